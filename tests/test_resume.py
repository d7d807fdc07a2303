"""Resume: a rerun of the same plan adopts the committed items of an unfinished run and does
only the rest, with a checkpoint (or export) identical to an uninterrupted run's.

The killed runs are real: the CLI in a subprocess (its own process group, so DirectRunner's
worker processes die with it), SIGKILLed once about half of the items have their durable record.
The rerun runs in-process, so the bytes it reads are counted where work items read them.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from conftest import ROOT, assert_bitwise_equal, convert, restore_leaves

from ckpt_transforms.storage import resume
from ckpt_transforms.work_items import convert as convert_items
from ckpt_transforms.work_items import export as export_items
from pipelines.graph import ConvertWorkItem
from pipelines.options import ConvertOptions, split_export_argv

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from make_llama_checkpoint import make  # noqa: E402

ITEMS = ("--max_item_bytes=64KiB",)  # 151 work items on the model below
EXPORT_ITEMS = ("--max_item_bytes=16KiB", "--max_shard_size=500KB")  # 239 items, 5 shards


def make_model(directory: str) -> str:
    make(directory, layers=4, hidden=128, mlp=256, heads=4, kv_heads=2, vocab=2000)
    return directory


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return make_model(str(tmp_path_factory.mktemp("model") / "llama"))


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory) -> str:
    """An uninterrupted conversion: what every resumed one must equal, leaf for leaf."""
    out = str(tmp_path_factory.mktemp("reference") / "out")
    convert(model, out, *ITEMS)
    return out


def convert_plan(source: str, *args: str):
    """(plan, plan hash) as the launcher computes them."""
    from pipelines.convert import make_plan
    from pipelines.resume import convert_plan_id

    opts = PipelineOptions(["--source", source, "--output", "unused", *args]).view_as(ConvertOptions)
    plan, provenance = make_plan(opts)
    from ckpt_transforms.orbax_io.writer import Layout

    return plan, convert_plan_id(plan, provenance, Layout(opts.use_ocdbt, opts.use_zarr3))


def record_ids(staging: str) -> set[int]:
    """Item ids with a record file (what a rerun may adopt), read without the code under test."""
    from ckpt_transforms.storage import outdir

    return {int(n) for n in outdir.list_files(resume.records_dir(staging)) if n.isdigit()}


def kill_when_half_done(cmd: list[str], find_staging, total: int) -> int:
    """Run `cmd`; SIGKILL its process group once half of `total` items have records; returns
    the records seen then. Fails if the run ends first."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    seen, deadline = 0, time.time() + 180
    try:
        while proc.poll() is None and time.time() < deadline:
            staging = find_staging()
            seen = resume.count_records(staging) if staging else 0
            if seen >= total // 2:
                break
            time.sleep(0.01)  # polling the record count
        assert proc.poll() is None, f"the run ended before half its items were done: {proc.stderr.read()[-2000:]}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    return seen


def local_staging(pattern: str):
    def find() -> str | None:
        found = glob.glob(pattern)
        return found[0] if found else None

    return find


def assert_same_checkpoint(out: str, reference: str) -> None:
    expected, actual = restore_leaves(reference), restore_leaves(out)
    assert sorted(actual) == sorted(expected)
    for name, value in expected.items():
        assert_bitwise_equal(actual[name], value, name)


def count_reads(monkeypatch) -> list[int]:
    """Bytes convert work items read from the source in this process (one entry per read)."""
    reads: list[int] = []
    real = convert_items._read

    def counting(source, file, offset, length, pool):
        reads.append(length)
        return real(source, file, offset, length, pool)

    monkeypatch.setattr(convert_items, "_read", counting)
    return reads


def count_region_reads(monkeypatch) -> list[int]:
    """Leaf regions export work items read in this process (one entry per read)."""
    reads: list[int] = []
    real = export_items.read_region

    def counting(store, region):
        reads.append(1)
        return real(store, region)

    monkeypatch.setattr(export_items, "read_region", counting)
    return reads


