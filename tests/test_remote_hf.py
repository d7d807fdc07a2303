"""hf:// sources against a local Hub-compatible server (tests/fake_hub.py), with HF_ENDPOINT at it.

Counts what the server sends: a conversion fetches the JSON files, each shard's header and each
tensor's bytes once, as ranges of at most one work item's slab, never whole files or unused files.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys

import pytest
from conftest import FIXTURES, ROOT, assert_matches_reference, convert
from fake_hub import FakeHub
from reference import load_tensors

from ckpt_transforms.storage.remote import HfSource, RemoteError
from ckpt_transforms.storage.sources import SourceError, open_source
from pipelines.cli import main as cli_main

SHARDED = os.path.join(FIXTURES, "llama_f32_sharded")
SINGLE = os.path.join(FIXTURES, "llama_bf16")
TOKEN = "hf_fakeTOKENfor_tests_0123456789abcdef"
UNUSED = "original/consolidated.00.pth"


@pytest.fixture(scope="module")
def hub():
    hub = FakeHub()
    hub.add_repo("acme/tiny", SHARDED, extra_files={UNUSED: bytes(1_000_000)})
    hub.add_repo("acme/gated", SINGLE, token=TOKEN)
    yield hub
    hub.stop()


def _env(hub: FakeHub, tmp_path) -> dict[str, str]:
    return {
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(tmp_path / "hf_home"),  # no stored token from the machine
        "CKPTBEAM_REMOTE_BACKOFF_S": "0.01",
    }


@pytest.fixture
def hf(hub, monkeypatch, tmp_path):
    for k, v in _env(hub, tmp_path).items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    hub.reset_log()
    hub.fault = None
    yield hub
    hub.fault = None
    hub.omit_sizes = False


def expected_fetch(model_dir: str) -> tuple[int, int]:
    """(bytes a conversion must fetch, of which tensor bytes): JSON files + shard headers + tensors.

    Computed from the files and the `safetensors` library, independently of the planner.
    """
    meta = 0
    for name in sorted(os.listdir(model_dir)):
        path = os.path.join(model_dir, name)
        if name.endswith(".json"):
            meta += os.path.getsize(path)
        elif name.endswith(".safetensors"):
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
            meta += 8 + n
    tensors = sum(t.nbytes for t in load_tensors(model_dir).values())
    return meta + tensors, tensors


def _range_sizes(hub: FakeHub) -> list[int]:
    sizes = []
    for s in hub.file_gets():
        m = re.fullmatch(r"bytes=(\d+)-(\d+)", s.range or "")
        assert m, f"GET {s.filename} without a byte range"
        sizes.append(int(m.group(2)) - int(m.group(1)) + 1)
    return sizes


def test_cli_converts_gated_repo_with_workers_in_other_processes(hub, tmp_path):
    """The real CLI in a subprocess, HF_ENDPOINT and HF_TOKEN set before huggingface_hub loads."""
    out = str(tmp_path / "out")
    env = {**os.environ, **_env(hub, tmp_path), "HF_TOKEN": TOKEN}
    hub.reset_log()
    cmd = [sys.executable, "-m", "pipelines.cli", "convert", "--source", "hf://acme/gated@main", "--output", out]
    cmd += ["--runner=DirectRunner", "--direct_running_mode=multi_processing", "--direct_num_workers=2"]
    cmd += ["--max_item_bytes=20000"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert TOKEN not in proc.stdout + proc.stderr
    commit = hub.repos["acme/gated"].commit
    assert f"plan for hf://acme/gated@{commit}" in proc.stdout
    # resolved once on the launcher: every file request (launcher and workers) names the commit
    assert hub.log and {s.revision for s in hub.log} == {commit}
    assert len(hub.api_calls) == 1
    fetched, _ = expected_fetch(SINGLE)
    assert hub.bytes_served() == fetched
    assert max(_range_sizes(hub)) <= 20000 < os.path.getsize(os.path.join(SINGLE, "model.safetensors"))
    assert_matches_reference(out, SINGLE)


def test_fetches_exactly_headers_and_tensor_bytes_despite_503s_and_resets(hf, out_dir):
    injected = []

    def fault(method, repo, filename, start):
        # the first 3 tensor-data reads get 503, the next 2 a connection reset
        if method == "GET" and filename.endswith(".safetensors") and start and start > 8 and len(injected) < 5:
            injected.append(filename)
            return 503 if len(injected) <= 3 else "reset"
        return None

    hf.fault = fault
    summary = convert("hf://acme/tiny@main", out_dir, "--max_item_bytes=20000")
    assert len(injected) == 5
    assert [s.status for s in hf.log].count(503) == 3
    fetched, tensor_bytes = expected_fetch(SHARDED)
    assert summary["bytes_read"] == tensor_bytes
    assert hf.bytes_served() == fetched  # failed attempts sent no bytes; nothing read twice
    assert not [s for s in hf.log if s.filename == UNUSED]
    shard_sizes = [os.path.getsize(os.path.join(SHARDED, f)) for f in os.listdir(SHARDED) if f.endswith(".safetensors")]
    assert max(_range_sizes(hf)) <= 20000 < min(shard_sizes)
    assert_matches_reference(out_dir, SHARDED)


def test_plain_repo_id_dry_run_reads_only_headers(hf, out_dir):
    summary = convert("acme/tiny", out_dir, "--dry_run")
    assert summary["work_items"] > 0 and not os.path.exists(out_dir)
    fetched, tensor_bytes = expected_fetch(SHARDED)
    assert hf.bytes_served() == fetched - tensor_bytes  # JSON files and headers only
    assert hf.bytes_served() < 0.05 * tensor_bytes


def test_permanent_404_fails_the_item_and_publishes_nothing(hf, out_dir):
    shard = "model-00002-of-00004.safetensors"
    hf.fault = lambda method, repo, filename, start: 404 if filename == shard and start and start > 8 else None
    commit = hf.repos["acme/tiny"].commit
    with pytest.raises(Exception) as info:
        convert("hf://acme/tiny", out_dir, "--no_resume")
    message = str(info.value)
    assert f"hf://acme/tiny@{commit}/{shard}" in message and "HTTP 404" in message
    assert not os.path.exists(os.path.join(out_dir, "0"))
    assert not [e for e in os.listdir(out_dir) if e.startswith("0.")]  # staging removed too
    # a 404 is not retried by the reader: one request per work-item attempt
    refused = [s for s in hf.log if s.status == 404]
    assert 1 <= len(refused) <= 3


def test_unknown_revision_is_a_clear_cli_error(hf, out_dir, capsys):
    assert cli_main(["convert", "--source", "hf://acme/tiny@v9.9", "--output", out_dir]) == 1
    err = capsys.readouterr().err
    assert "hf://acme/tiny@v9.9: revision not found in this repository (HTTP 404)" in err
    assert not os.path.exists(out_dir)
    assert not hf.log  # no file was requested


def test_plain_repo_id_that_is_neither_on_the_hub_nor_local(hf):
    with pytest.raises(SourceError) as e:
        open_source("acme/missing")
    assert str(e.value).startswith("source 'acme/missing': no such directory")
    assert "hf://acme/missing@main: repository not found" in str(e.value)
    assert len(hf.api_calls) == 1  # asked once: it may be a mistyped path


def test_gated_repo_without_or_with_a_wrong_token_is_a_clear_401(hf, monkeypatch):
    with pytest.raises(RemoteError, match=r"hf://acme/gated@main: the repository is gated \(HTTP 401\).*HF_TOKEN") as e:
        open_source("hf://acme/gated")
    assert e.value.status == 401
    wrong = "hf_wrongTOKEN_0000000000000000000000"
    monkeypatch.setenv("HF_TOKEN", wrong)
    with pytest.raises(RemoteError, match="HTTP 401") as e:
        open_source("hf://acme/gated@main")
    assert wrong not in str(e.value)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    source = open_source("hf://acme/gated@main")
    assert source.read_range("model.safetensors", 0, 8) == open(os.path.join(SINGLE, "model.safetensors"), "rb").read(8)


def test_pinned_uri_needs_no_resolution_and_fingerprints_name_the_commit(hf):
    import hashlib

    repo = hf.repos["acme/tiny"]
    source = open_source("hf://acme/tiny")
    assert isinstance(source, HfSource) and source.uri == f"hf://acme/tiny@{repo.commit}"
    assert len(hf.api_calls) == 1
    worker_side = open_source(source.uri)  # what a worker does: no Hub call at all
    assert len(hf.api_calls) == 1
    name = "model-00001-of-00004.safetensors"
    with open(os.path.join(SHARDED, name), "rb") as f:
        data = f.read()
    assert worker_side.read_range(name, 1000, 64) == data[1000:1064]
    assert len(hf.api_calls) == 1
    assert source.fingerprint(name) == {
        "size": len(data),
        "etag": hashlib.sha256(data).hexdigest(),
        "commit": repo.commit,
    }
    assert source.exists("config.json") and not source.exists("pytorch_model.bin")
    with pytest.raises(RemoteError, match="not found"):
        source.size("pytorch_model.bin")


def test_sizes_missing_from_model_info_come_from_a_head_request(hf):
    hf.omit_sizes = True
    source = open_source("hf://acme/tiny")
    name = "model-00004-of-00004.safetensors"
    assert source.size(name) == os.path.getsize(os.path.join(SHARDED, name))
    assert [(s.method, s.filename) for s in hf.log] == [("HEAD", name)]


def test_export_takes_config_generation_config_and_tokenizer_from_a_hub_repo(hf, tmp_path):
    """--hf_config hf://ORG/REPO fetches only the small side files, never the weights."""
    from pipelines.export import run as export

    extra = {"generation_config.json": b'{"max_length": 17}', "tokenizer_config.json": b'{"model_max_length": 8}'}
    hf.add_repo("acme/side", SINGLE, extra_files=extra)
    ckpt = str(tmp_path / "ckpt")
    convert(SINGLE, ckpt)
    hf.reset_log()
    out = str(tmp_path / "hf")
    export(["--source", ckpt, "--output", out, "--hf_config", "hf://acme/side"])
    for name, data in extra.items():
        with open(os.path.join(out, name), "rb") as f:
            assert f.read() == data
    fetched = {s.filename for s in hf.file_gets()}
    assert fetched and not any(f.endswith(".safetensors") for f in fetched)
