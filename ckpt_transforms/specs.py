"""Spec types shared by model maps and the planner, and the generic layer-stacking layout.

A family map is a short table over *one decoder layer* (plus a few global params). Whether
layers are scanned is not written per family: `expand_targets` turns the same table into either
one stacked array per param (layer axis at MaxText's `param_scan_axis`) or one array per layer.

Models whose layers are not all alike declare layer groups (DeepSeek: `dense_layers` then
`moe_layers`, each with its own table and MaxText container) and, for MaxText's scannable blocks
with an inhomogeneous layer cycle (GPT-OSS), a cycle: scanned, group layer i goes to the
sub-stack `layers_{i % cycle}`; unscanned, every layer is its own `<container>_<position>`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from ckpt_transforms.ops import Op, chain_output_shape

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
    """

    target: str
    hf_key: str
    source_shape: tuple[int, ...]
    ops: tuple[Op, ...] = ()
    experts: int = 0
    aux: tuple[Aux, ...] = ()

    @property
    def slab_shape(self) -> tuple[int, ...]:
        return chain_output_shape(self.source_shape, self.ops)


@dataclass(frozen=True)
class LayerGroup:
    """Decoder layers sharing one rule table and one MaxText container.

    container: e.g. "decoder/layers" or "decoder/moe_layers".
    layers:    HF layer indices, in MaxText's order (position i is `<container>_<i>` unscanned).
    cycle:     >1 for MaxText's scannable blocks of an inhomogeneous layer cycle: scanned,
               the group becomes `cycle` stacks `<container>/<cycle_name>_<b>` of layers[b::cycle].
    """

    container: str
    layers: tuple[int, ...]
    rules: tuple[ParamRule, ...]
    cycle: int = 1
    cycle_name: str = "layers"

    def scan_stacks(self) -> list[tuple[str, tuple[int, ...]]]:
        """(container, HF layers) of each scanned stack."""
        if self.cycle == 1:
            return [(self.container, self.layers)]
        if len(self.layers) % self.cycle:
            raise ValueError(
                f"{self.container}: {len(self.layers)} layers do not fill whole {self.cycle}-layer cycles, "
                "so they cannot be scanned (MaxText scans num_layers / cycle blocks); use --scan_layers=false"
            )
        return [(f"{self.container}/{self.cycle_name}_{b}", self.layers[b :: self.cycle]) for b in range(self.cycle)]


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
    """Scanned stack over `layers` (position None), or the unscanned layer at `position`."""
    slab = rule.slab_shape
    per_layer = ((rule.experts,) if rule.experts else ()) + slab
    expert_axes = (0,) if rule.experts else ()
    experts = range(rule.experts) if rule.experts else [None]
    if position is None:
        shape = per_layer[:PARAM_SCAN_AXIS] + (len(layers),) + per_layer[PARAM_SCAN_AXIS:]
        keys = [{"expert": e, "layer": layer} for e in experts for layer in layers]
        path = PARAMS_PREFIX + _split(container) + _split(rule.target)
        return _target(rule, path, shape, expert_axes + (PARAM_SCAN_AXIS,), keys)
    (layer,) = layers
    parent, last = _split(container)[:-1], _split(container)[-1]
    path = PARAMS_PREFIX + parent + (f"{last}_{position}",) + _split(rule.target)
    return _target(rule, path, per_layer, expert_axes, [{"expert": e, "layer": layer} for e in experts])


def expand_targets(model_map: ModelMap, scan_layers: bool) -> list[TargetParam]:
    """The full list of MaxText leaves for a map, scanned or one array per layer."""
    targets = [_global_target(r) for r in model_map.global_rules]
    for group in model_map.groups():
        for rule in group.rules:
            if scan_layers:
                targets.extend(_layer_target(rule, c, layers, None) for c, layers in group.scan_stacks() if layers)
            else:
                targets.extend(_layer_target(rule, group.container, [hf], i) for i, hf in enumerate(group.layers))
    names = [t.name for t in targets]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"model map {model_map.family!r} defines {dup[0]!r} twice")
    return targets


def nbytes(shape: Sequence[int], itemsize: int) -> int:
    return math.prod(shape) * itemsize
