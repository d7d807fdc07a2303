"""The Beam graph of a conversion: Create(work items) -> Reshuffle -> ConvertWorkItem -> Stitch.

Kept apart from the launcher (`pipelines.convert`) so DoFns pickle by module path on every runner.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from ckpt_transforms import faults
from ckpt_transforms.orbax_io import writer as orbax_writer
from ckpt_transforms.planning.convert_plan import DEFAULT_MAX_ITEM_BYTES, ArrayPlan, Plan, WorkItem, item_working_bytes
from ckpt_transforms.storage import lease, outdir, resume
from ckpt_transforms.storage.provenance import PROVENANCE_FILE
from ckpt_transforms.storage.remote import is_permanent_failure
from ckpt_transforms.storage.sources import open_source
from ckpt_transforms.tensors.buffers import BufferPool
from ckpt_transforms.work_items.convert import build_region

log = logging.getLogger("ckptbeam")
METRICS_NAMESPACE = "ckptbeam"


@dataclass(frozen=True)
class WrittenRecord:
    """What a finished work item reports: the only way a database gets into the checkpoint."""

    item_id: int
    db_id: str
    bytes_written: int

    def payload(self) -> dict:
        """What the durable resume record of this item holds besides its id."""
        return {"db": self.db_id, "bytes_written": self.bytes_written}

    @classmethod
    def from_payload(cls, item_id: int, payload: dict) -> WrittenRecord | None:
        db, written = payload.get("db"), payload.get("bytes_written")
        if not isinstance(db, str) or not isinstance(written, int) or not orbax_writer.is_attempt_id(db):
            return None
        return cls(item_id, db, written)


@dataclass
class _InFlight:
    """A work item whose database is committing in TensorStore's threads."""

    item: WorkItem
    db_id: str
    commit: Any
    attempt: int
    started: float
    working_bytes: int


