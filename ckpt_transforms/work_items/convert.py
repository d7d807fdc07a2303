"""Executing one work item: range-read each slab, decode, cast, apply ops, fill the region.

Order of casts follows MaxText's converter exactly: each HF tensor is cast to the save dtype
first, then the op chain runs (ops that scale compute in float32 and round back).

A quantized slab (weight + scale rows) is first combined by the chain's Decode op, which
computes in float32 and rounds once to bf16 -- what MaxText's standalone dequantize scripts
write to disk before its converter reads them -- and only then cast to the save dtype. So a
float32 save of an FP8 source holds the same bf16-rounded values MaxText's two-step pipeline
gives, in one pass and with no intermediate copy on disk.
"""

from __future__ import annotations

import numpy as np

from ckpt_transforms.planning.convert_plan import Slab, WorkItem
from ckpt_transforms.safetensors_io.index import TensorInfo
from ckpt_transforms.storage.sources import ByteSource, coalesce_ranges
from ckpt_transforms.tensors import dtypes
from ckpt_transforms.tensors.buffers import BufferPool
from ckpt_transforms.tensors.ops import apply_chain, copy_into, split_decode


def decode(raw: bytes | memoryview, src: TensorInfo) -> np.ndarray:
    """Raw little-endian bytes of a source range -> array of its safetensors dtype."""
    dtype = dtypes.numpy_dtype(src.dtype).newbyteorder("<")
    return np.frombuffer(raw, dtype=dtype).reshape(src.shape)


def cast_to_save_dtype(x: np.ndarray, save_dtype: np.dtype) -> np.ndarray:
    """What MaxText's eager getter does: f32/f16 -> bf16 rounds to nearest even; bf16 stays exact."""
    return x if x.dtype == save_dtype else x.astype(save_dtype)


# Inputs of one slab closer than this in one file are fetched with one ranged read: a weight and
# its scales (`x.weight`, `x.weight_scale_inv`) sit side by side in shards, and on gs:// / hf://
# every request costs a round trip. Bounded: the extra bytes read are at most this per gap.
COALESCE_GAP = 64 * 1024


def _read(source: ByteSource, file: str, offset: int, length: int, pool: BufferPool | None) -> bytes | np.ndarray:
    if not hasattr(source, "read_into"):
        return source.read_range(file, offset, length)
    # A local source reads straight into a numpy buffer (one copy less than bytes), reused
    # from the worker's pool when there is one.
    out = pool.empty((length,), np.uint8) if pool is not None else np.empty(length, np.uint8)
    source.read_into(file, offset, out)
    return out


def read_tensors(infos: list[TensorInfo], source: ByteSource, pool: BufferPool | None = None) -> list[np.ndarray]:
    """Each tensor's array; ranges in the same file that touch (within the gap) are read once."""
    chunks: dict[tuple[str, int], bytes | np.ndarray] = {}
    for file in {i.file for i in infos if i.length}:
        ranges = [(i.offset, i.length) for i in infos if i.file == file and i.length]
        for offset, length in coalesce_ranges(ranges, COALESCE_GAP):
            chunks[(file, offset)] = _read(source, file, offset, length, pool)
    out = []
    for info in infos:
        if info.length == 0:  # 0-size tensors are valid safetensors; nothing to fetch
            out.append(decode(b"", info))
            continue
        (start, data) = next((o, d) for (f, o), d in chunks.items() if f == info.file and o <= info.offset < o + len(d))
        view = memoryview(data)[info.offset - start : info.offset - start + info.length]  # no copy
        out.append(decode(view, info))
    return out


def read_tensor(info: TensorInfo, source: ByteSource, pool: BufferPool | None = None) -> np.ndarray:
    return read_tensors([info], source, pool)[0]


def slab_value(slab: Slab, item: WorkItem, source: ByteSource, pool: BufferPool | None = None) -> np.ndarray:
    decoder, ops = split_decode(item.ops)
    if decoder is None:
        x = read_tensor(slab.source, source, pool)
    else:
        x = decoder.apply_inputs(*read_tensors([slab.source, *slab.aux], source, pool))
    return apply_chain(cast_to_save_dtype(x, np.dtype(item.save_dtype)), ops)


def dest_index(dest: tuple) -> tuple:
    return tuple(d if isinstance(d, int) else slice(*d) for d in dest)


def build_region(item: WorkItem, source: ByteSource, pool: BufferPool | None = None) -> np.ndarray:
    """The item's whole region, one slab in flight at a time.

    With a `pool`, the region and the read buffers are reused memory (see `buffers`); the region
    stays valid for as long as the caller (or TensorStore) holds it.
    """
    shape, dtype = tuple(item.region_shape), np.dtype(item.save_dtype)
    region = pool.empty(shape, dtype) if pool is not None else np.empty(shape, dtype)
    for slab in item.slabs:
        value = slab_value(slab, item, source, pool)
        index = dest_index(slab.dest)
        expected = region[index].shape
        if value.shape != expected:
            raise ValueError(
                f"{item.param}: {slab.source.key} became shape {list(value.shape)} after ops, expected {list(expected)}"
            )
        copy_into(region[index], value)
        del value  # frees the slab's read buffer for the next slab
    return region
