"""One run per output: an exclusive lease on OUT, held for the whole run.

Two runs on one output would each clear the other's unfinished work, so a run takes the lease
before it reads or writes anything at OUT, and a second run fails at once naming the holder.
The lease lives beside the output (`OUT.ckptbeam-lease`), never inside it, so it is never part of
a published checkpoint or model, and it works before OUT exists.

- Local: `fcntl.flock` on the lease file, held by an open descriptor for the run. The kernel
  drops the lock when the process dies (even by SIGKILL), so a crashed run's lease is free at
  once; its stale file is simply taken over. The file is removed when the run ends.
- gs://: an object created with `ifGenerationMatch=0` (only one creator wins). A heartbeat thread
  rewrites it every `expiry / 4` seconds, each time conditional on the generation it last wrote.
  A lease whose heartbeat is older than the expiry (`CKPTBEAM_LEASE_EXPIRY_S`, default 600 s)
  belonged to a dead run and is taken over with a write conditional on that stale generation, so
  of two runs taking over at once only one wins. It is deleted, conditionally, at the end.
  Expiry compares the holder's heartbeat with this machine's clock: clocks must agree to well
  within the expiry.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from ckpt_transforms.storage import outdir

log = logging.getLogger("ckptbeam")
LEASE_SUFFIX = ".ckptbeam-lease"
BUCKET_ROOT_LEASE = ".ckptbeam-lease"  # gs://BUCKET as the output: no "beside" exists
EXPIRY_ENV = "CKPTBEAM_LEASE_EXPIRY_S"
DEFAULT_EXPIRY_S = 600.0
MIN_HEARTBEAT_S = 0.05  # tests shorten the expiry; never a busy loop
_LOST = b""  # TensorStore's "unknown" generation: a conditional write whose condition failed


class LeaseBusy(FileExistsError):
    """Another run holds the output's lease (a FileExistsError: the CLI reports it with exit 1)."""


class LeaseLost(RuntimeError):
    """Another run took this run's lease over (after it missed heartbeats for the expiry)."""


def lease_path(output: str) -> str:
    """Where the lease of `output` (normalized: absolute path or gs://BUCKET[/PATH]) lives."""
    if outdir.is_gcs(output):
        bucket, key = outdir.split_gcs(output)
        return f"{outdir.GCS_SCHEME}{bucket}/{key + LEASE_SUFFIX if key else BUCKET_ROOT_LEASE}"
    return output.rstrip("/") + LEASE_SUFFIX


def expiry_seconds() -> float:
    return float(os.environ.get(EXPIRY_ENV) or DEFAULT_EXPIRY_S)


def holder_record(command: str, output: str, now: float | None = None) -> dict:
    now = time.time() if now is None else now
    return {
        "run_id": uuid.uuid4().hex,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "command": command,
        "output": output,
        "started": now,
        "heartbeat": now,
    }


def _when(t: object) -> str:
    if not isinstance(t, int | float):
        return "unknown"
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def busy_message(output: str, holder: dict | None, path: str) -> str:
    """The one line a refused run prints: who holds OUT, since when, and what to do."""
    h = holder or {}
    who = f"host {h.get('host', 'unknown')}, pid {h.get('pid', 'unknown')}, started {_when(h.get('started'))}"
    if outdir.is_gcs(path):
        who += f", last heartbeat {_when(h.get('heartbeat'))}"
    if outdir.is_gcs(path):
        advice = (
            f"wait for it to finish, or if it died, rerun once its lease expires ({expiry_seconds():.0f} s "
            f"after its last heartbeat) or delete {path}"
        )
    else:
        advice = "wait for it to finish (its lease is freed when that process exits)"
    return f"{output} is being written by another ckptbeam run ({who}); {advice}"


def _parse(data: bytes | None) -> dict | None:
    try:
        record = json.loads(data) if data else None
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _encode(record: dict) -> bytes:
    return (json.dumps(record, indent=1, sort_keys=True) + "\n").encode("utf-8")


