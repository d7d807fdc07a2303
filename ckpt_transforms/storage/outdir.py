"""The one place that knows how output bytes reach a directory: local file system or gs://.

Checkpoint data goes through TensorStore (OCDBT over the kvstore spec from `kvstore_spec`); the
few small files around it (_METADATA, _CHECKPOINT_METADATA, commit markers) and the housekeeping
(listing leftovers, removing a failed run's output) go through the functions here. Local paths
use the file system directly (atomic rename for files); gs:// paths use TensorStore's `gcs`
kvstore, the same client the OCDBT writes use, so one set of credentials and one endpoint
(`TENSORSTORE_GCS_HTTP_URL` for an emulator) serve every write.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import shutil

import tensorstore as ts

GCS_SCHEME = "gs://"


def is_gcs(path: str) -> bool:
    return path.startswith(GCS_SCHEME)


def split_gcs(path: str) -> tuple[str, str]:
    """'gs://bucket/a/b/' -> ('bucket', 'a/b'); the bucket must be named."""
    bucket, _, key = path[len(GCS_SCHEME) :].partition("/")
    if not bucket:
        raise ValueError(f"{path!r} names no bucket (expected gs://BUCKET/PATH)")
    return bucket, key.strip("/")


def normalize(path: str) -> str:
    """An output location as used everywhere else: absolute local path, or gs://bucket/path.

    Other URI schemes are refused here, before anything is written.
    """
    if is_gcs(path):
        bucket, key = split_gcs(path)
        return f"{GCS_SCHEME}{bucket}/{key}" if key else f"{GCS_SCHEME}{bucket}"
    scheme, sep, _ = path.partition("://")
    if sep:
        raise ValueError(f"unsupported output URI scheme {scheme!r} in {path!r} (use a local path or gs://)")
    return os.path.abspath(path)


def join(path: str, *parts: str) -> str:
    return posixpath.join(path, *parts) if is_gcs(path) else os.path.join(path, *parts)


def kvstore_spec(directory: str) -> dict:
    """TensorStore kvstore spec of a directory (trailing slash: TensorStore joins keys to it).

    On GCS the spec carries the process's remote retry policy (TensorStore's own default retries
    for 15 minutes, silently)."""
    if is_gcs(directory):
        from ckpt_transforms.storage.remote import RetryPolicy

        bucket, key = split_gcs(directory)
        return {
            "driver": "gcs",
            "bucket": bucket,
            "path": key + "/" if key else "",
            "gcs_request_retries": RetryPolicy.from_env().tensorstore_retries(),
        }
    return {"driver": "file", "path": directory.rstrip("/") + "/"}


class _GcsKvStore:
    """A TensorStore gcs kvstore whose failures name the gs:// URI they concern (TensorStore's
    own text names neither bucket nor key) and are `RemoteError`s, never retried again."""

    def __init__(self, directory: str):
        self.directory = directory
        self._store = self._call(directory, lambda: ts.KvStore.open(kvstore_spec(directory)).result())

    def _call(self, uri: str, fn):
        try:
            return fn()
        except ValueError as e:
            from ckpt_transforms.storage.remote import RemoteError

            raise RemoteError(f"{uri}: {e}") from e

    def _where(self, key) -> str:
        return join(self.directory, key) if isinstance(key, str) else self.directory

    def read(self, key: str):
        return self._call(self._where(key), lambda: self._store.read(key).result())

    def write(self, key: str, value) -> None:
        return self._call(self._where(key), lambda: self._store.write(key, value).result())

    def list(self, key_range: ts.KvStore.KeyRange) -> list[bytes]:
        return self._call(self.directory, lambda: self._store.list(key_range).result())

    def delete_range(self, key_range: ts.KvStore.KeyRange) -> None:
        return self._call(self.directory, lambda: self._store.delete_range(key_range).result())

    def start(self, uri: str, fn):
        """Start an asynchronous operation `fn(store)`; its `.result()` names `uri` on failure."""
        future = self._call(uri, lambda: fn(self._store))
        return _NamedFuture(self, uri, future)


class _NamedFuture:
    def __init__(self, store: _GcsKvStore, uri: str, future):
        self.store, self.uri, self.future = store, uri, future

    def result(self):
        return self.store._call(self.uri, self.future.result)


def gcs_kvstore(directory: str) -> _GcsKvStore:
    """The kvstore of a gs:// directory; every failure names the URI it concerns."""
    return _GcsKvStore(directory)


