"""Writing planned safetensors shards from many workers: every byte range has one writer.

Two kinds of output, chosen by the staging location's URI (`create_shards`, `open_shard_writer`):

- **Local**: the launcher creates each shard at its final size with its header in place (the rest
  a sparse hole); work items then write their tensors' bytes at the offsets the plan fixed
  (`os.pwrite`, no locking needed: ranges are disjoint, and a retried item rewrites the same bytes).
- **gs://**: GCS objects cannot be written in place, and nothing is staged on a worker's disk.
  Each work item uploads its byte runs as part objects `<staging>/parts/<shard>/<offset:020d>`
  (runs adjacent in the file, within one item, become one part); the launcher uploads each
  header as the part at offset 0. `compose_shards` then checks that a shard's parts tile it
  exactly and composes them, in order, into the final object (GCS compose takes at most 32
  sources, so larger shards are composed in rounds through intermediate objects).

A retried or duplicated item writes the same parts under the same names (an item's writes and
their coalescing are deterministic), so reruns overwrite rather than add.
"""

from __future__ import annotations

import io
import os
import posixpath
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from ckpt_transforms.safetensors_io.layout import ShardLayout
from ckpt_transforms.storage import outdir

PARTS_DIR = "parts"
COMPOSE_DIR = "compose"
COMPOSE_MAX_SOURCES = 32  # GCS compose: 1-32 source objects per request
MAX_PART_BYTES = 64 * 2**20  # a part is closed past this, bounding what a worker holds for upload
_OFFSET_DIGITS = 20  # zero-padded, so listing order is file order
_COMPOSE_THREADS = 8  # shards composed at once by the finalize step (server-side copies, no data here)


class ShardWriter(Protocol):
    """`write(file, offset, data)` as work items call it, plus the item/bundle boundaries.

    `data` must stay unchanged until `end_item` (the GCS writer uploads views, not copies).
    """

    def __call__(self, file: str, offset: int, data: memoryview) -> None: ...

    def end_item(self) -> None:
        """Every byte of the item is written (uploaded) when this returns."""

    def discard(self) -> None:
        """Drop what a failed attempt wrote but did not yet send (its retry writes it again)."""

    def flush(self) -> None:
        """Make everything written durable (end of a bundle)."""

    def close(self) -> None: ...


def create_shards(directory: str, shards: Sequence[ShardLayout]) -> None:
    """Locally: each shard file at its final size, header written, data region zero (sparse).
    On gs://: each header uploaded as its shard's part at offset 0."""
    if outdir.is_gcs(directory):
        writer = GcsPartWriter(directory)
        for shard in shards:
            writer(shard.file, 0, memoryview(shard.header))
            writer.end_item()
        return
    for shard in shards:
        path = os.path.join(directory, shard.file)
        with open(path, "wb") as f:
            f.write(shard.header)
            f.truncate(shard.size)


def open_shard_writer(directory: str) -> ShardWriter:
    """The writer for shards staged at `directory` (a local directory or a gs:// prefix)."""
    return GcsPartWriter(directory) if outdir.is_gcs(directory) else LocalShardWriter(directory)


class LocalShardWriter:
    """`write(file, offset, data)` into the pre-sized shards of one directory."""

    def __init__(self, directory: str):
        self.directory = directory
        self._fds: dict[str, int] = {}

    def __call__(self, file: str, offset: int, data: memoryview) -> None:
        fd = self._fds.get(file)
        if fd is None:
            fd = self._fds[file] = os.open(os.path.join(self.directory, file), os.O_WRONLY)
        view = memoryview(data)
        while view:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n

    def end_item(self) -> None:
        pass  # pwrite is synchronous; durability is per bundle (flush)

    def discard(self) -> None:
        pass  # nothing is held back

    def flush(self) -> None:
        """Make the written bytes durable before the item reports them."""
        for fd in self._fds.values():
            os.fsync(fd)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


# --------------------------------------------------------------------------------------------
# gs://: part objects, composed by the finalize step


def part_name(file: str, offset: int) -> str:
    """A part's object name relative to the staging prefix."""
    return f"{PARTS_DIR}/{file}/{offset:0{_OFFSET_DIGITS}d}"


def _gcs():
    # Imported on first use: local exports never need google-cloud-storage.
    from ckpt_transforms.storage import remote

    return remote


