"""One line per failure: what the CLI prints instead of a traceback (`--debug` shows it).

Beam hides a DoFn's error in two ways: in-process it re-raises a copy whose text ends in
"[while running 'Step']", chained to the original; across processes (multi_processing, portable
runners) only the worker's traceback text arrives, inside a RuntimeError. Both are reduced here to
the error our code raised, which names the work item, file, field or URI.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import threading
import time

from ckpt_transforms.storage.remote import os_error_code

_BEAM_SUFFIX = re.compile(r"\s*\[while running '[^']*'\]")
# An exception line of a traceback text: "pkg.mod.SomeError: message" at the start of a line.
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w]*\.)*([A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt)): (\S.*)$")
_TRACEBACK = "Traceback (most recent call last)"
# A multi_processing worker that died (killed, out of memory) leaves only this in the launcher.
_WORKER_DIED = ("Channel closed prematurely", "Socket closed", "StatusCode.UNAVAILABLE")

HINTS = {
    errno.ENOSPC: "the disk is full: free space or choose another --output (not retried)",
    errno.EDQUOT: "the disk quota is used up: free space or choose another --output (not retried)",
    errno.EROFS: "the file system is read-only: choose another --output",
    errno.EACCES: "permission denied: check the owner and mode of that directory",
    errno.ENOTDIR: "a file is in the way where a directory is needed",
    errno.EISDIR: "a directory is in the way where a file is needed",
}


def _is_beam_wrapper(exc: BaseException) -> bool:
    return bool(_BEAM_SUFFIX.search(str(exc))) or type(exc).__module__.startswith("apache_beam")


def reported(exc: BaseException) -> BaseException:
    """The exception to report: below Beam's re-raised copies, our own error (which names the
    work item) rather than the library error it wraps."""
    seen = set()
    while exc.__cause__ is not None and id(exc) not in seen and _is_beam_wrapper(exc):
        seen.add(id(exc))
        exc = exc.__cause__
    return exc


def was_interrupted(exc: BaseException) -> bool:
    """A Ctrl-C, also when Beam re-raised it wrapped in an error of its own."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _from_traceback_text(text: str) -> str | None:
    """The last exception line of a traceback carried as text (the outermost error raised)."""
    if _TRACEBACK not in text:
        return None
    lines = [m.group(2) for line in text.splitlines() if (m := _EXCEPTION_LINE.match(line))]
    return lines[-1] if lines else None


def _oserror_text(exc: OSError) -> str:
    paths = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p is not None)
    what = exc.strerror or str(exc)
    return f"{paths}: {what}" if paths else what


def one_line(exc: BaseException) -> str:
    """The failure as one line: what went wrong, where, and what to do about it."""
    notes = _notes(exc)
    exc = reported(exc)
    text = str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        text = _oserror_text(exc)
    else:
        text = _from_traceback_text(text) or text
    if any(marker in text for marker in _WORKER_DIED) and _TRACEBACK not in str(exc):
        text = worker_died_message(f"Beam reports: {text.strip().splitlines()[0][:200]}")
    text = _BEAM_SUFFIX.sub("", text).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    if not first.strip():
        first = type(exc).__name__
    hint = HINTS.get(os_error_code(exc)) or HINTS.get(_errno_in_text(text))
    parts = [first] + ([hint] if hint and hint not in first else [])
    parts += [n for n in notes + _notes(exc) if n not in parts]
    return "; ".join(parts)


def _notes(exc: BaseException) -> list[str]:
    """The cleanup notes on `exc` and on the Beam copies it wraps (added on the way out)."""
    notes, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        notes += [n for n in getattr(exc, "__notes__", ()) if n not in notes]
        exc = exc.__cause__ if _is_beam_wrapper(exc) else None
    return notes


def _errno_in_text(text: str) -> int | None:
    m = re.search(r"\[os_error_code='(\d+)'\]|\[Errno (\d+)\]", text)
    return int(m.group(1) or m.group(2)) if m else None


def worker_died_message(reason: str) -> str:
    """A worker process that vanished (killed, out of memory) is reported by Beam only as a closed
    channel, or not at all; say what happened and what to do."""
    return (
        f"a Beam worker process died during the run ({reason}), so the work items it held did not finish. "
        "Rerun the same command; if memory is short, use a smaller --max_item_bytes or fewer --direct_num_workers"
    )


