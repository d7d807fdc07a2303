"""The conversion plan: pure, serializable data built from headers only.

A plan is a list of work items. Each names one region of one target array (a union of whole
zarr3 chunks, so no two items ever write the same chunk), the exact source byte ranges that
fill it, and the op chain. Items are sized so their working set stays under `max_item_bytes`.
"""

from __future__ import annotations

import fnmatch
import itertools
import math
from dataclasses import dataclass, field

import numpy as np

from ckpt_transforms import dtypes
from ckpt_transforms.ops import Op, chain_map_axis
from ckpt_transforms.safetensors_index import SourceModel, TensorInfo
from ckpt_transforms.specs import ModelMap, TargetParam, expand_targets

DEFAULT_MAX_ITEM_BYTES = 256 * 2**20
FLOAT_SOURCE_DTYPES = ("BF16", "F16", "F32", "F64")


class PlanError(ValueError):
    """The source does not match what the model map expects (message names key and file)."""


@dataclass(frozen=True)
class Slab:
    """One source read, transformed by the op chain, placed at `dest` inside the item's region.

    `dest` has one entry per target axis: an int (a stack axis, dropped on assignment) or a
    (start, stop) pair local to the region.
    """

    source: TensorInfo
    dest: tuple[int | tuple[int, int], ...]


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
        return sum(s.source.length for s in self.slabs)

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

    def summary(self) -> dict:
        largest = max(self.items, key=item_working_bytes) if self.items else None
        return {
            "family": self.family,
            "scan_layers": self.scan_layers,
            "save_dtype": self.save_dtype,
            "params": len(self.arrays),
            "work_items": len(self.items),
            "bytes_read": sum(i.bytes_read for i in self.items),
            "bytes_written": sum(i.bytes_written for i in self.items),
            "largest_item_bytes": item_working_bytes(largest) if largest else 0,
            "largest_item": largest.param if largest else None,
            "max_item_bytes": self.max_item_bytes,
            "unused_source_keys": len(self.unused_source_keys),
        }


def slab_working_bytes(source_bytes: int, target_bytes: int) -> int:
    """Peak bytes to turn one source read into a target slab: raw bytes, cast copy, op output."""
    return source_bytes + 2 * target_bytes


def item_working_bytes(item: WorkItem) -> int:
    """The item's region buffer plus the largest single slab in flight (slabs go one at a time)."""
    itemsize = np.dtype(item.save_dtype).itemsize
    per_slab = [slab_working_bytes(s.source.length, math.prod(_dest_shape(s.dest)) * itemsize) for s in item.slabs]
    return item.bytes_written + max(per_slab, default=0)


def _dest_shape(dest: tuple) -> tuple[int, ...]:
    return tuple(d[1] - d[0] for d in dest if not isinstance(d, int))


def _check_source(target: TargetParam, key: str, info: TensorInfo | None) -> None:
    if info is None:
        raise PlanError(f"source tensor {key!r} (for {target.name}) is missing from the checkpoint")
    if info.shape != target.source_shape:
        raise PlanError(
            f"source tensor {key!r} in {info.file} has shape {list(info.shape)}, "
            f"expected {list(target.source_shape)} from config.json (for {target.name})"
        )
    if info.dtype not in FLOAT_SOURCE_DTYPES:
        raise PlanError(
            f"source tensor {key!r} in {info.file} has dtype {info.dtype}; expected one of "
            f"{', '.join(FLOAT_SOURCE_DTYPES)} (quantized sources need a quantization_config)"
        )


def _row_split(target: TargetParam) -> tuple[int, int] | None:
    """(target axis, source rows per target index) when source rows can be cut, else None."""
    slab_axis = chain_map_axis(0, len(target.source_shape), target.ops, target.source_shape)
    if slab_axis is None or not target.source_shape:
        return None
    slab_axes = [a for a in range(len(target.shape)) if a not in target.stack_axes]
    axis = slab_axes[slab_axis]
    rows, size = target.source_shape[0], target.shape[axis]
    if size == 0 or rows % size:
        return None
    return axis, rows // size


