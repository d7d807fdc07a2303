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

import os
import shutil
import signal
import subprocess

import pytest
from conftest import FIXTURES, assert_matches_reference, convert, run_cli, tree_hashes

from ckpt_transforms.storage import lease, outdir

MODEL = os.path.join(FIXTURES, "llama_bf16")
OLD, NEW = "--scan_layers=true", "--scan_layers=false"  # convert: the old and the new checkpoint
SIGNALS = {"kill": signal.SIGKILL, "term": signal.SIGTERM}


def cli(*args: str, fault: str | None = None) -> subprocess.CompletedProcess:
    return run_cli(*args, env={"CKPTBEAM_FAULT": fault} if fault else None)


def assert_died_of(proc: subprocess.CompletedProcess, action: str) -> None:
    # SIGKILL ends the process; SIGTERM unwinds (lease released; committed items kept for a
    # resuming rerun, other staging removed) and exits 143.
    expected = -signal.SIGKILL if action == "kill" else 128 + signal.SIGTERM
    assert proc.returncode == expected, f"exit {proc.returncode}: {proc.stderr[-2000:]}"


# --- convert -----------------------------------------------------------------------------------

# (point, action, --force?, which checkpoint must be at OUT/0 afterwards)
# Left out as the same code path as a kept cell: item@2-kill (also tests/test_lease.py and
# test_reconversion.py), stitch-term, swap-kill with --force.
CONVERT_CELLS = [
    ("plan", "kill", False, "old"),
    ("item@2", "term", False, "old"),
    ("stitch", "kill", False, "old"),
    ("swap", "kill", False, "new"),
    ("swap", "term", False, "new"),
    ("item", "kill", True, "old"),
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
        assert not os.path.exists(lease.lease_path(out_dir)), "SIGTERM unwinds: the lease is released"
        if point != "item@2":
            assert not leftovers, "SIGTERM unwinds: its staging directory is removed"

    rerun = convert(MODEL, out_dir, NEW)  # takes over the lease; converting, it clears leftovers first
    if not rerun.get("up_to_date"):
        assert os.listdir(out_dir) == ["0"]
    if point == "item@2":  # a terminated (preempted) run keeps its committed items: the rerun resumes
        assert rerun["resumed_items"] >= 1
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


# Left out (covered for convert, the same launcher code): plan-term, item-term.
EXPORT_CELLS = [
    ("item", "kill", "old"),
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

    rerun = export(["--source", ckpt, "--output", hf, "--weight_dtype=float32"])
    if not rerun.get("up_to_date"):  # exporting, it clears leftovers first
        assert os.listdir(tmp_path) == ["hf"]
    assert tree_hashes(hf) == clean_f32


# --- a full disk --------------------------------------------------------------------------------


def disk_usage(root: str) -> int:
    """Bytes `root` takes on a tmpfs (whole pages per file)."""
    return sum(-(-os.path.getsize(os.path.join(b, f)) // 4096) * 4096 for b, _, fs in os.walk(root) for f in fs)


@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a tmpfs of that many bytes, unmounted after the test."""
    mounted = []

    def mount(size: int) -> str:
        mnt = tmp_path / "disk"
        mnt.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(str(mnt))
        return str(mnt)

    yield mount
    for mnt in mounted:
        subprocess.run(["umount", mnt], check=True)


def test_convert_disk_full_keeps_old_checkpoint(tmp_path, small_disk):
    convert(MODEL, str(tmp_path / "sized"), OLD)
    # Room for the old checkpoint and half as much again: a float32 one (twice the bytes) cannot fit.
    disk = small_disk(disk_usage(str(tmp_path / "sized")) * 3 // 2)
    out = os.path.join(disk, "out")
    convert(MODEL, out, OLD)
    old = tree_hashes(os.path.join(out, "0"))
    proc = cli("convert", "--source", MODEL, "--output", out, NEW, "--save_dtype=float32")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "No space left on device" in proc.stderr or "ENOSPC" in proc.stderr
    assert tree_hashes(os.path.join(out, "0")) == old
    assert sorted(os.listdir(disk)) == ["out"], "the lease is released"
    # The failed run's committed items stay for a resuming rerun (once there is room), nothing else.
    assert all(e == "0" or e.startswith("0.orbax-checkpoint-tmp-") for e in os.listdir(out)), os.listdir(out)


def test_export_disk_full_keeps_old_model(tmp_path, small_disk, checkpoint):
    from pipelines.export import run as export

    export(["--source", checkpoint[0], "--output", str(tmp_path / "sized")])
    disk = small_disk(disk_usage(str(tmp_path / "sized")) * 3 // 2)
    hf = os.path.join(disk, "hf")
    export(["--source", checkpoint[0], "--output", hf])
    old = tree_hashes(hf)
    proc = cli("export", "--source", checkpoint[0], "--output", hf, "--weight_dtype=float32")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "No space left on device" in proc.stderr
    assert tree_hashes(hf) == old
    leftovers = [e for e in os.listdir(disk) if e != "hf"]
    # The lease is released; the failed run's written items stay for a resuming rerun, nothing else.
    assert all(e.startswith("hf.ckptbeam-tmp-") for e in leftovers), leftovers


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


# --- gs:// --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gcs():
    """Every client (google-cloud-storage reads, TensorStore writes, leases) through one proxy."""
    from gcs_emulator import FakeGcs, FaultProxy
    from test_lease import create_bucket

    emulator = FakeGcs()
    proxy = FaultProxy(emulator.url)
    proxy.enforce_preconditions = True
    env = {
        "STORAGE_EMULATOR_HOST": proxy.url,
        "TENSORSTORE_GCS_HTTP_URL": proxy.url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token",
        "CKPTBEAM_REMOTE_BACKOFF_S": "0.01",
    }
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        create_bucket(emulator.url, "faults")
        for f in os.listdir(MODEL):
            outdir.write_bytes(f"gs://faults/hf/{f}", open(os.path.join(MODEL, f), "rb").read())
        yield proxy
    proxy.stop()
    emulator.stop()


def download(prefix: str, dest: str) -> str:
    for rel in outdir.list_files(prefix):
        path = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(outdir.read_bytes(outdir.join(prefix, rel)))
    return dest


def test_gcs_503_storm_is_ridden_out_and_result_identical(gcs, tmp_path):
    """Every other request of any kind (reads, writes, lease) answers 503, for the first 12."""
    seen = {"n": 0}

    def storm(method, path, headers):
        seen["n"] += 1
        return 503 if seen["n"] <= 12 and seen["n"] % 2 else None

    gcs.failed.clear()
    gcs.fault = storm
    try:
        convert("gs://faults/hf", "gs://faults/storm")
    finally:
        gcs.fault = None
    assert len(gcs.failed) == 6 and {status for *_, status in gcs.failed} == {503}
    assert_matches_reference(download("gs://faults/storm", str(tmp_path / "storm")), MODEL)
    assert outdir.read_bytes(lease.lease_path("gs://faults/storm")) is None


def test_gcs_force_killed_while_deleting_leaves_no_committed_mix(gcs, tmp_path, monkeypatch):
    """gs:// has no rename: --force deletes the old checkpoint's commit markers first. Killed
    right after, no committed checkpoint is there (Orbax refuses the step), never a mix; the
    killed run's lease guards OUT until it expires; then a rerun clears the step and converts."""
    out = "gs://faults/force"
    convert("gs://faults/hf", out, OLD)
    proc = cli("convert", "--source", "gs://faults/hf", "--output", out, OLD, "--force", fault="force_delete:kill")
    assert_died_of(proc, "kill")
    assert outdir.read_bytes(f"{out}/0/commit_success.txt") is None
    assert outdir.read_bytes(f"{out}/0/items/commit_success.txt") is None
    with pytest.raises(lease.LeaseBusy, match="is being written by another ckptbeam run"):
        convert("gs://faults/hf", out, NEW)
    monkeypatch.setenv(lease.EXPIRY_ENV, "0.05")  # its last heartbeat is older than that by now
    convert("gs://faults/hf", out, NEW)
    assert_matches_reference(download(out, str(tmp_path / "force")), MODEL, scan=False)


# --- a swap interrupted where the file system has no atomic exchange ----------------------------


def _die_between_renames(monkeypatch):
    """No RENAME_EXCHANGE (e.g. NFS), and the process stops right after the first rename."""
    real = os.rename

    def first_rename_then_die(a, b):
        real(a, b)
        raise SystemExit("killed between the renames")

    monkeypatch.setattr(outdir, "_exchange", lambda a, b: False)
    monkeypatch.setattr(outdir.os, "rename", first_rename_then_die)


def test_convert_swap_interrupted_without_exchange_is_undone_by_next_run(out_dir, monkeypatch):
    convert(MODEL, out_dir, OLD)
    old = tree_hashes(os.path.join(out_dir, "0"))
    with monkeypatch.context() as m:
        _die_between_renames(m)
        with pytest.raises(SystemExit):
            convert(MODEL, out_dir, NEW)
    assert "0" not in os.listdir(out_dir), "the window this fallback has: the next run closes it"
    assert convert(MODEL, out_dir, OLD).get("up_to_date"), "the old checkpoint is back, unchanged"
    assert tree_hashes(os.path.join(out_dir, "0")) == old


def test_export_swap_interrupted_without_exchange_is_undone_by_next_run(tmp_path, checkpoint, monkeypatch):
    from pipelines.export import run as export

    hf = str(tmp_path / "hf")
    export(["--source", checkpoint[0], "--output", hf])
    old = tree_hashes(hf)
    with monkeypatch.context() as m:
        _die_between_renames(m)
        with pytest.raises(SystemExit):
            export(["--source", checkpoint[0], "--output", hf, "--weight_dtype=float32"])
    assert not os.path.exists(hf)
    assert export(["--source", checkpoint[0], "--output", hf]).get("up_to_date")
    assert tree_hashes(hf) == old