@pytest.fixture
def counted_reads(monkeypatch) -> list[int]:
    return count_reads(monkeypatch)


@pytest.fixture
def counted_region_reads(monkeypatch) -> list[int]:
    return count_region_reads(monkeypatch)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipelines.cli", *args]


def test_killed_convert_resumes_reading_only_the_rest(model, reference, tmp_path, counted_reads, capsys):
    out = str(tmp_path / "out")
    plan, plan_id = convert_plan(model, *ITEMS)
    total = len(plan.items)
    seen = kill_when_half_done(
        cli("convert", "--source", model, "--output", out, *ITEMS),
        local_staging(os.path.join(out, "0.orbax-checkpoint-tmp-*")),
        total,
    )
    (staging,) = glob.glob(os.path.join(out, "0.orbax-checkpoint-tmp-*"))
    recorded = record_ids(staging)
    assert len(recorded) >= seen >= total // 2 and len(recorded) < total
    # One record damaged (not adopted: that item is redone), one of another plan (ignored).
    damaged = min(recorded)
    with open(os.path.join(resume.records_dir(staging), str(damaged)), "w") as f:
        f.write('{"format": "ckptbeam-resu')
    stranger = min(set(range(total)) - recorded)
    resume.write_record(staging, "0" * 64, stranger, {"db": "0" * 32, "bytes_written": 1})
    adopted = recorded - {damaged}

    summary = convert(model, out, *ITEMS)

    assert f"resumed: {len(adopted)} of {total} items reused" in capsys.readouterr().out
    assert summary["resumed_items"] == len(adopted)
    remaining = sum(i.bytes_read for i in plan.items if i.item_id not in adopted)
    assert sum(counted_reads) == remaining == summary["metrics"]["bytes_read"]
    assert remaining < 0.75 * summary["bytes_read"]  # about half of the model was not read again
    assert os.listdir(out) == ["0"]
    assert not os.path.exists(os.path.join(out, "0", resume.RECORDS_DIR))
    assert_same_checkpoint(out, reference)


def test_killed_multiprocess_convert_resumes(model, reference, tmp_path, counted_reads):
    """Under DirectRunner multi_processing the records come from worker processes, killed with
    the launcher (one process group); the rerun adopts them like any other."""
    out = str(tmp_path / "out")
    mp = ("--runner=DirectRunner", "--direct_running_mode=multi_processing", "--direct_num_workers=2")
    plan, _ = convert_plan(model, *ITEMS)
    kill_when_half_done(
        cli("convert", "--source", model, "--output", out, *ITEMS, *mp),
        local_staging(os.path.join(out, "0.orbax-checkpoint-tmp-*")),
        len(plan.items),
    )
    (staging,) = glob.glob(os.path.join(out, "0.orbax-checkpoint-tmp-*"))
    adopted = record_ids(staging)
    summary = convert(model, out, *ITEMS)
    assert summary["resumed_items"] == len(adopted) >= len(plan.items) // 2
    assert sum(counted_reads) == sum(i.bytes_read for i in plan.items if i.item_id not in adopted)
    assert_same_checkpoint(out, reference)


class FailsHalfWay(ConvertWorkItem):
    """Every item after the first half fails for good (a bad shard found late)."""

    def start_attempt(self, item, db_id):
        self.started = getattr(self, "started", 0) + 1
        if self.started > self.total_items // 2:
            raise OSError("quota exceeded")
        return super().start_attempt(item, db_id)


def test_failed_run_keeps_committed_items_for_the_rerun(model, reference, tmp_path, counted_reads):
    out = str(tmp_path / "out")
    with pytest.raises(Exception, match="quota exceeded"):
        convert(model, out, *ITEMS, convert_fn=FailsHalfWay)
    (staging,) = glob.glob(os.path.join(out, "0.orbax-checkpoint-tmp-*"))
    assert not os.path.exists(os.path.join(out, "0")), "nothing is published"
    kept = record_ids(staging)
    assert kept
    counted_reads.clear()
    summary = convert(model, out, *ITEMS)
    assert summary["resumed_items"] == len(kept)
    plan, _ = convert_plan(model, *ITEMS)
    assert sum(counted_reads) == sum(i.bytes_read for i in plan.items if i.item_id not in kept)
    assert_same_checkpoint(out, reference)


