"""Writing MaxText's Orbax layout with TensorStore: per-item OCDBT databases, stitch, commit.

Layout (what MaxText's to_maxtext writes through Orbax's PyTreeCheckpointer with OCDBT + zarr3):
    <out>/0/items/ocdbt.process_<db>/   one OCDBT database per work-item attempt (chunk bytes)
    <out>/0/items/manifest.ocdbt + d/   the root database: the stitch copies b-tree references
    <out>/0/items/_METADATA             Orbax tree metadata
    <out>/0/_CHECKPOINT_METADATA, commit_success.txt files, written last.
Every chunk key is written by exactly one work item (chunks are aligned to item regions), and
zarr.json files are written once, by the stitch, so databases never overlap.

Pathways layout (`Layout(use_ocdbt=False, ...)`, MaxText's `checkpoint_storage_use_ocdbt=false`):
no OCDBT, one plain directory per param, `items/<param>/.zarray` + chunk files `0.0`, ... (zarr2,
`zstd` level 1) or `zarr.json` + `c/0/0`, ... (zarr3), exactly as Orbax writes it. Chunk files are
shared keys there, so each attempt writes under its own `items/.attempt_<db>/<param>/...`, and the
stitch moves only the named attempts' chunk files into `items/<param>/` and removes the rest.

Output may be local or gs:// (`outdir` is the one place that knows how bytes get there). Locally
the step is staged as `<out>/0.orbax-checkpoint-tmp-<ts>` and renamed to `<out>/0` last. GCS has
no rename, so there the step is written in place, as Orbax does on GCS: a `_CKPTBEAM_IN_PROGRESS`
marker says "ours, unfinished", and the two `commit_success.txt` files are the last writes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import tensorstore as ts

from ckpt_transforms import faults
from ckpt_transforms.planning.convert_plan import ArrayPlan, WorkItem
from ckpt_transforms.storage import outdir
from ckpt_transforms.tensors import dtypes

PROCESS_PREFIX = "ocdbt.process_"
ATTEMPT_PREFIX = ".attempt_"  # without OCDBT: one attempt's chunk files, before the stitch moves them
META_DB_ID = "stitchmeta"
OCDBT_TARGET_DATA_FILE_SIZE = 2 * 2**30  # MaxText base.yml checkpoint_storage_target_data_file_size_bytes
PYTREE_HANDLER = "orbax.checkpoint._src.handlers.pytree_checkpoint_handler.PyTreeCheckpointHandler"
_DB_ID = re.compile(r"^[A-Za-z0-9]+$")


@dataclass(frozen=True)
class Layout:
    """Orbax storage format: MaxText's `checkpoint_storage_use_ocdbt` / `checkpoint_storage_use_zarr3`.

    The default (both true) is MaxText's default; both false is what its Pathways loaders expect.
    """

    use_ocdbt: bool = True
    use_zarr3: bool = True


DEFAULT_LAYOUT = Layout()


def ts_context() -> ts.Context:
    """One Context per process: the merge is zero-copy only if children and parent share it."""
    return ts.Context({"file_io_concurrency": {"limit": 128}, "cache_pool#ocdbt": {"total_bytes_limit": 100_000_000}})


_CONTEXT: ts.Context | None = None


def reset_shared_context() -> None:
    """Forget cached OCDBT manifests and nodes: a run that rewrites a location in place (gs://
    with --force) must not see the b-tree of the checkpoint it deleted."""
    global _CONTEXT
    _CONTEXT = None


def shared_context() -> ts.Context:
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = ts_context()
    return _CONTEXT


def ocdbt_spec(directory: str) -> dict:
    """OCDBT kvstore spec as Orbax writes it.

    On a local file system: non-atomic data files plus an atomic single-file manifest. On GCS
    every object write is atomic already, so one `gcs` base serves both (as in Orbax).
    """
    base = outdir.kvstore_spec(directory)
    spec = {
        "driver": "ocdbt",
        "base": base,
        "config": {"max_inline_value_bytes": 1024, "max_decoded_node_bytes": 100_000_000, "manifest_kind": "single"},
        "assume_config": True,
        "target_data_file_size": OCDBT_TARGET_DATA_FILE_SIZE,
        "cache_pool": "cache_pool#ocdbt",
    }
    if base["driver"] == "file":
        spec["base"] = {**base, "file_io_locking": {"mode": "non_atomic"}}
        spec["manifest"] = base
    return spec


def db_dir(items_dir: str, db_id: str) -> str:
    if not _DB_ID.match(db_id):
        raise ValueError(f"OCDBT process id {db_id!r} must be alphanumeric")
    return outdir.join(items_dir, PROCESS_PREFIX + db_id)


def zarr3_metadata(shape: tuple[int, ...], chunk_shape: tuple[int, ...], dtype: str) -> dict:
    """zarr3 metadata as Orbax writes it: one sharding_indexed shard per chunk, zstd level 3."""
    return {
        "shape": list(shape),
        "data_type": dtypes.zarr3_name(dtype),
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunk_shape)}},
        "chunk_key_encoding": {"name": "default"},
        "fill_value": 0,
        "codecs": [
            {
                "name": "sharding_indexed",
                "configuration": {
                    "chunk_shape": list(chunk_shape),
                    "codecs": [
                        {"name": "bytes", "configuration": {"endian": "little"}},
                        {"name": "zstd", "configuration": {"level": 3, "checksum": False}},
                    ],
                    "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
                    "index_location": "end",
                },
            }
        ],
    }


def zarr2_metadata(shape: tuple[int, ...], chunk_shape: tuple[int, ...]) -> dict:
    """zarr2 metadata as Orbax writes it (`_build_zarr2_metadata`): zstd level 1, no fill value.

    The dtype goes in the spec's `dtype` (as Orbax does); TensorStore writes the rest of `.zarray`
    (dimension_separator ".", order "C", fill_value null, filters null).
    """
    return {"shape": list(shape), "chunks": list(chunk_shape), "compressor": {"id": "zstd", "level": 1}}


def _zarr_spec(kvstore: dict, name: str, shape, chunk_shape, dtype: str, layout: Layout) -> dict:
    """TensorStore spec of one param's array under `kvstore` (an OCDBT database or a plain directory)."""
    if kvstore["driver"] != "ocdbt":  # a plain directory: its path is the directory itself
        kvstore = {**kvstore, "path": kvstore["path"] + name + "/"}
    else:  # a path inside the database
        kvstore = {**kvstore, "path": name + "/"}
    spec: dict = {"kvstore": kvstore, "store_data_equal_to_fill_value": True}
    if layout.use_zarr3:
        spec.update(driver="zarr3", metadata=zarr3_metadata(shape, chunk_shape, dtype))
    else:
        spec.update(driver="zarr", dtype=np.dtype(dtype).name, metadata=zarr2_metadata(shape, chunk_shape))
    return spec


