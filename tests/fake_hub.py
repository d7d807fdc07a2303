"""A small Hugging Face Hub stand-in for tests: the endpoints huggingface_hub calls, over real HTTP.

Serves model directories from disk on 127.0.0.1; huggingface_hub reads HF_ENDPOINT at import
(`huggingface_hub/constants.py`) and sends every call there:
    GET  /api/models/{repo}[/revision/{rev}]        model info: sha + siblings (sizes, blob ids, lfs)
    GET  /api/models/{repo}/tree/{rev}              file listing
    HEAD/GET /{repo}/resolve/{rev}/{file}           X-Repo-Commit, ETag, Content-Length; Range -> 206
Errors carry the Hub's `X-Error-Code` headers (RepoNotFound, RevisionNotFound, EntryNotFound,
GatedRepo), so huggingface_hub raises its usual classes. A repository made with a `token` is gated:
requests without `Authorization: Bearer <token>` get 401.

Every /resolve/ request is logged (revision in the URL, Range, status, body bytes), so tests can
count the bytes actually fetched. `fault(method, repo_id, filename, range_start)` may answer a
/resolve/ request with an HTTP status or "reset" (connection closed without a response).

A misbehaving mirror: with `ignore_range` every GET /resolve/ answers 200 with the whole file plus
`extra_body_bytes` zeros (streamed, never held in memory), with a Content-Length unless
`send_length` is false (then the body ends when the connection closes). The log then records the
bytes the client actually took before it hung up.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import socket
import struct
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field

Fault = Callable[[str, str, str, "int | None"], "int | str | None"]


@dataclass
class FakeRepo:
    repo_id: str
    files: dict[str, bytes]
    commit: str
    branches: dict[str, str]
    token: str | None = None

    def resolve(self, revision: str) -> str | None:
        if revision == self.commit:
            return self.commit
        return self.branches.get(revision)


@dataclass
class Served:
    method: str
    repo_id: str
    revision: str
    filename: str
    range: str | None
    status: int
    body_bytes: int


@dataclass
class FakeHub:
    """Threaded HTTP server on 127.0.0.1; `url` goes into HF_ENDPOINT. Stop with `stop()`."""

    repos: dict[str, FakeRepo] = field(default_factory=dict)
    log: list[Served] = field(default_factory=list)
    api_calls: list[str] = field(default_factory=list)
    fault: Fault | None = None
    omit_sizes: bool = False  # model info without file sizes (as a minimal mirror might answer)
    ignore_range: bool = False
    extra_body_bytes: int = 0
    send_length: bool = True

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()

    def add_repo(
        self, repo_id: str, directory: str, token: str | None = None, extra_files: dict[str, bytes] | None = None
    ) -> FakeRepo:
        """Serve every file of `directory` (plus `extra_files`) as `repo_id` at one fixed commit."""
        files = {}
        for name in sorted(os.listdir(directory)):
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    files[name] = f.read()
        files.update(extra_files or {})
        commit = hashlib.sha1(repo_id.encode() + b"".join(hashlib.sha1(v).digest() for v in files.values())).hexdigest()
        repo = FakeRepo(repo_id, files, commit, {"main": commit}, token)
        self.repos[repo_id] = repo
        return repo

    def reset_log(self) -> None:
        with self.lock:
            self.log.clear()
            self.api_calls.clear()

    def file_gets(self) -> list[Served]:
        with self.lock:
            return [s for s in self.log if s.method == "GET"]

    def bytes_served(self) -> int:
        return sum(s.body_bytes for s in self.file_gets())

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _is_lfs(name: str) -> bool:
    return not name.endswith((".json", ".txt", ".md"))


def _sibling(name: str, data: bytes) -> dict:
    entry = {"rfilename": name, "size": len(data), "blobId": _git_blob_id(data)}
    if _is_lfs(name):
        entry["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
    return entry


def _etag(name: str, data: bytes) -> str:
    return hashlib.sha256(data).hexdigest() if _is_lfs(name) else _git_blob_id(data)


_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None | str:
    """'bytes=a-b' -> (a, b+1) clipped to the file; None without a header; 'bad' if unsatisfiable."""
    if header is None:
        return None
    m = _RANGE.match(header.strip())
    if not m:
        return "bad"
    start = int(m.group(1))
    stop = int(m.group(2)) + 1 if m.group(2) else size
    if start >= size or stop <= start:
        return "bad"
    return start, min(stop, size)


def _make_handler(hub: FakeHub) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go out as separate writes
        _reset = False

        def log_message(self, *args) -> None:  # quiet
            pass

        def finish(self) -> None:
            if not self._reset:
                super().finish()

        # ---- responses -------------------------------------------------------------------
        def _send(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, data, status: int = 200) -> None:
            self._send(status, json.dumps(data).encode(), {"Content-Type": "application/json"})

        def _error(self, status: int, code: str | None, message: str) -> None:
            headers = {"Content-Type": "application/json", "X-Error-Message": message}
            if code:
                headers["X-Error-Code"] = code
            self._send(status, json.dumps({"error": message}).encode(), headers)

        def _reset_connection(self) -> None:
            """Close with RST and no response, like a dropped connection."""
            self._reset = True
            self.close_connection = True
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()

        # ---- access checks -----------------------------------------------------------------
        def _repo(self, repo_id: str) -> FakeRepo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound", "Repository not found")
                return None
            if repo.token is not None and self.headers.get("Authorization") != f"Bearer {repo.token}":
                self._error(
                    401,
                    "GatedRepo",
                    f"Access to model {repo_id} is restricted. You must have access to it and be authenticated.",
                )
                return None
            return repo

        def _commit(self, repo: FakeRepo, revision: str) -> str | None:
            commit = repo.resolve(revision)
            if commit is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return commit

        # ---- routes ------------------------------------------------------------------------
        def do_HEAD(self) -> None:
            self.do_GET()

        def do_GET(self) -> None:
            path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
            if path.startswith("/api/models/"):
                with hub.lock:
                    hub.api_calls.append(self.path)
                return self._api(path[len("/api/models/") :])
            m = re.match(r"^/([^/]+/[^/]+)/resolve/(.+?)/(.+)$", path)
            if m:
                return self._resolve(m.group(1), m.group(2), m.group(3))
            self._error(404, None, f"no route for {path}")

        def _api(self, rest: str) -> None:
            m = re.match(r"^([^/]+/[^/]+)(?:/(revision|tree)/(.+?))?/?$", rest)
            if not m:
                return self._error(404, None, "no route")
            repo = self._repo(m.group(1))
            if repo is None:
                return
            commit = self._commit(repo, m.group(3) or "main")
            if commit is None:
                return
            if m.group(2) == "tree":
                entries = [
                    {"type": "file", "path": n, "size": len(d), "oid": _git_blob_id(d)}
                    | (
                        {"lfs": {"oid": hashlib.sha256(d).hexdigest(), "size": len(d), "pointerSize": 134}}
                        if _is_lfs(n)
                        else {}
                    )
                    for n, d in repo.files.items()
                ]
                return self._json(entries)
            siblings = [_sibling(n, d) for n, d in repo.files.items()]
            if hub.omit_sizes:
                siblings = [{"rfilename": e["rfilename"]} for e in siblings]
            return self._json({"id": repo.repo_id, "modelId": repo.repo_id, "sha": commit, "siblings": siblings})

        def _resolve(self, repo_id: str, revision: str, filename: str) -> None:
            start = None
            m = _RANGE.match(self.headers.get("Range", "").strip())
            if m:
                start = int(m.group(1))
            action = hub.fault(self.command, repo_id, filename, start) if hub.fault else None
            if action == "reset":
                self._record(repo_id, revision, filename, 0, 0)
                return self._reset_connection()
            if isinstance(action, int):
                self._record(repo_id, revision, filename, action, 0)
                return self._error(action, "EntryNotFound" if action == 404 else None, "injected fault")
            repo = self._repo(repo_id)
            if repo is None:
                return
            commit = self._commit(repo, revision)
            if commit is None:
                return
            data = repo.files.get(filename)
            if data is None:
                self._record(repo_id, revision, filename, 404, 0)
                return self._error(404, "EntryNotFound", f"{filename} does not exist at {commit}")
            headers = {
                "X-Repo-Commit": commit,
                "ETag": f'"{_etag(filename, data)}"',
                "Accept-Ranges": "bytes",
                "Content-Type": "application/octet-stream",
            }
            if hub.ignore_range and self.command == "GET":
                return self._stream_whole(repo_id, revision, filename, data, headers)
            span = parse_range(self.headers.get("Range"), len(data))
            if span == "bad":
                self._record(repo_id, revision, filename, 416, 0)
                return self._send(416, b"", {**headers, "Content-Range": f"bytes */{len(data)}"})
            if span is None:
                body, status = data, 200
            else:
                body, status = data[span[0] : span[1]], 206
                headers["Content-Range"] = f"bytes {span[0]}-{span[1] - 1}/{len(data)}"
            self._record(repo_id, revision, filename, status, len(body) if self.command == "GET" else 0)
            self._send(status, body, headers)

        def _stream_whole(self, repo_id: str, revision: str, filename: str, data: bytes, headers: dict) -> None:
            """HTTP 200 with the file and `extra_body_bytes` zeros, 1 MiB at a time, until the client hangs up."""
            total = len(data) + hub.extra_body_bytes
            self.send_response(200)
            for k, v in headers.items():
                self.send_header(k, v)
            if hub.send_length:
                self.send_header("Content-Length", str(total))
            else:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            sent, zeros = 0, bytes(2**20)
            try:
                self.wfile.write(data)
                sent = len(data)
                while sent < total:
                    n = min(len(zeros), total - sent)
                    self.wfile.write(zeros[:n])
                    sent += n
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
            self._record(repo_id, revision, filename, 200, sent)

        def _record(self, repo_id: str, revision: str, filename: str, status: int, nbytes: int) -> None:
            with hub.lock:
                hub.log.append(
                    Served(self.command, repo_id, revision, filename, self.headers.get("Range"), status, nbytes)
                )

    return Handler