_gcs_kvstore = gcs_kvstore


def _prefix_range(prefix: str) -> ts.KvStore.KeyRange:
    """All keys starting with `prefix` (the empty prefix is every key)."""
    if not prefix:
        return ts.KvStore.KeyRange()
    return ts.KvStore.KeyRange(inclusive_min=prefix, exclusive_max=prefix[:-1] + chr(ord(prefix[-1]) + 1))


def write_text(path: str, text: str) -> None:
    """Write a small file whole: atomic rename locally, one object upload on GCS."""
    write_bytes(path, text.encode("utf-8"))


def write_bytes(path: str, data: bytes) -> None:
    """Write a small file whole: atomic rename locally, one object upload on GCS."""
    if is_gcs(path):
        parent, name = posixpath.split(path)
        _gcs_kvstore(parent).write(name, data)
        return
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        # Durable before it is visible: a resume record or a commit marker must never name data
        # that a crash could still lose.
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_bytes(path: str) -> bytes | None:
    """A small file's bytes, or None if it does not exist."""
    if is_gcs(path):
        parent, name = posixpath.split(path)
        result = _gcs_kvstore(parent).read(name)
        return bytes(result.value) if result.state == "value" else None
    try:
        with open(path, "rb") as f:
            return f.read()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def read_many(paths: list[str]) -> list[bytes | None]:
    """Many small files' bytes (None where absent); on GCS the reads are issued all at once."""
    if not paths or not is_gcs(paths[0]):
        return [read_bytes(p) for p in paths]
    stores: dict[str, ts.KvStore] = {}
    futures = []
    for path in paths:
        parent, name = posixpath.split(path)
        if parent not in stores:
            stores[parent] = _gcs_kvstore(parent)
        futures.append(stores[parent].start(path, lambda store, key=name: store.read(key)))
    results = [f.result() for f in futures]
    return [bytes(r.value) if r.state == "value" else None for r in results]


def read_text(path: str) -> str | None:
    """A small file's text, or None if it does not exist."""
    data = read_bytes(path)
    return None if data is None else data.decode("utf-8")