def attempt_dir(items_dir: str, db_id: str) -> str:
    """Without OCDBT: where attempt `db_id` writes its chunk files (never read by Orbax)."""
    if not _DB_ID.match(db_id):
        raise ValueError(f"attempt id {db_id!r} must be alphanumeric")
    return outdir.join(items_dir, ATTEMPT_PREFIX + db_id)


def _attempt_kvstore(items_dir: str, db_id: str, layout: Layout) -> dict:
    if layout.use_ocdbt:
        return ocdbt_spec(db_dir(items_dir, db_id))
    return outdir.kvstore_spec(attempt_dir(items_dir, db_id))


def _array_spec(items_dir: str, db_id: str, array: ArrayPlan, layout: Layout = DEFAULT_LAYOUT) -> dict:
    kvstore = _attempt_kvstore(items_dir, db_id, layout)
    return _zarr_spec(kvstore, array.name, array.shape, array.chunk_shape, array.dtype, layout)


def start_write_regions(
    items_dir: str,
    db_id: str,
    writes: Iterable[tuple[ArrayPlan, WorkItem, np.ndarray]],
    layout: Layout = DEFAULT_LAYOUT,
) -> ts.Future:
    """Stage item regions in this attempt's own database (or, without OCDBT, its own attempt
    directory) and start its commit (one OCDBT version; without OCDBT, the chunk files).

    TensorStore keeps a reference to each region instead of copying it (one region-sized copy
    less in memory and in time), so the caller must never modify a region after passing it here;
    dropping its own reference is fine. The returned future resolves once the database is
    durably committed. Encoding (zstd) and file writes run in TensorStore's threads meanwhile, so
    the caller can prepare the next item.
    """
    context = shared_context()
    txn = ts.Transaction()
    for array, item, data in writes:
        spec = _array_spec(items_dir, db_id, array, layout)
        store = ts.open(spec, context=context, transaction=txn, open=True, assume_metadata=True).result()
        index = tuple(slice(a, b) for a, b in item.region)
        store[index].write(data, can_reference_source_data_indefinitely=True).result()
    return txn.commit_async()