class _ViewsReader(io.RawIOBase):
    """A read-only, seekable file over a list of memoryviews, so an upload copies a chunk at a
    time instead of joining the whole part first (resumable uploads seek back on recovery)."""

    def __init__(self, views: Sequence[memoryview]):
        self._views = [v.cast("B") if v.format != "B" or v.ndim != 1 else v for v in views]
        self._starts = []
        pos = 0
        for v in self._views:
            self._starts.append(pos)
            pos += v.nbytes
        self._size, self._pos = pos, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = min(max(0, base + offset), self._size)
        return self._pos

    def read(self, size: int = -1) -> bytes:
        end = self._size if size is None or size < 0 else min(self._size, self._pos + size)
        out = bytearray()
        for start, view in zip(self._starts, self._views, strict=True):
            stop = start + view.nbytes
            if stop <= self._pos or start >= end:
                continue
            out += view[max(self._pos, start) - start : min(end, stop) - start]
        self._pos = end
        return bytes(out)


class GcsPartWriter:
    """Uploads an item's byte runs as part objects under a gs:// staging prefix.

    Runs that continue the previous one (same shard, next offset) are held and sent as one part
    when the chain breaks, the part reaches MAX_PART_BYTES, or the item ends.
    """

    def __init__(self, staging: str, max_part_bytes: int = MAX_PART_BYTES):
        self.staging = staging.rstrip("/")
        self.bucket_name, self.prefix = outdir.split_gcs(self.staging)
        self.max_part_bytes = max_part_bytes
        self._bucket = None
        self._views: list[memoryview] = []
        self._file, self._start, self._end = "", 0, 0
        self.parts_uploaded = 0

    @property
    def bucket(self):
        if self._bucket is None:
            self._bucket = _gcs()._gcs_client().bucket(self.bucket_name)
        return self._bucket

    def __call__(self, file: str, offset: int, data: memoryview) -> None:
        view = memoryview(data)
        if not view.nbytes:
            return
        if self._views and (
            file != self._file or offset != self._end or self._end - self._start >= self.max_part_bytes
        ):
            self._send()
        if not self._views:
            self._file, self._start, self._end = file, offset, offset
        self._views.append(view)
        self._end += view.nbytes

    def _send(self) -> None:
        if not self._views:
            return
        remote = _gcs()
        key = posixpath.join(self.prefix, part_name(self._file, self._start))
        blob = self.bucket.blob(key)
        views, size = self._views, self._end - self._start

        def upload() -> None:
            # A fresh reader per attempt: a retry sends the part from its first byte.
            blob.upload_from_file(
                _ViewsReader(views),
                size=size,
                content_type="application/octet-stream",
                checksum="crc32c",
                retry=None,
            )

        remote.with_retries(upload, f"gs://{self.bucket_name}/{key}", remote.GCS_AUTH_HINT)
        self.parts_uploaded += 1
        self.discard()

    def end_item(self) -> None:
        self._send()

    def discard(self) -> None:
        self._views = []
        self._file, self._start, self._end = "", 0, 0

    def flush(self) -> None:
        self._send()

    def close(self) -> None:
        self.discard()


class ShardAssemblyError(RuntimeError):
    """The parts of a gs:// shard do not tile it exactly (message names the shard and the bytes)."""


@dataclass(frozen=True)
class Part:
    offset: int
    size: int
    name: str  # full object name in the bucket


def check_tiling(where: str, parts: Sequence[Part], size: int) -> None:
    """Parts (sorted by offset) must cover [0, size) exactly: contiguous, no overlap, no gap."""
    pos = 0
    for part in parts:
        if part.offset > pos:
            raise ShardAssemblyError(
                f"{where}: bytes [{pos}, {part.offset}) of the planned {size} were never written "
                f"(no part covers them; the next part starts at {part.offset}); not publishing"
            )
        if part.offset < pos:
            raise ShardAssemblyError(
                f"{where}: the part at offset {part.offset} overlaps bytes up to {pos} written by the part before it; "
                "not publishing"
            )
        pos = part.offset + part.size
    if pos < size:
        raise ShardAssemblyError(
            f"{where}: bytes [{pos}, {size}) of the planned {size} were never written (no part covers them); "
            "not publishing"
        )
    if pos > size:
        raise ShardAssemblyError(f"{where}: parts end at byte {pos}, past the planned size {size}; not publishing")


