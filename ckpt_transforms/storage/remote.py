"""Remote model directories behind the one `ByteSource` interface: gs:// and hf://.

Both read exact byte ranges (HTTP `Range`), never whole shards, and keep nothing on local disk.
Transient failures (HTTP 408/429/5xx, connection resets, time-outs) are retried with exponential
backoff; 401/403/404 fail at once with a message naming the URI (never the token). Endpoints come
from the standard environment variables, so tests point the same code at local stand-ins:
`STORAGE_EMULATOR_HOST` (google-cloud-storage) and `HF_ENDPOINT` (huggingface_hub).

Importing this module registers both schemes; `storage.open_source` imports it on first use, so
Beam workers in other processes get the registration too.
"""

from __future__ import annotations

import errno
import http.client
import logging
import os
import random
import re
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from ckpt_transforms.storage.hf_hub import COMMIT, HfRef, open_hf
from ckpt_transforms.storage.outdir import split_gcs
from ckpt_transforms.storage.sources import SourceError, check_member_name, register_scheme

log = logging.getLogger("ckptbeam")
T = TypeVar("T")

ATTEMPTS_ENV = "CKPTBEAM_REMOTE_ATTEMPTS"
BACKOFF_ENV = "CKPTBEAM_REMOTE_BACKOFF_S"
DEADLINE_ENV = "CKPTBEAM_REMOTE_DEADLINE_S"
HTTP_TIMEOUT_S = 120.0  # per socket operation, not per transfer

GCS_AUTH_HINT = (
    "check the Google credentials this process uses (`gcloud auth application-default login`, "
    "GOOGLE_APPLICATION_CREDENTIALS, or the worker's service account) and their access to the bucket"
)
HF_AUTH_HINT = (
    "gated or private repositories need a token with access: set HF_TOKEN (or run `hf auth login`) "
    "on the launcher and the workers, and accept the model's license on the Hub"
)


class RemoteError(SourceError):
    """A remote read failed for good; `status` is the HTTP status when there was one."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class HttpStatusError(Exception):
    """An HTTP error answer from our own requests (the libraries raise their own classes)."""

    def __init__(self, status: int, detail: str = ""):
        super().__init__(f"HTTP {status}" + (f": {detail}" if detail else ""))
        self.status = status


@dataclass(frozen=True)
class RetryPolicy:
    """The one retry policy of every remote call (source reads, GCS client calls, TensorStore's gcs
    kvstore): at most `attempts` tries, with delays base, 2*base, 4*base, ... capped at `max_delay`,
    and no new try once `deadline` seconds have passed since the first one."""

    attempts: int = 6
    base_delay: float = 0.5
    max_delay: float = 30.0
    deadline: float = 600.0

    @classmethod
    def from_env(cls) -> RetryPolicy:
        """Defaults, overridable per process (tests use tiny delays; workers inherit the env)."""
        attempts = _env_number(ATTEMPTS_ENV, cls.attempts, int)
        base = _env_number(BACKOFF_ENV, cls.base_delay, float)
        deadline = _env_number(DEADLINE_ENV, cls.deadline, float)
        return cls(attempts=max(1, attempts), base_delay=max(0.0, base), deadline=max(0.0, deadline))

    def delay(self, attempt: int) -> float:
        """Backoff before retry number `attempt` (1-based), jittered to [d/2, d] to spread workers."""
        d = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
        return d * (0.5 + 0.5 * random.random())

    def tensorstore_retries(self) -> dict:
        """The same policy as TensorStore's `gcs_request_retries` context resource (its retries are
        internal, so the output side of a run obeys the settings the source side does)."""
        return {
            "max_retries": self.attempts - 1,  # retries after the first try
            "initial_delay": f"{self.base_delay:g}s",
            "max_delay": f"{max(self.base_delay, self.max_delay):g}s",
        }


def _env_number(name: str, default, kind):
    text = os.environ.get(name)
    if text is None or not text.strip():
        return default
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"environment variable {name}={text!r}: expected a number") from None


def http_status(exc: BaseException) -> int | None:
    """The HTTP status an exception carries (google-api-core, huggingface_hub/httpx, ours)."""
    status = getattr(exc, "status", None)
    if isinstance(status, int):
        return status
    code = getattr(exc, "code", None)  # google.api_core.exceptions.GoogleAPICallError
    if isinstance(code, int) and 100 <= code < 600:
        return code
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def _connection_error_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [ConnectionError, TimeoutError, http.client.HTTPException]
    try:
        import requests

        types += [requests.exceptions.ConnectionError, requests.exceptions.Timeout]
        types += [requests.exceptions.ChunkedEncodingError]
    except ImportError:  # pragma: no cover - requests comes with google-cloud-storage
        pass
    try:
        import httpx2

        types.append(httpx2.TransportError)
    except ImportError:  # pragma: no cover - huggingface_hub's HTTP client
        pass
    try:
        import urllib3

        types.append(urllib3.exceptions.HTTPError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


_CONNECTION_ERRORS = _connection_error_types()


def is_transient_status(status: int) -> bool:
    return status in (408, 429) or 500 <= status < 600


def is_connection_error(exc: BaseException) -> bool:
    """Resets, refused connections, time-outs, truncated bodies: worth another try."""
    return isinstance(exc, _CONNECTION_ERRORS)


# Local conditions another attempt cannot fix: a full disk or quota, a read-only or forbidden
# path, a file where a directory belongs (and the reverse).
PERMANENT_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR}
)
_TS_OS_ERROR = re.compile(r"\[os_error_code='(\d+)'\]")


def os_error_code(exc: BaseException) -> int | None:
    """The errno of an OSError, or the one TensorStore names in its error text."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno
    m = _TS_OS_ERROR.search(str(exc))
    return int(m.group(1)) if m else None


