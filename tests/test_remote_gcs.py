"""gs:// sources and outputs against a local fake-gcs-server (the same code path as production).

google-cloud-storage (source reads) goes through a fault-injecting loopback proxy
(STORAGE_EMULATOR_HOST); TensorStore (checkpoint writes) talks to the emulator directly
(TENSORSTORE_GCS_HTTP_URL). Results are downloaded, restored with orbax.checkpoint and compared
bit-exactly with the independent numpy reference.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
from conftest import FIXTURES, assert_bitwise_equal, assert_matches_reference, convert
from gcs_emulator import FakeGcs, FaultProxy, is_range_read
from reference import expected_leaves

from ckpt_transforms.orbax_io import writer as orbax_writer
from ckpt_transforms.storage import outdir
from ckpt_transforms.storage.remote import GcsSource, RemoteError
from ckpt_transforms.storage.sources import open_source
from pipelines.progress import count_committed_databases

SHARDED = "llama_f32_sharded"
SINGLE = "llama_bf16"
MODELS = "models"


@pytest.fixture(scope="module")
def gcs():
    """Emulator + proxy for the whole module, with the environment every client reads."""
    emulator = FakeGcs()
    proxy = FaultProxy(emulator.url)
    env = {
        "STORAGE_EMULATOR_HOST": proxy.url,
        "TENSORSTORE_GCS_HTTP_URL": emulator.url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token",
        "CKPTBEAM_REMOTE_BACKOFF_S": "0.01",
    }
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        client = _client(emulator.url)
        bucket = client.create_bucket(MODELS)
        for name in (SHARDED, SINGLE):
            d = os.path.join(FIXTURES, name)
            for f in sorted(os.listdir(d)):
                bucket.blob(f"hf/{name}/{f}").upload_from_filename(os.path.join(d, f))
        client.create_bucket("ckpts")
        emulator.client = client
        emulator.proxy = proxy
        try:
            yield emulator
        finally:
            proxy.stop()
            emulator.stop()


@pytest.fixture
def proxy(gcs):
    gcs.proxy.fault = None
    gcs.proxy.forwarded.clear()
    gcs.proxy.failed.clear()
    yield gcs.proxy
    gcs.proxy.fault = None


def _client(url: str):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    return storage.Client(project="test", credentials=AnonymousCredentials(), client_options={"api_endpoint": url})


def _objects(gcs, prefix: str) -> list[str]:
    return sorted(b.name for b in gcs.client.list_blobs("ckpts", prefix=prefix))


def _download(gcs, prefix: str, dest) -> str:
    """Copy gs://ckpts/<prefix>/** to a local directory (references in OCDBT are relative)."""
    for name in _objects(gcs, prefix + "/"):
        path = os.path.join(dest, name[len(prefix) + 1 :])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        gcs.client.bucket("ckpts").blob(name).download_to_filename(path)
    return str(dest)


def _assert_matches_reference(local_out: str, fixture: str, scan: bool = True) -> None:
    assert_matches_reference(local_out, os.path.join(FIXTURES, fixture), scan)


def _source(fixture: str) -> str:
    return f"gs://{MODELS}/hf/{fixture}"


def _media_gets(proxy) -> list[tuple[str, str, str | None]]:
    return [f for f in proxy.forwarded if f[0] == "GET" and ("alt=media" in f[1] or "/download/" in f[1])]


def test_gs_to_gs_multiprocess_restores_bit_exact(gcs, proxy, tmp_path):
    out = "gs://ckpts/run1"
    summary = convert(
        _source(SHARDED),
        out,
        "--runner=DirectRunner",
        "--direct_running_mode=multi_processing",
        "--direct_num_workers=2",
        "--max_item_bytes=20000",
    )
    assert summary["output"] == "gs://ckpts/run1/0/items"
    objects = _objects(gcs, "run1/")
    assert "run1/0/commit_success.txt" in objects and "run1/0/items/commit_success.txt" in objects
    assert "run1/0/_CHECKPOINT_METADATA" in objects and "run1/0/items/_METADATA" in objects
    assert not [o for o in objects if orbax_writer.IN_PROGRESS_MARK in o]
    # exactly the named databases (one per item) plus the stitch's metadata database survive
    dbs = {o.split("/")[3] for o in objects if o.startswith("run1/0/items/" + orbax_writer.PROCESS_PREFIX)}
    assert len(dbs) == summary["work_items"] + 1
    assert count_committed_databases("gs://ckpts/run1/0/items") == summary["work_items"] + 1
    # the workers read ranges only, each at most one slab (the budget), never a whole shard
    gets = _media_gets(proxy)
    assert gets and all(rng is not None for _, _, rng in gets)
    sizes = [int(b) - int(a) + 1 for a, b in (re.match(r"bytes=(\d+)-(\d+)", r).groups() for _, _, r in gets)]
    assert max(sizes) <= 20000 < min(os.path.getsize(os.path.join(FIXTURES, SHARDED, f)) for f in _shards())
    _assert_matches_reference(_download(gcs, "run1", tmp_path / "run1"), SHARDED)


