"""The MaxText peer suite: opt-in (marker `maxtext`, deselected by pytest.ini's addopts)."""

from __future__ import annotations

import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import peer  # noqa: E402


@pytest.fixture(scope="session")
def peer_workdir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Skips every peer test with one reason (pytest folds them into one line) when the peer venv
    is absent; else a session directory for checkpoints and logs (CKPTBEAM_PEER_WORKDIR keeps them)."""
    reason = peer.unavailable_reason()
    if reason:
        pytest.skip(reason)
    keep = os.environ.get("CKPTBEAM_PEER_WORKDIR")
    if keep:
        os.makedirs(keep, exist_ok=True)
        return keep
    return str(tmp_path_factory.mktemp("maxtext-peer"))
