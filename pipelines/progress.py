"""Launcher-side progress: watch committed per-item databases appear in the staging directory.

Works whatever the runner, because every finished work item leaves exactly one committed OCDBT
database (its manifest) under the checkpoint directory, local or gs://.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable

from ckpt_transforms.orbax_io.writer import ATTEMPT_PREFIX, PROCESS_PREFIX
from ckpt_transforms.storage import outdir
from pipelines.errors import add_cleanup_note

log = logging.getLogger("ckptbeam")


def count_committed_databases(items_dir: str) -> int:
    """Finished work items: OCDBT databases whose manifest exists (committed once it does); without
    OCDBT (Pathways layout), the per-attempt chunk directories written so far (an estimate)."""
    if outdir.is_gcs(items_dir):
        # One listing of the ocdbt.process_* keys instead of one request per database.
        keys = outdir.list_files(items_dir, prefix=PROCESS_PREFIX)
        attempts = {k.split("/", 1)[0] for k in outdir.list_files(items_dir, prefix=ATTEMPT_PREFIX)}
        return sum(1 for k in keys if k.count("/") == 1 and k.endswith("/manifest.ocdbt")) + len(attempts)
    try:
        entries = os.listdir(items_dir)
    except FileNotFoundError:
        return 0
    return sum(
        1
        for e in entries
        if (e.startswith(PROCESS_PREFIX) and os.path.exists(os.path.join(items_dir, e, "manifest.ocdbt")))
        or e.startswith(ATTEMPT_PREFIX)
    )


INTERVAL_ENV = "CKPTBEAM_PROGRESS_INTERVAL_S"
DEFAULT_INTERVAL_S = 5.0  # a log line this often when stderr is not a terminal (Dataflow, CI, files)
BAR_REFRESH_S = 0.5  # the live bar's polling period on a terminal


def log_interval() -> float:
    """Seconds between progress lines in logs (CKPTBEAM_PROGRESS_INTERVAL_S overrides the default)."""
    text = os.environ.get(INTERVAL_ENV, "")
    try:
        return max(0.05, float(text)) if text.strip() else DEFAULT_INTERVAL_S
    except ValueError:
        raise ValueError(f"environment variable {INTERVAL_ENV}={text!r}: expected seconds") from None


def human_bytes(n: float) -> str:
    """A size in binary units (KiB, MiB, ...): the one unit system of every line ckptbeam prints."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


class ProgressMonitor:
    """Progress of a run seen from the launcher: on a terminal a live bar (items, bytes, MiB/s,
    ETA), elsewhere a log line 'N/M work items, MiB written, MiB/s, ETA' every `interval` seconds.

    On the way out it logs the final count, and on failure records on the exception how many
    items had finished, for the one line the CLI prints."""

    def __init__(
        self,
        items_dir: str,
        total_items: int,
        total_bytes: int,
        interval: float | None = None,
        counter: Callable[[], int] | None = None,
        bar: bool | None = None,
    ):
        """`counter` returns the finished items (default: committed databases under `items_dir`);
        `bar` forces the terminal bar on or off (default: on when stderr is a terminal)."""
        self.items_dir, self.total_items, self.total_bytes = items_dir, total_items, total_bytes
        self.counter = counter or (lambda: count_committed_databases(items_dir))
        self.interval = log_interval() if interval is None else interval
        self.bar = _is_terminal(sys.stderr) if bar is None else bar
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ckptbeam-progress", daemon=True)
        self.started = time.time()

    def __enter__(self) -> ProgressMonitor:
        self.started = time.time()
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._succeeded = exc is None  # then every item is done, whatever the last count saw
        self._stop.set()
        self._thread.join(timeout=2)
        try:
            done = self.done()
        except Exception:  # noqa: BLE001 - a progress count must never hide the run's own outcome
            return
        if exc is not None:
            if done < self.total_items:
                add_cleanup_note(exc, f"{done} of {self.total_items} work items had finished")
        elif not self.bar:
            log.info(self.line(self.total_items))  # the run finished: every item is done

    def done(self) -> int:
        """Finished items so far (the most ever counted: publishing moves the staging directory away)."""
        self._done = max(getattr(self, "_done", 0), min(self.counter(), self.total_items))
        return self._done

    def line(self, done: int | None = None) -> str:
        done = self.done() if done is None else done
        elapsed = max(time.time() - self.started, 1e-6)
        frac = done / self.total_items if self.total_items else 1.0
        written = self.total_bytes * frac
        rate = written / elapsed
        eta = f"{elapsed / frac - elapsed:.0f} s" if frac > 0 else "unknown"
        return (
            f"progress: {done}/{self.total_items} work items ({100 * frac:.0f}%), "
            f"~{human_bytes(written)} written, {human_bytes(rate)}/s, ETA {eta}"
        )

    def _run(self) -> None:
        if self.bar:
            self._run_bar()
            return
        while not self._stop.wait(self.interval):
            log.info(self.line())

    def _run_bar(self) -> None:
        """tqdm over the bytes to write (rate and ETA in B/s), the items as its postfix; log lines
        from other threads go above the bar instead of through it."""
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        width = _terminal_width(sys.stderr)
        with (
            tqdm(
                total=self.total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="ckptbeam", file=sys.stderr,
                ncols=width or 100, nrows=20, dynamic_ncols=bool(width), mininterval=BAR_REFRESH_S, leave=True,
            ) as bar,
            logging_redirect_tqdm(loggers=[logging.getLogger()], tqdm_class=tqdm),
        ):  # fmt: skip
            while True:
                stopping = self._stop.wait(BAR_REFRESH_S)
                done = self.total_items if getattr(self, "_succeeded", False) else self.done()
                fraction = done / self.total_items if self.total_items else 1.0
                bar.set_postfix_str(f"{done}/{self.total_items} items", refresh=False)
                bar.update(round(self.total_bytes * fraction) - bar.n)
                if stopping:
                    break


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _terminal_width(stream) -> int:
    """Columns of the terminal `stream` writes to; 0 when it does not say (a bare pty)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):
        return 0
