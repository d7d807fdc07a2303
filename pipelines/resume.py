"""Launcher side of resuming: find the unfinished staging of the same plan, adopt its committed
items, or start clean; after a failure, keep what is committed for the next run.

The records themselves (format, plan hash, validity) live in `ckpt_transforms.storage.resume`;
here is what each direction adopts: convert an item's OCDBT database (or attempt directory),
export an item's bytes in the pre-sized local shards (or its part and scatter objects on gs://).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from ckpt_transforms.orbax_io import writer as orbax_writer
from ckpt_transforms.planning.convert_plan import Plan
from ckpt_transforms.planning.export_plan import ExportPlan
from ckpt_transforms.safetensors_io import writer as shard_writer
from ckpt_transforms.storage import outdir, resume
from pipelines.export_graph import ExportRecord
from pipelines.graph import WrittenRecord

log = logging.getLogger("ckptbeam")


@dataclass
class Staging:
    """Where this run writes, and what it reuses from an unfinished run of the same plan."""

    path: str
    plan_id: str
    resumed: bool = False  # an unfinished run of this plan was found and adopted
    adopted: list = field(default_factory=list)  # its committed items' records

    def line(self, total: int) -> str:
        return resume.resumed_line(len(self.adopted), total)


def convert_plan_id(plan: Plan, provenance: dict, layout: orbax_writer.Layout) -> str:
    """Provenance covers sources (fingerprints), map version and options; the items and arrays
    cover the planner itself (chunking, item cuts)."""
    return resume.plan_hash("convert", provenance, layout, plan.arrays, plan.items)


def export_plan_id(plan: ExportPlan, provenance: dict, output: str) -> str:
    """Provenance covers the checkpoint (fingerprint), config and options; on gs:// the part
    writer's thresholds decide which objects an item writes, so a rerun writes the same names."""
    writer = "local"
    if outdir.is_gcs(output):
        writer = [shard_writer.direct_part_bytes(), shard_writer.segment_bytes(), shard_writer.MAX_PART_BYTES]
    return resume.plan_hash("export", provenance, writer, plan.shards, plan.items)


def _remove(stale: list[str], what: str) -> None:
    for path in stale:
        log.info("removing leftovers of an earlier unfinished %s: %s", what, path)
        outdir.remove_tree(path)


def _keep_only(staging: str, kept: set[int]) -> None:
    """Drop the records that were not adopted: the rerun writes its own for those items."""
    directory = resume.records_dir(staging)
    for name in outdir.list_files(directory):
        if not name.isdigit() or int(name) not in kept:
            outdir.remove_file(outdir.join(directory, name))


def prepare_convert(output: str, plan: Plan, plan_id: str, layout: orbax_writer.Layout, adopt: bool) -> Staging:
    """The staging step directory: the unfinished one of this plan (when `adopt`) with its
    committed items, or a fresh one; every other unfinished run of ours is removed."""
    stale = orbax_writer.stale_staging_dirs(output)
    chosen, others = resume.pick_staging(stale, plan_id) if adopt else (None, stale)
    _remove(others, "run")
    if chosen is not None:
        return Staging(chosen, plan_id, True, _adopt_databases(chosen, plan, plan_id, layout))
    staging = orbax_writer.new_staging_dir(output)
    outdir.make_dirs(outdir.join(staging, "items"))
    resume.mark_plan(staging, plan_id)
    return Staging(staging, plan_id)


def _adopt_databases(staging: str, plan: Plan, plan_id: str, layout: orbax_writer.Layout) -> list[WrittenRecord]:
    """Records whose database is there; every database (attempt) no adopted record names is removed."""
    items_dir = outdir.join(staging, "items")
    present = orbax_writer.committed_attempts(items_dir, layout)
    adopted = []
    for item_id, payload in sorted(resume.read_records(staging, plan_id, {i.item_id for i in plan.items}).items()):
        record = WrittenRecord.from_payload(item_id, payload)
        if record is not None and record.db_id in present:
            adopted.append(record)
    removed = orbax_writer.remove_attempts(items_dir, {orbax_writer.attempt_entry(r.db_id, layout) for r in adopted})
    if removed:
        log.info("removed %d database(s) no committed record names, e.g. %s", len(removed), removed[0])
    _keep_only(staging, {r.item_id for r in adopted})
    return adopted


def prepare_export(stale: list[str], fresh: str, plan: ExportPlan, plan_id: str, adopt: bool) -> Staging:
    """The staging directory (prefix on gs://): the unfinished one of this plan (when `adopt`)
    with its committed items, or `fresh` with the shards created; the other stale ones removed."""
    chosen, others = resume.pick_staging(stale, plan_id) if adopt else (None, stale)
    if chosen is not None and not outdir.is_gcs(chosen) and not _shards_intact(chosen, plan):
        others, chosen = others + [chosen], None
    _remove(others, "export")
    if chosen is not None:
        return Staging(chosen, plan_id, True, _adopt_exported(chosen, plan, plan_id))
    outdir.make_dirs(fresh)
    shard_writer.create_shards(fresh, plan.shards)
    resume.mark_plan(fresh, plan_id)  # only now: shards exist at their full size (their headers uploaded)
    return Staging(fresh, plan_id)


def _shards_intact(staging: str, plan: ExportPlan) -> bool:
    """Every local shard file at its planned size: adopted bytes live in them, never recreated."""
    for shard in plan.shards:
        path = os.path.join(staging, shard.file)
        if not os.path.isfile(path) or os.path.getsize(path) != shard.size:
            log.warning("not resuming %s: %s is missing or not %d bytes", staging, shard.file, shard.size)
            return False
    return True


def _adopt_exported(staging: str, plan: ExportPlan, plan_id: str) -> list[ExportRecord]:
    """Records of the items whose bytes are in place. An item without a record is rewritten
    whole by this run (locally at its planned offsets; on gs:// under the same part and scatter
    names, the writer's thresholds being part of the plan hash), so its partial writes vanish."""
    adopted = []
    for item_id, payload in sorted(resume.read_records(staging, plan_id, {i.item_id for i in plan.items}).items()):
        record = ExportRecord.from_payload(item_id, payload)
        if record is not None:
            adopted.append(record)
    _keep_only(staging, {r.item_id for r in adopted})
    return adopted


def keep_after_failure(staging: str, output: str, adopt: bool) -> str | None:
    """If a failed run's staging stays for the next run to resume (resume on, and some item
    committed), the note saying so; None when it is to be removed. Nothing is published either way."""
    committed = resume.count_records(staging) if adopt else 0
    if not committed:
        return None
    return (
        f"nothing was published at {output}; {committed} committed work item(s) kept in {staging}: rerun the "
        "same command to resume, or add --no_resume to start clean"
    )