def add_cleanup_note(exc: BaseException, note: str) -> None:
    """Record on the failure what was cleaned up, for the one line the CLI prints."""
    if hasattr(exc, "add_note"):
        exc.add_note(note)


class WorkerDiedError(BaseException):
    """A Beam worker process exited while the run was waiting for its work. A BaseException, as
    KeyboardInterrupt is: Beam's waiting loops catch and retry on Exception."""


_WORKER_EXIT = re.compile(r"Worker subprocess exited with return code (-?\d+)")
_GRACE_S = 0.5  # a Ctrl-C also stops the workers; the launcher's own interrupt comes first


def _exit_reason(code: int) -> str:
    signum = -code if code < 0 else code - 128 if code > 128 else None
    if signum is None:
        return f"exit code {code}"
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    return f"killed by {name}" + (" (the out-of-memory killer sends this)" if signum == signal.SIGKILL else "")


SDK_WORKER_MODULE = b"apache_beam.runners.worker.sdk_worker_main"


def _children(pid: int) -> list[int]:
    """Child processes of `pid` (any of its threads may have started them), from /proc."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(c) for c in f.read().split()]
        except OSError:
            continue
    return found


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def stop_worker_processes() -> list[int]:
    """Send SIGTERM to the Beam SDK worker processes this process started (and their children:
    Beam starts each through a shell); returns their ids."""
    stopped = []
    for pid in _children(os.getpid()):
        if SDK_WORKER_MODULE not in _cmdline(pid):
            continue
        for target in [*_children(pid), pid]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(target, signal.SIGTERM)
                stopped.append(target)
    return stopped


def _in_beam(tb) -> bool:
    """Whether a traceback runs through Beam's or gRPC's code (their threads' failures follow a
    failure the main thread reports as one line)."""
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename.replace(os.sep, "/")
        if "/apache_beam/" in name or "/grpc/" in name:
            return True
        tb = tb.tb_next
    return False


@contextlib.contextmanager
def watch_workers(show_consequences: bool = False):
    """Fail the run when a worker process dies, instead of waiting for it forever.

    Beam's multi_processing runner notices a dead worker only in a thread of its own ("Exception in
    thread run_worker: Worker subprocess exited with return code 137") while the launcher keeps
    waiting for that worker's bundle. Here that thread's exception interrupts the main thread
    (SIGUSR1 to it, so a blocked wait returns) with a `WorkerDiedError` saying what to do. Main
    thread only; a real Ctrl-C keeps its own meaning. Failures of Beam's own threads (they follow
    the one the main thread reports) are shown only with `show_consequences` (--debug).
    """
    main = threading.main_thread()
    state = {"interrupted": False, "raised": False, "reason": ""}
    previous_hook = threading.excepthook

    def hook(args) -> None:
        m = _WORKER_EXIT.search(str(args.exc_value))
        if m is None:
            if show_consequences or not _in_beam(args.exc_traceback):
                previous_hook(args)  # Beam's threads fail with it when a worker dies or on Ctrl-C
            return
        time.sleep(_GRACE_S)
        if not state["interrupted"] and not state["reason"]:
            state["reason"] = _exit_reason(int(m.group(1)))
            # Beam's shutdown waits for every worker to exit, and the others wait for the dead
            # one's bundle: stop them (our own child processes) so the run can end and clean up.
            stop_worker_processes()
            signal.pthread_kill(main.ident, signal.SIGUSR1)

    def on_worker_died(signum, frame) -> None:
        if not state["raised"] and not state["interrupted"]:
            state["raised"] = True
            raise WorkerDiedError(worker_died_message(state["reason"]))

    def on_interrupt(signum, frame) -> None:
        state["interrupted"] = True
        stop_worker_processes()  # a Ctrl-C reaches them too, but not a SIGINT sent to us alone
        raise KeyboardInterrupt

    if threading.current_thread() is not main:
        yield
        return
    old_usr1 = signal.signal(signal.SIGUSR1, on_worker_died)
    old_int = signal.signal(signal.SIGINT, on_interrupt)
    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous_hook
        signal.signal(signal.SIGUSR1, old_usr1)
        signal.signal(signal.SIGINT, old_int)
