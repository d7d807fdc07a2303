"""hf:// URIs as HfFileSystem spells them, --revision, the cache location and the no-retry cases (no network)."""

from __future__ import annotations

import socket

import httpx2
import pytest
from huggingface_hub.errors import OfflineModeIsEnabled

from ckpt_transforms.storage.hf_hub import HfRef, hub_cache_dir, looks_like_repo_id
from ckpt_transforms.storage.remote import RemoteError, RetryPolicy, with_retries
from ckpt_transforms.storage.sources import LocalSource, SourceError, open_source

SHA = "ab" * 20


@pytest.mark.parametrize(
    "uri, repo_id, revision, subfolder",
    [
        ("hf://acme/tiny", "acme/tiny", None, ""),
        ("hf://acme/tiny@main", "acme/tiny", "main", ""),
        ("hf://acme/tiny@refs/pr/3", "acme/tiny", "refs/pr/3", ""),
        ("hf://acme/tiny@refs/pr/3/ckpt/step1", "acme/tiny", "refs/pr/3", "ckpt/step1"),
        ("hf://acme/tiny@release%2Fv2/ckpt", "acme/tiny", "release/v2", "ckpt"),
        ("hf://acme/tiny/ckpt", "acme/tiny", None, "ckpt"),
        (f"hf://acme/tiny@{SHA}/a/b", "acme/tiny", SHA, "a/b"),
        ("acme/Tiny-1.5B@v1", "acme/Tiny-1.5B", "v1", ""),
        ("hf://models/acme/tiny@v1", "acme/tiny", "v1", ""),
    ],
)
def test_hf_uris_parse_and_print_back_as_hf_file_system_spells_them(uri, repo_id, revision, subfolder):
    ref = HfRef.parse(uri)
    assert ref == HfRef(repo_id, revision, subfolder)
    assert HfRef.parse(ref.uri()) == ref
    assert ref.uri(SHA) == f"hf://{repo_id}@{SHA}" + (f"/{subfolder}" if subfolder else "")


@pytest.mark.parametrize(
    "uri, message",
    [
        ("hf://", "not a Hugging Face model URI"),
        ("hf://acme/tiny@", "not a Hugging Face model URI"),
        ("hf://gpt2", "not a Hugging Face model URI"),  # the Hub wants ORG/REPO
        ("hf://../x", "not a Hugging Face model URI"),
        ("hf://datasets/acme/tiny", "only model repositories"),
        ("hf://acme/tiny@main/../../etc", "escapes the model directory"),
    ],
)
def test_bad_hf_uris_are_refused(uri, message):
    with pytest.raises(SourceError, match=message):
        HfRef.parse(uri)


def test_revision_flag_is_the_same_as_at_revision_and_may_not_contradict_it():
    assert HfRef.parse("hf://acme/tiny/sub").with_revision("v1") == HfRef("acme/tiny", "v1", "sub")
    assert HfRef.parse("hf://acme/tiny@v1").with_revision("v1") == HfRef("acme/tiny", "v1")
    assert HfRef.parse("hf://acme/tiny@v1").with_revision(None) == HfRef("acme/tiny", "v1")
    with pytest.raises(SourceError, match="asks for revision 'v1' and --revision for 'v2'"):
        HfRef.parse("hf://acme/tiny@v1").with_revision("v2")


def test_revision_for_a_local_or_gcs_source_is_an_error(tmp_path):
    for uri in (str(tmp_path), "gs://bucket/model"):
        with pytest.raises(SourceError, match="--revision v1 applies to Hugging Face sources"):
            open_source(uri, revision="v1")


def test_plain_repo_ids_versus_local_paths(tmp_path, monkeypatch):
    assert looks_like_repo_id("meta-llama/Llama-3.1-8B")
    assert looks_like_repo_id("acme/tiny@main")
    for path in ("/abs/path", "./rel/dir", "a/b/c", "model", "../x/y"):
        assert not looks_like_repo_id(path)
    # an existing local directory that looks like a repo id stays local
    (tmp_path / "acme" / "tiny").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert isinstance(open_source("acme/tiny"), LocalSource)


@pytest.mark.parametrize("path", ["./models/llama", "/no/such/model", "runs/7/hf-model", "model"])
def test_a_mistyped_local_path_says_no_such_directory(path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing may ask it
    with pytest.raises(SourceError, match=rf"^source '{path}': no such directory$"):
        open_source(path)


def test_a_file_is_not_a_directory(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SourceError, match="is not a directory"):
        open_source(str(tmp_path / "config.json"))


def test_cache_location_follows_huggingface_hub(monkeypatch, tmp_path):
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert hub_cache_dir() == str(tmp_path / ".cache" / "huggingface" / "hub")
    monkeypatch.setenv("XDG_CACHE_HOME", "/x")
    assert hub_cache_dir() == "/x/huggingface/hub"
    monkeypatch.setenv("HF_HOME", "/h")
    assert hub_cache_dir() == "/h/hub"
    monkeypatch.setenv("HF_HUB_CACHE", "/c")
    assert hub_cache_dir() == "/c"


def _dns_failure() -> Exception:
    try:
        raise socket.gaierror(-2, "Name or service not known")
    except socket.gaierror as e:
        try:
            raise httpx2.ConnectError("[Errno -2] Name or service not known") from e
        except httpx2.ConnectError as outer:
            return outer


@pytest.mark.parametrize(
    "error, reason",
    [(_dns_failure(), "cannot resolve the host name"), (OfflineModeIsEnabled("offline"), "HF_HUB_OFFLINE is set")],
)
def test_offline_mode_and_unresolvable_hosts_are_not_retried(error, reason):
    calls, sleeps = [], []

    def fn():
        calls.append(1)
        raise error

    with pytest.raises(RemoteError, match=reason):
        with_retries(fn, "hf://acme/tiny", policy=RetryPolicy(attempts=6), sleep=sleeps.append)
    assert len(calls) == 1 and not sleeps


def test_a_refused_connection_is_still_retried():
    calls, sleeps = [], []

    def fn():
        calls.append(1)
        if len(calls) < 3:
            raise httpx2.ConnectError("[Errno 111] Connection refused")
        return "ok"

    assert with_retries(fn, "hf://acme/tiny", policy=RetryPolicy(attempts=6), sleep=sleeps.append) == "ok"
    assert len(sleeps) == 2
