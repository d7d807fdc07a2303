"""Spec types shared by model maps and the planner, and the generic layer-stacking layout.

A family map is a short table over *one decoder layer* (plus a few global params). Whether
layers are scanned is not written per family: `expand_targets` turns the same table into either
one stacked array per param (layer axis at MaxText's `param_scan_axis`) or one array per layer.
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
class ParamRule:
    """One MaxText param fed by one HF tensor per (expert, layer) slab.

    target:       MaxText path below the layer container (layer rules, e.g. "mlp/wi_0/kernel")
                  or below params/params (global rules, e.g. "token_embedder/embedding").
    hf_key:       HF key template; may use {layer} and {expert}.
    source_shape: the HF tensor's shape, derived from config.json (checked against headers).
    ops:          op chain from the HF tensor (cast to the save dtype) to one target slab.
    experts:      >0 stacks that many experts on axis 0 of the per-layer target.
    """

    target: str
    hf_key: str
    source_shape: tuple[int, ...]
    ops: tuple[Op, ...] = ()
    experts: int = 0

    @property
    def slab_shape(self) -> tuple[int, ...]:
        return chain_output_shape(self.source_shape, self.ops)


@dataclass(frozen=True)
class ModelMap:
    """What a family map returns for one config: global rules, per-layer rules, layer count."""

    family: str
    num_layers: int
    global_rules: tuple[ParamRule, ...]
    layer_rules: tuple[ParamRule, ...]
    layer_container: str = "decoder/layers"
    # Source tensors that may be present but feed no target (e.g. rotary caches, MTP layers).
    known_extras: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())


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

    def hf_key_at(self, stack_index: Sequence[int]) -> str:
        flat = 0
        for i, n in zip(stack_index, self.stack_sizes, strict=True):
            flat = flat * n + i
        return self.hf_keys[flat]


def _split(path: str) -> tuple[str, ...]:
    return tuple(p for p in path.split("/") if p)


def _global_target(rule: ParamRule) -> TargetParam:
    return TargetParam(
        PARAMS_PREFIX + _split(rule.target),
        rule.slab_shape,
        (),
        (rule.hf_key,),
        rule.source_shape,
        rule.ops,
    )


def _layer_target(rule: ParamRule, container: str, layers: list[int], scanned: bool) -> TargetParam:
    slab = rule.slab_shape
    per_layer = ((rule.experts,) if rule.experts else ()) + slab
    expert_axes = (0,) if rule.experts else ()
    experts = range(rule.experts) if rule.experts else [None]

    def key(expert: int | None, layer: int) -> str:
        return rule.hf_key.format(layer=layer, expert=expert)

    if scanned:
        shape = per_layer[:PARAM_SCAN_AXIS] + (len(layers),) + per_layer[PARAM_SCAN_AXIS:]
        keys = tuple(key(e, layer) for e in experts for layer in layers)
        path = PARAMS_PREFIX + _split(container) + _split(rule.target)
        return TargetParam(path, shape, expert_axes + (PARAM_SCAN_AXIS,), keys, rule.source_shape, rule.ops)
    (layer,) = layers
    parent, last = _split(container)[:-1], _split(container)[-1]
    path = PARAMS_PREFIX + parent + (f"{last}_{layer}",) + _split(rule.target)
    keys = tuple(key(e, layer) for e in experts)
    return TargetParam(path, per_layer, expert_axes, keys, rule.source_shape, rule.ops)


def expand_targets(model_map: ModelMap, scan_layers: bool) -> list[TargetParam]:
    """The full list of MaxText leaves for a map, scanned or one array per layer."""
    targets = [_global_target(r) for r in model_map.global_rules]
    all_layers = list(range(model_map.num_layers))
    for rule in model_map.layer_rules:
        if scan_layers:
            targets.append(_layer_target(rule, model_map.layer_container, all_layers, True))
        else:
            targets.extend(_layer_target(rule, model_map.layer_container, [i], False) for i in all_layers)
    names = [t.name for t in targets]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"model map {model_map.family!r} defines {dup[0]!r} twice")
    return targets


def nbytes(shape: Sequence[int], itemsize: int) -> int:
    return math.prod(shape) * itemsize
