"""Shared fixtures: run a conversion in-process and restore what it wrote with orbax.checkpoint."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
TESTS = os.path.join(ROOT, "tests")
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

FIXTURES = os.path.join(TESTS, "fixtures")
GOLDEN = os.path.join(TESTS, "golden")
FIXTURE_NAMES = sorted(d for d in os.listdir(FIXTURES) if os.path.isfile(os.path.join(FIXTURES, d, "config.json")))
# Fixtures MaxText converts only unscanned (Gemma4 E2B/E4B: its gemma4_small decoder has no scanned form).
UNSCANNED_ONLY = frozenset({"gemma4_small_bf16"})


def tree_hashes(root: str) -> dict[str, str]:
    """Every file under `root` (relative path) -> sha256 of its bytes: "unchanged" means this is equal."""
    found = {}
    for base, _, files in os.walk(root):
        for f in files:
            path = os.path.join(base, f)
            with open(path, "rb") as fh:
                found[os.path.relpath(path, root)] = hashlib.sha256(fh.read()).hexdigest()
    return found


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`ckptbeam ARGS` in a fresh process running this checkout's code."""
    environ = {**os.environ, "PYTHONPATH": ROOT, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args], cwd=ROOT, env=environ, capture_output=True, text=True
    )


def convert(source: str, output: str, *args: str, convert_fn=None) -> dict:
    from pipelines.convert import run

    argv = ["--source", source, "--output", output, *args]
    return run(argv) if convert_fn is None else run(argv, convert_fn=convert_fn)


def restore_leaves(output: str) -> dict[str, np.ndarray]:
    """Restore OUTPUT/0/items with orbax.checkpoint (no extra args) -> dotted name -> array."""
    import orbax.checkpoint as ocp

    restored = ocp.PyTreeCheckpointer().restore(os.path.join(output, "0", "items"))
    leaves = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(restored):
        name = ".".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)
        leaves[name] = np.asarray(leaf)
    return leaves


def assert_bitwise_equal(actual: np.ndarray, expected: np.ndarray, name: str) -> None:
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    a = np.ascontiguousarray(actual).view(np.uint8)
    b = np.ascontiguousarray(expected).view(np.uint8)
    if not np.array_equal(a, b):
        diff = np.argwhere(actual != expected)
        raise AssertionError(f"{name}: {len(diff)} values differ, first at {diff[0].tolist() if len(diff) else '?'}")


def assert_matches_reference(
    out_dir: str, model_dir: str, scan: bool = True, save_dtype: str = "bfloat16", **reference_options
) -> None:
    """Restore OUT with orbax and require every leaf to equal the independent numpy reference."""
    from reference import expected_leaves

    restored = restore_leaves(out_dir)
    assert restored.pop("step") == 0
    expected = expected_leaves(model_dir, scan, save_dtype, **reference_options)
    assert sorted(restored) == sorted(expected)
    for name, value in expected.items():
        assert_bitwise_equal(restored[name], value, name)


@pytest.fixture
def out_dir(tmp_path):
    return str(tmp_path / "out")


@pytest.hookimpl(trylast=True)  # after `-m` has deselected what it does not select
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The opt-in MaxText peer suite (tests/maxtext), selected with `-m maxtext` but without its
    peer venv: one skipped item with one line saying how to build it, instead of one per test."""
    selected = [item for item in items if item.get_closest_marker("maxtext")]
    if not selected:
        return
    sys.path.insert(0, os.path.join(TESTS, "maxtext"))
    import peer

    reason = peer.unavailable_reason()
    if reason is None:
        return
    first, rest = selected[0], set(selected[1:])
    first.add_marker(pytest.mark.skip(reason=reason))
    config.hook.pytest_deselected(items=list(rest))
    items[:] = [item for item in items if item not in rest]