class ConvertWorkItem(beam.DoFn):
    """Range-read, transform and write one work item into a fresh OCDBT database per attempt.

    Items overlap: while TensorStore encodes and commits earlier items' databases, the next item
    is read and transformed. What may overlap is bounded by memory, not by count: the items in
    flight together stay within `in_flight_bytes` of planned working memory (--max_item_bytes;
    the planner sizes items at up to half of it so two overlap), so many small items (norms,
    small models) keep both cores busy, big ones go two at a time, and an item that could not be
    cut below the whole budget runs alone. A record is emitted only after its own database has
    committed, so the stitch never names a database that is not durable.
    """

    MAX_ITEMS_IN_FLIGHT = 8  # also bounds open databases and TensorStore futures per worker

    def __init__(
        self,
        source_uri: str,
        items_dir: str,
        arrays: list[ArrayPlan],
        total_items: int,
        attempts: int = 3,
        layout: orbax_writer.Layout = orbax_writer.DEFAULT_LAYOUT,
        in_flight_bytes: int = DEFAULT_MAX_ITEM_BYTES,
        resume_plan: str | None = None,
    ):
        """`resume_plan`: the plan hash; each committed item is then recorded for a resuming rerun."""
        self.source_uri = source_uri
        self.resume_plan = resume_plan
        self.in_flight_bytes = in_flight_bytes
        self.layout = layout
        self.items_dir = items_dir
        self.arrays = {a.name: a for a in arrays}
        self.total_items = total_items
        self.attempts = max(1, attempts)
        self.items_done = Metrics.counter(METRICS_NAMESPACE, "items_done")
        self.item_retries = Metrics.counter(METRICS_NAMESPACE, "item_retries")
        self.bytes_read = Metrics.counter(METRICS_NAMESPACE, "bytes_read")
        self.bytes_written = Metrics.counter(METRICS_NAMESPACE, "bytes_written")
        self.item_ms = Metrics.distribution(METRICS_NAMESPACE, "item_ms")

    def setup(self) -> None:
        self.source = open_source(self.source_uri)
        # Regions and read buffers reuse memory within the in-flight budget (see `buffers`).
        self.buffers = BufferPool(self.in_flight_bytes)

    def start_bundle(self) -> None:
        self._in_flight: deque[_InFlight] = deque()
        self._in_flight_bytes = 0

    def start_attempt(self, item: WorkItem, db_id: str) -> Any:
        """Build the region and start writing it into database `db_id`; returns a future that
        resolves when the database commits."""
        region = build_region(item, self.source, self.buffers)
        writes = [(self.arrays[item.param], item, region)]
        return orbax_writer.start_write_regions(self.items_dir, db_id, writes, self.layout)

    def _give_up_or_retry(self, item: WorkItem, attempt: int, error: Exception) -> None:
        # The failed attempt's database is never reported, so the stitch ignores and removes it.
        # A SourceError (malformed or missing source, or a remote read that already used up its
        # own transient retries) or a full disk would fail the same way again: no further attempts.
        if attempt >= self.attempts or is_permanent_failure(error):
            self._settle_in_flight()
            raise RuntimeError(
                f"work item {item.item_id} ({item.param}) failed"
                + (f" after {attempt} attempts" if attempt > 1 else "")
                + f": {error}"
            ) from error
        self.item_retries.inc()
        log.warning("work item %d (%s) attempt %d failed: %s; retrying", item.item_id, item.param, attempt, error)

    def _settle_in_flight(self) -> None:
        """Before failing the bundle, let other items' commits finish (or fail): TensorStore keeps
        writing in its own threads, and would otherwise recreate files inside a staging directory
        the launcher removes once the run has failed."""
        for flight in getattr(self, "_in_flight", ()):
            try:
                flight.commit.result()
            except Exception:  # noqa: BLE001 - the bundle is failing anyway; this error is not the cause
                pass

    def _start(self, item: WorkItem, attempt: int, started: float) -> _InFlight:
        while True:
            db_id = uuid.uuid4().hex
            try:
                commit = self.start_attempt(item, db_id)
                return _InFlight(item, db_id, commit, attempt, started, item_working_bytes(item))
            except Exception as e:
                self._give_up_or_retry(item, attempt, e)
                attempt += 1

    def _finish(self, flight: _InFlight) -> WrittenRecord:
        self._in_flight_bytes -= flight.working_bytes
        while True:
            try:
                flight.commit.result()
                break
            except Exception as e:
                self._give_up_or_retry(flight.item, flight.attempt, e)
                flight = self._start(flight.item, flight.attempt + 1, flight.started)
        item, elapsed = flight.item, time.time() - flight.started
        self.items_done.inc()
        self.bytes_read.inc(item.bytes_read)
        self.bytes_written.inc(item.bytes_written)
        self.item_ms.update(int(elapsed * 1000))
        record = WrittenRecord(item.item_id, flight.db_id, item.bytes_written)
        self._record(record)
        log.debug(  # one line per item only at DEBUG: a 671B conversion has 13k items
            "work item %d/%d done: %s %s, %.2f MB in %.2f s",
            item.item_id + 1,
            self.total_items,
            item.param,
            list(item.region_shape),
            item.bytes_written / 1e6,
            elapsed,
        )
        faults.point("item")
        return record

    def _record(self, record: WrittenRecord) -> None:
        """The durable record of a committed item (its database committed above), for a rerun."""
        if self.resume_plan is None:
            return
        staging = self.items_dir.rstrip("/").rsplit("/", 1)[0]
        resume.record_committed(staging, self.resume_plan, record.item_id, record.payload())

    def process(self, item):
        # Wait for the oldest commits until this item fits next to the ones still in flight.
        needed = item_working_bytes(item)
        while self._in_flight and (
            self._in_flight_bytes + needed > self.in_flight_bytes or len(self._in_flight) >= self.MAX_ITEMS_IN_FLIGHT
        ):
            yield self._finish(self._in_flight.popleft())
        flight = self._start(item, 1, time.time())
        self._in_flight.append(flight)
        self._in_flight_bytes += flight.working_bytes

    def finish_bundle(self):
        while self._in_flight:
            yield WindowedValue(self._finish(self._in_flight.popleft()), MIN_TIMESTAMP, [GlobalWindow()])


