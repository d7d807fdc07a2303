"""Launcher-side progress: watch committed per-item databases appear in the staging directory.

Works whatever the runner, because every finished work item leaves exactly one committed OCDBT
database (its manifest) under the checkpoint directory, local or gs://.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from ckpt_transforms.orbax_io.writer import ATTEMPT_PREFIX, PROCESS_PREFIX
from ckpt_transforms.storage import outdir

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


class ProgressMonitor:
    """Logs 'N/M work items, MB written, MB/s, ETA' every `interval` seconds until stopped."""

    def __init__(
        self,
        items_dir: str,
        total_items: int,
        total_bytes: int,
        interval: float = 5.0,
        counter: Callable[[], int] | None = None,
    ):
        """`counter` returns the finished items (default: committed databases under `items_dir`)."""
        self.items_dir, self.total_items, self.total_bytes = items_dir, total_items, total_bytes
        self.counter = counter or (lambda: count_committed_databases(items_dir))
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ckptbeam-progress", daemon=True)
        self.started = time.time()

    def __enter__(self) -> ProgressMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def line(self) -> str:
        done = min(self.counter(), self.total_items)
        elapsed = max(time.time() - self.started, 1e-6)
        frac = done / self.total_items if self.total_items else 1.0
        written = self.total_bytes * frac
        rate = written / elapsed / 1e6
        eta = f"{elapsed / frac - elapsed:.0f} s" if frac > 0 else "unknown"
        return (
            f"progress: {done}/{self.total_items} work items ({100 * frac:.0f}%), "
            f"~{written / 1e6:.1f} MB written, {rate:.1f} MB/s, ETA {eta}"
        )

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            log.info(self.line())
