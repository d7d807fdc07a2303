"""The conversion plan: pure, serializable data built from headers only.

A plan is a list of work items. Each names one region of one target array (a union of whole
zarr3 chunks, so no two items ever write the same chunk), the exact source byte ranges that
fill it, and the op chain. Items are sized so their working set stays under `max_item_bytes`.

A slab may read further tensors next to its main one (`Slab.aux`, e.g. an FP8 weight's
scale_inv rows): a quantized source is dequantized inside the work item, in one pass.

A target whose rows outnumber its source's (a zero-padded vocabulary) or the other way round (a
truncated one) is still cut along rows: an item reads only the source rows that exist inside its
region and pads its slab with zeros to the region's height (a region wholly in the padding reads
one row and drops it: no item ever issues an empty read).

A leaf is stored in the dtype its op chain produces from the save dtype (Gemma's `scale + 1` is
float32 even when saving bf16, as in MaxText); such an item still casts its source to the save
dtype first (a leading RoundOnce), then computes, exactly as MaxText does.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ckpt_transforms.planning.specs import PARAMS_PREFIX, ModelMap, TargetParam, expand_targets
from ckpt_transforms.safetensors_io.index import SourceModel, TensorInfo
from ckpt_transforms.tensors import dtypes
from ckpt_transforms.tensors.ops import (
    Op,
    PadAxis,
    RoundOnce,
    Transpose,
    TruncateAxis,
    chain_map_axis,
    chain_output_dtype,
    split_decode,
)

DEFAULT_MAX_ITEM_BYTES = 256 * 2**20
# Items are planned at up to 1/ITEMS_OVERLAPPED of --max_item_bytes, so a worker can read and
# transform one while TensorStore encodes and commits the other, all within the budget; an item
# that cannot be cut that small without multiplying the items (one slab's decode scratch) gets the
# whole budget and runs alone (see `choose_item_chunk`).
ITEMS_OVERLAPPED = 2
FLOAT_SOURCE_DTYPES = ("BF16", "F16", "F32", "F64")


class PlanError(ValueError):
    """The source does not match what the model map expects (message names key and file)."""


@dataclass(frozen=True)
class Slab:
    """One source read, transformed by the op chain, placed at `dest` inside the item's region.

    `dest` has one entry per target axis: an int (a stack axis, dropped on assignment) or a
    (start, stop) pair local to the region. `aux` are further reads the chain's Decode op
    combines with `source` (e.g. the scale rows matching the weight rows).
    """

    source: TensorInfo
    dest: tuple[int | tuple[int, int], ...]
    aux: tuple[TensorInfo, ...] = ()

    @property
    def bytes_read(self) -> int:
        return self.source.length + sum(a.length for a in self.aux)


@dataclass(frozen=True)
class WorkItem:
    item_id: int
    param: str
    region: tuple[tuple[int, int], ...]
    slabs: tuple[Slab, ...]
    ops: tuple[Op, ...]
    save_dtype: str

    @property
    def region_shape(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in self.region)

    @property
    def bytes_read(self) -> int:
        return sum(s.bytes_read for s in self.slabs)

    @property
    def bytes_written(self) -> int:
        return math.prod(self.region_shape) * np.dtype(self.save_dtype).itemsize


@dataclass(frozen=True)
class ArrayPlan:
    """A target leaf as it will be stored: shape, dtype and zarr3 chunk shape."""

    name: str
    path: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str
    chunk_shape: tuple[int, ...]


@dataclass
class Plan:
    family: str
    scan_layers: bool
    save_dtype: str
    max_item_bytes: int
    arrays: list[ArrayPlan]
    items: list[WorkItem]
    unused_source_keys: list[str] = field(default_factory=list)
    # --only: the patterns that selected `arrays`, and how many params the whole model has.
    only: tuple[str, ...] = ()
    params_total: int | None = None
    # What the summary says about the embedding's rows (model_maps.vocab_summary; set by the
    # commands, which know the family and --model; empty: nothing to say).
    vocab: dict = field(default_factory=dict)

    def summary(self) -> dict:
        largest = max(self.items, key=item_working_bytes) if self.items else None
        return {
            "family": self.family,
            "scan_layers": self.scan_layers,
            "save_dtype": self.save_dtype,
            "params": len(self.arrays),
            "params_total": len(self.arrays) if self.params_total is None else self.params_total,
            "only": list(self.only),
            "work_items": len(self.items),
            "bytes_read": sum(i.bytes_read for i in self.items),
            "bytes_written": sum(i.bytes_written for i in self.items),
            "largest_item_bytes": item_working_bytes(largest) if largest else 0,
            "largest_item": largest.param if largest else None,
            "max_item_bytes": self.max_item_bytes,
            "unused_source_keys": len(self.unused_source_keys),
            "vocab": dict(self.vocab),
        }


def slab_working_bytes(
    source_bytes: int, target_bytes: int, decode_bytes: int = 0, cast_bytes: int | None = None
) -> int:
    """Peak bytes to turn one source read into a target slab: raw bytes (all inputs), the
    decoder's scratch (dequantized float32 and its rounded copy), the cast copy of the whole
    decoded slab (`cast_bytes`; the target size unless ops drop elements, like taking one half
    of a fused tensor), and the op output."""
    return source_bytes + decode_bytes + (target_bytes if cast_bytes is None else cast_bytes) + target_bytes


def decoded_elements(ops: tuple[Op, ...], source_shape: tuple[int, ...]) -> int:
    """Elements of a slab after decoding and before the rest of the ops (what gets cast)."""
    decoder, _ = split_decode(ops)
    return math.prod(decoder.output_shape(source_shape) if decoder else source_shape)


def chain_copies(ops: tuple[Op, ...]) -> bool:
    """Whether the ops after decoding make a new array. Transposes are views, which the executor
    copies straight into the region, so a chain of only those costs no slab-sized copy."""
    _, rest = split_decode(ops)
    return any(not isinstance(op, Transpose) for op in rest)


def slab_casts(ops: tuple[Op, ...], source_dtype: str, save_dtype: str) -> bool:
    """Whether the executor casts the slab (a copy): after decoding, or when the source dtype is
    not the save dtype (a bf16 source saved as bf16 is used as read)."""
    decoder, _ = split_decode(ops)
    return decoder is not None or dtypes.numpy_dtype(source_dtype) != np.dtype(save_dtype)


def region_working_bytes(region_bytes: int, largest_slab_bytes: int) -> int:
    """Peak bytes of one work item: while slabs are assembled, the region buffer plus the largest
    slab in flight; while writing, the region and TensorStore's staged copy of it; while
    committing, that copy and its encoded (zstd) output, which is at most as large."""
    return max(region_bytes + largest_slab_bytes, 2 * region_bytes)


def item_working_bytes(item: WorkItem) -> int:
    """Peak bytes of the item (see `region_working_bytes`); slabs are assembled one at a time."""
    itemsize = np.dtype(item.save_dtype).itemsize
    decoder, _ = split_decode(item.ops)
    copies = chain_copies(item.ops)
    per_slab = []
    for s in item.slabs:
        decoded = decoded_elements(item.ops, s.source.shape)
        scratch = decoder.scratch_bytes(decoded) if decoder else 0
        target = math.prod(_dest_shape(s.dest)) * itemsize if copies else 0
        cast = decoded * itemsize if slab_casts(item.ops, s.source.dtype, item.save_dtype) else 0
        per_slab.append(slab_working_bytes(s.bytes_read, target, scratch, cast))
    return region_working_bytes(item.bytes_written, max(per_slab, default=0))


def _dest_shape(dest: tuple) -> tuple[int, ...]:
    return tuple(d[1] - d[0] for d in dest if not isinstance(d, int))


def _check_source(
    target: TargetParam,
    key: str,
    info: TensorInfo | None,
    shape: tuple[int, ...],
    allowed: tuple[str, ...] | None,
    main_key: str | None = None,
) -> None:
    """`allowed` None: any float dtype (a plain source); else the Decode op's input dtypes."""
    role = f" (read with {main_key!r})" if main_key else ""
    if info is None:
        raise PlanError(f"source tensor {key!r}{role} (for {target.name}) is missing from the checkpoint")
    if info.shape != shape:
        raise PlanError(
            f"source tensor {key!r} in {info.file} has shape {list(info.shape)}, "
            f"expected {list(shape)} from config.json (for {target.name})"
        )
    if allowed is None and info.dtype not in FLOAT_SOURCE_DTYPES:
        raise PlanError(
            f"source tensor {key!r} in {info.file} has dtype {info.dtype}; expected one of "
            f"{', '.join(FLOAT_SOURCE_DTYPES)} (quantized sources need a quantization_config)"
        )
    if allowed is not None and info.dtype not in allowed:
        raise PlanError(
            f"source tensor {key!r} in {info.file} has dtype {info.dtype}; the model's "
            f"quantization_config implies {' or '.join(allowed)} (for {target.name})"
        )