def is_permanent_failure(exc: BaseException) -> bool:
    """A failure that would repeat on the next attempt of a work item: bad or refused input
    (`SourceError`, which includes remote reads that used up their own retries) and local
    conditions such as a full disk (ENOSPC is never transient)."""
    return isinstance(exc, SourceError) or os_error_code(exc) in PERMANENT_ERRNOS


def unreachable(exc: BaseException) -> str:
    """Why no retry can succeed ('' if one might): offline mode, or a host name that does not resolve."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    if isinstance(exc, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set, so the Hub is not asked"
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, socket.gaierror):
            return f"cannot resolve the host name ({cause.strerror or cause}); no network, or a wrong endpoint?"
        cause = cause.__cause__ or cause.__context__
    return ""


def permanent_message(uri: str, status: int | None, auth_hint: str, detail: str = "") -> str:
    """What a user needs to know about a refused request; names the URI, never credentials."""
    default = {
        401: "not authorized",
        403: "access denied",
        404: "not found",
        416: "byte range not satisfiable: the file is shorter than its header says",
    }.get(status, "request refused")
    text = f"{uri}: {detail or default} (HTTP {status})"
    if status in (401, 403) and auth_hint:
        text += f"; {auth_hint}"
    return text


def _reason(exc: BaseException, status: int | None) -> str:
    if status is not None:
        return f"HTTP {status}"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}{': ' + text[:200] if text else ''}"


def with_retries(
    fn: Callable[[], T],
    uri: str,
    auth_hint: str = "",
    policy: RetryPolicy | None = None,
    sleep: Callable[[float], None] = time.sleep,
    describe: Callable[[BaseException], str] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """Call `fn`, retrying transient failures; turn HTTP refusals into a `RemoteError` naming `uri`.

    Exceptions that are neither HTTP errors nor connection problems (bugs) propagate unchanged.
    `describe` may add a more specific cause (e.g. "revision 'x' does not exist").
    """
    policy = policy or RetryPolicy.from_env()
    started = clock()
    for attempt in range(1, policy.attempts + 1):
        try:
            return fn()
        except SourceError:
            raise
        except Exception as exc:
            status = http_status(exc)
            if status is None and not is_connection_error(exc):
                raise
            if unreachable(exc):
                raise RemoteError(f"{uri}: {unreachable(exc)}") from None
            detail = describe(exc) if describe else ""
            if status is not None and not is_transient_status(status):
                raise RemoteError(permanent_message(uri, status, auth_hint, detail), status) from None
            reason = _reason(exc, status)
            delay = policy.delay(attempt)
            if attempt == policy.attempts or clock() - started + delay > policy.deadline:
                raise RemoteError(
                    f"{uri}: still failing after {attempt} attempts ({reason}) over {clock() - started:.0f} s; "
                    f"retries are set by {ATTEMPTS_ENV}, {BACKOFF_ENV} and {DEADLINE_ENV}",
                    status,
                ) from None
            log.warning("%s: %s; retry %d of %d in %.2f s", uri, reason, attempt, policy.attempts - 1, delay)
            sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def check_range(data: bytes, where: str, offset: int, length: int) -> bytes:
    """The body of a range read must be exactly the `length` bytes asked for."""
    if len(data) != length:
        raise SourceError(
            f"{where}: short read at bytes [{offset}, {offset + length}): got {len(data)} bytes "
            "(object truncated or changed during conversion?)"
        )
    return data


_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


def check_range_headers(status: int, headers, where: str, offset: int, length: int) -> None:
    """Refuse, before any body is read, an answer that is not the byte range asked for: a server
    that ignores `Range` (HTTP 200 with the whole file) or sends another range or size.

    `headers` is any case-insensitive mapping (httpx, requests). A 200 is accepted only for a
    read of the whole file from byte 0 (the body is then capped at `length` by `read_capped`)."""
    declared = headers.get("Content-Length")
    encoded = (headers.get("Content-Encoding") or "identity").lower() != "identity"
    if declared is not None and not (declared.isdigit() or encoded):
        raise SourceError(f"{where}: the server sent Content-Length {declared!r} (expected a byte count)")
    if status == 200:
        if offset != 0 or (declared is not None and not encoded and int(declared) != length):
            size = f"{declared} bytes" if declared is not None else "a body of unknown size"
            raise SourceError(
                f"{where}: the server ignored the byte range request for bytes [{offset}, {offset + length}) "
                f"(HTTP 200 with {size}; expected HTTP 206 with {length} bytes)"
            )
        return
    if status != 206:
        raise SourceError(f"{where}: unexpected HTTP {status} for a byte range request (expected 206)")
    m = _CONTENT_RANGE.match((headers.get("Content-Range") or "").strip())
    if not m or int(m.group(1)) != offset or int(m.group(2)) > offset + length - 1:
        raise SourceError(
            f"{where}: the server answered Content-Range {headers.get('Content-Range')!r} for bytes "
            f"[{offset}, {offset + length}) (expected 'bytes {offset}-{offset + length - 1}/<size>')"
        )
    served = int(m.group(2)) - int(m.group(1)) + 1
    if declared is not None and not encoded and int(declared) != served:
        raise SourceError(f"{where}: Content-Length {declared} does not match Content-Range {m.group(0)!r}")


class CappedSink:
    """A write-only file object that refuses more than the `length` bytes asked for, so a server
    that ignores `Range` is never buffered whole (also what google-cloud-storage downloads into)."""

    def __init__(self, where: str, offset: int, length: int):
        self.where, self.offset, self.length = where, offset, length
        self.data = bytearray()

    def write(self, chunk: bytes) -> int:
        if len(self.data) + len(chunk) > self.length:
            raise SourceError(
                f"{self.where}: the server sent more than the {self.length} bytes asked for at bytes "
                f"[{self.offset}, {self.offset + self.length}) (it ignored the byte range?)"
            )
        self.data += chunk
        return len(chunk)


def read_capped(chunks: Iterable[bytes], where: str, offset: int, length: int) -> bytes:
    """Join a streamed body, refusing it as soon as it exceeds `length` bytes (see CappedSink)."""
    sink = CappedSink(where, offset, length)
    for chunk in chunks:
        sink.write(chunk)
    return bytes(sink.data)


# --------------------------------------------------------------------------------------------
# gs://bucket/path: Google Cloud Storage through google-cloud-storage (JSON API media downloads)


def _gcs_client():
    """A storage client with the process's default credentials (anonymous if there are none).

    With STORAGE_EMULATOR_HOST set, google-cloud-storage talks to that endpoint anonymously.
    """
    from google.auth.exceptions import DefaultCredentialsError
    from google.cloud import storage

    try:
        return storage.Client(project=None)
    except DefaultCredentialsError:
        log.warning("no Google credentials found; reading GCS anonymously (public buckets only)")
        return storage.Client.create_anonymous_client()


class GcsSource:
    """A model directory in a GCS bucket: `gs://BUCKET/PATH`.

    One object listing (sizes, etags, generations) answers exists/size/fingerprint; data comes
    from ranged media downloads with the library's own retries off (ours apply).
    """

    def __init__(self, uri: str):
        self.bucket_name, self.prefix = split_gcs(uri)
        self.uri = f"gs://{self.bucket_name}/{self.prefix}" if self.prefix else f"gs://{self.bucket_name}"
        self._client = None
        self._objects: dict[str, dict] | None = None

    @property
    def client(self):
        if self._client is None:
            self._client = _gcs_client()
        return self._client

    def _key(self, name: str) -> str:
        check_member_name(name)
        return f"{self.prefix}/{name}" if self.prefix else name

    def where(self, name: str) -> str:
        return f"{self.uri}/{name}"

    def _listing(self) -> dict[str, dict]:
        if self._objects is None:
            start = len(self.prefix) + 1 if self.prefix else 0

            def list_all() -> list:
                prefix = self.prefix + "/" if self.prefix else None
                return list(self.client.list_blobs(self.bucket_name, prefix=prefix, retry=None))

            blobs = with_retries(list_all, self.uri, GCS_AUTH_HINT)
            self._objects = {
                b.name[start:]: {"size": b.size, "etag": b.etag, "generation": b.generation} for b in blobs
            }
        return self._objects

    def exists(self, name: str) -> bool:
        self._key(name)
        return name in self._listing()

    def size(self, name: str) -> int:
        return self.fingerprint(name)["size"]

    def fingerprint(self, name: str) -> dict:
        self._key(name)
        info = self._listing().get(name)
        if info is None:
            raise RemoteError(f"{self.where(name)}: not found", 404)
        return dict(info)

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        if length == 0:
            return b""
        blob = self.client.bucket(self.bucket_name).blob(self._key(name))

        def download() -> bytes:
            sink = CappedSink(self.where(name), offset, length)
            blob.download_to_file(
                sink, start=offset, end=offset + length - 1, raw_download=True, checksum=None, retry=None
            )
            return bytes(sink.data)

        data = with_retries(download, self.where(name), GCS_AUTH_HINT)
        return check_range(data, self.where(name), offset, length)


# --------------------------------------------------------------------------------------------
# hf://org/repo[@revision][/subfolder]: the Hugging Face Hub through huggingface_hub's HTTP session


def hf_endpoint() -> str:
    """The Hub endpoint, as huggingface_hub reads it (HF_ENDPOINT), looked up at call time."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _describe_hf(exc: BaseException) -> str:
    """A specific cause from huggingface_hub's error classes (they parse X-Error-Code)."""
    from huggingface_hub.errors import (
        GatedRepoError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, RevisionNotFoundError):
        return "revision not found in this repository"
    if isinstance(exc, GatedRepoError):
        return "the repository is gated"
    if isinstance(exc, RepositoryNotFoundError):
        return "repository not found, or private/gated and no valid token was sent"
    if isinstance(exc, RemoteEntryNotFoundError):
        return "file not found at this revision"
    return ""


