"""The export plan (Orbax -> Hugging Face safetensors): pure data, from checkpoint metadata only.

The same model map that drives a conversion is read backwards: every MaxText leaf (a
`TargetParam`) holds one HF tensor per slab (layer, expert), and the inverse of its op chain
turns a slab back into that tensor. Several leaves may feed one HF tensor (GPT-OSS's wi_0/wi_1
halves of gate_up_proj, Gemma4's fused experts): they are planned together.

Work items follow the Orbax chunks. TensorStore decodes a chunk whole whatever part of it is
read, and a scanned leaf's chunk holds every layer, so an item covering one HF tensor would
decode each chunk once per layer. An item therefore reads a union of whole chunks of its
leaves (all leaves of a fused group share the region), cut as the budget needs: first along the
stacking axes (experts, then layers), then along the axis that becomes the HF tensor's rows
(contiguous bytes), then any other axis the inverse ops map to one range of the HF tensor
(strided writes). A region never splits a chunk, so when one chunk alone is over the budget the
item holds that one decoded chunk (`Plan.oversized_chunks` says so).

Every HF tensor's shard, the shard's header and each tensor's byte offset are fixed here
(`safetensors_io.layout`); an item's outputs are boxes of HF tensors, written into their
planned byte ranges.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ckpt_transforms.orbax_io.reader import Checkpoint, LeafMeta
from ckpt_transforms.planning.convert_plan import PlanError, largest_fitting, select_targets
from ckpt_transforms.planning.specs import ModelMap, TargetParam, expand_targets
from ckpt_transforms.safetensors_io.layout import (
    DEFAULT_MAX_SHARD_SIZE,
    ShardLayout,
    TensorSpec,
    plan_shards,
)
from ckpt_transforms.tensors import dtypes
from ckpt_transforms.tensors.ops import Op, PlaceInAxis, PutEvery, chain_output_shape, invert_chain, split_decode

DEFAULT_MAX_ITEM_BYTES = 256 * 2**20
ST_NAMES = {"bfloat16": "BF16", "float32": "F32", "float16": "F16"}
Range = tuple[int, int]


@dataclass(frozen=True)
class Piece:
    """One slab (one stack index) of a leaf region, turned into (a box of) one HF tensor.

    `index` selects the slab inside the item's region (local: stack axes are ints); `ops` are
    the inverse ops fitted to this part; a trailing PutEvery/PlaceInAxis is not run but says
    where in the output box this piece goes (the halves of a fused tensor)."""

    hf_key: str
    index: tuple[int | Range, ...]
    ops: tuple[Op, ...]


@dataclass(frozen=True)
class LeafRead:
    """A union of whole chunks of one leaf, read once by an item."""

    leaf: str  # canonical name (params.params....)
    disk_name: str
    region: tuple[Range, ...]
    dtype: str  # stored dtype


@dataclass(frozen=True)
class Output:
    """A box of one HF tensor an item writes, and the pieces (per read) that fill it."""

    hf_key: str
    box: tuple[Range, ...]
    pieces: tuple[tuple[int, Piece], ...]  # (index into the item's reads, piece)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in self.box)


@dataclass(frozen=True)
class ExportItem:
    item_id: int
    reads: tuple[LeafRead, ...]
    outputs: tuple[Output, ...]
    weight_dtype: str

    @property
    def label(self) -> str:
        return self.reads[0].leaf if len(self.reads) == 1 else " + ".join(r.leaf for r in self.reads)

    @property
    def bytes_read(self) -> int:
        return sum(math.prod(b - a for a, b in r.region) * np.dtype(r.dtype).itemsize for r in self.reads)

    @property
    def bytes_written(self) -> int:
        return sum(math.prod(o.shape) for o in self.outputs) * np.dtype(self.weight_dtype).itemsize

    @property
    def working_bytes(self) -> int:
        """Peak bytes: every region decoded (plus its cast copy), one output box and one piece's
        op output in flight (outputs are written one at a time)."""
        w = np.dtype(self.weight_dtype).itemsize
        regions = sum(
            math.prod(b - a for a, b in r.region)
            * (np.dtype(r.dtype).itemsize + (w if r.dtype != self.weight_dtype else 0))
            for r in self.reads
        )
        largest = max((math.prod(o.shape) for o in self.outputs), default=0) * w
        return regions + 3 * largest


@dataclass
class ExportPlan:
    family: str
    scan_layers: bool
    weight_dtype: str
    max_item_bytes: int
    shards: list[ShardLayout]
    items: list[ExportItem]
    params: int
    hf_tensors: int
    oversized_chunks: list[str] = field(default_factory=list)
    only: tuple[str, ...] = ()

    def shard_of(self) -> dict[str, ShardLayout]:
        return {t.key: s for s in self.shards for t in s.tensors}

    def summary(self) -> dict:
        largest = max(self.items, key=lambda i: i.working_bytes) if self.items else None
        return {
            "family": self.family,
            "scan_layers": self.scan_layers,
            "weight_dtype": self.weight_dtype,
            "params": self.params,
            "hf_tensors": self.hf_tensors,
            "shards": len(self.shards),
            "work_items": len(self.items),
            "bytes_read": sum(i.bytes_read for i in self.items),
            "bytes_written": sum(s.size for s in self.shards),
            "largest_item_bytes": largest.working_bytes if largest else 0,
            "largest_item": largest.label if largest else None,
            "max_item_bytes": self.max_item_bytes,
            "oversized_chunks": len(self.oversized_chunks),
            "only": list(self.only),
        }


def weight_dtype_of(checkpoint: Checkpoint) -> str:
    """The checkpoint's own dtype: the floating dtype holding most of its bytes (its save dtype;
    a bf16 Gemma checkpoint's float32 norm leaves do not change it)."""
    totals: dict[str, int] = {}
    for leaf in checkpoint.leaves.values():
        if np.issubdtype(np.dtype(leaf.dtype), np.floating) or leaf.dtype == "bfloat16":
            totals[leaf.dtype] = totals.get(leaf.dtype, 0) + leaf.nbytes
    if not totals:
        raise PlanError(f"{checkpoint.items_dir}: no floating-point parameters")
    return max(totals, key=totals.get)


