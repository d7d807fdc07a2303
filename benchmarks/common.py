"""Shared benchmark helpers: run a command under /usr/bin/time -v; the ckptbeam CLI command."""

from __future__ import annotations

import re
import subprocess
import sys
import time

CKPTBEAM = [sys.executable, "-m", "pipelines.cli", "convert"]


def timed(cmd: list[str], shell: bool = False) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of a command, via /usr/bin/time -v."""
    full = ["/usr/bin/time", "-v", "bash", "-c", cmd[0]] if shell else ["/usr/bin/time", "-v", *cmd]
    started = time.perf_counter()
    result = subprocess.run(full, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode:
        raise SystemExit(f"{cmd} failed:\n{result.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1))
    return wall, rss_kb * 1024
