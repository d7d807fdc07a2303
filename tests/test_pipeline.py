"""The Beam graph under different runners, retries, and zombie writes."""

from __future__ import annotations

import os

import pytest
from conftest import FIXTURES, assert_matches_reference, convert

from ckpt_transforms.orbax_io import writer as orbax_writer
from ckpt_transforms.tensors import buffers
from ckpt_transforms.work_items.convert import build_region
from pipelines.graph import ConvertWorkItem

SHARDED = os.path.join(FIXTURES, "llama_f32_sharded")


@pytest.fixture
def pool_everything(monkeypatch):
    """Pool even the fixtures' tiny arrays, so reuse of regions and read buffers is exercised
    while other items' commits are in flight. Yields how many times a pooled buffer was reused."""
    monkeypatch.setattr(buffers, "MIN_POOLED_BYTES", 0)
    reused = []
    original = buffers.BufferPool._buffer

    def counting(self, nbytes):
        before = [id(b) for b in self._buffers]
        buf = original(self, nbytes)
        if buf is not None and id(buf) in before:
            reused.append(nbytes)
        return buf

    monkeypatch.setattr(buffers.BufferPool, "_buffer", counting)
    return reused


def _databases(out_dir: str) -> list[str]:
    items = os.path.join(out_dir, "0", "items")
    return sorted(e for e in os.listdir(items) if e.startswith(orbax_writer.PROCESS_PREFIX))


def test_direct_runner_multi_processing(out_dir):
    summary = convert(
        SHARDED,
        out_dir,
        "--runner=DirectRunner",
        "--direct_running_mode=multi_processing",
        "--direct_num_workers=2",
        "--max_item_bytes=20000",  # forces layer- and row-split items
    )
    assert summary["work_items"] > summary["params"]
    assert_matches_reference(out_dir, SHARDED)


class FailsOnceAfterWriting(ConvertWorkItem):
    """First attempt of every item writes its region, then dies: a crashed attempt's leftovers."""

    def start_attempt(self, item, db_id):
        if not hasattr(self, "_failed"):
            self._failed = set()
        if item.item_id not in self._failed:
            self._failed.add(item.item_id)
            region = build_region(item, self.source, self.buffers)
            region[...] = 0  # garbage that must never reach the checkpoint
            writes = [(self.arrays[item.param], item, region)]
            orbax_writer.write_regions(self.items_dir, db_id, writes, self.layout)
            raise OSError("injected failure after writing")
        return super().start_attempt(item, db_id)


def test_item_that_fails_once_is_retried_and_checkpoint_is_identical(out_dir, pool_everything):
    summary = convert(SHARDED, out_dir, convert_fn=FailsOnceAfterWriting)
    assert summary["metrics"]["item_retries"] == summary["work_items"]
    assert_matches_reference(out_dir, SHARDED)
    # Only the successful attempts' databases (plus the stitch's metadata db) remain.
    assert len(_databases(out_dir)) == summary["work_items"] + 1


class ZombieWriter(ConvertWorkItem):
    """Also writes a stray database no record names, as a zombie attempt on another worker would."""

    def start_attempt(self, item, db_id):
        commit = super().start_attempt(item, db_id)
        region = build_region(item, self.source, self.buffers)  # while the real commit holds its region
        region[...] = 1
        writes = [(self.arrays[item.param], item, region)]
        orbax_writer.write_regions(self.items_dir, "zombie" + db_id[:8], writes, self.layout)
        return commit


def test_stitch_never_merges_an_unnamed_database(out_dir, pool_everything):
    summary = convert(SHARDED, out_dir, "--scan_layers=false", convert_fn=ZombieWriter)
    assert_matches_reference(out_dir, SHARDED, scan=False)
    assert pool_everything, "the zombie's regions came from the pool"
    assert not [d for d in _databases(out_dir) if "zombie" in d]
    assert len(_databases(out_dir)) == summary["work_items"] + 1


def test_pooled_buffers_are_reused_across_overlapping_items(out_dir, pool_everything):
    """Many small items, several in flight: every region and read buffer comes from the pool."""
    convert(SHARDED, out_dir, "--max_item_bytes=20000")
    assert_matches_reference(out_dir, SHARDED)
    assert len(pool_everything) > 10


def test_dry_run_writes_nothing(out_dir, capsys):
    summary = convert(SHARDED, out_dir, "--dry_run")
    assert summary["work_items"] == summary["params"] == 12
    assert not os.path.exists(out_dir)
    assert "work items" in capsys.readouterr().out


def test_existing_checkpoint_is_never_overwritten_by_other_inputs_without_a_record(out_dir):
    convert(SHARDED, out_dir)
    os.remove(os.path.join(out_dir, "0", "ckptbeam_provenance.json"))  # as if another tool wrote it
    before = sorted(os.listdir(os.path.join(out_dir, "0", "items")))
    with pytest.raises(FileExistsError, match="not made by ckptbeam"):
        convert(SHARDED, out_dir)
    assert sorted(os.listdir(os.path.join(out_dir, "0", "items"))) == before


class SourceBreaksOnce(ConvertWorkItem):
    """A source error (e.g. HTTP 404 after the reader's own retries) is not worth another attempt."""

    calls = 0

    def start_attempt(self, item, db_id):
        from ckpt_transforms.storage.sources import SourceError

        type(self).calls += 1
        raise SourceError(f"{item.param}: gone")


def test_source_errors_are_not_retried(out_dir):
    SourceBreaksOnce.calls = 0
    with pytest.raises(Exception, match="gone"):
        convert(SHARDED, out_dir, convert_fn=SourceBreaksOnce)
    assert SourceBreaksOnce.calls == 1
    assert not os.path.exists(os.path.join(out_dir, "0"))


class CommitFailsOnce(ConvertWorkItem):
    """The write is staged, but the asynchronous commit of the first attempt fails (disk full...)."""

    class _Failed:
        def result(self):
            raise OSError("commit failed")

    def start_attempt(self, item, db_id):
        commit = super().start_attempt(item, db_id)
        if not hasattr(self, "_seen"):
            self._seen = set()
        if item.item_id not in self._seen:
            self._seen.add(item.item_id)
            commit.result()  # let it land, then report failure: its database must still be ignored
            return self._Failed()
        return commit


def test_a_commit_that_fails_asynchronously_is_retried(out_dir):
    summary = convert(SHARDED, out_dir, "--scan_layers=false", convert_fn=CommitFailsOnce)
    assert summary["metrics"]["item_retries"] == summary["work_items"]
    assert_matches_reference(out_dir, SHARDED, scan=False)
    items = os.path.join(out_dir, "0", "items")
    assert len([e for e in os.listdir(items) if e.startswith("ocdbt.process_")]) == summary["work_items"] + 1