def _shards() -> list[str]:
    return [f for f in os.listdir(os.path.join(FIXTURES, SHARDED)) if f.endswith(".safetensors")]


def test_checkpoint_on_gcs_is_readable_in_place(gcs, proxy, tmp_path):
    """TensorStore reads a leaf straight from gs:// (root b-tree references resolve on GCS)."""
    import tensorstore as ts

    convert(_source(SINGLE), "gs://ckpts/inplace")
    leaf = "params.params.token_embedder.embedding"
    spec = {
        "driver": "zarr3",
        "kvstore": {"driver": "ocdbt", "base": "gs://ckpts/inplace/0/items/", "path": leaf + "/"},
    }
    value = ts.open(spec, open=True).result().read().result()
    expected = expected_leaves(os.path.join(FIXTURES, SINGLE), True)[leaf]
    assert_bitwise_equal(np.asarray(value), expected, leaf)


def test_inspect_lists_a_checkpoint_on_gcs(gcs, proxy, tmp_path, capsys):
    """`ckptbeam inspect gs://...` lists the same leaves as for the same checkpoint on disk."""
    from pipelines.cli import main

    convert(_source(SINGLE), "gs://ckpts/inspected")
    convert(os.path.join(FIXTURES, SINGLE), str(tmp_path / "local"))
    capsys.readouterr()
    assert main(["inspect", "gs://ckpts/inspected"]) == 0
    remote = capsys.readouterr().out.splitlines()
    assert main(["inspect", str(tmp_path / "local")]) == 0
    local = capsys.readouterr().out.splitlines()
    assert len(remote) > 10 and remote[:-1] == local[:-1]  # the params; the last line has local disk usage
    assert "params.params.token_embedder.embedding" in "\n".join(remote)
    assert remote[-1].startswith(local[-1].split(",")[0]) and "on disk" not in remote[-1]


def test_transient_503_on_range_reads_is_retried_and_result_identical(gcs, proxy, out_dir):
    failures = {"left": 5}

    def fault(method, path, headers):
        if is_range_read(method, path, headers) and failures["left"] > 0:
            failures["left"] -= 1
            return 503
        return None

    proxy.fault = fault
    convert(_source(SHARDED), out_dir, "--max_item_bytes=20000")
    assert len(proxy.failed) == 5 and all(status == 503 for *_, status in proxy.failed)
    _assert_matches_reference(out_dir, SHARDED)


def test_permanent_404_fails_the_item_and_publishes_nothing(gcs, proxy):
    shard = "model-00002-of-00004.safetensors"

    def fault(method, path, headers):
        start = re.match(r"bytes=(\d+)", headers.get("Range") or "")
        if is_range_read(method, path, headers) and shard in path and start and int(start.group(1)) > 8:
            return 404  # headers are readable (planning works), tensor data is gone
        return None

    proxy.fault = fault
    with pytest.raises(Exception) as info:
        convert(_source(SHARDED), "gs://ckpts/failed", "--no_resume")
    message = str(info.value)
    assert f"gs://{MODELS}/hf/{SHARDED}/{shard}" in message and "404" in message
    assert _objects(gcs, "failed/") == []
    # permanent: no retry loop inside the reader (one refusal per item attempt, 3 attempts)
    assert 1 <= len(proxy.failed) <= 3


def test_unnamed_database_on_gcs_is_removed(gcs, proxy, tmp_path):
    from test_pipeline import ZombieWriter

    summary = convert(_source(SHARDED), "gs://ckpts/zombie", "--scan_layers=false", convert_fn=ZombieWriter)
    objects = _objects(gcs, "zombie/")
    assert not [o for o in objects if "zombie" in o.split("/", 1)[1]]
    dbs = {o.split("/")[3] for o in objects if o.startswith("zombie/0/items/" + orbax_writer.PROCESS_PREFIX)}
    assert len(dbs) == summary["work_items"] + 1
    _assert_matches_reference(_download(gcs, "zombie", tmp_path / "z"), SHARDED, scan=False)


def test_pathways_layout_on_gcs_moves_only_named_attempts(gcs, proxy, tmp_path):
    """Without OCDBT the stitch copies the named attempts' chunk files into place on GCS."""
    from test_pipeline import ZombieWriter

    args = ("--use_ocdbt=false", "--use_zarr3=false", "--max_item_bytes=20000")
    convert(_source(SHARDED), "gs://ckpts/pathways", *args, convert_fn=ZombieWriter)
    objects = _objects(gcs, "pathways/")
    assert "pathways/0/commit_success.txt" in objects and "pathways/0/items/step/0" in objects
    assert not [o for o in objects if "/.attempt_" in o or orbax_writer.PROCESS_PREFIX in o]
    assert "pathways/0/items/params.params.token_embedder.embedding/.zarray" in objects
    local = _download(gcs, "pathways", tmp_path / "p")
    _assert_matches_reference(local, SHARDED)
    with open(os.path.join(local, "0", "items", "_METADATA"), encoding="utf-8") as f:
        assert '"use_ocdbt": false, "use_zarr3": false' in f.read()