class StitchAndCommit(beam.DoFn):
    """Merge the databases named by records, write Orbax metadata, commit and publish last."""

    def __init__(
        self,
        staging_dir: str,
        output: str,
        arrays: list[ArrayPlan],
        item_ids: list[int],
        custom: dict,
        provenance: dict | None = None,
        replace: bool = False,
        layout: orbax_writer.Layout = orbax_writer.DEFAULT_LAYOUT,
    ):
        self.layout = layout
        self.staging_dir = staging_dir
        self.output = output
        self.arrays = arrays
        self.item_ids = item_ids
        self.custom = custom
        self.provenance = provenance
        self.replace = replace

    def process(self, records):
        by_item: dict[int, WrittenRecord] = {}
        for r in sorted(records, key=lambda r: (r.item_id, r.db_id)):
            by_item.setdefault(r.item_id, r)
        missing = sorted(set(self.item_ids) - set(by_item))
        if missing:
            raise RuntimeError(
                f"{len(missing)} work item(s) produced no record, e.g. item {missing[0]}; not publishing"
            )
        items_dir = os.path.join(self.staging_dir, "items")
        stats = orbax_writer.stitch(items_dir, [r.db_id for r in by_item.values()], self.arrays, self.layout)
        faults.point("stitch")
        lease.verify_held(self.output)  # fencing: a run whose lease was taken over must not commit
        resume.forget(self.staging_dir)  # a committed step keeps no resume state
        if self.provenance is not None:
            outdir.write_text(outdir.join(self.staging_dir, PROVENANCE_FILE), json.dumps(self.provenance, indent=1))
        orbax_writer.commit_step(self.staging_dir, self.custom)
        final = orbax_writer.publish(self.staging_dir, self.output, self.replace)
        log.info("stitched %d databases in %.3f s; published %s", stats["databases"], stats["merge_seconds"], final)
        yield {"final": final, **stats}


def build_pipeline(
    p: beam.Pipeline,
    plan: Plan,
    source_uri: str,
    staging_dir: str,
    output: str,
    attempts: int = 3,
    convert_fn: type[ConvertWorkItem] = ConvertWorkItem,
    provenance: dict | None = None,
    replace: bool = False,
    layout: orbax_writer.Layout = orbax_writer.DEFAULT_LAYOUT,
    resume_plan: str | None = None,
    adopted: list[WrittenRecord] = (),
) -> beam.PCollection:
    """The Beam graph over a plan; `convert_fn` lets tests inject faults into the worker step.

    `adopted`: records of items an unfinished run of the same plan committed; only the other
    items run, and the stitch merges both."""
    items_dir = os.path.join(staging_dir, "items")
    custom = {"scan_layers": plan.scan_layers}
    done = {r.item_id for r in adopted}
    records = (
        p
        | "CreateWorkItems" >> beam.Create([i for i in plan.items if i.item_id not in done], reshuffle=False)
        | "Reshuffle" >> beam.Reshuffle()
        | "ConvertWorkItem"
        >> beam.ParDo(
            convert_fn(
                source_uri,
                items_dir,
                plan.arrays,
                len(plan.items),
                attempts,
                layout,
                plan.max_item_bytes,
                resume_plan=resume_plan,
            )  # fmt: skip
        )
    )
    if adopted:
        records = (records, p | "AdoptedRecords" >> beam.Create(list(adopted))) | "WithAdopted" >> beam.Flatten()
    return (
        records
        | "CollectRecords" >> beam.combiners.ToList()
        | "StitchAndCommit"
        >> beam.ParDo(
            StitchAndCommit(
                staging_dir, output, plan.arrays, [i.item_id for i in plan.items], custom, provenance, replace, layout
            )
        )
    )
