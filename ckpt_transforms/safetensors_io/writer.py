"""Writing planned safetensors shards from many workers: every byte range has one writer.

Two kinds of output, chosen by the staging location's URI (`create_shards`, `open_shard_writer`):

- **Local**: the launcher creates each shard at its final size with its header in place (the rest
  a sparse hole); work items then write their tensors' bytes at the offsets the plan fixed
  (`os.pwrite`, no locking needed: ranges are disjoint, and a retried item rewrites the same bytes).
- **gs://**: GCS objects cannot be written in place, and nothing is staged on a worker's disk.
  A work item's runs that are adjacent in the file are grouped; a group of at least
  DIRECT_PART_BYTES becomes a part object `<staging>/parts/<shard>/<offset:020d>`, and shorter
  ones (an item that covers a column band of a tensor writes one short run per row) go into one
  scatter object per item and shard, `<staging>/scatter/<shard>/<offset>`, described by
  progressions in the item's record. The launcher uploads each header as the part at offset 0.
  A segment stage (`plan_segments`, `assemble_segment`) rebuilds the bytes that no part covers,
  SEGMENT_BYTES at a time, from ranged reads of the scatter objects, and uploads them as parts.
  `check_parts` then checks that a shard's parts tile it exactly, and `compose_shards` composes
  them in order into the final object (GCS compose takes at most 32 sources, so larger shards
  are composed in rounds through intermediate objects).

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
SCATTER_DIR = "scatter"
DIRECT_PART_BYTES = 8 * 2**20  # smaller groups of bytes go to scatter objects, not parts
SEGMENT_BYTES = 64 * 2**20  # parts built from scatter objects
DIRECT_PART_ENV = "CKPTBEAM_GCS_DIRECT_PART_BYTES"
SEGMENT_ENV = "CKPTBEAM_GCS_SEGMENT_BYTES"
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

    def end_item(self) -> list[Scatter]:
        """Every byte of the item is written (uploaded) when this returns; the scatter objects
        it wrote (gs://) go into the item's record."""

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
            writer.write_part(shard.file, 0, memoryview(shard.header))
        return
    for shard in shards:
        path = os.path.join(directory, shard.file)
        with open(path, "wb") as f:
            f.write(shard.header)
            f.truncate(shard.size)


def open_shard_writer(directory: str) -> ShardWriter:
    """The writer for shards staged at `directory` (a local directory or a gs:// prefix)."""
    return GcsPartWriter(directory) if outdir.is_gcs(directory) else LocalShardWriter(directory)


WRITE_CALL_BYTES = 128 * 2**10


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
            # Page-cache writes of 128 KiB cost a fraction of the CPU of multi-MiB ones on the VMs
            # measured (benchmarks/bench_write_calls.py).
            n = os.pwrite(fd, view[:WRITE_CALL_BYTES], offset)
            view, offset = view[n:], offset + n

    def end_item(self) -> list[Scatter]:
        return []  # pwrite is synchronous; durability is per bundle (flush)

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


@dataclass(frozen=True)
class Scatter:
    """Small runs of one item in one shard, uploaded back to back as one object.

    `runs` are arithmetic progressions `(offset, stride, count, length, data_offset)`: run i is
    the file bytes [offset + i*stride, +length), stored at data_offset + i*length in the object.
    A strided box (a column band of an HF tensor) is one progression however many rows it has.
    """

    file: str
    name: str  # object name in the bucket
    runs: tuple[tuple[int, int, int, int, int], ...]

    @property
    def lo(self) -> int:
        return min(r[0] for r in self.runs)

    @property
    def hi(self) -> int:
        return max(r[0] + (r[2] - 1) * r[1] + r[3] for r in self.runs)


class GcsPartWriter:
    """Uploads an item's bytes under a gs:// staging prefix, as parts or as scatter objects.

    Runs that continue the previous one (same shard, next offset) are held as one group until
    the chain breaks, the group reaches MAX_PART_BYTES, or the item ends. A group of at least
    `direct_bytes` becomes a part at its offset. Smaller groups (the rows of a column band are
    many short runs) would make a part each; they are appended to the item's scatter object for
    that shard instead, and a later stage (`assemble_segment`) builds parts from them.
    """

    def __init__(self, staging: str, max_part_bytes: int = MAX_PART_BYTES, direct_bytes: int | None = None):
        self.staging = staging.rstrip("/")
        self.bucket_name, self.prefix = outdir.split_gcs(self.staging)
        self.max_part_bytes = max_part_bytes
        self.direct_bytes = direct_part_bytes() if direct_bytes is None else direct_bytes
        self._bucket = None
        self._views: list[memoryview] = []
        self._file, self._start, self._end = "", 0, 0
        self._scatter: dict[str, tuple[list[memoryview], list[list[int]], list[int]]] = {}
        self._done: list[Scatter] = []
        self.parts_uploaded = 0
        self.scatter_uploaded = 0

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
            self._close_group()
        if not self._views:
            self._file, self._start, self._end = file, offset, offset
        self._views.append(view)
        self._end += view.nbytes

    def _close_group(self, direct: bool = False) -> None:
        if not self._views:
            return
        views, file, start, size = self._views, self._file, self._start, self._end - self._start
        self._views, self._file, self._start, self._end = [], "", 0, 0
        if direct or size >= self.direct_bytes:
            self._upload(part_name(file, start), views, size)
            self.parts_uploaded += 1
            return
        held, runs, total = self._scatter.setdefault(file, ([], [], [0]))
        last = runs[-1] if runs else None
        data_offset = total[0]
        if last and last[3] == size and last[2] == 1 and start >= last[0] + size:
            last[1], last[2] = start - last[0], 2
        elif last and last[3] == size and last[2] > 1 and start == last[0] + last[2] * last[1]:
            last[2] += 1
        else:
            runs.append([start, size, 1, size, data_offset])
        held.extend(views)
        total[0] += size
        if total[0] >= self.max_part_bytes:
            self._send_scatter(file)

    def _send_scatter(self, file: str) -> None:
        views, runs, total = self._scatter.pop(file)
        # Named by its first file offset: items write disjoint bytes, so names never collide,
        # and a retried item rewrites the same object.
        name = posixpath.join(self.prefix, f"{SCATTER_DIR}/{file}/{runs[0][0]:0{_OFFSET_DIGITS}d}")
        self._upload(name[len(self.prefix) + 1 :], views, total[0])
        self.scatter_uploaded += 1
        self._done.append(Scatter(file, name, tuple(tuple(r) for r in runs)))

    def _upload(self, rel_name: str, views: list[memoryview], size: int) -> None:
        remote = _gcs()
        key = posixpath.join(self.prefix, rel_name)
        blob = self.bucket.blob(key)

        def upload() -> None:
            # A fresh reader per attempt: a retry sends the object from its first byte.
            blob.upload_from_file(
                _ViewsReader(views),
                size=size,
                content_type="application/octet-stream",
                checksum="crc32c",
                retry=None,
            )

        remote.with_retries(upload, f"gs://{self.bucket_name}/{key}", remote.GCS_AUTH_HINT)

    def write_part(self, file: str, offset: int, data: memoryview) -> None:
        """Upload `data` as the part at `offset`, whatever its size (headers, segments)."""
        self._close_group()
        self(file, offset, data)
        self._close_group(direct=True)

    def end_item(self) -> list[Scatter]:
        """Upload what the item still holds; returns its scatter objects (for the item's record)."""
        self._close_group()
        for file in list(self._scatter):
            self._send_scatter(file)
        done, self._done = self._done, []
        return done

    def discard(self) -> None:
        self._views = []
        self._file, self._start, self._end = "", 0, 0
        self._scatter.clear()
        self._done = []

    def flush(self) -> None:
        pass  # end_item sends everything of an item; nothing outlives it

    def close(self) -> None:
        self.discard()


def direct_part_bytes() -> int:
    """Groups at least this large become parts directly (env override for tests and tuning)."""
    return int(os.environ.get(DIRECT_PART_ENV, DIRECT_PART_BYTES))


def segment_bytes() -> int:
    """The size of the parts built from scatter objects (env override for tests and tuning)."""
    return int(os.environ.get(SEGMENT_ENV, SEGMENT_BYTES))


@dataclass(frozen=True)
class Segment:
    """File bytes [start, end) of one shard, to be built from the scatter objects that reach in."""

    file: str
    start: int
    end: int
    sources: tuple[Scatter, ...]


def plan_segments(
    shards: Sequence[ShardLayout], parts: dict[str, list[Part]], scatters: Sequence[Scatter], size: int
) -> list[Segment]:
    """The bytes of each shard that no direct part covers, cut into segments of at most `size`,
    each with the scatter objects that overlap it (a gap no scatter covers gets a segment with
    none: its assembly names the missing bytes)."""
    by_file: dict[str, list[Scatter]] = {}
    for sc in scatters:
        by_file.setdefault(sc.file, []).append(sc)
    segments = []
    for shard in shards:
        mine = sorted(by_file.get(shard.file, []), key=lambda sc: sc.lo)
        spans = [(sc.lo, sc.hi, sc) for sc in mine]
        pos, gaps = 0, []
        for part in parts.get(shard.file, []):
            if part.offset > pos:
                gaps.append((pos, part.offset))
            pos = max(pos, part.offset + part.size)
        if pos < shard.size:
            gaps.append((pos, shard.size))
        for a, b in gaps:
            for start in range(a, b, size):
                end = min(b, start + size)
                sources = tuple(sc for lo, hi, sc in spans if lo < end and hi > start)
                segments.append(Segment(shard.file, start, end, sources))
    return segments


def assemble_segment(staging: str, output: str, segment: Segment, bucket=None) -> int:
    """Build a segment's bytes from its scatter objects (one ranged read per progression) and
    upload them as the part at its offset; every byte must come from exactly one run."""
    import numpy as np

    remote = _gcs()
    bucket = bucket or remote._gcs_client().bucket(outdir.split_gcs(staging)[0])
    a, b = segment.start, segment.end
    buf = np.zeros(b - a, np.uint8)
    covered = np.zeros(b - a, np.bool_)
    where = f"{staging}/{SCATTER_DIR}/{segment.file} (for {output}/{segment.file})"

    def put(dst: int, rows: np.ndarray, stride: int) -> None:
        n, length = rows.shape
        view = np.lib.stride_tricks.as_strided(buf[dst:], shape=(n, length), strides=(stride, 1))
        mask = np.lib.stride_tricks.as_strided(covered[dst:], shape=(n, length), strides=(stride, 1))
        if mask.any():
            raise ShardAssemblyError(f"{where}: bytes near {a + dst} are written twice; not publishing")
        view[...] = rows
        mask[...] = True

    for sc in segment.sources:
        blob = bucket.blob(sc.name)
        for off, stride, count, length, data_offset in sc.runs:
            # Rows of this progression that reach into [a, b).
            first = max(0, -(-(a - off - length + 1) // stride))
            last = min(count, (b - 1 - off) // stride + 1)
            if first >= last:
                continue
            lo, n = data_offset + first * length, (last - first) * length
            data = remote.with_retries(
                lambda blob=blob, lo=lo, n=n: blob.download_as_bytes(
                    start=lo, end=lo + n - 1, raw_download=True, checksum=None, retry=None
                ),
                f"gs://{bucket.name}/{sc.name}",
                remote.GCS_AUTH_HINT,
            )
            rows = np.frombuffer(remote.check_range(data, f"gs://{bucket.name}/{sc.name}", lo, n), np.uint8)
            rows = rows.reshape(last - first, length)
            for i in range(first, last):
                row_start = off + i * stride
                if row_start >= a and row_start + length <= b:
                    # Rows from i on that lie wholly inside: one strided copy.
                    inner = min(last, (b - off - length) // stride + 1)
                    put(row_start - a, rows[i - first : inner - first], stride)
                    for j in range(inner, last):
                        _put_clipped(put, off + j * stride, rows[j - first], a, b)
                    break
                _put_clipped(put, row_start, rows[i - first], a, b)
    if not covered.all():
        missing = np.flatnonzero(~covered)
        gap_end = missing[0] + int(np.argmax(covered[missing[0] :])) if covered[missing[0] :].any() else b - a
        raise ShardAssemblyError(
            f"{where}: bytes [{a + int(missing[0])}, {a + int(gap_end)}) were never written "
            "(no part or scatter run covers them); not publishing"
        )
    GcsPartWriter(staging).write_part(segment.file, a, memoryview(buf))
    return b - a


def _put_clipped(put, row_start: int, row, a: int, b: int) -> None:
    lo, hi = max(row_start, a), min(row_start + len(row), b)
    if lo < hi:
        put(lo - a, row[lo - row_start : hi - row_start].reshape(1, -1), hi - lo)


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