def test_existing_gcs_checkpoint_is_kept_and_unfinished_runs_are_cleared(gcs, proxy, tmp_path):
    convert(_source(SINGLE), "gs://ckpts/again")
    before = _objects(gcs, "again/")
    assert convert(_source(SINGLE), "gs://ckpts/again")["up_to_date"] is True  # same inputs: nothing to do
    assert _objects(gcs, "again/") == before
    with pytest.raises(FileExistsError, match="cannot be replaced atomically: rerun with --force"):
        convert(_source(SINGLE), "gs://ckpts/again", "--scan_layers=false")
    assert _objects(gcs, "again/") == before
    convert(_source(SINGLE), "gs://ckpts/again", "--scan_layers=false", "--force")
    _assert_matches_reference(_download(gcs, "again", tmp_path / "a"), SINGLE, scan=False)

    # a crashed run of ours: marker, a half-written database, no commit marker -> cleared, redone
    bucket = gcs.client.bucket("ckpts")
    bucket.blob(f"crashed/0/{orbax_writer.IN_PROGRESS_MARK}").upload_from_string(b"x")
    bucket.blob("crashed/0/items/ocdbt.process_dead/manifest.ocdbt").upload_from_string(b"garbage")
    convert(_source(SINGLE), "gs://ckpts/crashed")
    objects = _objects(gcs, "crashed/")
    assert "crashed/0/commit_success.txt" in objects and not [o for o in objects if "dead" in o]
    _assert_matches_reference(_download(gcs, "crashed", tmp_path / "c"), SINGLE)

    # someone else's uncommitted data is never deleted
    bucket.blob("foreign/0/items/something").upload_from_string(b"theirs")
    with pytest.raises(FileExistsError, match="neither a committed checkpoint"):
        convert(_source(SINGLE), "gs://ckpts/foreign")
    assert _objects(gcs, "foreign/") == ["foreign/0/items/something"]


def test_gcs_source_fingerprint_and_clear_errors(gcs, proxy):
    source = open_source(_source(SINGLE))
    assert isinstance(source, GcsSource) and source.uri == _source(SINGLE)
    blob = gcs.client.bucket(MODELS).get_blob(f"hf/{SINGLE}/model.safetensors")
    fp = source.fingerprint("model.safetensors")
    assert fp == {"size": blob.size, "etag": blob.etag, "generation": blob.generation}
    assert not source.exists("pytorch_model.bin")
    with open(os.path.join(FIXTURES, SINGLE, "model.safetensors"), "rb") as f:
        f.seek(100)
        assert source.read_range("model.safetensors", 100, 50) == f.read(50)

    proxy.fault = lambda method, path, headers: 403 if is_range_read(method, path, headers) else None
    with pytest.raises(RemoteError, match=r"gs://models/hf/llama_bf16/model.safetensors: access denied \(HTTP 403\)"):
        source.read_range("model.safetensors", 0, 8)
    assert len(proxy.failed) == 1  # refused at once, not retried
    with pytest.raises(RemoteError, match="not found"):
        source.size("missing.safetensors")


def test_output_uri_checks():
    with pytest.raises(ValueError, match="unsupported output URI scheme 's3'"):
        outdir.normalize("s3://bucket/x")
    with pytest.raises(ValueError, match="names no bucket"):
        outdir.normalize("gs:///x")
    assert outdir.normalize("gs://b/x/") == "gs://b/x"


def test_killed_gcs_convert_resumes_reading_only_the_rest(gcs, proxy, tmp_path, monkeypatch):
    """gs:// output: the step is written in place at OUT/0; a killed run's records there are adopted."""
    from test_resume import (
        ITEMS,
        assert_same_checkpoint,
        cli,
        convert_plan,
        count_reads,
        kill_when_half_done,
        make_model,
        record_ids,
    )

    model = make_model(str(tmp_path / "model"))
    reference = str(tmp_path / "reference")
    convert(model, reference, *ITEMS)
    plan, _ = convert_plan(model, *ITEMS)
    out, staging = "gs://ckpts/resumed", "gs://ckpts/resumed/0"
    kill_when_half_done(cli("convert", "--source", model, "--output", out, *ITEMS), lambda: staging, len(plan.items))
    adopted = record_ids(staging)
    assert len(plan.items) // 2 <= len(adopted) < len(plan.items)
    assert orbax_writer.COMMIT_FILE not in outdir.list_children(staging)

    monkeypatch.setenv("CKPTBEAM_LEASE_EXPIRY_S", "0")  # the killed run's lease has expired
    reads = count_reads(monkeypatch)
    summary = convert(model, out, *ITEMS)

    assert summary["resumed_items"] == len(adopted)
    assert sum(reads) == sum(i.bytes_read for i in plan.items if i.item_id not in adopted)
    objects = _objects(gcs, "resumed/")
    assert not [o for o in objects if ".ckptbeam_" in o or orbax_writer.IN_PROGRESS_MARK in o]
    assert_same_checkpoint(_download(gcs, "resumed", tmp_path / "resumed"), reference)
