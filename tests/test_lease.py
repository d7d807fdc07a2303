"""One run per output: a second run on the same output is refused at once and changes nothing.

Local leases are flock'ed files (a killed run's lock is freed by the kernel); gs:// leases are
generation-matched objects with a heartbeat, tested against fake-gcs-server behind a proxy that
enforces `ifGenerationMatch` (the emulator ignores it on simple uploads and deletes; GCS does not).
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from conftest import FIXTURES, assert_matches_reference, convert, run_cli, tree_hashes
from gcs_emulator import FakeGcs, FaultProxy

from ckpt_transforms.storage import lease, outdir
from pipelines.graph import ConvertWorkItem

MODEL = os.path.join(FIXTURES, "llama_bf16")


def snapshot(root: str) -> dict[str, str]:
    """Every file under `root` and beside it (leases, staging) -> sha256 of its bytes."""
    return tree_hashes(os.path.dirname(root))


cli = run_cli


SECOND: dict = {}


class LaunchSecondRunMidFanOut(ConvertWorkItem):
    """While this (first) run is writing its first work item, start a second run on the same output."""

    def start_attempt(self, item, db_id):
        if "args" in SECOND and "result" not in SECOND:
            out = SECOND["output"]
            before = snapshot(out)
            SECOND["result"] = cli("convert", "--source", MODEL, "--output", out, *SECOND["args"])
            SECOND["unchanged"] = snapshot(out) == before
        return super().start_attempt(item, db_id)


@pytest.mark.parametrize("first,second", [("true", "false"), ("false", "true")], ids=["scan-first", "unscan-first"])
def test_second_concurrent_run_is_refused_naming_the_holder(out_dir, first, second):
    SECOND.clear()
    SECOND.update(output=out_dir, args=[f"--scan_layers={second}"])
    convert(MODEL, out_dir, f"--scan_layers={first}", convert_fn=LaunchSecondRunMidFanOut)

    refused = SECOND["result"]
    assert refused.returncode == 1, refused.stderr
    line = refused.stderr.strip().splitlines()[-1]
    assert f"{out_dir} is being written by another ckptbeam run (host " in line
    assert f"pid {os.getpid()}, started " in line and "wait for it to finish" in line
    assert SECOND["unchanged"], "the refused run changed files at or beside the output"
    assert sorted(os.listdir(os.path.dirname(out_dir))) == ["out"], "the lease is released at the end"
    assert_matches_reference(out_dir, MODEL, scan=first == "true")


def test_export_is_refused_while_another_export_holds_the_output(tmp_path, out_dir):
    convert(MODEL, out_dir)
    hf = str(tmp_path / "hf")
    with lease.hold(hf, "export") as held:
        before = snapshot(hf)
        refused = cli("export", "--source", out_dir, "--output", hf)
        assert snapshot(hf) == before
        assert json.loads(open(held.path).read())["pid"] == os.getpid()
    assert refused.returncode == 1
    assert f"{hf} is being written by another ckptbeam run (host " in refused.stderr
    assert not os.path.exists(hf)
    assert held.path == hf + ".ckptbeam-lease", "beside the model directory, never inside it"


def test_lease_of_a_killed_run_is_taken_over(out_dir):
    killed = cli("convert", "--source", MODEL, "--output", out_dir, env={"CKPTBEAM_FAULT": "item:kill"})
    assert killed.returncode == -signal.SIGKILL
    stale = json.loads(open(lease.lease_path(out_dir)).read())
    assert stale["command"] == "convert" and stale["pid"] != os.getpid()
    convert(MODEL, out_dir)
    assert not os.path.exists(lease.lease_path(out_dir))
    assert sorted(os.listdir(out_dir)) == ["0"]
    assert_matches_reference(out_dir, MODEL)


def test_lease_lives_beside_the_output():
    assert lease.lease_path("/a/out") == "/a/out.ckptbeam-lease"
    assert lease.lease_path("/a/out/") == "/a/out.ckptbeam-lease"
    assert lease.lease_path("gs://b/x/out") == "gs://b/x/out.ckptbeam-lease"
    assert lease.lease_path("gs://b") == "gs://b/.ckptbeam-lease"


# --- gs:// -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gcs():
    emulator = FakeGcs()
    proxy = FaultProxy(emulator.url)
    proxy.enforce_preconditions = True
    env = {"TENSORSTORE_GCS_HTTP_URL": proxy.url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        yield emulator
    proxy.stop()
    emulator.stop()


def create_bucket(emulator_url: str, name: str) -> None:
    import urllib.request

    req = urllib.request.Request(f"{emulator_url}/storage/v1/b", data=json.dumps({"name": name}).encode())
    req.add_header("Content-Type", "application/json")
    urllib.request.urlopen(req).read()


@pytest.fixture(scope="module")
def bucket(gcs):
    create_bucket(gcs.url, "leases")
    return "gs://leases"


def _kv(path: str):
    import tensorstore as ts

    parent, name = path.rsplit("/", 1)
    return ts.KvStore.open(outdir.kvstore_spec(parent)).result(), name


def test_emulator_behind_proxy_honours_if_generation_match(bucket):
    kv, name = _kv(f"{bucket}/precondition")
    absent = kv.read(name).result().stamp.generation
    first = kv.write(name, b"one", if_equal=absent).result().generation
    assert first != b""
    assert kv.write(name, b"two", if_equal=absent).result().generation == b"", "create-if-absent must fail"
    second = kv.write(name, b"three", if_equal=first).result().generation
    assert kv.write(name, b"four", if_equal=first).result().generation == b"", "stale generation must fail"
    assert kv.write(name, None, if_equal=first).result().generation == b"", "stale delete must fail"
    assert bytes(kv.read(name).result().value) == b"three"
    kv.write(name, None, if_equal=second).result()
    assert kv.read(name).result().state == "missing"


def test_gcs_lease_is_exclusive_and_released(bucket):
    out = f"{bucket}/ckpt"
    with lease.hold(out, "convert") as held:
        with pytest.raises(lease.LeaseBusy, match=r"is being written by another ckptbeam run .*last heartbeat"):
            lease.acquire(out, "convert")
        assert outdir.read_text(held.path) is not None
    assert outdir.read_text(lease.lease_path(out)) is None
    lease.acquire(out, "export").release()


def test_gcs_lease_expired_is_taken_over_and_a_fresh_one_is_not(bucket, monkeypatch):
    out = f"{bucket}/stale"
    dead = lease.holder_record("convert", out, now=time.time() - 3600)
    outdir.write_bytes(lease.lease_path(out), json.dumps(dead).encode())
    monkeypatch.setenv(lease.EXPIRY_ENV, "7200")
    with pytest.raises(lease.LeaseBusy, match=f"pid {dead['pid']}"):
        lease.acquire(out, "convert")
    monkeypatch.setenv(lease.EXPIRY_ENV, "600")
    with lease.hold(out, "convert") as held:
        assert json.loads(outdir.read_text(held.path))["run_id"] == held.record["run_id"]


def test_gcs_heartbeat_keeps_the_lease_and_notices_a_takeover(bucket):
    out = f"{bucket}/beat"
    held = lease.GcsLease(out, lease.holder_record("convert", out), expiry=0.2)
    held.acquire()
    try:
        first = json.loads(outdir.read_text(held.path))["heartbeat"]
        deadline = time.time() + 30
        while json.loads(outdir.read_text(held.path))["heartbeat"] == first and time.time() < deadline:
            time.sleep(0.02)
        assert json.loads(outdir.read_text(held.path))["heartbeat"] > first, "no heartbeat"
        # Another run takes the lease over (as after an expiry): the heartbeat must notice and stop.
        outdir.write_bytes(held.path, json.dumps(lease.holder_record("convert", out)).encode())
        while not held.lost() and time.time() < deadline:
            time.sleep(0.02)
        assert held.lost()
    finally:
        held.release()
    assert outdir.read_text(held.path) is not None, "a lost lease is not deleted: it is the other run's"


def test_gcs_convert_is_refused_while_leased_and_changes_nothing(bucket):
    out = f"{bucket}/model"
    with lease.hold(out, "convert"):
        before = outdir.list_files(bucket)
        with pytest.raises(lease.LeaseBusy, match=f"{out} is being written by another ckptbeam run"):
            convert(MODEL, out)
        assert outdir.list_files(bucket) == before


class TakenOverMidFanOut(ConvertWorkItem):
    """As if this run had missed heartbeats for the expiry: another run takes its lease over."""

    def start_attempt(self, item, db_id):
        path = lease.lease_path(TAKEOVER["output"])
        if outdir.read_text(path) and "other" not in TAKEOVER:
            TAKEOVER["other"] = lease.holder_record("convert", TAKEOVER["output"])
            outdir.write_bytes(path, json.dumps(TAKEOVER["other"]).encode())
        return super().start_attempt(item, db_id)


TAKEOVER: dict = {}


def test_gcs_run_that_lost_its_lease_does_not_commit_or_clean_up(bucket):
    out = f"{bucket}/fenced"
    TAKEOVER.clear()
    TAKEOVER["output"] = out
    with pytest.raises(Exception, match="lost its lease to another run"):
        convert(MODEL, out, convert_fn=TakenOverMidFanOut)
    assert outdir.read_bytes(f"{out}/0/commit_success.txt") is None, "fenced: no commit"
    assert outdir.list_files(f"{out}/0"), "what is at OUT/0 is the other run's now: not cleaned up"
    holder = json.loads(outdir.read_text(lease.lease_path(out)))
    assert holder["run_id"] == TAKEOVER["other"]["run_id"], "the other run's lease is left alone"