def write_regions(
    items_dir: str,
    db_id: str,
    writes: Iterable[tuple[ArrayPlan, WorkItem, np.ndarray]],
    layout: Layout = DEFAULT_LAYOUT,
) -> None:
    """Write item regions into this attempt's own database and wait for the commit."""
    start_write_regions(items_dir, db_id, writes, layout).result()


def _write_array_metadata(kvstore: dict, arrays: list[ArrayPlan], layout: Layout) -> None:
    """Every param's zarr metadata plus Orbax's `step` scalar (0) under `kvstore`; written by the stitch."""
    context = shared_context()
    txn = ts.Transaction()
    for array in arrays:
        spec = _zarr_spec(kvstore, array.name, array.shape, array.chunk_shape, array.dtype, layout)
        ts.open(spec, context=context, transaction=txn, create=True, open=True).result()
    step = ts.open(
        _zarr_spec(kvstore, "step", (), (), "int64", layout), context=context, transaction=txn, create=True, open=True
    ).result()
    step.write(np.int64(0)).result()
    txn.commit_async().result()


def merge_databases(items_dir: str, db_ids: Iterable[str]) -> None:
    """Zero-copy merge: copy each named database's b-tree into the root database, atomically."""
    context = shared_context()
    parent = ts.KvStore.open(ocdbt_spec(items_dir), context=context).result()
    children = [ts.KvStore.open(ocdbt_spec(db_dir(items_dir, d)), context=context).result() for d in db_ids]
    txn = ts.Transaction(atomic=True)
    for child in children:
        child.experimental_copy_range_to(parent.with_transaction(txn)).result()
    txn.commit_async().result()


def tree_metadata(arrays: list[ArrayPlan], layout: Layout = DEFAULT_LAYOUT) -> dict:
    """Orbax `_METADATA` for TrainState(step=0, params={'params': ...}, opt_state={})."""

    def entry(keys: tuple[str, ...], value_type: str, skip: bool = False) -> tuple[str, dict]:
        return repr(keys), {
            "key_metadata": [{"key": k, "key_type": 2} for k in keys],
            "value_metadata": {"value_type": value_type, "skip_deserialize": skip},
        }

    tree = dict([entry(("step",), "scalar")])
    tree.update(entry(tuple(a.path), "np.ndarray") for a in arrays)
    tree.update([entry(("opt_state",), "Dict", skip=True)])
    return {
        "tree_metadata": tree,
        "use_ocdbt": layout.use_ocdbt,
        "use_zarr3": layout.use_zarr3,
        "store_array_data_equal_to_fill_value": True,
        "custom_metadata": None,
    }


def _write_json(path: str, data: dict) -> None:
    outdir.write_text(path, json.dumps(data))


