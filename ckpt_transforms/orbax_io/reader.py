"""Reading an Orbax checkpoint with TensorStore: its tree, each leaf's shape/dtype/chunks, regions.

Only metadata is read to plan an export (`_METADATA`, each array's `zarr.json`, the step's
`_CHECKPOINT_METADATA`); a work item then reads whole chunks of one leaf. TensorStore decodes a
zarr3 shard (Orbax writes one inner chunk per shard) whole, whatever part of it is asked for, so
an export item always covers whole chunks: reading one layer of a scanned leaf would decode the
chunk that holds every layer.

Layouts recognised (MaxText's, see EXPORT.md): Linen `params.params.<decoder...>` (our convert
output, MaxText's to_maxtext output and Linen training checkpoints, `opt_state.*` present and
never read), NNX `<decoder...>.value` leaves, NNX-RL `base.<decoder...>.value`, in OCDBT + zarr3,
or the Pathways layouts (no OCDBT, zarr2 or zarr3 per-param directories). Every leaf is known by
its canonical Linen name (`params.params.decoder.layers.mlp.wi_0.kernel`) and read under its
on-disk name.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

import numpy as np
import tensorstore as ts

from ckpt_transforms.storage import outdir

METADATA_FILE = "_METADATA"
CHECKPOINT_METADATA_FILE = "_CHECKPOINT_METADATA"
COMMIT_FILE = "commit_success.txt"
PARAMS = "params.params."
_LIST_INDEX = re.compile(r"\.(layers|blocks)\.(\d+)(?=\.)")


class CheckpointError(ValueError):
    """The Orbax checkpoint is missing, incomplete or not what it claims (message names it)."""


@dataclass(frozen=True)
class LeafMeta:
    """One array of the checkpoint as stored: canonical and on-disk name, shape, dtype, chunks."""

    name: str
    disk_name: str
    shape: tuple[int, ...]
    dtype: str
    chunk_shape: tuple[int, ...]
    value_type: str = "np.ndarray"  # as _METADATA records it

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class Checkpoint:
    """What planning needs to know of a checkpoint; serializable, so workers can reopen it."""

    items_dir: str
    use_ocdbt: bool
    use_zarr3: bool
    leaves: dict[str, LeafMeta]
    scan_layers: bool | None  # as recorded in the step's custom metadata (None: not recorded)
    fingerprint: dict

    def leaf(self, name: str) -> LeafMeta:
        return self.leaves[name]


def resolve_items_dir(path: str) -> str:
    """Accept OUT (a MaxText base directory holding step 0 or the latest step), OUT/<step>,
    OUT/<step>/items, local or gs://."""
    path = outdir.normalize(path)
    candidates = [path, outdir.join(path, "items")]
    if outdir.dir_exists(path):
        steps = sorted((int(c) for c in outdir.list_children(path) if c.isdigit()), reverse=True)
        candidates += [outdir.join(path, str(s), "items") for s in steps]
    for cand in candidates:
        if outdir.file_exists(outdir.join(cand, METADATA_FILE)):
            return cand
    if not outdir.dir_exists(path):
        raise CheckpointError(f"no such checkpoint directory: {path}")
    raise CheckpointError(f"no Orbax {METADATA_FILE} under {path} (tried ., items, <step>/items)")


def canonical_name(disk_name: str) -> str | None:
    """The Linen name of a parameter leaf, or None for leaves that are not model parameters
    (step, opt_state, NNX rngs)."""
    name = disk_name
    if name.startswith(PARAMS):
        pass
    elif name.startswith(("opt_state.", "optimizer.")) or name == "step" or "rngs" in name.split("."):
        return None
    else:
        if name.startswith("base."):  # NNX-RL: the policy model under `base`
            name = name[len("base.") :]
        name = name.removesuffix(".value")  # NNX variables: {value: array}
        name = PARAMS + name
    return _LIST_INDEX.sub(lambda m: f".{m.group(1)}_{m.group(2)}", name)


def tree_leaves(meta: dict) -> list[tuple[str, str]]:
    """(on-disk name, Orbax value type) of the arrays `_METADATA` lists (dotted tree paths),
    skipping empty nodes (an empty `opt_state`)."""
    leaves = []
    for entry in meta.get("tree_metadata", {}).values():
        value = entry.get("value_metadata", {})
        if value.get("skip_deserialize") or value.get("value_type") in ("Dict", "List", "None"):
            continue
        leaves.append((".".join(str(k["key"]) for k in entry["key_metadata"]), str(value.get("value_type"))))
    return leaves


def read_tree_metadata(items_dir: str) -> dict:
    meta = _read_json(outdir.join(items_dir, METADATA_FILE), METADATA_FILE)
    if meta is None:
        raise CheckpointError(f"{items_dir}: no {METADATA_FILE}")
    return meta