def test_no_resume_starts_clean(model, reference, tmp_path, counted_reads):
    out = str(tmp_path / "out")
    with pytest.raises(Exception, match="quota exceeded"):
        convert(model, out, *ITEMS, convert_fn=FailsHalfWay)
    (staging,) = glob.glob(os.path.join(out, "0.orbax-checkpoint-tmp-*"))
    counted_reads.clear()
    summary = convert(model, out, *ITEMS, "--no_resume")
    assert summary["resumed_items"] == 0
    assert sum(counted_reads) == summary["bytes_read"]
    assert os.listdir(out) == ["0"] and not os.path.exists(staging)
    assert_same_checkpoint(out, reference)


def test_other_options_do_not_adopt_and_clear_the_unfinished_run(model, tmp_path):
    out = str(tmp_path / "out")
    with pytest.raises(Exception, match="quota exceeded"):
        convert(model, out, *ITEMS, convert_fn=FailsHalfWay)
    (staging,) = glob.glob(os.path.join(out, "0.orbax-checkpoint-tmp-*"))
    summary = convert(model, out, "--max_item_bytes=1MiB")  # another plan: other items
    assert summary["resumed_items"] == 0
    assert os.listdir(out) == ["0"] and not os.path.exists(staging)


def test_records_are_adopted_only_whole_and_of_the_plan(tmp_path):
    staging = str(tmp_path / "s")
    resume.mark_plan(staging, "p1")
    assert resume.plan_of(staging) == "p1"
    resume.write_record(staging, "p1", 3, {"db": "abc", "bytes_written": 5})
    resume.write_record(staging, "p2", 4, {"db": "abd", "bytes_written": 5})  # another plan
    resume.write_record(staging, "p1", 9, {"db": "abe", "bytes_written": 5})  # not an item of the plan
    directory = resume.records_dir(staging)
    with open(os.path.join(directory, "5"), "w") as f:
        f.write('{"format": "ckptbeam-resume/1", "plan": "p1", "item"')  # cut short
    with open(os.path.join(directory, "6"), "w") as f:  # names another item than its file
        json.dump({"format": resume.FORMAT, "plan": "p1", "item": 7, "db": "x", "bytes_written": 1}, f)
    with open(os.path.join(directory, "8.tmp"), "w") as f:  # a write that never completed
        f.write("{}")
    assert resume.read_records(staging, "p1", set(range(9))) == {3: {"db": "abc", "bytes_written": 5}}
    assert resume.pick_staging([staging, str(tmp_path / "other")], "p1") == (staging, [str(tmp_path / "other")])
    assert resume.pick_staging([staging], "p2") == (None, [staging])
    assert resume.plan_hash({"a": 1, "b": [1, 2]}) == resume.plan_hash({"b": [1, 2], "a": 1})
    assert resume.plan_hash({"a": 1}) != resume.plan_hash({"a": 2})


# --------------------------------------------------------------------------------------------
# export


def export_plan(ckpt: str, out: str, *args: str):
    from pipelines.export import make_export_plan
    from pipelines.resume import export_plan_id

    parsed, _ = split_export_argv(["--source", ckpt, "--output", out, *args])
    plan, _, _, provenance = make_export_plan(parsed)
    return plan, export_plan_id(plan, provenance, out)


def snapshot(directory: str) -> dict[str, bytes]:
    files = {}
    for root, _, names in os.walk(directory):
        for n in names:
            with open(os.path.join(root, n), "rb") as f:
                files[os.path.relpath(os.path.join(root, n), directory)] = f.read()
    return files