def list_parts(staging: str) -> dict[str, list[Part]]:
    """Every shard's parts under a gs:// staging prefix, sorted by offset (one listing)."""
    remote = _gcs()
    bucket_name, prefix = outdir.split_gcs(staging)
    root = f"{prefix}/{PARTS_DIR}/" if prefix else f"{PARTS_DIR}/"
    client = remote._gcs_client()
    blobs = remote.with_retries(
        lambda: list(client.list_blobs(bucket_name, prefix=root, retry=None)),
        f"gs://{bucket_name}/{root}",
        remote.GCS_AUTH_HINT,
    )
    found: dict[str, list[Part]] = {}
    for blob in blobs:
        file, _, offset = blob.name[len(root) :].rpartition("/")
        if not file or not offset.isdigit():
            raise ShardAssemblyError(f"gs://{bucket_name}/{blob.name}: not a part object (expected <shard>/<offset>)")
        found.setdefault(file, []).append(Part(int(offset), int(blob.size), blob.name))
    for parts in found.values():
        parts.sort(key=lambda p: p.offset)
    return found


@dataclass
class ComposeStats:
    parts: int = 0
    compose_calls: int = 0


def check_parts(staging: str, output: str, shards: Sequence[ShardLayout]) -> dict[str, list[Part]]:
    """Every shard's parts (one listing), checked to tile the shard exactly; nothing else there."""
    found = list_parts(staging)
    for shard in shards:
        where = f"{staging}/{PARTS_DIR}/{shard.file} (for {output}/{shard.file})"
        check_tiling(where, found.get(shard.file, []), shard.size)
    unplanned = sorted(set(found) - {s.file for s in shards})
    if unplanned:
        raise ShardAssemblyError(f"{staging}/{PARTS_DIR}: parts of unplanned files {unplanned}; not publishing")
    return found


def compose_shards(
    staging: str, output: str, shards: Sequence[ShardLayout], parts: dict[str, list[Part]]
) -> ComposeStats:
    """Compose each shard's checked parts (`check_parts`) in order into `output/<shard>`.

    Intermediate objects (shards of more than 32 parts) stay under the staging prefix; the
    caller deletes the prefix afterwards.
    """
    stats = ComposeStats(parts=sum(len(parts[s.file]) for s in shards))
    local = threading.local()

    def compose_one(shard: ShardLayout) -> int:
        if not hasattr(local, "bucket"):  # one client per thread: a client is not shared across threads
            local.bucket = _gcs()._gcs_client().bucket(outdir.split_gcs(output)[0])
        return _compose_shard(local.bucket, staging, output, shard, parts[shard.file])

    with ThreadPoolExecutor(max_workers=min(_COMPOSE_THREADS, max(1, len(shards)))) as pool:
        stats.compose_calls = sum(pool.map(compose_one, shards))
    return stats


def _compose_shard(bucket, staging: str, output: str, shard: ShardLayout, parts: Sequence[Part]) -> int:
    """Compose one shard's parts in order into its final object; returns the compose calls made."""
    remote = _gcs()
    _, staging_key = outdir.split_gcs(staging)
    out_bucket, out_key = outdir.split_gcs(output)
    sources = [bucket.blob(p.name) for p in parts]
    calls, round_ = 0, 0
    while len(sources) > COMPOSE_MAX_SOURCES:
        merged = []
        for i in range(0, len(sources), COMPOSE_MAX_SOURCES):
            name = posixpath.join(staging_key, COMPOSE_DIR, shard.file, f"r{round_}-{i // COMPOSE_MAX_SOURCES:06d}")
            merged.append(_compose(remote, bucket, name, sources[i : i + COMPOSE_MAX_SOURCES]))
            calls += 1
        sources, round_ = merged, round_ + 1
    final = _compose(remote, bucket, posixpath.join(out_key, shard.file), sources)
    calls += 1
    if final.size != shard.size:
        raise ShardAssemblyError(
            f"gs://{out_bucket}/{final.name}: composed object has {final.size} bytes, planned {shard.size}"
        )
    return calls


def _compose(remote, bucket, name: str, sources: list):
    dest = bucket.blob(name)
    dest.content_type = "application/octet-stream"
    # Same sources, same result: a retried compose is harmless.
    remote.with_retries(lambda: dest.compose(sources, retry=None), f"gs://{bucket.name}/{name}", remote.GCS_AUTH_HINT)
    return dest