class LocalLease:
    """An flock'ed file beside a local output."""

    def __init__(self, output: str, record: dict):
        self.output, self.record, self.path = output, record, lease_path(output)
        self._fd: int | None = None

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _parse(os.pread(fd, 1 << 16, 0))
                os.close(fd)
                raise LeaseBusy(busy_message(self.output, holder, self.path)) from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder removed this file as we locked it: lock the current one
        previous = _parse(os.pread(fd, 1 << 16, 0))
        if previous:
            log.info("taking over %s from an earlier run that ended without releasing it: %s", self.path, previous)
        os.ftruncate(fd, 0)
        os.pwrite(fd, _encode(self.record), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.remove(self.path)  # while still locked: a waiting run then locks a fresh file
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None

    def lost(self) -> bool:
        return False  # the kernel holds the lock for as long as this process lives

    def verify(self) -> None:
        """Nothing to check: the kernel holds the lock for as long as this process lives."""


class GcsLease:
    """A generation-matched object beside a gs:// output, kept alive by a heartbeat thread."""

    def __init__(self, output: str, record: dict, expiry: float | None = None):
        self.output, self.record, self.path = output, record, lease_path(output)
        self.expiry = expiry_seconds() if expiry is None else expiry
        parent, self._name = posixpath.split(self.path)
        self._kv = outdir.gcs_kvstore(parent)
        self._generation: bytes | None = None
        self._stop = threading.Event()
        self._lost = False
        self._thread: threading.Thread | None = None

    def _op(self, fn):
        """One kvstore operation on the lease object; a failure names its gs:// URI."""
        return self._kv.start(self.path, fn).result()

    def acquire(self) -> None:
        current = self._op(lambda kv: kv.read(self._name))
        holder = _parse(bytes(current.value)) if current.state == "value" else None
        if current.state == "value":
            beat = (holder or {}).get("heartbeat")
            age = time.time() - beat if isinstance(beat, int | float) else float("inf")
            if age <= self.expiry:
                raise LeaseBusy(busy_message(self.output, holder, self.path))
            log.warning("taking over an expired lease (no heartbeat for %.0f s): %s", age, holder)
        written = self._op(lambda kv: kv.write(self._name, _encode(self.record), if_equal=current.stamp.generation))
        if written.generation == _LOST:  # another run created or took it over between our read and write
            winner = self._op(lambda kv: kv.read(self._name))
            raise LeaseBusy(busy_message(self.output, _parse(bytes(winner.value)) or None, self.path))
        self._generation = written.generation
        self._thread = threading.Thread(target=self._heartbeat, name="ckptbeam-lease-heartbeat", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(max(self.expiry / 4, MIN_HEARTBEAT_S)):
            self.record["heartbeat"] = time.time()
            try:
                written = self._op(lambda kv: kv.write(self._name, _encode(self.record), if_equal=self._generation))
            except Exception as e:  # noqa: BLE001 - transient: the next beat tries again, well within expiry
                log.warning("lease heartbeat on %s failed: %s", self.path, e)
                continue
            if written.generation == _LOST:
                self._lost = True
                log.error("lost the lease on %s: another run took it over (no heartbeat within %.0f s)",
                          self.output, self.expiry)  # fmt: skip
                return
            self._generation = written.generation

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._generation is not None and not self._lost:
            try:
                self._op(lambda kv: kv.write(self._name, None, if_equal=self._generation))
            except Exception as e:  # noqa: BLE001 - the run's result matters more; the lease expires
                log.warning("could not release the lease %s (%s); it expires %.0f s after its last heartbeat",
                            self.path, e, self.expiry)  # fmt: skip
        self._generation = None

    def lost(self) -> bool:
        return self._lost

    def verify(self) -> None:
        """Raise LeaseLost unless the lease object still names this run (one read)."""
        current = self._op(lambda kv: kv.read(self._name))
        holder = _parse(bytes(current.value)) if current.state == "value" else None
        if self._lost or (holder or {}).get("run_id") != self.record["run_id"]:
            self._lost = True
            raise LeaseLost(
                f"{self.output}: this run lost its lease to another run ({busy_message(self.output, holder, self.path)}"
                "); not publishing"
            )


# The leases this process holds, by output: the publishing step checks its own before it commits
# (on Dataflow workers this is empty: the launcher holds the lease, see README).
_HELD: dict[str, LocalLease | GcsLease] = {}


def lost(output: str) -> bool:
    """Whether this process's lease on `output` is known to have been taken over (then what is
    at OUT belongs to the other run, and a failing run must not clean it up)."""
    held = _HELD.get(output)
    return held is not None and held.lost()


def verify_held(output: str) -> None:
    """Before publishing at `output`: raise LeaseLost if this process's lease on it was taken over."""
    held = _HELD.get(output)
    if held is not None:
        held.verify()


def acquire(output: str, command: str) -> LocalLease | GcsLease:
    """Take the lease of `output` or raise LeaseBusy naming its holder; nothing else is touched."""
    record = holder_record(command, output)
    lease = GcsLease(output, record) if outdir.is_gcs(output) else LocalLease(output, record)
    lease.acquire()
    _HELD[output] = lease
    return lease


@contextmanager
def hold(output: str, command: str) -> Iterator[LocalLease | GcsLease]:
    """The lease of `output` for the duration of the block."""
    lease = acquire(output, command)
    try:
        yield lease
    finally:
        _HELD.pop(output, None)
        lease.release()