def chunk_shape(store: ts.TensorStore) -> tuple[int, ...]:
    """The stored chunk (for zarr3 the shard, i.e. the chunk_grid) of an opened array."""
    chunk = store.chunk_layout.write_chunk.shape
    return tuple(int(c) for c in chunk) if chunk is not None else tuple(store.shape)


def kvstore(items_dir: str, disk_name: str, use_ocdbt: bool) -> dict:
    """The kvstore spec of one leaf's array, as Orbax addresses it."""
    if use_ocdbt:
        return {"driver": "ocdbt", "base": outdir.kvstore_spec(items_dir), "path": disk_name + "/"}
    return outdir.kvstore_spec(outdir.join(items_dir, disk_name))


def read_context(concurrency: int = 2) -> ts.Context:
    """A small-cache context for reading: `data_copy_concurrency` bounds how many chunks are
    decoded at once (each decoded chunk is a transient of its full size)."""
    return ts.Context(
        {
            "cache_pool": {"total_bytes_limit": 0},
            "cache_pool#ocdbt": {"total_bytes_limit": 64_000_000},
            "data_copy_concurrency": {"limit": concurrency},
            "file_io_concurrency": {"limit": 32},
        }
    )


def open_leaf(
    items_dir: str, disk_name: str, use_ocdbt: bool, use_zarr3: bool, context: ts.Context | None = None
) -> ts.TensorStore:
    spec = {"driver": "zarr3" if use_zarr3 else "zarr", "kvstore": kvstore(items_dir, disk_name, use_ocdbt)}
    if use_ocdbt:
        spec["kvstore"]["cache_pool"] = "cache_pool#ocdbt"
    try:
        return ts.open(spec, open=True, read=True, context=context or read_context()).result()
    except ValueError as e:
        raise CheckpointError(f"{items_dir}: cannot open array {disk_name!r} ({e})") from None


def _read_json(path: str, what: str) -> dict | None:
    text = outdir.read_text(path)
    if text is None:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: {what} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: {what} is not a JSON object")
    return data


def step_dir_of(items_dir: str) -> str:
    return items_dir.rstrip("/").rsplit("/", 1)[0]


def fingerprint(items_dir: str) -> dict:
    """What identifies the checkpoint's content for up-to-date checks: the tree metadata and the
    root OCDBT manifest (rewritten by every merge) or, without OCDBT, every leaf's metadata."""
    parts = {}
    for name in (METADATA_FILE, "manifest.ocdbt", COMMIT_FILE):
        info = outdir.file_fingerprint(outdir.join(items_dir, name))
        if info is not None:
            parts[name] = info
    return parts


def load_checkpoint(path: str, context: ts.Context | None = None) -> Checkpoint:
    """Open a checkpoint's metadata: every parameter leaf's shape, dtype and chunk shape."""
    items_dir = resolve_items_dir(path)
    meta = read_tree_metadata(items_dir)
    if not outdir.file_exists(outdir.join(items_dir, COMMIT_FILE)) and outdir.is_gcs(items_dir):
        raise CheckpointError(f"{items_dir}: no {COMMIT_FILE}: the checkpoint was never committed")
    use_ocdbt, use_zarr3 = bool(meta.get("use_ocdbt", True)), bool(meta.get("use_zarr3", True))
    if use_ocdbt and not outdir.file_exists(outdir.join(items_dir, "manifest.ocdbt")):
        raise CheckpointError(f"{items_dir}: _METADATA says OCDBT but there is no manifest.ocdbt (not merged?)")
    context = context or read_context()
    leaves: dict[str, LeafMeta] = {}
    for disk_name, value_type in tree_leaves(meta):
        name = canonical_name(disk_name)
        if name is None:
            continue
        if name in leaves:
            raise CheckpointError(
                f"{items_dir}: leaves {leaves[name].disk_name!r} and {disk_name!r} are the same param"
            )
        store = open_leaf(items_dir, disk_name, use_ocdbt, use_zarr3, context)
        dtype = np.dtype(store.dtype.numpy_dtype).name
        leaves[name] = LeafMeta(name, disk_name, tuple(store.shape), dtype, chunk_shape(store), value_type)
    if not leaves:
        raise CheckpointError(f"{items_dir}: {METADATA_FILE} lists no model parameters")
    custom = _read_json(outdir.join(step_dir_of(items_dir), CHECKPOINT_METADATA_FILE), CHECKPOINT_METADATA_FILE) or {}
    recorded = (custom.get("custom_metadata") or {}).get("scan_layers")
    return Checkpoint(
        items_dir,
        use_ocdbt,
        use_zarr3,
        leaves,
        recorded if isinstance(recorded, bool) else None,
        fingerprint(items_dir),
    )


def read_region(store: ts.TensorStore, region: tuple[tuple[int, int], ...]) -> np.ndarray:
    """Read a box of a leaf (the chunks covering it are decoded whole, once)."""
    return store[tuple(slice(a, b) for a, b in region)].read().result()