def _check_target_sources(target: TargetParam, tensors: dict[str, TensorInfo], aliases: tuple = ()) -> list[str]:
    """Check every tensor a target reads; return their keys."""
    decoder, _ = split_decode(target.ops)
    if target.aux and decoder is None:
        raise PlanError(f"{target.name}: a rule with aux tensors must start its ops with a Decode op")
    allowed = decoder.input_dtypes if decoder else ()
    keys = []
    if target.aux and _row_resize(target) is not None:
        raise PlanError(f"{target.name}: a padded or truncated target cannot read aux tensors")
    for i, key in enumerate(target.hf_keys):
        if key not in tensors and _alias_spellings(key, aliases):
            raise PlanError(
                f"source tensor {key!r} (for {target.name}) is missing from the checkpoint "
                f"(also looked for {', '.join(repr(k) for k in _alias_spellings(key, aliases))})"
            )
        _check_source(target, key, tensors.get(key), target.source_shape, allowed[0] if decoder else None)
        keys.append(key)
        for j, (aux, aux_key) in enumerate(zip(target.aux, target.aux_keys[i] if target.aux else (), strict=True)):
            _check_source(target, aux_key, tensors.get(aux_key), aux.shape, allowed[j + 1], key)
            keys.append(aux_key)
    return keys


