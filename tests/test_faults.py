"""Faults at every step leave the old output or the new one, never a mix, never neither.

A run is replacing an existing output (convert: a checkpoint made with other options; export: a
model exported with another weight dtype) and is stopped at a named step by the test-only hook
`CKPTBEAM_FAULT=<point>:<kill|term>` (ckpt_transforms/faults.py), in a real CLI process. Then:
the old output's every file is unchanged (sha256), or the new one is in place and equals a clean
run's; nothing else is left at or beside the output but leftovers the next run clears; and a
rerun succeeds. Plus: a full disk (a small tmpfs), the source vanishing after planning, and a
gs:// 503 storm.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys

import pytest
from conftest import FIXTURES, ROOT, assert_matches_reference, convert

from ckpt_transforms.storage import lease

MODEL = os.path.join(FIXTURES, "llama_bf16")
OLD, NEW = "--scan_layers=true", "--scan_layers=false"  # convert: the old and the new checkpoint
SIGNALS = {"kill": signal.SIGKILL, "term": signal.SIGTERM}


def tree_hashes(root: str) -> dict[str, str]:
    found = {}
    for base, _, files in os.walk(root):
        for f in files:
            path = os.path.join(base, f)
            with open(path, "rb") as fh:
                found[os.path.relpath(path, root)] = hashlib.sha256(fh.read()).hexdigest()
    return found


def cli(*args: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT}
    if fault:
        env["CKPTBEAM_FAULT"] = fault
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True
    )


def assert_died_of(proc: subprocess.CompletedProcess, action: str) -> None:
    # SIGKILL ends the process; SIGTERM unwinds (staging removed, lease released) and exits 143.
    expected = -signal.SIGKILL if action == "kill" else 128 + signal.SIGTERM
    assert proc.returncode == expected, f"exit {proc.returncode}: {proc.stderr[-2000:]}"


# --- convert -----------------------------------------------------------------------------------

# (point, action, --force?, which checkpoint must be at OUT/0 afterwards)
CONVERT_CELLS = [
    ("plan", "kill", False, "old"),
    ("item@2", "kill", False, "old"),
    ("item@2", "term", False, "old"),
    ("stitch", "kill", False, "old"),
    ("stitch", "term", False, "old"),
    ("swap", "kill", False, "new"),
    ("swap", "term", False, "new"),
    ("item", "kill", True, "old"),
    ("swap", "kill", True, "new"),
]


@pytest.mark.parametrize(
    "point,action,force,outcome", CONVERT_CELLS, ids=[f"{p}-{a}{'-force' if f else ''}" for p, a, f, _ in CONVERT_CELLS]
)
def test_convert_fault_leaves_old_or_new_checkpoint(out_dir, point, action, force, outcome):
    convert(MODEL, out_dir, OLD)
    old = tree_hashes(os.path.join(out_dir, "0"))
    new_args = [OLD, "--force"] if force else [NEW]
    proc = cli("convert", "--source", MODEL, "--output", out_dir, *new_args, fault=f"{point}:{action}")
    assert_died_of(proc, action)

    if outcome == "old":
        assert tree_hashes(os.path.join(out_dir, "0")) == old, "the old checkpoint changed"
    else:
        assert_matches_reference(out_dir, MODEL, scan=force)  # --force reruns OLD
    leftovers = [e for e in os.listdir(out_dir) if e != "0"]
    assert all(e.startswith("0.orbax-checkpoint-tmp-") for e in leftovers), leftovers
    if action == "term":
        assert not leftovers, "SIGTERM unwinds: its staging directory is removed"
        assert not os.path.exists(lease.lease_path(out_dir)), "SIGTERM unwinds: the lease is released"

    rerun = convert(MODEL, out_dir, NEW)  # takes over the lease; converting, it clears leftovers first
    if not rerun.get("up_to_date"):
        assert os.listdir(out_dir) == ["0"]
    assert_matches_reference(out_dir, MODEL, scan=False)


# --- export ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint to export, and a clean float32 export of it (what a new export must equal)."""
    root = tmp_path_factory.mktemp("export")
    ckpt = str(root / "ckpt")
    convert(MODEL, ckpt)
    clean = str(root / "clean_f32")
    from pipelines.export import run as export

    export(["--source", ckpt, "--output", clean, "--weight_dtype=float32"])
    return ckpt, tree_hashes(clean)


EXPORT_CELLS = [
    ("plan", "term", "old"),
    ("item", "kill", "old"),
    ("item", "term", "old"),
    ("stitch", "kill", "old"),
    ("swap", "kill", "new"),
    ("swap", "term", "new"),
]


