"""The Beam graph of an export: Create(work items) -> Reshuffle -> ExportWorkItem -> Finalize.

Workers write their HF tensors' bytes through the shard writer of the output kind
(`safetensors_io.writer`): locally straight into the pre-sized shards of the staging directory,
on gs:// as part and scatter objects under the staging prefix (gs:// adds PlanSegments ->
AssembleSegments, which turn the scatter objects into parts). The finalize step checks that every
item reported and publishes: locally it writes the index, config, tokenizer files and the provenance
record into the staging directory and renames it into place; on gs:// (no rename) it composes
the parts into the final shard objects at OUT/, then writes the index and side files, and the
provenance record last: its presence marks a complete export.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass

import apache_beam as beam
from apache_beam.metrics import Metrics

from ckpt_transforms import faults
from ckpt_transforms.orbax_io.reader import Checkpoint, CheckpointError, read_context
from ckpt_transforms.planning.export_plan import ExportItem, ExportPlan
from ckpt_transforms.safetensors_io.layout import INDEX_FILE, ShardLayout, index_json
from ckpt_transforms.safetensors_io.writer import (
    Scatter,
    Segment,
    assemble_segment,
    check_parts,
    compose_shards,
    list_parts,
    open_shard_writer,
    plan_segments,
    segment_bytes,
)
from ckpt_transforms.storage import lease, outdir, resume
from ckpt_transforms.work_items.export import LeafCache, run_export_item

log = logging.getLogger("ckptbeam")
METRICS_NAMESPACE = "ckptbeam"
DONE_DIR = resume.RECORDS_DIR  # one record per finished item: resume state and progress for the launcher
EXPORT_PROVENANCE_FILE = "ckptbeam_export.json"
# gs:// only: written to the staging prefix once the finalize step starts writing at OUT/, so a
# failed run knows the final objects it has to remove (before it, OUT/ is untouched).
PUBLISHING_MARK = ".ckptbeam_publishing"
OLD_INFIX = ".ckptbeam-old-"  # a replaced export renamed aside (only where no atomic exchange exists)


@dataclass(frozen=True)
class ExportRecord:
    item_id: int
    bytes_written: int
    scatter: tuple[Scatter, ...] = ()  # gs://: the item's small runs, for the segment stage

    def payload(self) -> dict:
        """What the durable resume record of this item holds besides its id."""
        return {"bytes_written": self.bytes_written, "scatter": [[s.file, s.name, s.runs] for s in self.scatter]}

    @classmethod
    def from_payload(cls, item_id: int, payload: dict) -> ExportRecord | None:
        try:
            written = payload["bytes_written"]
            scatter = tuple(
                Scatter(str(f), str(n), tuple(tuple(int(x) for x in r) for r in runs))
                for f, n, runs in payload["scatter"]
            )
        except (KeyError, TypeError, ValueError):
            return None
        return cls(item_id, written, scatter) if isinstance(written, int) else None


class ExportWorkItem(beam.DoFn):
    """Read whole chunks of an item's leaves, undo the conversion ops, write the HF bytes."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        staging_dir: str,
        shards: list[ShardLayout],
        total: int,
        attempts: int,
        resume_plan: str | None = None,
    ):
        """`resume_plan`: the plan hash; each item's bytes are then made durable and recorded."""
        self.checkpoint, self.staging_dir, self.shards = checkpoint, staging_dir, shards
        self.resume_plan = resume_plan
        self.total, self.attempts = total, max(1, attempts)
        self.items_done = Metrics.counter(METRICS_NAMESPACE, "items_done")
        self.item_retries = Metrics.counter(METRICS_NAMESPACE, "item_retries")
        self.bytes_read = Metrics.counter(METRICS_NAMESPACE, "bytes_read")
        self.bytes_written = Metrics.counter(METRICS_NAMESPACE, "bytes_written")

    def setup(self) -> None:
        c = self.checkpoint
        self.leaves = LeafCache(c.items_dir, c.use_ocdbt, c.use_zarr3, read_context())
        self.writer = open_shard_writer(self.staging_dir)
        self.shard_of = {t.key: s for s in self.shards for t in s.tensors}

    def process(self, item: ExportItem):
        started = time.time()
        for attempt in range(1, self.attempts + 1):
            try:
                written = run_export_item(item, self.leaves, self.shard_of, self.writer)
                scatter = self.writer.end_item()  # gs://: everything is uploaded before the item reports
                break
            except (CheckpointError, MemoryError, OSError) as e:
                self.writer.discard()
                # A damaged checkpoint or a full disk fails the same way again.
                raise RuntimeError(f"export work item {item.item_id} ({item.label}) failed: {e}") from e
            except Exception as e:
                self.writer.discard()
                if attempt == self.attempts:
                    raise RuntimeError(
                        f"export work item {item.item_id} ({item.label}) failed after {attempt} attempts: {e}"
                    ) from e
                self.item_retries.inc()
                log.warning("export work item %d attempt %d failed: %s; retrying", item.item_id, attempt, e)
        self.items_done.inc()
        self.bytes_read.inc(item.bytes_read)
        self.bytes_written.inc(written)
        record = ExportRecord(item.item_id, written, tuple(scatter))
        self._record(record)
        faults.point("item")
        log.debug(
            "export item %d/%d done: %s in %.2f s", item.item_id + 1, self.total, item.label, time.time() - started
        )
        yield record

    def _record(self, record: ExportRecord) -> None:
        """Record the item for a resuming rerun once its bytes are durable (gs://: uploaded by
        `end_item`; locally: fsynced here); without a plan hash, a bare progress marker."""
        if self.resume_plan is None:
            mark_done(self.staging_dir, record.item_id)
            return
        self.writer.flush()
        resume.record_committed(self.staging_dir, self.resume_plan, record.item_id, record.payload())

    def finish_bundle(self) -> None:
        # Durable before the bundle's records are committed.
        self.writer.flush()

    def teardown(self) -> None:
        writer = getattr(self, "writer", None)
        if writer is not None:
            writer.close()


