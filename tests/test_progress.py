"""The launcher's progress count sees finished items in both layouts."""

from __future__ import annotations

import os

from pipelines.progress import ProgressMonitor, count_committed_databases


def test_counts_committed_databases_and_attempt_dirs(tmp_path):
    items = tmp_path / "items"
    os.makedirs(items / "ocdbt.process_a")
    (items / "ocdbt.process_a" / "manifest.ocdbt").write_bytes(b"x")
    os.makedirs(items / "ocdbt.process_b")  # not committed yet: no manifest
    os.makedirs(items / ".attempt_c" / "param")
    assert count_committed_databases(str(items)) == 2
    assert count_committed_databases(str(tmp_path / "missing")) == 0
    line = ProgressMonitor(str(items), total_items=4, total_bytes=4_000_000).line()
    assert line.startswith("progress: 2/4 work items (50%)")