def file_fingerprint(path: str) -> dict | None:
    """{size, sha256} of a small file (the same locally and on GCS), or None if it is absent."""
    data = read_bytes(path)
    return None if data is None else {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def file_exists(path: str) -> bool:
    if is_gcs(path):
        # A one-key listing: no data is read, and binary files (manifest.ocdbt) are fine.
        parent, name = posixpath.split(path)
        exact = ts.KvStore.KeyRange(inclusive_min=name, exclusive_max=name + "\0")
        return bool(_gcs_kvstore(parent).list(exact))
    return os.path.isfile(path)


def list_files(directory: str, prefix: str = "") -> list[str]:
    """Every file under `directory` whose relative path starts with `prefix` (recursive, '/'-separated)."""
    if is_gcs(directory):
        keys = _gcs_kvstore(directory).list(_prefix_range(prefix))
        return sorted(k.decode("utf-8") for k in keys)
    found = []
    for root, _, files in os.walk(directory):
        rel_root = os.path.relpath(root, directory)
        for f in files:
            rel = f if rel_root == "." else posixpath.join(rel_root.replace(os.sep, "/"), f)
            if rel.startswith(prefix):
                found.append(rel)
    return sorted(found)


def dir_exists(directory: str) -> bool:
    """Locally: a directory. On GCS (no directories): at least one object under `directory/`."""
    if is_gcs(directory):
        return bool(list_files(directory))
    return os.path.isdir(directory)


def list_children(directory: str, prefix: str = "") -> list[str]:
    """Names of the entries directly inside `directory` that start with `prefix` (on GCS: first
    components of object names; the listing is limited to `prefix`, not the whole directory)."""
    if is_gcs(directory):
        return sorted({k.split("/", 1)[0] for k in list_files(directory, prefix)})
    try:
        return sorted(e for e in os.listdir(directory) if e.startswith(prefix))
    except FileNotFoundError:
        return []


def remove_tree(directory: str) -> None:
    """Delete `directory` and everything under it (best effort locally, like `rm -rf`)."""
    if is_gcs(directory):
        if not split_gcs(directory)[1]:
            raise ValueError(f"refusing to delete a whole bucket ({directory})")
        _gcs_kvstore(directory).delete_range(ts.KvStore.KeyRange())
        return
    shutil.rmtree(directory, ignore_errors=True)


def remove_file(path: str) -> None:
    """Delete one file if it exists."""
    if is_gcs(path):
        parent, name = posixpath.split(path)
        _gcs_kvstore(parent).write(name, None)
        return
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


_GCS_COPY_WINDOW = 8  # objects in flight while copying on GCS: each is held in memory (<= one chunk)


def move_files(src_dir: str, dst_dir: str, rel_paths: list[str]) -> None:
    """Move files `src_dir/<rel>` to `dst_dir/<rel>` (replacing), e.g. chunk files into place.

    Locally one rename per file. GCS has no rename: each object is copied (read, then written
    whole) and the source deleted only after its copy landed, so a retry after a failure finds
    every file in one place or the other. A rel path whose source is gone is skipped (already moved).
    """
    if not is_gcs(src_dir):
        for rel in rel_paths:
            dst = os.path.join(dst_dir, *rel.split("/"))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            try:
                os.replace(os.path.join(src_dir, *rel.split("/")), dst)
            except FileNotFoundError:
                pass
        return
    src, dst = _gcs_kvstore(src_dir), _gcs_kvstore(dst_dir)
    for start in range(0, len(rel_paths), _GCS_COPY_WINDOW):
        window = rel_paths[start : start + _GCS_COPY_WINDOW]
        reads = [src.start(join(src_dir, rel), lambda s, rel=rel: s.read(rel)) for rel in window]
        writes = []
        for rel, read in zip(window, reads, strict=True):
            result = read.result()
            if result.state == "value":
                writes.append((rel, dst.start(join(dst_dir, rel), lambda s, rel=rel, v=result.value: s.write(rel, v))))
        for _, w in writes:
            w.result()
        for f in [src.start(join(src_dir, rel), lambda s, rel=rel: s.write(rel, None)) for rel, _ in writes]:
            f.result()


def make_dirs(directory: str) -> None:
    """Create a local directory tree; GCS has no directories, so nothing to do there."""
    if not is_gcs(directory):
        os.makedirs(directory, exist_ok=True)


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: str, b: str) -> bool:
    """Swap two local paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where
    the platform or file system cannot."""
    import ctypes
    import errno

    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), a)


def swap_in(staging: str, final: str, aside: str) -> str:
    """Put local directory `staging` where the existing `final` is; returns where the old one now
    is (the caller deletes it). One atomic exchange where the file system can (a reader or a crash
    sees the old directory or the new one); else two renames, `final` -> `aside` first, and a
    crash between them leaves `final` missing with the old one at `aside` (see `restore_aside`)."""
    if _exchange(staging, final):
        return staging
    os.rename(final, aside)
    os.rename(staging, final)
    return aside


def restore_aside(final: str, asides: list[str]) -> None:
    """After a crash between the two renames of `swap_in`: put the old directory back."""
    if asides and not os.path.exists(final):
        os.rename(sorted(asides)[-1], final)
