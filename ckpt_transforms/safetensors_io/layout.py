"""The byte layout of Hugging Face safetensors shards, fixed before any tensor data exists.

A safetensors header is a pure function of the tensors' names, dtypes and shapes (and the
metadata): the official writer orders tensors by dtype (widest alignment first) then name, packs
them back to back and pads the compact JSON header with spaces to a multiple of 8 bytes. So the
export planner can fix every shard's header and every tensor's absolute offset up front, and
workers fill disjoint byte ranges independently; the result is byte-identical to
`safetensors.numpy.save_file(tensors, metadata={"format": "pt"})`.

Shards follow MaxText's `to_huggingface`: tensors in sorted key order, a new shard when the next
tensor would pass the size limit, `model-0000i-of-0000N.safetensors` or one `model.safetensors`.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ckpt_transforms.tensors.dtypes import SAFETENSORS_DTYPES

# The safetensors `Dtype` enum order (tensor.rs); tensors are sorted by it, descending.
DTYPE_ORDER = (
    "BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F8_E4M3FNUZ",
    "F8_E5M2FNUZ", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64",
)  # fmt: skip
PT_METADATA = {"format": "pt"}  # transformers refuses files without it
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # huggingface_hub's "5GB" (decimal units)
_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip


def parse_shard_size(text: str | int) -> int:
    """'5GB' (decimal, as huggingface_hub and transformers read it), '3GiB', '1000000' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"not a shard size: {text!r} (e.g. 5GB, 3GiB, 500MB)")
    size = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
    if size < 1:
        raise ValueError(f"shard size must be positive, got {text!r}")
    return size


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the output: HF key, safetensors dtype name, shape."""

    key: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * SAFETENSORS_DTYPES[self.dtype][1] // 8


@dataclass(frozen=True)
class ShardLayout:
    """One output file: its header bytes (length prefix included) and where each tensor starts."""

    file: str
    header: bytes
    offsets: dict[str, int]  # absolute byte offset of each tensor in the file
    tensors: tuple[TensorSpec, ...]

    @property
    def size(self) -> int:
        return len(self.header) + sum(t.nbytes for t in self.tensors)

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def _file_order(tensors: Sequence[TensorSpec]) -> list[TensorSpec]:
    rank = {d: i for i, d in enumerate(DTYPE_ORDER)}
    return sorted(tensors, key=lambda t: (-rank[t.dtype], t.key))


def shard_layout(file: str, tensors: Sequence[TensorSpec], metadata: dict[str, str] | None = None) -> ShardLayout:
    """The header the official writer produces for these tensors, and their absolute offsets."""
    header: dict = {"__metadata__": dict(PT_METADATA if metadata is None else metadata)}
    ordered, relative, start = _file_order(tensors), {}, 0
    for t in ordered:
        header[t.key] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [start, start + t.nbytes]}
        relative[t.key] = start
        start += t.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    prefix = struct.pack("<Q", len(raw)) + raw
    return ShardLayout(file, prefix, {k: len(prefix) + v for k, v in relative.items()}, tuple(ordered))


def plan_shards(tensors: Sequence[TensorSpec], max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> list[ShardLayout]:
    """Greedy shards over the sorted keys (a tensor larger than the limit gets a shard of its own)."""
    groups: list[list[TensorSpec]] = [[]]
    size = 0
    for t in sorted(tensors, key=lambda t: t.key):
        if groups[-1] and size + t.nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    if len(groups) == 1:
        return [shard_layout(SINGLE_FILE, groups[0])]
    n = len(groups)
    return [shard_layout(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]


def index_json(shards: Sequence[ShardLayout]) -> str | None:
    """`model.safetensors.index.json` as transformers writes it (None for a single file)."""
    if len(shards) == 1 and shards[0].file == SINGLE_FILE:
        return None
    weight_map = {t.key: s.file for s in shards for t in s.tensors}
    index = {"metadata": {"total_size": sum(s.data_bytes for s in shards)}, "weight_map": weight_map}
    return json.dumps(index, indent=2, sort_keys=True) + "\n"


def contiguous_runs(shape: tuple[int, ...], box: tuple[tuple[int, int], ...], itemsize: int) -> tuple[np.ndarray, int]:
    """Byte offsets (relative to the tensor's start) of the contiguous runs that a C-ordered box
    of a C-ordered tensor occupies, and the length of each run; the box's own C-ordered bytes are
    the runs one after another."""
    ndim = len(shape)
    # The runs span every trailing axis the box covers whole, plus the first partial one.
    k = ndim
    while k > 0 and box[k - 1] == (0, shape[k - 1]):
        k -= 1
    k = max(k - 1, 0)
    strides = [itemsize * math.prod(shape[i + 1 :]) for i in range(ndim)]
    run = (box[k][1] - box[k][0]) * strides[k] if ndim else itemsize
    starts = np.zeros(1, dtype=np.int64) + (box[k][0] * strides[k] if ndim else 0)
    for axis in range(k - 1, -1, -1):
        a, b = box[axis]
        starts = (np.arange(a, b, dtype=np.int64)[:, None] * strides[axis] + starts[None, :]).reshape(-1)
    return starts, run