class HfSource:
    """A model repository (or a subfolder of one) on the Hugging Face Hub, pinned to one commit.

    The revision (default `main`) is resolved to a commit when the source is opened, on the
    launcher; `uri` then names that commit (`hf://org/repo@<sha>[/subfolder]`), so workers that
    open the same URI read the same immutable files without asking the Hub again. Files of that
    commit already in the local Hub cache (`local`, set by `hf_hub.open_hf`) are read from there.
    """

    def __init__(self, ref: HfRef | str, policy: RetryPolicy | None = None):
        self.ref = ref if isinstance(ref, HfRef) else HfRef.parse(ref)
        self.repo_id = self.ref.repo_id
        self.endpoint = hf_endpoint()
        self.policy = policy
        self.local = None
        self._files: dict[str, dict] | None = None
        revision = self.ref.revision
        if revision is not None and COMMIT.match(revision):
            self.commit = revision
        else:
            self.commit = self._load_info(revision or "main")
        self.uri = self.ref.uri(self.commit)

    def _load_info(self, revision: str) -> str:
        """One model-info call: the commit of `revision` plus every file's size and etag."""
        from huggingface_hub import HfApi

        api = HfApi(endpoint=self.endpoint)
        where = HfRef(self.repo_id, revision, self.ref.subfolder).uri()
        info = with_retries(
            lambda: api.model_info(self.repo_id, revision=revision, files_metadata=True, timeout=HTTP_TIMEOUT_S),
            where,
            HF_AUTH_HINT,
            policy=self.policy,
            describe=_describe_hf,
        )
        if not info.sha:
            raise RemoteError(f"{where}: the Hub returned no commit for this revision")
        self._files = {
            s.rfilename: {"size": s.size, "etag": s.lfs.sha256 if s.lfs else s.blob_id} for s in info.siblings or []
        }
        return info.sha

    def _listing(self) -> dict[str, dict]:
        if self._files is None:
            self._load_info(self.commit)
        return self._files

    def where(self, name: str) -> str:
        return f"{self.uri}/{name}"

    def _url(self, name: str) -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.repo_id, self.ref.member(name), revision=self.commit, endpoint=self.endpoint)

    def exists(self, name: str) -> bool:
        return self.ref.member(name) in self._listing()

    def fingerprint(self, name: str) -> dict:
        info = self._listing().get(self.ref.member(name))
        if info is None:
            raise RemoteError(f"{self.where(name)}: not found at this commit", 404)
        if info["size"] is None:  # the Hub left sizes out: ask for this file's headers
            info["size"] = self._head_size(name)
        return {**info, "commit": self.commit}

    def size(self, name: str) -> int:
        return self.fingerprint(name)["size"]

    def _get(self, name: str, headers: dict[str, str], method: str = "GET"):
        from huggingface_hub.utils import build_hf_headers, get_session

        response = get_session().request(
            method, self._url(name), headers=build_hf_headers(headers=headers), timeout=HTTP_TIMEOUT_S
        )
        if response.status_code >= 400:
            raise HttpStatusError(response.status_code, response.headers.get("X-Error-Message", ""))
        return response

    def _head_size(self, name: str) -> int:
        response = with_retries(lambda: self._get(name, {}, "HEAD"), self.where(name), HF_AUTH_HINT)
        size = response.headers.get("X-Linked-Size") or response.headers.get("Content-Length")
        if size is None or not size.isdigit():
            raise RemoteError(f"{self.where(name)}: the Hub sent no valid size for this file ({size!r})")
        return int(size)

    def _get_range(self, name: str, offset: int, length: int) -> bytes:
        """One ranged GET, streamed: status and headers are checked before the body is read, and
        the body is never taken beyond `length` bytes."""
        from huggingface_hub.utils import build_hf_headers, get_session

        where = self.where(name)
        headers = build_hf_headers(headers={"Range": f"bytes={offset}-{offset + length - 1}"})
        with get_session().stream("GET", self._url(name), headers=headers, timeout=HTTP_TIMEOUT_S) as response:
            if response.status_code >= 400:
                raise HttpStatusError(response.status_code, response.headers.get("X-Error-Message", ""))
            check_range_headers(response.status_code, response.headers, where, offset, length)
            return read_capped(response.iter_bytes(), where, offset, length)

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        if length == 0:
            return b""
        if self.local is not None and self.local.exists(name):
            return self.local.read_range(name, offset, length)
        where = self.where(name)
        data = with_retries(lambda: self._get_range(name, offset, length), where, HF_AUTH_HINT)
        return check_range(data, where, offset, length)


register_scheme("gs", GcsSource)
register_scheme("hf", open_hf)