def _placement(ops: tuple[Op, ...]) -> tuple[tuple[Op, ...], Op | None]:
    if ops and isinstance(ops[-1], PutEvery | PlaceInAxis):
        return ops[:-1], ops[-1]
    return ops, None


def fit_chain(
    ops: tuple[Op, ...], shape: tuple[int, ...], part: tuple[Range, ...]
) -> tuple[tuple[Op, ...], tuple[Range, ...]] | None:
    """The ops to run on `part` of an array of `shape`, and the box of the whole result that
    their output is; None if some partial axis does not map to one range."""
    fitted = []
    box = list(part)
    shape = tuple(shape)
    for op in ops:
        out_shape = op.output_shape(shape)
        new_box = [(0, n) for n in out_shape]
        cur = op
        for axis, rng in enumerate(box):
            if rng == (0, shape[axis]):
                continue
            mapped = op.map_range(axis, shape, rng)
            if mapped is None:
                return None
            new_box[mapped[0]] = mapped[1]
            cur = cur.for_part(axis, shape, rng)
        fitted.append(cur)
        shape, box = out_shape, new_box
    return tuple(fitted), tuple(box)


@dataclass(frozen=True)
class _Group:
    """Leaves planned together (they feed the same HF tensors), with their inverse chains."""

    targets: tuple[TargetParam, ...]
    leaves: tuple[LeafMeta, ...]