def _row_resize(target: TargetParam) -> tuple[int, int] | None:
    """(index in the op chain, slab axis) when the chain has one PadAxis/TruncateAxis on the
    axis source rows run along and every other op keeps source row i at index i; else None."""
    if not target.source_shape:
        return None
    axis, shape, found = 0, tuple(target.source_shape), None
    for i, op in enumerate(target.ops):
        out = op.output_shape(shape)
        if isinstance(op, PadAxis | TruncateAxis) and op.axis % len(shape) == axis:
            if found is not None:
                return None
            found, shape = i, out
            continue
        mapped = op.map_axis(axis, len(shape))
        if mapped is None or out[mapped] != shape[axis]:
            return None
        axis, shape = mapped, out
    return (found, axis) if found is not None else None


def _row_split(target: TargetParam) -> tuple[int, int] | None:
    """(target axis, source rows per target index) when source rows can be cut, else None."""
    resize = _row_resize(target)
    if resize is not None:
        slab_axes = [a for a in range(len(target.shape)) if a not in target.stack_axes]
        return slab_axes[resize[1]], 1
    slab_axis = chain_map_axis(0, len(target.source_shape), target.ops, target.source_shape)
    if slab_axis is None or not target.source_shape:
        return None
    slab_axes = [a for a in range(len(target.shape)) if a not in target.stack_axes]
    axis = slab_axes[slab_axis]
    rows, size = target.source_shape[0], target.shape[axis]
    if size == 0 or rows % size:
        return None
    return axis, rows // size


def _row_multiple(target: TargetParam, split: tuple[int, int] | None) -> int:
    """Target indices along the row-split axis must come in multiples of this, so that every
    cut of the main tensor's rows falls on a row block of each aux tensor (FP8 scale rows)."""
    if not split or not target.aux:
        return 1
    block = math.lcm(*(a.row_block for a in target.aux))
    return block // math.gcd(block, split[1])