class FinalizeExport(beam.DoFn):
    """Check every item reported, write index/config/tokenizer/provenance, publish."""

    def __init__(self, staging_dir: str, output: str, plan_items: list[int], shards: list[ShardLayout],
                 side_files: dict[str, bytes], provenance: dict, replace: bool):  # fmt: skip
        self.staging_dir, self.output, self.item_ids, self.shards = staging_dir, output, plan_items, shards
        self.side_files, self.provenance, self.replace = side_files, provenance, replace

    def process(self, records):
        lease.verify_held(self.output)  # fencing: a run whose lease was taken over must not publish
        if outdir.is_gcs(self.output):
            # `records` are the segments' results here; the items were checked by PlanSegments.
            yield publish_gcs(self.staging_dir, self.output, self.shards, self._files(), self.replace)
            return
        check_records(records, self.item_ids)
        for shard in self.shards:
            path = os.path.join(self.staging_dir, shard.file)
            if os.path.getsize(path) != shard.size:
                raise RuntimeError(f"{path} has {os.path.getsize(path)} bytes, planned {shard.size}; not publishing")
        for name, data in self._files().items():
            with open(os.path.join(self.staging_dir, name), "wb") as f:
                f.write(data)
                os.fsync(f.fileno())
        resume.forget(self.staging_dir)
        faults.point("stitch")
        yield publish_dir(self.staging_dir, self.output, self.replace)

    def _files(self) -> dict[str, bytes]:
        """Everything besides the shards, in writing order: the provenance record last."""
        index = index_json(self.shards)
        files = dict(self.side_files)
        if index is not None:
            files[INDEX_FILE] = index.encode("utf-8")
        files[EXPORT_PROVENANCE_FILE] = (json.dumps(self.provenance, indent=1, sort_keys=True) + "\n").encode()
        return files


def check_records(records: list[ExportRecord], item_ids: list[int]) -> None:
    missing = sorted(set(item_ids) - {r.item_id for r in records})
    if missing:
        raise RuntimeError(f"{len(missing)} export work item(s) produced no record, e.g. {missing[0]}; not publishing")


class PlanSegments(beam.DoFn):
    """gs://: once every item reported, the shard bytes no direct part covers, as segments."""

    def __init__(self, staging_dir: str, plan_items: list[int], shards: list[ShardLayout]):
        self.staging_dir, self.item_ids, self.shards = staging_dir, plan_items, shards

    def process(self, records):
        check_records(records, self.item_ids)
        scatters = [sc for r in records for sc in r.scatter]
        segments = plan_segments(self.shards, list_parts(self.staging_dir), scatters, segment_bytes())
        log.info("%d scatter object(s) -> %d segment(s)", len(scatters), len(segments))
        yield from segments


class AssembleSegment(beam.DoFn):
    """gs://: one segment's bytes gathered from scatter objects, uploaded as a part."""

    def __init__(self, staging_dir: str, output: str):
        self.staging_dir, self.output = staging_dir, output
        self.segments = Metrics.counter(METRICS_NAMESPACE, "segments")

    def process(self, segment: Segment):
        yield assemble_segment(self.staging_dir, self.output, segment)
        self.segments.inc()