def _largest_fitting(n: int, fits) -> int:
    """Largest c in [1, n] with fits(c) (fits is monotone); 1 if none fits."""
    lo, hi = 1, n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def choose_chunk_shape(target: TargetParam, source_itemsize: float, save_itemsize: int, budget: int) -> tuple[int, ...]:
    """Largest chunk (the whole array if it fits) whose work item stays under `budget`.

    Shrinks stack axes outer first (experts, then layers); if a single slab is still too big,
    cuts it along the target axis that source rows map to.
    """
    split = _row_split(target)
    slab_elems = math.prod(target.slab_shape)
    source_elems = math.prod(target.source_shape)

    def cost(c: list[int]) -> int:
        frac = c[split[0]] / target.shape[split[0]] if split and target.shape[split[0]] else 1.0
        # Round up: an underestimate would let an item exceed the budget.
        slab_target = math.ceil(slab_elems * frac) * save_itemsize
        slab_source = math.ceil(source_elems * frac * source_itemsize)
        n_slabs = math.prod(c[a] for a in target.stack_axes)
        return n_slabs * slab_target + slab_working_bytes(slab_source, slab_target)

    def with_axis(c: list[int], axis: int, value: int) -> list[int]:
        return c[:axis] + [value] + c[axis + 1 :]

    chunk = list(target.shape)
    for axis in target.stack_axes:
        if cost(chunk) <= budget:
            return tuple(chunk)
        chunk[axis] = _largest_fitting(target.shape[axis], lambda v, a=axis: cost(with_axis(chunk, a, v)) <= budget)
    if cost(chunk) <= budget:
        return tuple(chunk)
    if split is None:
        raise PlanError(
            f"{target.name}: one slab needs {cost(chunk)} bytes, over --max_item_bytes={budget}, "
            "and its op chain does not allow cutting source rows"
        )
    axis = split[0]
    chunk[axis] = _largest_fitting(target.shape[axis], lambda v: cost(with_axis(chunk, axis, v)) <= budget)
    if cost(chunk) > budget:
        raise PlanError(f"{target.name}: even one row slab needs {cost(chunk)} bytes, over --max_item_bytes={budget}")
    return tuple(chunk)


def _items_for_target(
    target: TargetParam,
    chunk: tuple[int, ...],
    infos: dict[str, TensorInfo],
    save_dtype: str,
    first_id: int,
) -> list[WorkItem]:
    split = _row_split(target)
    row_axis, row_unit = split if split else (None, 1)
    grid = [range(0, n, c) if n else range(1) for n, c in zip(target.shape, chunk, strict=True)]
    items = []
    for starts in itertools.product(*grid):
        region = tuple((s, min(s + c, n)) for s, c, n in zip(starts, chunk, target.shape, strict=True))
        slabs = []
        stack_ranges = [range(*region[a]) for a in target.stack_axes]
        for stack_index in itertools.product(*stack_ranges):
            key = target.hf_key_at(stack_index)
            info = infos[key]
            dest: list = []
            for axis, (a, b) in enumerate(region):
                if axis in target.stack_axes:
                    dest.append(stack_index[target.stack_axes.index(axis)] - a)
                else:
                    dest.append((0, b - a))
            if row_axis is not None and region[row_axis] != (0, target.shape[row_axis]):
                r0, r1 = region[row_axis]
                info = info.rows(r0 * row_unit, r1 * row_unit)
            slabs.append(Slab(info, tuple(dest)))
        items.append(WorkItem(first_id + len(items), target.name, region, tuple(slabs), target.ops, save_dtype))
    return items


def build_plan(
    source: SourceModel,
    model_map: ModelMap,
    scan_layers: bool,
    save_dtype: str = "bfloat16",
    max_item_bytes: int = DEFAULT_MAX_ITEM_BYTES,
) -> Plan:
    """Validate the source against the map and cut every target into bounded work items."""
    save = dtypes.save_dtype(save_dtype)
    targets = expand_targets(model_map, scan_layers)
    used: set[str] = set()
    for target in targets:
        for key in target.hf_keys:
            _check_source(target, key, source.tensors.get(key))
            used.add(key)
    unused = sorted(set(source.tensors) - used)
    unexpected = [k for k in unused if not any(_matches(k, p) for p in model_map.known_extras)]
    if unexpected:
        info = source.tensors[unexpected[0]]
        raise PlanError(
            f"{len(unexpected)} source tensor(s) are not used by the {model_map.family} map, e.g. "
            f"{unexpected[0]!r} in {info.file} (wrong --model, or a variant this map does not cover)"
        )
    arrays, items = [], []
    for target in targets:
        infos = {k: source.tensors[k] for k in target.hf_keys}
        src_itemsize = max(dtypes.bits_per_element(i.dtype) for i in infos.values()) / 8
        chunk = choose_chunk_shape(target, src_itemsize, save.itemsize, max_item_bytes)
        arrays.append(ArrayPlan(target.name, target.path, target.shape, save.name, chunk))
        items.extend(_items_for_target(target, chunk, infos, save.name, len(items)))
    return Plan(model_map.family, scan_layers, save.name, max_item_bytes, arrays, items, unused)


def _matches(key: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(key, pattern)