@pytest.mark.parametrize("point,action,outcome", EXPORT_CELLS, ids=[f"{p}-{a}" for p, a, _ in EXPORT_CELLS])
def test_export_fault_leaves_old_or_new_model(tmp_path, checkpoint, point, action, outcome):
    from pipelines.export import run as export

    ckpt, clean_f32 = checkpoint
    hf = str(tmp_path / "hf")
    export(["--source", ckpt, "--output", hf])  # the old model: bfloat16
    old = tree_hashes(hf)
    proc = cli("export", "--source", ckpt, "--output", hf, "--weight_dtype=float32", fault=f"{point}:{action}")
    assert_died_of(proc, action)

    assert tree_hashes(hf) == (old if outcome == "old" else clean_f32)
    leftovers = [e for e in os.listdir(tmp_path) if e != "hf"]
    assert all(".ckptbeam-tmp-" in e or e.endswith(".ckptbeam-lease") for e in leftovers), leftovers
    if action == "term":
        assert not leftovers, "SIGTERM unwinds: staging removed and lease released"

    export(["--source", ckpt, "--output", hf, "--weight_dtype=float32"])
    assert os.listdir(tmp_path) == ["hf"]
    assert tree_hashes(hf) == clean_f32


# --- a full disk --------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs: room for one checkpoint of the fixture, not for a second in float32."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield str(mnt)
    subprocess.run(["umount", str(mnt)], check=True)


def test_convert_disk_full_keeps_old_checkpoint(small_disk):
    out = os.path.join(small_disk, "out")
    convert(MODEL, out, OLD)
    old = tree_hashes(os.path.join(out, "0"))
    proc = cli("convert", "--source", MODEL, "--output", out, NEW, "--save_dtype=float32")
    assert proc.returncode != 0
    assert "No space left on device" in proc.stderr or "ENOSPC" in proc.stderr or "space" in proc.stderr
    assert tree_hashes(os.path.join(out, "0")) == old
    assert sorted(os.listdir(small_disk)) == ["out"] and os.listdir(out) == ["0"], "staging and lease removed"


def test_export_disk_full_keeps_old_model(small_disk, checkpoint):
    from pipelines.export import run as export

    hf = os.path.join(small_disk, "hf")
    export(["--source", checkpoint[0], "--output", hf])
    old = tree_hashes(hf)
    proc = cli("export", "--source", checkpoint[0], "--output", hf, "--weight_dtype=float32")
    assert proc.returncode != 0
    assert "No space left on device" in proc.stderr
    assert tree_hashes(hf) == old
    assert sorted(os.listdir(small_disk)) == ["hf"], "staging and lease removed"


# --- the source vanishing mid-run ---------------------------------------------------------------


def test_convert_source_truncated_after_planning_keeps_old_checkpoint(tmp_path, out_dir, monkeypatch):
    import pipelines.convert as launcher

    source = str(tmp_path / "src")
    shutil.copytree(MODEL, source)
    convert(source, out_dir, OLD)
    old = tree_hashes(os.path.join(out_dir, "0"))
    planned = launcher.make_plan

    def plan_then_truncate(*args, **kwargs):
        result = planned(*args, **kwargs)
        with open(os.path.join(source, "model.safetensors"), "r+b") as f:
            f.truncate(4096)  # the header survives, the tensors do not
        return result

    monkeypatch.setattr(launcher, "make_plan", plan_then_truncate)
    with pytest.raises(Exception, match="model.safetensors"):
        convert(source, out_dir, NEW)
    assert tree_hashes(os.path.join(out_dir, "0")) == old
    assert os.listdir(out_dir) == ["0"]


def test_export_checkpoint_data_deleted_after_planning_keeps_old_model(tmp_path, checkpoint, monkeypatch):
    import pipelines.export as launcher

    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(checkpoint[0], ckpt)
    hf = str(tmp_path / "hf")
    launcher.run(["--source", ckpt, "--output", hf])
    old = tree_hashes(hf)
    planned = launcher.make_export_plan

    def plan_then_delete(*args, **kwargs):
        result = planned(*args, **kwargs)
        items = os.path.join(ckpt, "0", "items")
        for db in os.listdir(items):
            if db.startswith("ocdbt.process_"):
                shutil.rmtree(os.path.join(items, db, "d"), ignore_errors=True)
        return result

    monkeypatch.setattr(launcher, "make_export_plan", plan_then_delete)
    with pytest.raises(Exception):  # noqa: B017 - which layer notices first is not the point here
        launcher.run(["--source", ckpt, "--output", hf, "--weight_dtype=float32"])
    assert tree_hashes(hf) == old
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "hf"]
