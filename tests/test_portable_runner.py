"""The pipeline through Beam's portable job API (local job service, LOOPBACK workers).

This is how a distributed runner sees the job: the graph, every DoFn and every option are
serialized and shipped to a job service, so anything that does not pickle fails here.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
from conftest import FIXTURES, assert_matches_reference, convert


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def job_endpoint():
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "apache_beam.runners.portability.local_job_service_main", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.2)
        else:
            pytest.fail("local job service did not start")
        yield f"localhost:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_portable_runner_converts_and_restores(job_endpoint, out_dir):
    source = os.path.join(FIXTURES, "qwen2_bf16_tied")
    convert(
        source,
        out_dir,
        "--runner=PortableRunner",
        f"--job_endpoint={job_endpoint}",
        "--environment_type=LOOPBACK",
        "--scan_layers=false",
        "--max_item_bytes=20000",
    )
    assert_matches_reference(out_dir, source, scan=False)
