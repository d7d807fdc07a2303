"""Read back what an Orbax checkpoint holds: params, shapes, dtypes, chunking and size on disk."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np
import tensorstore as ts


@dataclass(frozen=True)
class LeafInfo:
    name: str
    value_type: str
    shape: tuple[int, ...]
    dtype: str
    chunk_shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


def resolve_items_dir(path: str) -> str:
    """Accept OUT, OUT/0 or OUT/0/items."""
    for cand in (path, os.path.join(path, "items"), os.path.join(path, "0", "items")):
        if os.path.isfile(os.path.join(cand, "_METADATA")):
            return cand
    raise FileNotFoundError(f"no Orbax _METADATA under {path} (tried ., items, 0/items)")


def open_leaf(items_dir: str, name: str, use_ocdbt: bool = True, use_zarr3: bool = True) -> ts.TensorStore:
    """One leaf, in the storage format `_METADATA` names (as Orbax reads it)."""
    if use_ocdbt:
        kvstore = {"driver": "ocdbt", "base": f"file://{items_dir}/", "path": name + "/"}
    else:
        kvstore = {"driver": "file", "path": os.path.join(items_dir, name) + "/"}
    return ts.open({"driver": "zarr3" if use_zarr3 else "zarr", "kvstore": kvstore}, open=True).result()


def inspect_checkpoint(path: str) -> tuple[list[LeafInfo], int]:
    """Leaves in _METADATA order, and the checkpoint's total bytes on disk."""
    items_dir = resolve_items_dir(path)
    with open(os.path.join(items_dir, "_METADATA"), encoding="utf-8") as f:
        meta = json.load(f)
    leaves = []
    for entry in meta["tree_metadata"].values():
        value = entry["value_metadata"]
        if value.get("skip_deserialize"):
            continue
        name = ".".join(str(k["key"]) for k in entry["key_metadata"])
        store = open_leaf(items_dir, name, meta.get("use_ocdbt", True), meta.get("use_zarr3", True))
        chunk = tuple(store.chunk_layout.write_chunk.shape or ())  # zarr3: the shard (chunk_grid)
        leaves.append(LeafInfo(name, value["value_type"], tuple(store.shape), str(store.dtype.numpy_dtype), chunk))
    disk = sum(os.path.getsize(os.path.join(r, f)) for r, _, files in os.walk(items_dir) for f in files)
    return leaves, disk


def format_leaves(leaves: list[LeafInfo], disk_bytes: int) -> str:
    width = max((len(leaf.name) for leaf in leaves), default=10)
    lines = [f"{'param':<{width}}  {'shape':<22} {'dtype':<9} chunk"]
    for leaf in leaves:
        lines.append(f"{leaf.name:<{width}}  {str(list(leaf.shape)):<22} {leaf.dtype:<9} {list(leaf.chunk_shape)}")
    total = sum(leaf.nbytes for leaf in leaves)
    lines.append(f"{len(leaves)} leaves, {total / 1e6:.2f} MB of values, {disk_bytes / 1e6:.2f} MB on disk")
    return "\n".join(lines)