@pytest.fixture(scope="module")
def reference_export(reference, tmp_path_factory) -> str:
    from pipelines.export import run

    out = str(tmp_path_factory.mktemp("hf") / "hf")
    run(["--source", reference, "--output", out, *EXPORT_ITEMS])
    return out


def test_killed_export_resumes_writing_only_the_rest(reference, reference_export, tmp_path, counted_region_reads):
    from pipelines.export import run

    out = str(tmp_path / "hf")
    plan, _ = export_plan(reference, out, *EXPORT_ITEMS)
    total = len(plan.items)
    assert len(plan.shards) > 1
    kill_when_half_done(
        cli("export", "--source", reference, "--output", out, *EXPORT_ITEMS),
        local_staging(out + ".ckptbeam-tmp-*"),
        total,
    )
    (staging,) = glob.glob(out + ".ckptbeam-tmp-*")
    adopted = record_ids(staging)
    assert total // 2 <= len(adopted) < total

    summary = run(["--source", reference, "--output", out, *EXPORT_ITEMS])

    assert summary["resumed_items"] == len(adopted)
    rest = [i for i in plan.items if i.item_id not in adopted]
    assert len(counted_region_reads) == sum(len(i.reads) for i in rest)
    assert summary["metrics"]["bytes_read"] == sum(i.bytes_read for i in rest) < 0.75 * summary["bytes_read"]
    assert snapshot(out) == snapshot(reference_export)  # every shard byte for byte
    assert not glob.glob(out + ".ckptbeam-*")


def test_pathways_layout_resumes_from_attempt_directories(model, tmp_path, counted_reads):
    """Without OCDBT an item's writes are its attempt directory's chunk files; those are adopted."""
    pathways = ("--use_ocdbt=false", "--use_zarr3=false", *ITEMS)
    reference = str(tmp_path / "reference")
    convert(model, reference, *pathways)
    out = str(tmp_path / "out")
    with pytest.raises(Exception, match="quota exceeded"):
        convert(model, out, *pathways, convert_fn=FailsHalfWay)
    (staging,) = glob.glob(os.path.join(out, "0.orbax-checkpoint-tmp-*"))
    kept = record_ids(staging)
    counted_reads.clear()
    summary = convert(model, out, *pathways)
    assert summary["resumed_items"] == len(kept) > 0
    plan, _ = convert_plan(model, *pathways)
    assert sum(counted_reads) == sum(i.bytes_read for i in plan.items if i.item_id not in kept)
    assert_same_checkpoint(out, reference)


def test_run_that_failed_in_the_stitch_reruns_only_the_stitch(model, reference, tmp_path, monkeypatch):
    from ckpt_transforms.orbax_io import writer as orbax_writer

    out = str(tmp_path / "out")
    real = orbax_writer.stitch

    def dies(*args, **kwargs):
        raise OSError("launcher preempted")

    monkeypatch.setattr(orbax_writer, "stitch", dies)
    with pytest.raises(Exception, match="launcher preempted"):
        convert(model, out, *ITEMS)
    monkeypatch.setattr(orbax_writer, "stitch", real)
    reads = count_reads(monkeypatch)
    summary = convert(model, out, *ITEMS)
    assert summary["resumed_items"] == summary["work_items"] and reads == []
    assert_same_checkpoint(out, reference)


def test_plan_hash_is_the_same_in_another_process():
    """A rerun is another process (another hash seed): the plan hash must not depend on it.
    Quantized sources (decode ops) and a multimodal one, to cover every kind of op."""
    from conftest import FIXTURES

    sources = [os.path.join(FIXTURES, f) for f in ("deepseek3_fp8", "gpt_oss_mxfp4", "gemma3_mm_bf16")]
    code = (
        "from test_resume import convert_plan\n"
        f"for s in {sources!r}:\n    print(convert_plan(s, '--max_item_bytes=256KiB')[1])"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])}
    other = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    ours = [convert_plan(s, "--max_item_bytes=256KiB")[1] for s in sources]
    assert other.stdout.split()[-3:] == ours
