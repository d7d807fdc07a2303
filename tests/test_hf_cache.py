"""The local Hugging Face cache, HF_HUB_OFFLINE, subfolders and --revision, against the fake Hub.

The cache is filled by huggingface_hub's own `snapshot_download` from the fake Hub (HF_ENDPOINT),
so its layout (refs/, snapshots/<commit>/ links into blobs/) is the library's, not ours.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys

import pytest
from conftest import FIXTURES, ROOT, assert_matches_reference, convert
from fake_hub import FakeHub

from ckpt_transforms.storage.hf_hub import CachedSnapshot
from ckpt_transforms.storage.remote import HfSource
from ckpt_transforms.storage.sources import SourceError, open_source
from pipelines.cli import main as cli_main

SHARDED = os.path.join(FIXTURES, "llama_f32_sharded")
SINGLE = os.path.join(FIXTURES, "llama_bf16")


def _files(directory: str, prefix: str = "") -> dict[str, bytes]:
    out = {}
    for name in os.listdir(directory):
        with open(os.path.join(directory, name), "rb") as f:
            out[prefix + name] = f.read()
    return out


@pytest.fixture(scope="module")
def hub():
    hub = FakeHub()
    hub.add_repo("acme/tiny", SHARDED)
    nested = hub.add_repo("acme/nested", SINGLE, extra_files=_files(SHARDED, "ckpt/"))
    nested.branches["release/v2"] = nested.commit
    yield hub
    hub.stop()


@pytest.fixture(scope="module")
def cache_dir(hub, tmp_path_factory):
    """acme/tiny and acme/nested downloaded into a Hub cache by huggingface_hub itself."""
    from huggingface_hub import snapshot_download

    cache = str(tmp_path_factory.mktemp("hub_cache"))
    for repo in ("acme/tiny", "acme/nested"):
        snapshot_download(repo, cache_dir=cache, endpoint=hub.url)
    return cache


@pytest.fixture
def hf(hub, cache_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no stored token from the machine
    monkeypatch.setenv("HF_HUB_CACHE", cache_dir)
    monkeypatch.setenv("CKPTBEAM_REMOTE_BACKOFF_S", "0.01")
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    hub.reset_log()
    yield hub


def _no_requests(hub: FakeHub) -> None:
    assert not hub.api_calls and not hub.log


def test_offline_conversion_reads_the_cache_and_asks_no_one(hf, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    commit = hf.repos["acme/tiny"].commit
    for i, uri in enumerate(["hf://acme/tiny", "acme/tiny", f"hf://acme/tiny@{commit}"]):
        out = str(tmp_path / f"out{i}")
        summary = convert(uri, out)
        assert_matches_reference(out, SHARDED)
        assert summary["bytes_read"] > 0
    _no_requests(hf)


def test_offline_cli_with_workers_in_other_processes(hf, cache_dir, tmp_path):
    """Beam workers in other processes open the pinned URI offline too: from the cache, asking no one."""
    out = str(tmp_path / "out")
    env = {**os.environ, "HF_ENDPOINT": hf.url, "HF_HUB_CACHE": cache_dir, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "pipelines.cli", "convert", "--source", "acme/tiny", "--output", out]
    cmd += ["--runner=DirectRunner", "--direct_running_mode=multi_processing", "--direct_num_workers=2"]
    proc = subprocess.run(
        cmd + ["--max_item_bytes=20000"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"plan for hf://acme/tiny@{hf.repos['acme/tiny'].commit}" in proc.stdout
    assert_matches_reference(out, SHARDED)
    _no_requests(hf)


def test_offline_source_names_the_commit_and_the_hub_fingerprints(hf, cache_dir, monkeypatch, tmp_path):
    """Read from the cache or over HTTP, a source has the same URI and fingerprints, so a scheduled
    re-conversion does not redo a conversion because the bytes came from elsewhere."""
    name = "model-00002-of-00004.safetensors"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    online = open_source("hf://acme/tiny")
    assert isinstance(online, HfSource) and online.local is None
    monkeypatch.setenv("HF_HUB_CACHE", cache_dir)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = open_source("hf://acme/tiny")
    assert isinstance(offline, CachedSnapshot)
    assert offline.uri == online.uri == f"hf://acme/tiny@{hf.repos['acme/tiny'].commit}"
    assert offline.fingerprint(name) == online.fingerprint(name)
    assert offline.read_range(name, 100, 50) == online.read_range(name, 100, 50)


def test_offline_without_the_repo_in_the_cache_fails_at_once(hf, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SourceError, match=r"hf://acme/other: not in the Hugging Face cache .*hf download acme/other"):
        open_source("hf://acme/other")
    with pytest.raises(SourceError, match=r"hf://acme/tiny@v9: not in the Hugging Face cache .*--revision v9"):
        open_source("hf://acme/tiny", revision="v9")
    with pytest.raises(SourceError, match=r"^source 'acme/other': no such directory, nor a Hugging Face model"):
        open_source("acme/other")
    out = str(tmp_path / "out")
    assert cli_main(["convert", "--source", "hf://acme/other", "--output", out]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "HF_HUB_OFFLINE is set" in err[0] and not os.path.exists(out)
    _no_requests(hf)


def test_online_files_of_the_resolved_commit_come_from_the_cache(hf, out_dir):
    summary = convert("hf://acme/tiny@main", out_dir)
    assert_matches_reference(out_dir, SHARDED)
    assert summary["bytes_read"] > 0
    assert len(hf.api_calls) == 1  # the revision is still resolved on the Hub
    assert not hf.file_gets()  # but no byte came over HTTP


def test_online_without_a_cache_reads_byte_ranges(hf, monkeypatch, out_dir, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    convert("hf://acme/tiny", out_dir)
    assert_matches_reference(out_dir, SHARDED)
    assert hf.file_gets() and all(s.range for s in hf.file_gets())


def _dead_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # closed when we return: connection refused


def test_a_mistyped_plain_path_is_asked_once_and_says_no_such_directory(hf, monkeypatch, caplog):
    with pytest.raises(SourceError, match=r"^source 'checkpoints/llamma': no such directory, nor a Hugging Face model"):
        open_source("checkpoints/llamma")
    assert len(hf.api_calls) == 1
    monkeypatch.setenv("HF_ENDPOINT", _dead_endpoint())
    with caplog.at_level(logging.WARNING, logger="ckptbeam"):
        with pytest.raises(SourceError, match=r"^source 'checkpoints/llamma': no such directory"):
            open_source("checkpoints/llamma")
    assert not [r for r in caplog.records if "retry" in r.getMessage()]


def test_unreachable_hub_falls_back_to_the_cached_snapshot(hf, monkeypatch, caplog, out_dir):
    monkeypatch.setenv("HF_ENDPOINT", "http://hub.invalid")  # reserved name: never resolves
    with caplog.at_level(logging.WARNING, logger="ckptbeam"):
        source = open_source("hf://acme/tiny")
    assert isinstance(source, CachedSnapshot)
    assert any("cannot resolve the host name" in r.getMessage() for r in caplog.records)
    assert not [r for r in caplog.records if "retry" in r.getMessage()]
    with pytest.raises(SourceError, match=r"hf://acme/other@main: cannot resolve the host name"):
        open_source("hf://acme/other")


@pytest.mark.parametrize("offline", [False, True])
def test_subfolder_and_revision_with_a_slash(hf, monkeypatch, out_dir, offline):
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.setenv("HF_HUB_CACHE", out_dir + "-empty-cache")
    commit = hf.repos["acme/nested"].commit
    uri = "hf://acme/nested@release%2Fv2/ckpt" if not offline else "hf://acme/nested/ckpt"
    convert(uri, out_dir)
    assert_matches_reference(out_dir, SHARDED)
    assert open_source(uri).uri == f"hf://acme/nested@{commit}/ckpt"
    if offline:
        _no_requests(hf)
    else:
        assert {s.filename.split("/")[0] for s in hf.file_gets()} == {"ckpt"}


def test_revision_flag_on_the_command_line(hf, capsys, tmp_path):
    commit = hf.repos["acme/tiny"].commit
    out = str(tmp_path / "out")
    assert cli_main(["convert", "--source", "acme/tiny", "--revision", commit, "--output", out, "--dry_run"]) == 0
    assert f"plan for hf://acme/tiny@{commit}" in capsys.readouterr().out
    bad = ["convert", "--source", "hf://acme/tiny@main", "--revision", "v2", "--output", out]
    assert cli_main(bad) == 1
    assert "asks for revision 'main' and --revision for 'v2'" in capsys.readouterr().err
    assert cli_main(["convert", "--source", SINGLE, "--revision", "v2", "--output", out]) == 1
    assert "--revision v2 applies to Hugging Face sources" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_export_takes_hf_config_at_a_revision(hf, tmp_path, capsys):
    from pipelines.export import run as export

    ckpt = str(tmp_path / "ckpt")
    convert(SINGLE, ckpt)
    out = str(tmp_path / "hf")
    export(["--source", ckpt, "--output", out, "--hf_config", "hf://acme/nested", "--revision", "release/v2"])
    with open(os.path.join(out, "config.json"), "rb") as f, open(os.path.join(SINGLE, "config.json"), "rb") as g:
        assert f.read() == g.read()
    bad = ["export", "--source", ckpt, "--output", str(tmp_path / "hf2"), "--revision", "main"]
    assert cli_main(bad) == 1
    assert "--revision main applies to --hf_config hf://ORG/REPO" in capsys.readouterr().err
