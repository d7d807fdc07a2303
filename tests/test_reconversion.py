"""Scheduled re-conversion: up to date reads headers only, changed inputs swap in after commit,
a killed run leaves OUT untouched and the next run cleans up."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import FIXTURES, ROOT, assert_matches_reference, convert

from ckpt_transforms.storage import sources as storage
from ckpt_transforms.storage.provenance import PROVENANCE_FILE

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from make_llama_checkpoint import make  # noqa: E402


@pytest.fixture
def model(tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(os.path.join(FIXTURES, "llama_f32_sharded"), dst)
    return str(dst)


def _snapshot(out_dir: str) -> dict[str, int]:
    step = os.path.join(out_dir, "0")
    return {os.path.join(r, f): os.stat(os.path.join(r, f)).st_mtime_ns for r, _, fs in os.walk(step) for f in fs}


def test_rerun_on_same_inputs_is_up_to_date_and_reads_only_headers(model, out_dir, monkeypatch):
    convert(model, out_dir)
    before = _snapshot(out_dir)
    with open(os.path.join(out_dir, "0", PROVENANCE_FILE)) as f:
        assert json.load(f)["options"]["scan_layers"] is True

    reads: list[tuple[str, int, int]] = []
    original = storage.LocalSource.read_into

    def spy(self, name, offset, out):
        reads.append((name, offset, out.nbytes))
        return original(self, name, offset, out)

    monkeypatch.setattr(storage.LocalSource, "read_into", spy)
    summary = convert(model, out_dir)
    assert summary["up_to_date"] is True
    assert _snapshot(out_dir) == before
    tensor_reads = [r for r in reads if r[0].endswith(".safetensors") and r[1] >= 8 and r[2] > 8]
    header_bytes = sum(length for _, _, length in tensor_reads)
    assert header_bytes < 10_000, f"read {header_bytes} bytes of safetensors: more than headers"


def test_changed_options_reconvert_and_swap_after_commit(model, out_dir):
    convert(model, out_dir)
    summary = convert(model, out_dir, "--scan_layers=false")
    assert "up_to_date" not in summary
    assert_matches_reference(out_dir, model, scan=False)
    assert os.listdir(out_dir) == ["0"], "the replaced checkpoint and staging dirs are gone"


def test_changed_source_file_reconverts(model, out_dir):
    convert(model, out_dir)
    config = os.path.join(model, "config.json")
    with open(config) as f:
        cfg = json.load(f)
    cfg["rms_norm_eps"] = 1e-3  # an input change that keeps the tensors valid
    with open(config, "w") as f:
        json.dump(cfg, f)
    summary = convert(model, out_dir)
    assert "up_to_date" not in summary
    assert_matches_reference(out_dir, model, scan=True)


def test_force_reconverts_up_to_date_checkpoint(model, out_dir):
    convert(model, out_dir)
    before = _snapshot(out_dir)
    summary = convert(model, out_dir, "--force")
    assert "up_to_date" not in summary
    assert _snapshot(out_dir) != before
    assert_matches_reference(out_dir, model, scan=True)


def test_checkpoint_not_made_by_ckptbeam_needs_force(model, out_dir):
    convert(model, out_dir)
    os.remove(os.path.join(out_dir, "0", PROVENANCE_FILE))
    with pytest.raises(FileExistsError, match="not made by ckptbeam; use --force"):
        convert(model, out_dir, "--scan_layers=false")
    convert(model, out_dir, "--scan_layers=false", "--force")
    assert_matches_reference(out_dir, model, scan=False)


def test_killed_run_leaves_output_untouched_and_next_run_succeeds(tmp_path, out_dir):
    source = str(tmp_path / "bigger")
    make(source, layers=8, hidden=256, mlp=512, heads=4, kv_heads=2, vocab=4000)
    convert(source, out_dir, "--max_item_bytes=1MiB")
    before = _snapshot(out_dir)

    # A second run with other options, killed while its work items are being written.
    cmd = [sys.executable, "-m", "pipelines.cli", "convert", "--source", source, "--output", out_dir,
           "--scan_layers=false", "--max_item_bytes=150KiB"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staging = None
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        tmp = [d for d in os.listdir(out_dir) if d.startswith("0.orbax-checkpoint-tmp-")]
        if tmp and any(e.startswith("ocdbt.process_") for e in os.listdir(os.path.join(out_dir, tmp[0], "items"))):
            staging = tmp[0]
            break
        time.sleep(0.05)
    assert staging is not None and proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)

    assert _snapshot(out_dir) == before, "a killed run changed the published checkpoint"
    assert staging in os.listdir(out_dir), "its leftovers are still there"
    convert(source, out_dir, "--scan_layers=false", "--max_item_bytes=1MiB")
    assert os.listdir(out_dir) == ["0"]
    assert_matches_reference(out_dir, source, scan=False)