def largest_fitting(n: int, fits, multiple: int = 1) -> int:
    """Largest c in {multiple, 2*multiple, ..., n} with fits(c) (fits is monotone); the
    smallest candidate if none fits."""
    steps = math.ceil(n / multiple)
    lo, hi = 1, steps
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(min(n, mid * multiple)) else (lo, mid - 1)
    return min(n, lo * multiple)


def shard_shape(shape: tuple[int, ...], shard_count: int) -> tuple[int, ...]:
    """The zarr chunk Orbax writes for an array MaxText's converter saves from `shard_count`
    devices (`--simulated_cpu_devices_count`): one device's shard, i.e. the array split along
    axis 0 if the count divides it, else along axis 1. An array MaxText replicates instead (no
    such axis) is split by Orbax's replica-parallel save (its default) along its first axis the
    count divides, which can then only be axis 2 or later; with none (and for 0-d arrays) it is
    one chunk. Together: the first axis the count divides."""
    if shard_count < 1:
        raise ValueError(f"shard_count must be >= 1, got {shard_count}")
    shape = tuple(shape)
    for axis, size in enumerate(shape):
        if size % shard_count == 0:
            return shape[:axis] + (size // shard_count,) + shape[axis + 1 :]
    return shape


def item_shape(target: TargetParam, chunk: tuple[int, ...]) -> tuple[int, ...]:
    """Extent of the work items of a target stored with `chunk`; every item is a union of whole
    chunks. Items can only cut stack axes (one source tensor per index) and the axis source rows
    map to, so they span every other axis whole, even where a shard splits it into chunks. On the
    row axis an item takes enough chunks to start on an aux row block (FP8 scale rows)."""
    split = _row_split(target)
    extent = list(target.shape)
    for axis in target.stack_axes:
        extent[axis] = chunk[axis]
    if split is not None:
        axis = split[0]
        extent[axis] = min(target.shape[axis], math.lcm(chunk[axis], _row_multiple(target, split)))
    return tuple(extent)


def choose_chunk_shape(
    target: TargetParam,
    source_itemsize: float,
    save_itemsize: int,
    budget: int,
    aux_itemsizes: tuple[float, ...] = (),
    shard_count: int = 1,
    casts: bool = True,
    row_cuts: bool = True,
) -> tuple[int, ...]:
    """Largest chunk (the shard of `shard_count` devices, see `shard_shape`, if its work item
    fits; with one device the whole array) whose work item stays under `budget`.

    Shrinks stack axes outer first (experts, then layers); if a single slab is still too big,
    cuts it along the target axis that source rows map to (in whole aux row blocks). Costs are
    those of the items (`item_shape`), which may span several chunks. `casts`: whether the
    executor casts slabs (see `slab_casts`; True is the safe overestimate). Without `row_cuts`,
    a target that only fits by cutting source rows is a PlanError.
    """
    split = _row_split(target)
    multiple = _row_multiple(target, split)
    slab_elems = math.prod(target.slab_shape)
    source_elems = math.prod(target.source_shape)
    decoder, _ = split_decode(target.ops)
    decoded_elems = decoded_elements(target.ops, target.source_shape)
    copies = chain_copies(target.ops)

    def aux_bytes(c: list[int]) -> int:
        total = 0
        for aux, isz in zip(target.aux, aux_itemsizes, strict=True):
            rows = c[split[0]] * split[1] if split else target.source_shape[0]
            aux_rows = min(aux.shape[0], math.ceil(rows / aux.row_block)) if aux.shape else 1
            total += math.ceil(aux_rows * math.prod(aux.shape[1:]) * isz)
        return total

    resized = _row_resize(target) is not None
    source_rows = target.source_shape[0] if target.source_shape else 1

    def cost(c: list[int]) -> int:
        frac = c[split[0]] / target.shape[split[0]] if split and target.shape[split[0]] else 1.0
        # A padded/truncated target reads at most as many source rows as its region has rows.
        src_frac = min(source_rows, c[split[0]]) / source_rows if resized and source_rows else frac
        # Round up: an underestimate would let an item exceed the budget.
        slab_target = math.ceil(slab_elems * frac) * save_itemsize
        slab_source = math.ceil(source_elems * src_frac * source_itemsize) + aux_bytes(c)
        decoded = math.ceil(decoded_elems * src_frac)
        scratch = decoder.scratch_bytes(decoded) if decoder else 0
        n_slabs = math.prod(c[a] for a in target.stack_axes)
        cast = decoded * save_itemsize if casts else 0
        slab = slab_working_bytes(slab_source, slab_target if copies else 0, scratch, cast)
        return region_working_bytes(n_slabs * slab_target, slab)

    def with_axis(c: list[int], axis: int, value: int) -> list[int]:
        return c[:axis] + [value] + c[axis + 1 :]

    def item_cost(c: list[int]) -> int:
        return cost(list(item_shape(target, tuple(c))))

    # Start from the shard (MaxText's layout); a chunk shrunk for the budget stays within one
    # shard's extent (it may straddle two shards when it does not divide the shard).
    chunk = list(shard_shape(target.shape, shard_count))
    for axis in target.stack_axes:
        if item_cost(chunk) <= budget:
            return tuple(chunk)
        chunk[axis] = largest_fitting(chunk[axis], lambda v, a=axis: item_cost(with_axis(chunk, a, v)) <= budget)
    if item_cost(chunk) <= budget:
        return tuple(chunk)
    if split is None or not row_cuts:
        raise PlanError(
            f"{target.name}: one slab needs {item_cost(chunk)} bytes, over --max_item_bytes={budget}, "
            "and its op chain does not allow cutting source rows"
        )
    axis = split[0]
    # Candidates are whole aux row blocks (items equal chunks) and the unshrunk shard rows.
    chunk[axis] = largest_fitting(chunk[axis], lambda v: item_cost(with_axis(chunk, axis, v)) <= budget, multiple)
    if item_cost(chunk) > budget:
        raise PlanError(
            f"{target.name}: even one row slab needs {item_cost(chunk)} bytes, over --max_item_bytes={budget}"
        )
    return tuple(chunk)


def item_count(target: TargetParam, chunk: tuple[int, ...]) -> int:
    """How many work items a target stored with `chunk` gets."""
    extent = item_shape(target, chunk)
    return math.prod(-(-n // e) if n else 1 for n, e in zip(target.shape, extent, strict=True))


def choose_item_chunk(
    target: TargetParam,
    source_itemsize: float,
    save_itemsize: int,
    budget: int,
    aux_itemsizes: tuple[float, ...] = (),
    shard_count: int = 1,
    casts: bool = True,
) -> tuple[int, ...]:
    """The chunk for items of at most budget / ITEMS_OVERLAPPED, so that a worker overlaps them
    within the budget.

    Cutting stack axes (layers, experts) is always taken. Cutting source rows is taken when it
    at most doubles the target's items compared with items of the whole budget (an embedding or
    lm_head: two half-size items encode on two cores instead of one item on one). Otherwise the
    target is cut for the whole budget and its items run alone: cutting rows finer would
    multiply the items for no gain in bounded memory (DeepSeek-V3's FP8 experts, whose one-slab
    dequantization scratch is over half the budget: 12k -> 91k items).
    """
    args = (source_itemsize, save_itemsize)
    half = budget // ITEMS_OVERLAPPED
    try:
        return choose_chunk_shape(target, *args, half, aux_itemsizes, shard_count, casts, row_cuts=False)
    except PlanError:
        pass
    whole = choose_chunk_shape(target, *args, budget, aux_itemsizes, shard_count, casts)
    try:
        halved = choose_chunk_shape(target, *args, half, aux_itemsizes, shard_count, casts)
    except PlanError:
        return whole
    return halved if item_count(target, halved) <= 2 * item_count(target, whole) else whole


def _items_for_target(
    target: TargetParam,
    chunk: tuple[int, ...],
    infos: dict[str, TensorInfo],
    save_dtype: str,
    first_id: int,
) -> list[WorkItem]:
    split = _row_split(target)
    row_axis, row_unit = split if split else (None, 1)
    resize = _row_resize(target)
    extent = item_shape(target, chunk)
    grid = [range(0, n, e) if n else range(1) for n, e in zip(target.shape, extent, strict=True)]
    items = []
    for starts in itertools.product(*grid):
        region = tuple((s, min(s + e, n)) for s, e, n in zip(starts, extent, target.shape, strict=True))
        slabs = []
        stack_ranges = [range(*region[a]) for a in target.stack_axes]
        for stack_index in itertools.product(*stack_ranges):
            info = infos[target.hf_key_at(stack_index)]
            aux = [infos[k] for k in target.aux_keys_at(stack_index)]
            dest: list = []
            for axis, (a, b) in enumerate(region):
                if axis in target.stack_axes:
                    dest.append(stack_index[target.stack_axes.index(axis)] - a)
                else:
                    dest.append((0, b - a))
            if resize is not None:
                info = info.rows(*_source_rows(target, region[row_axis]))
            elif row_axis is not None and region[row_axis] != (0, target.shape[row_axis]):
                r0, r1 = region[row_axis][0] * row_unit, region[row_axis][1] * row_unit
                info = info.rows(r0, r1)
                for i, spec in enumerate(target.aux):
                    if r0 % spec.row_block:
                        raise AssertionError(f"{target.name}: row cut {r0} is inside a block of {spec.hf_key}")
                    aux[i] = aux[i].rows(r0 // spec.row_block, math.ceil(r1 / spec.row_block))
            slabs.append(Slab(info, tuple(dest), tuple(aux)))
        ops = _resized_ops(target, resize, region[row_axis]) if resize is not None else target.ops
        items.append(WorkItem(first_id + len(items), target.name, region, tuple(slabs), ops, save_dtype))
    return items


def _source_rows(target: TargetParam, rows: tuple[int, int]) -> tuple[int, int]:
    """Source rows an item covering target rows [a, b) of a padded/truncated target reads: the
    ones inside [a, b) that exist. A region wholly in the padding still reads one (the last) row,
    which its chain drops, so that no item ever issues a zero-length read."""
    n = target.source_shape[0]
    a, b = min(rows[0], n), min(rows[1], n)
    return (a, b) if b > a else (n - 1, n)


def _resized_ops(target: TargetParam, resize: tuple[int, int], rows: tuple[int, int]) -> tuple[Op, ...]:
    """The chain for an item covering target rows [a, b): the source rows inside [a, b) are
    zero-padded to b - a rows (the row a wholly padded region reads is dropped first)."""
    index, _ = resize
    axis, n = target.ops[index].axis, target.source_shape[0]
    a, b = rows
    inside = max(0, min(b, n) - min(a, n))
    fitted: tuple[Op, ...] = () if inside else (TruncateAxis(axis, 0, 1),)
    if inside != b - a:
        fitted += (PadAxis(axis, b - a, inside),)
    return target.ops[:index] + fitted + target.ops[index + 1 :]


def build_plan(
    source: SourceModel,
    model_map: ModelMap,
    scan_layers: bool,
    save_dtype: str = "bfloat16",
    max_item_bytes: int = DEFAULT_MAX_ITEM_BYTES,
    shard_count: int = 1,
    only: Sequence[str] = (),
) -> Plan:
    """Validate the source against the map and cut every target into bounded work items.

    `shard_count` chunks each array as MaxText's converter run on that many devices would
    (`shard_shape`); 1 gives one chunk per array where the budget allows."""
    save = dtypes.save_dtype(save_dtype)
    targets = [
        _resolve_aliases(t, source.tensors, model_map.key_aliases) for t in expand_targets(model_map, scan_layers)
    ]
    used: set[str] = set()
    for target in targets:
        used.update(_check_target_sources(target, source.tensors, model_map.key_aliases))
    unused = sorted(set(source.tensors) - used)
    unexpected = [k for k in unused if not any(_matches(k, p) for p in model_map.known_extras)]
    if unexpected:
        info = source.tensors[unexpected[0]]
        raise PlanError(
            f"{len(unexpected)} source tensor(s) are not used by the {model_map.family} map, e.g. "
            f"{unexpected[0]!r} in {info.file} (wrong --model, or a variant this map does not cover)"
        )
    # --only narrows what is written, never what is checked: the whole source was validated above.
    params_total = len(targets)
    if only:
        targets = select_targets(targets, only, f"the {model_map.family} map (scan_layers={scan_layers})")
    arrays, items = [], []
    for target in targets:
        target, leaf = _stored_as(target, save)
        infos = {k: source.tensors[k] for k in target.hf_keys}
        src_itemsize = max(dtypes.bits_per_element(i.dtype) for i in infos.values()) / 8
        aux_itemsizes = tuple(
            max(dtypes.bits_per_element(source.tensors[keys[j]].dtype) for keys in target.aux_keys) / 8
            for j in range(len(target.aux))
        )
        infos.update((k, source.tensors[k]) for keys in target.aux_keys for k in keys)
        casts = any(slab_casts(target.ops, infos[k].dtype, leaf.name) for k in target.hf_keys)
        chunk = choose_item_chunk(
            target, src_itemsize, leaf.itemsize, max_item_bytes, aux_itemsizes, shard_count, casts
        )
        arrays.append(ArrayPlan(target.name, target.path, target.shape, leaf.name, chunk))
        items.extend(_items_for_target(target, chunk, infos, leaf.name, len(items)))
    return Plan(
        model_map.family, scan_layers, save.name, max_item_bytes, arrays, items, unused,
        only=tuple(only), params_total=params_total,
    )  # fmt: skip


def param_matches(name: str, pattern: str) -> bool:
    """fnmatch `pattern` against a param's full name (`params.params.decoder...`) or the name
    below `params.params.`, so `decoder.dense_layers_0.*` works as well as `*dense_layers_0.*`."""
    short = name.removeprefix(".".join(PARAMS_PREFIX) + ".")
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(short, pattern)


def select_targets(targets: list[TargetParam], patterns: Sequence[str], where: str) -> list[TargetParam]:
    """The targets some pattern matches; a pattern matching nothing is an error (a typo would
    otherwise silently drop params from a partial checkpoint)."""
    names = [t.name for t in targets]
    for pattern in patterns:
        if not any(param_matches(n, pattern) for n in names):
            close = difflib.get_close_matches(pattern, names, n=4, cutoff=0.0)
            raise PlanError(
                f"--only pattern {pattern!r} matches none of the {len(names)} params of {where}; "
                f"params are named like {', '.join(close)}"
            )
    return [t for t in targets if any(param_matches(t.name, p) for p in patterns)]


def _stored_as(target: TargetParam, save: np.dtype) -> tuple[TargetParam, np.dtype]:
    """(the target as its items run it, the dtype its leaf is stored in).

    Usually the save dtype. When the chain computes into another dtype (AddScalar: float32), the
    leaf keeps that dtype, as MaxText saves whatever its hook returns; the items then store that
    dtype and round the source to the save dtype first (RoundOnce), so the arithmetic starts from
    the same values as MaxText's cast-first loader.
    """
    decoder, ops = split_decode(target.ops)
    leaf = chain_output_dtype(save, ops)  # the executor casts to the save dtype before `ops`
    if leaf == save:
        return target, save
    if decoder is not None:
        raise PlanError(f"{target.name}: a decoded source whose ops change the dtype is not supported")
    return dataclasses.replace(target, ops=(RoundOnce(save.name),) + target.ops), leaf


def _resolve_key(key: str, tensors: dict[str, TensorInfo], aliases: tuple) -> str:
    """`key` if the checkpoint has it, else its first alias spelling that it has, else `key`."""
    if key in tensors:
        return key
    for prefix, alternatives in aliases:
        if key.startswith(prefix):
            for alt in alternatives:
                if alt + key[len(prefix) :] in tensors:
                    return alt + key[len(prefix) :]
    return key


def _alias_spellings(key: str, aliases: tuple) -> list[str]:
    return [alt + key[len(p) :] for p, alts in aliases if key.startswith(p) for alt in alts]


def _resolve_aliases(target: TargetParam, tensors: dict[str, TensorInfo], aliases: tuple) -> TargetParam:
    if not aliases:
        return target
    return dataclasses.replace(
        target,
        hf_keys=tuple(_resolve_key(k, tensors, aliases) for k in target.hf_keys),
        aux_keys=tuple(tuple(_resolve_key(k, tensors, aliases) for k in keys) for keys in target.aux_keys),
    )


def _matches(key: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(key, pattern)