def _groups(targets: list[TargetParam], leaves: dict[str, LeafMeta]) -> list[_Group]:
    """Connected leaves: two targets are one group when they share an HF key."""
    owner: dict[str, int] = {}
    parent = list(range(len(targets)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, t in enumerate(targets):
        for key in t.hf_keys:
            if key in owner:
                parent[find(i)] = find(owner[key])
            else:
                owner[key] = i
    members: dict[int, list[int]] = {}
    for i in range(len(targets)):
        members.setdefault(find(i), []).append(i)
    groups = []
    for idx in members.values():
        ts = tuple(targets[i] for i in idx)
        first = ts[0]
        for t in ts[1:]:
            if t.shape != first.shape or t.stack_axes != first.stack_axes or t.hf_keys != first.hf_keys:
                raise PlanError(f"{first.name} and {t.name} feed the same HF tensors but are not stacked alike")
        groups.append(_Group(ts, tuple(leaves[t.name] for t in ts)))
    return groups


def _slab_axes(t: TargetParam) -> list[int]:
    return [a for a in range(len(t.shape)) if a not in t.stack_axes]


def _inverse(t: TargetParam) -> tuple[Op, ...]:
    decoder, ops = split_decode(t.ops)
    if decoder is not None:
        raise PlanError(f"{t.name}: the export map must read unquantized tensors (no Decode op)")
    return invert_chain(ops)


def _cut_order(group: _Group) -> list[int]:
    """Axes an item may cut, in order of preference: stack axes (outer first), the axis that
    becomes the HF tensor's rows, then other axes that map to one range of the HF tensor."""
    t = group.targets[0]
    slab_axes = _slab_axes(t)
    rows, others = [], []
    for i, axis in enumerate(slab_axes):
        size = t.shape[axis]
        if size < 2:
            continue
        part = tuple((0, 1) if j == i else (0, t.shape[a]) for j, a in enumerate(slab_axes))
        fits = [fit_chain(_placement(_inverse(x))[0], t.slab_shape, part) for x in group.targets]
        if any(f is None for f in fits):
            continue
        (rows if fits[0][1][0] != (0, t.source_shape[0]) else others).append(axis)
    return list(t.stack_axes) + rows + others


def _granularity(group: _Group) -> list[int]:
    """Per axis, the size of whole-chunk steps every leaf of the group agrees on."""
    shape = group.targets[0].shape
    return [min(n, math.lcm(*(leaf.chunk_shape[a] for leaf in group.leaves))) or 1 for a, n in enumerate(shape)]


def _item_cost(group: _Group, extent: Sequence[int], weight: np.dtype) -> int:
    t = group.targets[0]
    elems = math.prod(extent)
    regions = sum(
        elems * (np.dtype(leaf.dtype).itemsize + (weight.itemsize if np.dtype(leaf.dtype) != weight else 0))
        for leaf in group.leaves
    )
    slab = math.prod(extent[a] for a in _slab_axes(t)) * weight.itemsize
    return regions + 3 * slab


def _regions(group: _Group, budget: int, weight: np.dtype) -> tuple[list[tuple[Range, ...]], bool]:
    """Item regions (boxes of whole chunks) for a group, and whether one exceeds the budget."""
    shape = list(group.targets[0].shape)
    gran = _granularity(group)
    extent = list(shape)
    for axis in _cut_order(group):
        if _item_cost(group, extent, weight) <= budget:
            break

        def fits(v: int, axis: int = axis) -> bool:
            return _item_cost(group, extent[:axis] + [v] + extent[axis + 1 :], weight) <= budget

        extent[axis] = largest_fitting(shape[axis], fits, gran[axis])
    # A region is a union of whole chunks along every axis it cuts.
    extent = [e if e == n else max(g, e - e % g) for e, n, g in zip(extent, shape, gran, strict=True)]
    grid = [range(0, n, e) if n else range(1) for n, e in zip(shape, extent, strict=True)]
    regions = [
        tuple((s, min(s + e, n)) for s, e, n in zip(starts, extent, shape, strict=True))
        for starts in itertools.product(*grid)
    ]
    return regions, _item_cost(group, extent, weight) > budget


def _outputs_for_region(group: _Group, region: tuple[Range, ...]) -> list[Output]:
    """The HF boxes one region of a group fills, each with its pieces (one per leaf)."""
    t0 = group.targets[0]
    slab_axes = _slab_axes(t0)
    part = tuple(region[a] for a in slab_axes)
    by_key: dict[str, tuple[tuple[Range, ...], list]] = {}
    stack_ranges = [range(*region[a]) for a in t0.stack_axes]
    for stack_index in itertools.product(*stack_ranges):
        for read_index, t in enumerate(group.targets):
            key = t.hf_key_at(stack_index)
            ops, place = _placement(_inverse(t))
            fitted = fit_chain(ops, t.slab_shape, part)
            if fitted is None:
                raise PlanError(f"{t.name}: region {region} does not map to one box of {key}")
            ops_fit, box = fitted
            if place is not None:
                box = _placed_box(place, box, chain_output_shape(t.slab_shape, ops), key)
            if any(b <= a for a, b in box):
                continue  # wholly in a padding the HF tensor does not have (vocab rows)
            index: list = []
            for axis, (a, _) in enumerate(region):
                if axis in t.stack_axes:
                    index.append(stack_index[t.stack_axes.index(axis)] - a)
                else:
                    index.append((0, region[axis][1] - region[axis][0]))
            piece = Piece(key, tuple(index), ops_fit + ((place,) if place is not None else ()))
            prev = by_key.setdefault(key, (box, []))
            if prev[0] != box:
                raise PlanError(f"{key}: {t.name} and another leaf fill different boxes {prev[0]} / {box}")
            prev[1].append((read_index, piece))
    return [Output(k, box, tuple(pieces)) for k, (box, pieces) in by_key.items()]


def _placed_box(place: Op, box: tuple[Range, ...], shape: tuple[int, ...], key: str) -> tuple[Range, ...]:
    """The box in the fused HF tensor that one of its parts (PutEvery/PlaceInAxis) fills: the
    whole fused axis (the part's positions along it are spread over all of it)."""
    axis = place.axis % len(shape)
    if box[axis] != (0, shape[axis]):
        raise PlanError(f"{key}: a region may not cut the axis its parts are fused along")
    return box[:axis] + ((0, place.output_shape(shape)[axis]),) + box[axis + 1 :]


def _check_leaves(targets: list[TargetParam], checkpoint: Checkpoint, family: str, scan_layers: bool) -> None:
    """Every target must be in the checkpoint with the shape the config implies, and every
    parameter of the checkpoint must be a target (else the config or --model is wrong)."""
    names = {t.name for t in targets}
    missing = [t for t in targets if t.name not in checkpoint.leaves]
    if missing:
        raise PlanError(
            f"{checkpoint.items_dir}: {len(missing)} param(s) the {family} map expects "
            f"(scan_layers={scan_layers}) are missing, e.g. {missing[0].name} {list(missing[0].shape)}"
        )
    for t in targets:
        leaf = checkpoint.leaves[t.name]
        if leaf.shape != t.shape:
            raise PlanError(
                f"{checkpoint.items_dir}: {t.name} has shape {list(leaf.shape)}, but the HF config implies "
                f"{list(t.shape)} (the config contradicts the checkpoint: check layers, widths, heads, experts, vocab)"
            )
        kind = np.dtype(leaf.dtype)
        if not (np.issubdtype(kind, np.floating) or leaf.dtype == "bfloat16"):
            raise PlanError(f"{checkpoint.items_dir}: {t.name} has dtype {leaf.dtype}; expected a floating dtype")
    extra = sorted(set(checkpoint.leaves) - names)
    if extra:
        raise PlanError(
            f"{checkpoint.items_dir}: {len(extra)} param(s) are not part of the {family} map "
            f"(scan_layers={scan_layers}), e.g. {extra[0]} (wrong --hf_config / --model, or another layout)"
        )


def build_export_plan(
    checkpoint: Checkpoint,
    model_map: ModelMap,
    scan_layers: bool,
    weight_dtype: str | None = None,
    max_item_bytes: int = DEFAULT_MAX_ITEM_BYTES,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    only: Sequence[str] = (),
) -> ExportPlan:
    """Check the checkpoint against the map, fix the shards' layout, cut bounded work items."""
    targets = expand_targets(model_map, scan_layers)
    _check_leaves(targets, checkpoint, model_map.family, scan_layers)
    weight_name = weight_dtype or weight_dtype_of(checkpoint)
    weight = dtypes.save_dtype(weight_name)
    groups = _groups(targets, checkpoint.leaves)
    if only:
        chosen = {t.name for t in select_targets(targets, only, f"the {model_map.family} map")}
        groups = [g for g in groups if any(t.name in chosen for t in g.targets)]
    tensors: dict[str, TensorSpec] = {}
    for g in groups:
        for key in g.targets[0].hf_keys:
            tensors[key] = TensorSpec(key, ST_NAMES[weight.name], tuple(g.targets[0].source_shape))
    shards = plan_shards(list(tensors.values()), max_shard_size)
    items: list[ExportItem] = []
    oversized: list[str] = []
    for g in groups:
        regions, over = _regions(g, max_item_bytes, weight)
        if over:
            oversized.append(g.targets[0].name)
        for region in regions:
            outputs = _outputs_for_region(g, region)
            if not outputs:
                continue
            reads = tuple(LeafRead(leaf.name, leaf.disk_name, region, leaf.dtype) for leaf in g.leaves)
            items.append(ExportItem(len(items), reads, tuple(outputs), weight.name))
    _check_coverage(items, tensors)
    return ExportPlan(
        model_map.family, scan_layers, weight.name, max_item_bytes, shards, items,
        params=sum(len(g.targets) for g in groups), hf_tensors=len(tensors), oversized_chunks=oversized,
        only=tuple(only),
    )  # fmt: skip


def _check_coverage(items: list[ExportItem], tensors: dict[str, TensorSpec]) -> None:
    """Every HF tensor is written whole by the items' boxes, each element once (boxes are
    disjoint by construction: regions partition each leaf)."""
    covered = dict.fromkeys(tensors, 0)
    for item in items:
        for out in item.outputs:
            covered[out.hf_key] += math.prod(out.shape)
    for key, spec in tensors.items():
        if covered[key] != math.prod(spec.shape):
            raise PlanError(f"internal: {key} is covered by {covered[key]} of {math.prod(spec.shape)} elements")
