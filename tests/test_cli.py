"""The installed `ckptbeam` console script, as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import FIXTURES, ROOT


def _ckptbeam(*args: str) -> subprocess.CompletedProcess:
    exe = os.path.join(os.path.dirname(sys.executable), "ckptbeam")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "pipelines.cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_help_lists_conversion_options():
    result = _ckptbeam("convert", "--help")
    assert result.returncode == 0
    for flag in ("--source", "--output", "--model", "--scan_layers", "--save_dtype", "--max_item_bytes"):
        assert flag in result.stdout


def test_demo_converts_and_inspects(tmp_path):
    result = _ckptbeam("demo", "--output", str(tmp_path / "demo"))
    assert result.returncode == 0, result.stderr
    assert "load_parameters_path=" in result.stdout
    query = [line.split() for line in result.stdout.splitlines() if "self_attention.query.kernel" in line]
    assert query == [
        [
            "params.params.decoder.layers.self_attention.query.kernel",
            "[64,",
            "3,",
            "4,",
            "24]",
            "bfloat16",
            "[64,",
            "3,",
            "4,",
            "24]",
        ]
    ]
    assert os.path.isfile(tmp_path / "demo" / "0" / "items" / "_METADATA")


def test_module_entry_point_and_unscanned(tmp_path):
    out = tmp_path / "o"
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.convert", "--source", os.path.join(FIXTURES, "mistral_bf16"),
         "--output", str(out), "--scan_layers", "false", "--model", "mistral-7b"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    inspect = _ckptbeam("inspect", str(out))
    assert "params.params.decoder.layers_1.mlp.wo.kernel" in inspect.stdout


def test_bad_source_is_a_clear_error(tmp_path):
    result = _ckptbeam("convert", "--source", str(tmp_path), "--output", str(tmp_path / "o"))
    assert result.returncode == 1
    assert "config.json not found" in result.stderr
    assert "Traceback" not in result.stderr