def mark_done(staging: str, item_id: int) -> None:
    """One empty marker per finished item, counted by the launcher's progress line."""
    if outdir.is_gcs(staging):
        outdir.write_bytes(outdir.join(staging, DONE_DIR, str(item_id)), b"")
    else:
        open(os.path.join(staging, DONE_DIR, str(item_id)), "wb").close()


def count_done(staging: str) -> int:
    """Finished items so far (one listing on gs://)."""
    return resume.count_records(staging)


def published_names(shards: list[ShardLayout], side_files: dict[str, bytes]) -> list[str]:
    """Every object a gs:// export writes at OUT/, the provenance record first (removal order)."""
    names = [EXPORT_PROVENANCE_FILE, *sorted(side_files), INDEX_FILE, *(s.file for s in shards)]
    return list(dict.fromkeys(names))


def publish_gcs(staging: str, output: str, shards: list[ShardLayout], files: dict[str, bytes], replace: bool) -> str:
    """Publish a gs:// export in place: shards, then index and side files, provenance last.

    GCS has no rename. Replacing (`replace`, from --force) deletes the old provenance record
    first, so from then on OUT/ never looks complete until the new record lands.
    """
    started = time.time()
    parts = check_parts(staging, output, shards)  # before anything at OUT/ is touched
    if replace:
        outdir.remove_file(outdir.join(output, EXPORT_PROVENANCE_FILE))
    outdir.write_bytes(outdir.join(staging, PUBLISHING_MARK), b"")
    if replace:
        faults.point("force_delete")
        outdir.remove_tree(output)
    stats = compose_shards(staging, output, shards, parts)
    last = EXPORT_PROVENANCE_FILE
    for name, data in files.items():
        if name != last:
            outdir.write_bytes(outdir.join(output, name), data)
    outdir.write_bytes(outdir.join(output, last), files[last])
    log.info(
        "published %s: %d shard(s) from %d part(s) with %d compose call(s) in %.2f s",
        output, len(shards), stats.parts, stats.compose_calls, time.time() - started,
    )  # fmt: skip
    try:
        outdir.remove_tree(staging)
    except Exception as e:  # the export is complete; the next run clears leftovers
        log.warning("could not remove the staging prefix %s: %s", staging, e)
    return output


def _remove_tree(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def publish_dir(staging: str, output: str, replace: bool) -> str:
    """Rename the finished staging directory into place. An existing output (only with
    `replace`) swaps places with it (`outdir.swap_in`) and is deleted last, so a reader sees the
    old model or the new one, never a mix."""
    if os.path.isdir(output) and not os.listdir(output):
        os.rmdir(output)  # an empty directory holds nothing to keep
    if os.path.exists(output):
        if not replace:
            raise FileExistsError(f"{output} exists; not replacing it")
        old = outdir.swap_in(staging, output, f"{output}{OLD_INFIX}{int(time.time() * 1000)}")
        faults.point("swap")
        _remove_tree(old)
    else:
        os.rename(staging, output)
    return output


def build_export_pipeline(
    p: beam.Pipeline,
    plan: ExportPlan,
    checkpoint: Checkpoint,
    staging: str,
    output: str,
    side_files: dict[str, bytes],
    provenance: dict,
    replace: bool,
    attempts: int = 3,
    resume_plan: str | None = None,
    adopted: list[ExportRecord] = (),
) -> beam.PCollection:
    """`adopted`: records of items an unfinished run of the same plan committed; only the other
    items run, and the finalize step counts both."""
    done = {r.item_id for r in adopted}
    work = ExportWorkItem(checkpoint, staging, plan.shards, len(plan.items), attempts, resume_plan)
    records = (
        p
        | "CreateExportItems" >> beam.Create([i for i in plan.items if i.item_id not in done], reshuffle=False)
        | "Reshuffle" >> beam.Reshuffle()
        | "ExportWorkItem" >> beam.ParDo(work)
    )
    if adopted:
        records = (records, p | "AdoptedRecords" >> beam.Create(list(adopted))) | "WithAdopted" >> beam.Flatten()
    collected = records | "CollectRecords" >> beam.combiners.ToList()
    if outdir.is_gcs(output):
        collected = (
            collected
            | "PlanSegments" >> beam.ParDo(PlanSegments(staging, [i.item_id for i in plan.items], plan.shards))
            | "ReshuffleSegments" >> beam.Reshuffle()
            | "AssembleSegments" >> beam.ParDo(AssembleSegment(staging, output))
            | "CollectSegments" >> beam.combiners.ToList()
        )
    return collected | "FinalizeExport" >> beam.ParDo(
        FinalizeExport(staging, output, [i.item_id for i in plan.items], plan.shards, side_files, provenance, replace)
    )
