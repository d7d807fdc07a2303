"""One place for URIs and byte access: every read of source bytes goes through a `ByteSource`.

Local paths are served here; remote schemes (gs://, hf://) register their own `ByteSource`
with `register_scheme`, so planning and work items never care where bytes live.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import numpy as np


class SourceError(ValueError):
    """A source file is missing, unreadable or malformed (message names the file)."""


class ByteSource(Protocol):
    """Read-only access to the files of one model directory."""

    uri: str

    def size(self, name: str) -> int: ...

    def read_range(self, name: str, offset: int, length: int) -> bytes: ...

    def exists(self, name: str) -> bool: ...

    def fingerprint(self, name: str) -> dict: ...


def check_member_name(name: str, what: str = "file") -> str:
    """Reject names that would escape the model directory (absolute, '..', backslashes)."""
    if not isinstance(name, str) or not name:
        raise SourceError(f"{what} name {name!r} is empty or not a string")
    parts = name.split("/")
    if name.startswith("/") or "\\" in name or "\x00" in name or any(p in ("", ".", "..") for p in parts):
        raise SourceError(f"{what} name {name!r} escapes the model directory")
    return name


@dataclass
class LocalSource:
    """A model directory on the local file system."""

    uri: str

    def __post_init__(self) -> None:
        self.root = os.path.abspath(self.uri)
        if not os.path.isdir(self.root):
            what = "is not a directory" if os.path.exists(self.root) else "no such directory"
            raise SourceError(f"source {self.uri!r}: {what}")

    def _path(self, name: str) -> str:
        check_member_name(name)
        path = os.path.realpath(os.path.join(self.root, name))
        if os.path.commonpath([path, os.path.realpath(self.root)]) != os.path.realpath(self.root):
            raise SourceError(f"file name {name!r} escapes the model directory {self.root}")
        return path

    def exists(self, name: str) -> bool:
        return os.path.isfile(self._path(name))

    def size(self, name: str) -> int:
        try:
            return os.path.getsize(self._path(name))
        except OSError as e:
            raise SourceError(f"cannot stat {os.path.join(self.uri, name)}: {e.strerror}") from None

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        out = np.empty(length, np.uint8)
        self.read_into(name, offset, out)
        return out.tobytes()  # headers and JSON: small

    def read_into(self, name: str, offset: int, out: np.ndarray) -> None:
        """Fill the contiguous array `out` with the file's bytes from `offset` on: one copy from
        the page cache (`read` makes two, into its buffer and then a bytes object), into memory
        the caller chooses (a worker's reused buffers: no fresh pages for the kernel to zero)."""
        path = self._path(name)
        length = out.nbytes
        try:
            with open(path, "rb", buffering=0) as f:
                f.seek(offset)
                got = 0
                view = memoryview(out).cast("B")
                while got < length:
                    n = f.readinto(view[got:])
                    if not n:
                        break
                    got += n
        except OSError as e:
            raise SourceError(f"cannot read {path}: {e.strerror}") from None
        if got != length:
            raise SourceError(
                f"{path}: short read at bytes [{offset}, {offset + length}): got {got} bytes "
                "(file truncated or changed during conversion?)"
            )

    def fingerprint(self, name: str) -> dict:
        st = os.stat(self._path(name))
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


_SCHEMES: dict[str, Callable[[str], ByteSource]] = {}
# Schemes whose module registers itself on import. Imported on first use, so every process
# (a Beam worker unpickling a DoFn included) gets the registration without importing it up front.
_LAZY_SCHEMES = {"gs": "ckpt_transforms.storage.remote", "hf": "ckpt_transforms.storage.remote"}


def register_scheme(scheme: str, factory: Callable[[str], ByteSource]) -> None:
    _SCHEMES[scheme] = factory


def _factory(scheme: str, uri: str) -> Callable[[str], ByteSource]:
    if scheme not in _SCHEMES and scheme in _LAZY_SCHEMES:
        importlib.import_module(_LAZY_SCHEMES[scheme])
    if scheme not in _SCHEMES:
        raise SourceError(f"unsupported source URI scheme {scheme!r} in {uri!r} (use a local path, gs:// or hf://)")
    return _SCHEMES[scheme]


def open_source(uri: str, revision: str | None = None) -> ByteSource:
    """The ByteSource for a model directory URI: local path, `gs://...`,
    `hf://org/repo[@rev][/subfolder]` (`revision`: `--revision`, for hf:// only).

    A plain `org/repo[@rev]` that is not an existing local path means a Hugging Face repository;
    the Hub is asked once (no retries: it may be a mistyped path), and the error leads with
    "no such directory".
    """
    scheme, sep, _ = uri.partition("://")
    if sep and scheme == "hf":
        return _factory(scheme, uri)(uri, revision=revision)
    if not sep and not os.path.exists(uri):
        from ckpt_transforms.storage.hf_hub import looks_like_repo_id

        if looks_like_repo_id(uri):
            try:
                return _factory("hf", uri)("hf://" + uri, revision=revision, probe=True)
            except SourceError as e:
                raise SourceError(f"source {uri!r}: no such directory, nor a Hugging Face model ({e})") from None
    if revision:
        raise SourceError(f"--revision {revision} applies to Hugging Face sources (hf://ORG/REPO), not to {uri!r}")
    return _factory(scheme, uri)(uri) if sep else LocalSource(uri)


def coalesce_ranges(ranges: Iterable[tuple[int, int]], max_gap: int = 0) -> list[tuple[int, int]]:
    """Merge (offset, length) ranges that touch or lie within `max_gap` bytes of each other."""
    merged: list[list[int]] = []
    for off, length in sorted(ranges):
        if merged and off <= merged[-1][1] + max_gap:
            merged[-1][1] = max(merged[-1][1], off + length)
        else:
            merged.append([off, off + length])
    return [(a, b - a) for a, b in merged]
