"""Spec types shared by model maps and the planner, and the generic layer-stacking layout.

A family map is a short table over *one decoder layer* (plus a few global params). Whether
layers are scanned is not written per family: `expand_targets` turns the same table into either
one stacked array per param (layer axis at MaxText's `param_scan_axis`) or one array per layer.

Models whose layers are not all alike declare layer groups (DeepSeek: `dense_layers` then
`moe_layers`, each with its own table and MaxText container) and, for MaxText's scannable blocks
with an inhomogeneous layer cycle (GPT-OSS), a cycle: scanned, group layer i goes to the
sub-stack `layers_{i % cycle}`; unscanned, every layer is its own `<container>_<position>`.
Blocks whose sub-layers differ (Qwen3-Next: linear attention, then full attention every Nth
layer) add rules per cycle position; layers left over after the last whole cycle can go to an
unstacked remainder block (Gemma3's `layers_remainder`). A MaxText layer may also be built from
several HF layers (Gemma2 pairs a local and a global HF layer): a rule maps its group's layer
number n to the HF layer `n * layer_stride + layer_offset`. A scanned cycle may also nest a
scan inside the block scan (Gemma4: the five local layers of each block stack at axes 1 and 2,
the global one at axis 1), and a group may have no scanned form at all (Gemma4 E2B/E4B).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from ckpt_transforms.tensors.ops import Op, chain_output_shape

# MaxText's base.yml `param_scan_axis`: scanned stacks put the layer axis at axis 1.
PARAM_SCAN_AXIS = 1
PARAMS_PREFIX = ("params", "params")


@dataclass(frozen=True)
class Aux:
    """A further source tensor each slab reads next to its main one (e.g. FP8 scale_inv).

    hf_key:    key template, like the rule's main key.
    shape:     its shape, derived from config.json (checked against headers).
    row_block: main-tensor rows covered by one row of this tensor. A slab of main rows
               [r0, r1) reads rows [r0 // row_block, ceil(r1 / row_block)); the planner only
               cuts main rows at multiples of row_block, so a slab never starts mid-block.
    """

    hf_key: str
    shape: tuple[int, ...]
    row_block: int = 1


@dataclass(frozen=True)
class ParamRule:
    """One MaxText param fed by one HF tensor per (expert, layer) slab.

    target:       MaxText path below the layer container (layer rules, e.g. "mlp/wi_0/kernel")
                  or below params/params (global rules, e.g. "token_embedder/embedding").
    hf_key:       HF key template; may use {layer} and {expert}.
    source_shape: the HF tensor's shape, derived from config.json (checked against headers).
    ops:          op chain from the HF tensor (cast to the save dtype) to one target slab; with
                  `aux` tensors it starts with a Decode op that takes (main, *aux).
    experts:      >0 stacks that many experts on axis 0 of the per-layer target.
    aux:          further tensors per slab (quantization scales).
    layer_stride, layer_offset: {layer} in the keys is `n * layer_stride + layer_offset` for the
                  group's layer number n (Gemma2: MaxText layer n holds HF layers 2n and 2n+1).
    """

    target: str
    hf_key: str
    source_shape: tuple[int, ...]
    ops: tuple[Op, ...] = ()
    experts: int = 0
    aux: tuple[Aux, ...] = ()
    layer_stride: int = 1
    layer_offset: int = 0

    def hf_layer(self, n: int) -> int:
        return n * self.layer_stride + self.layer_offset

    @property
    def slab_shape(self) -> tuple[int, ...]:
        return chain_output_shape(self.source_shape, self.ops)


@dataclass(frozen=True)
class LayerGroup:
    """Decoder layers sharing one rule table and one MaxText container.

    container: e.g. "decoder/layers" or "decoder/moe_layers".
    layers:    layer numbers in MaxText's order (position i is `<container>_<i>` unscanned); a
               rule's {layer} is `rule.hf_layer(number)` (the HF layer index by default).
    cycle:     >1 for MaxText's scannable blocks of an inhomogeneous layer cycle: scanned,
               the group becomes `cycle` stacks `<container>/<cycle_name>_<b>` of layers[b::cycle].
    position_rules: per cycle position, rules only layers at that position have (added to
               `rules`; Qwen3-Next: linear-attention positions vs the full-attention one).
    remainder: where layers after the last whole cycle go when scanned, each unstacked as
               `<remainder>/<cycle_name>_<r>` (Gemma3's `decoder/layers_remainder`); None: the
               group must fill whole cycles to be scanned.
    slots:     how a scanned cycle is laid out, as (name, cycle positions) pairs; default one
               `<cycle_name>_<b>` per position. A slot of several positions is a scan nested in
               the block scan (Gemma4's `local_layers`: [block][position] stacked at
               param_scan_axis and the axis after it); its positions must share their rules.
    scan_container: the scanned blocks' container when it differs from the unscanned one
               (Gemma4: `decoder/scanned_blocks`, unscanned `decoder/layers_<i>`).
    first_index: unscanned, position i is `<container>_<first_index + i>` and its cycle position
               is (first_index + i) % cycle: a group continuing another one's numbering
               (Gemma4 E2B/E4B: the KV-shared layers after the others).
    unscannable: why MaxText has no scanned form of these layers ("" if it has one).
    """

    container: str
    layers: tuple[int, ...]
    rules: tuple[ParamRule, ...]
    cycle: int = 1
    cycle_name: str = "layers"
    position_rules: tuple[tuple[ParamRule, ...], ...] = ()
    remainder: str | None = None
    slots: tuple[tuple[str, tuple[int, ...]], ...] = ()
    scan_container: str | None = None
    first_index: int = 0
    unscannable: str = ""

    def __post_init__(self) -> None:
        if self.position_rules and len(self.position_rules) != self.cycle:
            raise ValueError(
                f"{self.container}: {len(self.position_rules)} position rule sets for a {self.cycle}-cycle"
            )
        if self.slots and sorted(p for _, ps in self.slots for p in ps) != list(range(self.cycle)):
            raise ValueError(f"{self.container}: slots {self.slots} do not cover the {self.cycle}-cycle once")
        for name, positions in self.slots:
            if len({self.rules_at(p) for p in positions}) != 1:
                raise ValueError(f"{self.container}: positions {positions} of slot {name!r} have different rules")

    def rules_at(self, position: int) -> tuple[ParamRule, ...]:
        """Rules of the layer at `position` in the group (its cycle position decides extras)."""
        extra = self.position_rules[(self.first_index + position) % self.cycle] if self.position_rules else ()
        return self.rules + extra

    def whole_cycles(self) -> int:
        """Layers in whole cycles (the scanned part)."""
        n = len(self.layers) - len(self.layers) % self.cycle
        if n != len(self.layers) and self.remainder is None:
            raise ValueError(
                f"{self.container}: {len(self.layers)} layers do not fill whole {self.cycle}-layer cycles, "
                "so they cannot be scanned (MaxText scans num_layers / cycle blocks); use --scan_layers=false"
            )
        return n

    def scan_stacks(self) -> list[tuple[str, tuple, tuple[ParamRule, ...]]]:
        """(container, layer numbers, rules) of each scanned stack; a nested slot's layer numbers
        are one tuple per block."""
        if self.unscannable:
            raise ValueError(f"{self.container}: {self.unscannable}; use --scan_layers=false")
        container = self.scan_container or self.container
        if self.cycle == 1 and not self.position_rules:
            return [(container, self.layers, self.rules)]
        scanned = self.layers[: self.whole_cycles()]
        blocks = [scanned[i : i + self.cycle] for i in range(0, len(scanned), self.cycle)]
        slots = self.slots or tuple((f"{self.cycle_name}_{b}", (b,)) for b in range(self.cycle))
        stacks = []
        for name, positions in slots:
            if len(positions) == 1:
                layers: tuple = tuple(block[positions[0]] for block in blocks)
            else:
                layers = tuple(tuple(block[p] for p in positions) for block in blocks)
            stacks.append((f"{container}/{name}", layers, self.rules_at(positions[0])))
        return stacks

    def remainder_layers(self) -> list[tuple[str, int, tuple[ParamRule, ...]]]:
        """(container, layer number, rules) of each unstacked remainder layer when scanned."""
        n = self.whole_cycles()
        return [
            (f"{self.remainder}/{self.cycle_name}_{r}", layer, self.rules_at(n + r))
            for r, layer in enumerate(self.layers[n:])
        ]


@dataclass(frozen=True)
class ModelMap:
    """What a family map returns for one config: global rules, per-layer rules, layer count.

    Homogeneous decoders give `num_layers` + `layer_rules` (one group in `layer_container`);
    others give `layer_groups`, which then take precedence.
    """

    family: str
    num_layers: int
    global_rules: tuple[ParamRule, ...]
    layer_rules: tuple[ParamRule, ...]
    layer_container: str = "decoder/layers"
    # Source tensors that may be present but feed no target (e.g. rotary caches, MTP layers).
    known_extras: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())
    layer_groups: tuple[LayerGroup, ...] = ()
    # (prefix in the rules, prefixes a checkpoint may use instead): the planner reads a key under
    # the first spelling the checkpoint has (Gemma3: `language_model.model.` as save_pretrained
    # writes it, or MaxText's `model.language_model.`).
    key_aliases: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def groups(self) -> tuple[LayerGroup, ...]:
        if self.layer_groups:
            return self.layer_groups
        return (LayerGroup(self.layer_container, tuple(range(self.num_layers)), self.layer_rules),)


@dataclass(frozen=True)
class TargetParam:
    """One leaf of the MaxText tree and where each of its slabs comes from.

    `stack_axes` are the target axes that index slabs (outer first); `hf_keys` lists one HF key
    per slab in C order over those axes. Removing the stack axes from `shape` gives the shape of
    one slab (`slab_shape`).
    """

    path: tuple[str, ...]
    shape: tuple[int, ...]
    stack_axes: tuple[int, ...]
    hf_keys: tuple[str, ...]
    source_shape: tuple[int, ...]
    ops: tuple[Op, ...]
    # With aux tensors: their specs, and per slab (same order as hf_keys) one key per aux.
    aux: tuple[Aux, ...] = ()
    aux_keys: tuple[tuple[str, ...], ...] = ()

    @property
    def name(self) -> str:
        """Orbax's key for the leaf: tree path joined by '.'."""
        return ".".join(self.path)

    @property
    def slab_shape(self) -> tuple[int, ...]:
        return tuple(d for i, d in enumerate(self.shape) if i not in self.stack_axes)

    @property
    def stack_sizes(self) -> tuple[int, ...]:
        return tuple(self.shape[a] for a in self.stack_axes)

    def _flat(self, stack_index: Sequence[int]) -> int:
        flat = 0
        for i, n in zip(stack_index, self.stack_sizes, strict=True):
            flat = flat * n + i
        return flat

    def hf_key_at(self, stack_index: Sequence[int]) -> str:
        return self.hf_keys[self._flat(stack_index)]

    def aux_keys_at(self, stack_index: Sequence[int]) -> tuple[str, ...]:
        return self.aux_keys[self._flat(stack_index)] if self.aux else ()


def _split(path: str) -> tuple[str, ...]:
    return tuple(p for p in path.split("/") if p)


def _target(
    rule: ParamRule, path: tuple[str, ...], shape: tuple[int, ...], stack_axes: tuple[int, ...], slab_keys: list
) -> TargetParam:
    """`slab_keys`: per slab, the format arguments of its key templates ({layer}, {expert})."""
    keys = tuple(rule.hf_key.format(**k) for k in slab_keys)
    aux_keys = tuple(tuple(a.hf_key.format(**k) for a in rule.aux) for k in slab_keys) if rule.aux else ()
    return TargetParam(path, shape, stack_axes, keys, rule.source_shape, rule.ops, rule.aux, aux_keys)


def _global_target(rule: ParamRule) -> TargetParam:
    return _target(rule, PARAMS_PREFIX + _split(rule.target), rule.slab_shape, (), [{}])


def _layer_target(rule: ParamRule, container: str, layers: Sequence[int], position: int | None) -> TargetParam:
    """Scanned stack over `layers` (position None), the unscanned layer at `position`, or (position
    -1) one unstacked layer directly under `container` (a remainder layer)."""
    slab = rule.slab_shape
    per_layer = ((rule.experts,) if rule.experts else ()) + slab
    expert_axes = (0,) if rule.experts else ()
    experts = range(rule.experts) if rule.experts else [None]
    if position is None and layers and isinstance(layers[0], tuple):
        # A scan nested in the block scan: [block][position] at param_scan_axis and the next axis.
        blocks, inner = len(layers), len(layers[0])
        shape = per_layer[:PARAM_SCAN_AXIS] + (blocks, inner) + per_layer[PARAM_SCAN_AXIS:]
        keys = [{"expert": e, "layer": rule.hf_layer(n)} for e in experts for block in layers for n in block]
        path = PARAMS_PREFIX + _split(container) + _split(rule.target)
        return _target(rule, path, shape, expert_axes + (PARAM_SCAN_AXIS, PARAM_SCAN_AXIS + 1), keys)
    if position is None:
        shape = per_layer[:PARAM_SCAN_AXIS] + (len(layers),) + per_layer[PARAM_SCAN_AXIS:]
        keys = [{"expert": e, "layer": rule.hf_layer(layer)} for e in experts for layer in layers]
        path = PARAMS_PREFIX + _split(container) + _split(rule.target)
        return _target(rule, path, shape, expert_axes + (PARAM_SCAN_AXIS,), keys)
    (layer,) = layers
    if position < 0:
        path = PARAMS_PREFIX + _split(container) + _split(rule.target)
    else:
        parent, last = _split(container)[:-1], _split(container)[-1]
        path = PARAMS_PREFIX + parent + (f"{last}_{position}",) + _split(rule.target)
    keys = [{"expert": e, "layer": rule.hf_layer(layer)} for e in experts]
    return _target(rule, path, per_layer, expert_axes, keys)


def _group_targets(group: LayerGroup, scan_layers: bool) -> list[TargetParam]:
    targets = []
    if scan_layers:
        stacks = group.scan_stacks()
        # Shared rules first, stack by stack (the order every homogeneous family always had).
        for rule in group.rules:
            targets.extend(_layer_target(rule, c, layers, None) for c, layers, _ in stacks if layers)
        for c, layers, rules in stacks:
            if layers:
                targets.extend(_layer_target(r, c, layers, None) for r in rules[len(group.rules) :])
        for c, layer, rules in group.remainder_layers():
            targets.extend(_layer_target(r, c, [layer], -1) for r in rules)
        return targets
    first = group.first_index
    for rule in group.rules:
        targets.extend(_layer_target(rule, group.container, [n], first + i) for i, n in enumerate(group.layers))
    for i, n in enumerate(group.layers):
        extra = group.rules_at(i)[len(group.rules) :]
        targets.extend(_layer_target(r, group.container, [n], first + i) for r in extra)
    return targets


def expand_targets(model_map: ModelMap, scan_layers: bool) -> list[TargetParam]:
    """The full list of MaxText leaves for a map, scanned or one array per layer."""
    targets = [_global_target(r) for r in model_map.global_rules]
    for group in model_map.groups():
        targets.extend(_group_targets(group, scan_layers))
    names = [t.name for t in targets]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"model map {model_map.family!r} defines {dup[0]!r} twice")
    return targets


def nbytes(shape: Sequence[int], itemsize: int) -> int:
    return math.prod(shape) * itemsize
