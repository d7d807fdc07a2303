"""Read back what an Orbax checkpoint holds: params, shapes, dtypes, chunking and size on disk."""

from __future__ import annotations

import os

from ckpt_transforms.orbax_io.reader import (
    LeafMeta,
    chunk_shape,
    open_leaf,
    read_tree_metadata,
    resolve_items_dir,
    tree_leaves,
)
from ckpt_transforms.storage import outdir

# One leaf as listed (`name` is the on-disk name here; `step` included).
LeafInfo = LeafMeta


def inspect_checkpoint(path: str) -> tuple[list[LeafInfo], int | None]:
    """Leaves in _METADATA order (under their on-disk names, `step` included), and the
    checkpoint's total bytes on disk (None on gs://, where sizes would need a listing per object)."""
    items_dir = resolve_items_dir(path)
    meta = read_tree_metadata(items_dir)
    use_ocdbt, use_zarr3 = meta.get("use_ocdbt", True), meta.get("use_zarr3", True)
    leaves = []
    for name, value_type in tree_leaves(meta):
        store = open_leaf(items_dir, name, use_ocdbt, use_zarr3)
        dtype = str(store.dtype.numpy_dtype)
        leaves.append(LeafMeta(name, name, tuple(store.shape), dtype, chunk_shape(store), value_type))
    if outdir.is_gcs(items_dir):
        return leaves, None
    disk = sum(os.path.getsize(os.path.join(r, f)) for r, _, files in os.walk(items_dir) for f in files)
    return leaves, disk


def format_leaves(leaves: list[LeafInfo], disk_bytes: int | None) -> str:
    width = max((len(leaf.name) for leaf in leaves), default=10)
    lines = [f"{'param':<{width}}  {'shape':<22} {'dtype':<9} chunk"]
    for leaf in leaves:
        lines.append(f"{leaf.name:<{width}}  {str(list(leaf.shape)):<22} {leaf.dtype:<9} {list(leaf.chunk_shape)}")
    total = sum(leaf.nbytes for leaf in leaves)
    disk = "" if disk_bytes is None else f", {disk_bytes / 1e6:.2f} MB on disk"
    lines.append(f"{len(leaves)} leaves, {total / 1e6:.2f} MB of values{disk}")
    return "\n".join(lines)
