"""The remote reader's retry policy, error classification and URI routing (no network)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT
from google.api_core import exceptions as gexc

from ckpt_transforms.storage.remote import (
    HttpStatusError,
    RemoteError,
    RetryPolicy,
    http_status,
    is_permanent_failure,
    with_retries,
)
from ckpt_transforms.storage.sources import SourceError


class Flaky:
    """Raises the given exceptions in turn, then returns 'ok'."""

    def __init__(self, *errors: BaseException):
        self.errors = list(errors)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def _run(fn, attempts: int = 4):
    sleeps: list[float] = []
    policy = RetryPolicy(attempts=attempts, base_delay=1.0, max_delay=3.0)
    return with_retries(fn, "gs://b/m/f", "HINT", policy=policy, sleep=sleeps.append), sleeps


@pytest.mark.parametrize(
    "error",
    [
        HttpStatusError(429),
        HttpStatusError(500),
        gexc.ServiceUnavailable("busy"),
        gexc.TooManyRequests("slow down"),
        ConnectionResetError(104, "Connection reset by peer"),
        TimeoutError("timed out"),
    ],
    ids=["429", "500", "gcs-503", "gcs-429", "reset", "timeout"],
)
def test_transient_errors_are_retried_with_growing_backoff(error):
    fn = Flaky(error, error, error)
    result, sleeps = _run(fn)
    assert result == "ok" and fn.calls == 4
    assert len(sleeps) == 3
    for attempt, slept in enumerate(sleeps, 1):
        full = min(3.0, 2 ** (attempt - 1))
        assert full / 2 <= slept <= full


@pytest.mark.parametrize(
    "error,status,text",
    [
        (HttpStatusError(401), 401, "not authorized (HTTP 401); HINT"),
        (gexc.Forbidden("no"), 403, "access denied (HTTP 403); HINT"),
        (gexc.NotFound("gone"), 404, "not found (HTTP 404)"),
        (HttpStatusError(416), 416, "byte range not satisfiable"),
    ],
)
def test_refusals_fail_at_once_naming_the_uri(error, status, text):
    fn = Flaky(error)
    with pytest.raises(RemoteError) as info:
        _run(fn)
    assert fn.calls == 1
    assert info.value.status == status
    assert str(info.value).startswith("gs://b/m/f: ") and text in str(info.value)
    assert isinstance(info.value, SourceError)  # the CLI reports it as a plain error


def test_attempts_are_bounded():
    fn = Flaky(*[HttpStatusError(503)] * 10)
    with pytest.raises(RemoteError, match=r"gs://b/m/f: still failing after 4 attempts \(HTTP 503\)"):
        _run(fn)
    assert fn.calls == 4


def test_bugs_are_not_retried_or_disguised():
    fn = Flaky(KeyError("oops"))
    with pytest.raises(KeyError):
        _run(fn)
    assert fn.calls == 1


def test_policy_from_env(monkeypatch):
    monkeypatch.setenv("CKPTBEAM_REMOTE_ATTEMPTS", "2")
    monkeypatch.setenv("CKPTBEAM_REMOTE_BACKOFF_S", "0.25")
    assert RetryPolicy.from_env() == RetryPolicy(attempts=2, base_delay=0.25)


def test_http_status_of_library_errors():
    assert http_status(gexc.BadGateway("x")) == 502
    assert http_status(HttpStatusError(404)) == 404
    assert http_status(ConnectionResetError()) is None


def test_remote_schemes_register_lazily_in_a_fresh_process():
    """What a Beam worker process does: open a pinned URI without importing remote first."""
    code = (
        "import sys\n"
        "from ckpt_transforms.storage.sources import open_source\n"
        "assert 'ckpt_transforms.storage.remote' not in sys.modules\n"
        "print(type(open_source('gs://bucket/model')).__name__,"
        " open_source('hf://acme/tiny@' + 'ab' * 20).uri)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["GcsSource", "hf://acme/tiny@" + "ab" * 20]


def test_no_retry_starts_after_the_deadline():
    """The deadline bounds a call whose every try hangs until its time-out, whatever the attempts."""
    now = [0.0]
    sleeps: list[float] = []

    def slow_failure():
        now[0] += 50.0  # each try takes 50 s to time out
        raise TimeoutError("timed out")

    policy = RetryPolicy(attempts=100, base_delay=1.0, max_delay=1.0, deadline=120.0)
    with pytest.raises(RemoteError, match=r"gs://b/m/f: still failing after 3 attempts"):
        with_retries(slow_failure, "gs://b/m/f", policy=policy, sleep=sleeps.append, clock=lambda: now[0])
    assert len(sleeps) == 2


def test_tensorstore_gets_the_same_policy(monkeypatch):
    monkeypatch.setenv("CKPTBEAM_REMOTE_ATTEMPTS", "3")
    monkeypatch.setenv("CKPTBEAM_REMOTE_BACKOFF_S", "0.01")
    from ckpt_transforms.storage.outdir import kvstore_spec

    spec = kvstore_spec("gs://bucket/out")
    assert spec["gcs_request_retries"] == {"max_retries": 2, "initial_delay": "0.01s", "max_delay": "30s"}
    assert "gcs_request_retries" not in kvstore_spec("/tmp/out")


def test_a_bad_retry_setting_names_the_variable(monkeypatch):
    monkeypatch.setenv("CKPTBEAM_REMOTE_ATTEMPTS", "many")
    with pytest.raises(ValueError, match="CKPTBEAM_REMOTE_ATTEMPTS='many': expected a number"):
        RetryPolicy.from_env()


@pytest.mark.parametrize(
    "error, permanent",
    [
        (OSError(28, "No space left on device"), True),
        (ValueError("RESOURCE_EXHAUSTED: Failed to write 9 bytes: No space left on device [os_error_code='28']"), True),
        (OSError(30, "Read-only file system"), True),
        (SourceError("bad header"), True),
        (ConnectionResetError(104, "reset"), False),
        (ValueError("UNAVAILABLE: try again"), False),
    ],
    ids=["enospc", "tensorstore-enospc", "erofs", "source", "reset", "unavailable"],
)
def test_permanent_failures_are_not_retried_by_work_items(error, permanent):
    assert is_permanent_failure(error) is permanent