def chunk_keys(array_shape: tuple[int, ...], chunk_shape: tuple[int, ...], use_zarr3: bool) -> list[str]:
    """Every chunk key of a fully written array, relative to its directory (Orbax's key encodings:
    zarr2 `0.0` / scalar `0`; zarr3 default encoding `c/0/0` / scalar `c`)."""
    indices = list(np.ndindex(*[-(-n // c) for n, c in zip(array_shape, chunk_shape, strict=True)]))
    if use_zarr3:
        return ["/".join(("c",) + tuple(map(str, ix))) for ix in indices]
    return [".".join(map(str, ix)) if ix else "0" for ix in indices]


def _stitch_ocdbt(items_dir: str, named: list[str], arrays: list[ArrayPlan], layout: Layout) -> None:
    _write_array_metadata(ocdbt_spec(db_dir(items_dir, META_DB_ID)), arrays, layout)
    merge_databases(items_dir, [META_DB_ID] + named)


def _stitch_plain(items_dir: str, named: list[str], arrays: list[ArrayPlan], layout: Layout) -> None:
    """Without OCDBT: move the named attempts' chunk files into place, then check every chunk is there.

    Idempotent: a retried stitch moves whatever a failed one left in the named attempt directories.
    """
    for db_id in named:
        src = attempt_dir(items_dir, db_id)
        outdir.move_files(src, items_dir, outdir.list_files(src))
    _write_array_metadata(outdir.kvstore_spec(items_dir), arrays, layout)
    present = set(outdir.list_files(items_dir))
    for array in arrays:
        missing = [
            k
            for k in chunk_keys(array.shape, array.chunk_shape, layout.use_zarr3)
            if f"{array.name}/{k}" not in present
        ]
        if missing:
            raise RuntimeError(
                f"{array.name}: {len(missing)} chunk file(s) missing after the stitch, e.g. {missing[0]}; not publishing"
            )


def stitch(items_dir: str, db_ids: list[str], arrays: list[ArrayPlan], layout: Layout = DEFAULT_LAYOUT) -> dict:
    """Merge (or move) exactly the named attempts' writes, add array metadata and `_METADATA`, drop leftovers.

    Attempts not named (a failed or duplicate attempt's writes) never enter the checkpoint and are
    removed afterwards, so a retry can never leak stale chunks into the checkpoint.
    """
    named = sorted(set(db_ids))
    started = time.time()
    if layout.use_ocdbt:
        _stitch_ocdbt(items_dir, named, arrays, layout)
        keep = {PROCESS_PREFIX + d for d in named + [META_DB_ID]}
    else:
        _stitch_plain(items_dir, named, arrays, layout)
        keep = set()
    merge_seconds = time.time() - started
    _write_json(outdir.join(items_dir, "_METADATA"), tree_metadata(arrays, layout))
    removed = remove_attempts(items_dir, keep)
    # Without OCDBT the named attempts' directories are empty now (their files moved): not leftovers.
    removed = [e for e in removed if not (e.startswith(ATTEMPT_PREFIX) and e[len(ATTEMPT_PREFIX) :] in named)]
    return {"databases": len(named), "merge_seconds": merge_seconds, "removed_leftovers": removed}


def is_attempt_id(db_id: str) -> bool:
    return bool(_DB_ID.match(db_id))


def remove_attempts(items_dir: str, keep: set[str]) -> list[str]:
    """Remove every attempt's database or chunk directory whose entry name is not in `keep`;
    returns the entries removed."""
    removed = []
    for entry in outdir.list_children(items_dir):
        if entry.startswith((PROCESS_PREFIX, ATTEMPT_PREFIX)) and entry not in keep:
            outdir.remove_tree(outdir.join(items_dir, entry))
            removed.append(entry)
    return removed


def attempt_entry(db_id: str, layout: Layout) -> str:
    """The entry under `items/` that holds attempt `db_id`'s writes."""
    return (PROCESS_PREFIX if layout.use_ocdbt else ATTEMPT_PREFIX) + db_id


def committed_attempts(items_dir: str, layout: Layout) -> set[str]:
    """Attempt ids whose writes are there: OCDBT databases with a manifest (it appears when the
    database commits); without OCDBT, attempt directories (their files are checked by the stitch,
    which may already have moved some of them into place)."""
    prefix = attempt_entry("", layout)
    files = outdir.list_files(items_dir, prefix=prefix)
    if not layout.use_ocdbt:
        return {f.split("/", 1)[0][len(prefix) :] for f in files}
    return {f.split("/", 1)[0][len(prefix) :] for f in files if f.count("/") == 1 and f.endswith("/manifest.ocdbt")}


def commit_step(step_dir: str, custom_metadata: dict) -> None:
    """Orbax's step-level files; the `commit_success.txt` files, written last, are what GCS readers wait for."""
    now = time.time_ns()
    _write_json(
        outdir.join(step_dir, "_CHECKPOINT_METADATA"),
        {
            "item_handlers": {"items": PYTREE_HANDLER},
            "metrics": {},
            "init_timestamp_nsecs": now,
            "commit_timestamp_nsecs": now,
            "custom_metadata": custom_metadata,
        },
    )
    if outdir.is_gcs(step_dir):
        outdir.remove_file(outdir.join(step_dir, IN_PROGRESS_MARK))
    for d in (outdir.join(step_dir, "items"), step_dir):
        outdir.write_text(outdir.join(d, COMMIT_FILE), f"Checkpoint commit was successful to {d}")


STEP_DIR = "0"
TMP_MARK = ".orbax-checkpoint-tmp-"
COMMIT_FILE = "commit_success.txt"
IN_PROGRESS_MARK = "_CKPTBEAM_IN_PROGRESS"
REPLACED = "replaced-"  # infix of a replaced step renamed aside during a swap


def final_step_dir(output: str) -> str:
    return outdir.join(output, STEP_DIR)


def new_staging_dir(output: str) -> str:
    """Where this run writes its step.

    Locally: Orbax's own temporary-step naming, so Orbax readers ignore it until it is renamed.
    On GCS (no rename): the final step directory itself, marked in progress until committed.
    """
    if outdir.is_gcs(output):
        final = final_step_dir(output)
        outdir.write_text(outdir.join(final, IN_PROGRESS_MARK), f"ckptbeam conversion started at {time.time_ns()}")
        return final
    return os.path.join(output, f"{STEP_DIR}{TMP_MARK}{time.time_ns()}")


def stale_staging_dirs(output: str) -> list[str]:
    """Leftovers of unfinished runs: temporary steps locally; on GCS an uncommitted step we marked."""
    if outdir.is_gcs(output):
        final = final_step_dir(output)
        committed = outdir.file_exists(outdir.join(final, COMMIT_FILE))
        ours = outdir.file_exists(outdir.join(final, IN_PROGRESS_MARK))
        return [final] if ours and not committed else []
    if not os.path.isdir(output):
        return []
    return sorted(os.path.join(output, e) for e in os.listdir(output) if e.startswith(STEP_DIR + TMP_MARK))


def restore_interrupted_swap(output: str) -> None:
    """A crash between the two renames of a swap (file systems without an atomic exchange) left
    OUTPUT/0 missing and the old step renamed aside: put it back, before anything looks at OUTPUT."""
    if not outdir.is_gcs(output):
        asides = outdir.list_children(output, STEP_DIR + TMP_MARK + REPLACED)
        outdir.restore_aside(final_step_dir(output), [os.path.join(output, a) for a in asides])


def existing_step_error(output: str) -> str | None:
    """Why OUTPUT/0 must not be written, or None if it is free (or only our own leftovers)."""
    final = final_step_dir(output)
    if not outdir.is_gcs(output):
        return f"{final} already exists; remove it or choose another --output" if os.path.exists(final) else None
    if outdir.file_exists(outdir.join(final, COMMIT_FILE)):
        return f"{final} already exists; remove it or choose another --output"
    if outdir.dir_exists(final) and not outdir.file_exists(outdir.join(final, IN_PROGRESS_MARK)):
        return (
            f"{final} already exists but is neither a committed checkpoint nor an unfinished ckptbeam run; "
            "remove it or choose another --output"
        )
    return None


def discard_staging(staging_dir: str) -> bool:
    """Remove a failed run's output; never a committed step (on GCS staging is the final step)."""
    if outdir.is_gcs(staging_dir):
        if outdir.file_exists(outdir.join(staging_dir, COMMIT_FILE)):
            return False
    elif not os.path.exists(staging_dir):
        return False
    outdir.remove_tree(staging_dir)
    return True


def publish(staging_dir: str, output: str, replace: bool = False) -> str:
    """Make the staged step visible as OUTPUT/0: one atomic rename locally.

    With `replace`, the new step and a committed OUTPUT/0 swap places in one atomic exchange (or,
    where the file system cannot, two renames via a temporary-step name) and the old one, now at a
    temporary-step name cleared like any leftover, is removed last: a reader sees the old
    checkpoint or the new one, never a mix. On GCS the step was written in place and
    `commit_step` already wrote the commit markers last.
    """
    final = final_step_dir(output)
    if outdir.is_gcs(output):
        return final
    if not os.path.exists(final):
        os.rename(staging_dir, final)
        return final
    if not replace:
        raise FileExistsError(f"{final} appeared while converting; the new checkpoint stays in {staging_dir}")
    aside = os.path.join(output, f"{STEP_DIR}{TMP_MARK}{REPLACED}{time.time_ns()}")
    retired = outdir.swap_in(staging_dir, final, aside)
    faults.point("swap")
    shutil.rmtree(retired, ignore_errors=True)
    return final


def is_committed(output: str) -> bool:
    """Whether OUTPUT/0 is a finished checkpoint (locally it exists only after the final rename)."""
    final = final_step_dir(output)
    if outdir.is_gcs(output):
        return outdir.file_exists(outdir.join(final, COMMIT_FILE))
    return os.path.isdir(final)
