"""Running one export work item: read whole chunks, undo the conversion ops, write HF bytes.

MaxText's `to_huggingface` casts every leaf to `weight_dtype` as it restores it (round to
nearest even), runs its hooks, then casts the result to `weight_dtype` again. An item does the
same per region: the region is cast once, each slab runs the inverse op chain (whose scaling ops
compute in float32 and round back to the slab's dtype, as MaxText's hooks do), and the result is
cast to the weight dtype before its bytes go to their planned place in the shard.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tensorstore as ts

from ckpt_transforms.orbax_io.reader import open_leaf, read_region
from ckpt_transforms.planning.export_plan import ExportItem, Output, Piece
from ckpt_transforms.safetensors_io.layout import ShardLayout, contiguous_runs
from ckpt_transforms.tensors import dtypes
from ckpt_transforms.tensors.ops import PlaceInAxis, PutEvery, apply_chain, as_bits, copy_into

# write(file, offset, data): put `data` at byte `offset` of the shard `file`.
WriteFn = Callable[[str, int, memoryview], None]


def _local_index(index: tuple) -> tuple:
    return tuple(i if isinstance(i, int) else slice(*i) for i in index)


def _placed(buffer: np.ndarray, piece: Piece, values: np.ndarray) -> None:
    """Put a piece's values into the output box: whole, or its positions of a fused axis."""
    place = piece.ops[-1] if piece.ops and isinstance(piece.ops[-1], PutEvery | PlaceInAxis) else None
    if place is None:
        copy_into(buffer, values)  # blocked: a transposed slab would walk memory against the grain
        return
    index = [slice(None)] * buffer.ndim
    axis = place.axis % buffer.ndim
    index[axis] = (
        slice(place.start, None, place.step) if isinstance(place, PutEvery) else slice(place.start, place.stop)
    )
    copy_into(buffer[tuple(index)], values)


def build_output(output: Output, regions: list[np.ndarray], weight: np.dtype) -> np.ndarray:
    """The C-ordered values of one HF tensor box, from the item's (already cast) regions."""
    buffer = np.empty(output.shape, weight)
    for read_index, piece in output.pieces:
        x = regions[read_index][_local_index(piece.index)]
        ops = piece.ops[:-1] if piece.ops and isinstance(piece.ops[-1], PutEvery | PlaceInAxis) else piece.ops
        y = apply_chain(x, ops)
        if y.dtype != weight:
            y = y.astype(weight)  # MaxText's final cast (Gemma's norm - 1 computes in float32)
        _placed(buffer, piece, y)
    return buffer


def write_output(values: np.ndarray, output: Output, shard: ShardLayout, write: WriteFn) -> int:
    """Write a box's bytes as the contiguous runs it occupies in its shard; returns bytes."""
    spec = next(t for t in shard.tensors if t.key == output.hf_key)
    raw = memoryview(np.ascontiguousarray(as_bits(values))).cast("B")
    starts, run = contiguous_runs(spec.shape, output.box, values.dtype.itemsize)
    base = shard.offsets[output.hf_key]
    if run == 0:
        return 0
    # Runs that follow each other in the file are merged into one write.
    pos = 0
    i = 0
    while i < len(starts):
        j = i + 1
        while j < len(starts) and starts[j] == starts[j - 1] + run:
            j += 1
        n = (j - i) * run
        write(shard.file, base + int(starts[i]), raw[pos : pos + n])
        pos += n
        i = j
    return pos


class LeafCache:
    """Open TensorStore handles of one checkpoint's leaves, reused across items of a worker."""

    def __init__(self, items_dir: str, use_ocdbt: bool, use_zarr3: bool, context: ts.Context):
        self.items_dir, self.use_ocdbt, self.use_zarr3, self.context = items_dir, use_ocdbt, use_zarr3, context
        self._stores: dict[str, ts.TensorStore] = {}

    def get(self, disk_name: str) -> ts.TensorStore:
        if disk_name not in self._stores:
            self._stores[disk_name] = open_leaf(self.items_dir, disk_name, self.use_ocdbt, self.use_zarr3, self.context)
        return self._stores[disk_name]


def run_export_item(item: ExportItem, leaves: LeafCache, shard_of: dict[str, ShardLayout], write: WriteFn) -> int:
    """Read the item's regions, build and write each of its HF boxes; returns bytes written."""
    weight = dtypes.save_dtype(item.weight_dtype)
    regions = []
    for read in item.reads:
        region = read_region(leaves.get(read.disk_name), read.region)
        regions.append(region if region.dtype == weight else region.astype(weight))
    written = 0
    for output in item.outputs:
        values = build_output(output, regions, weight)
        written += write_output(values, output, shard_of[output.hf_key], write)
        del values
    return written
