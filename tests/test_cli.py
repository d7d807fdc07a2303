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
    assert os.path.isfile(tmp_path / "demo" / "hf" / "model.safetensors")  # and back to HF
    assert "exported 30 tensors" in result.stdout


def test_demo_never_replaces_a_checkpoint_it_did_not_write(tmp_path):
    step = tmp_path / "demo" / "0"
    step.mkdir(parents=True)
    (step / "precious.txt").write_text("keep me")
    result = _ckptbeam("demo", "--output", str(tmp_path / "demo"))
    assert result.returncode != 0
    assert "--force" in result.stderr and "Traceback" not in result.stderr
    assert (step / "precious.txt").read_text() == "keep me"


def test_export_from_the_entry_point(tmp_path):
    ckpt, hf = str(tmp_path / "ckpt"), str(tmp_path / "hf")
    assert _ckptbeam("convert", "--source", os.path.join(FIXTURES, "qwen3_bf16_tied"), "--output", ckpt).returncode == 0
    result = _ckptbeam("export", "--source", ckpt, "--output", hf)
    assert result.returncode == 0, result.stderr
    assert "exported" in result.stdout and os.path.isfile(os.path.join(hf, "model.safetensors"))
    typo = _ckptbeam("export", "--source", ckpt, "--output", hf + "2", "--weight_dtyp", "float32")
    assert typo.returncode == 2 and "--weight_dtype" in typo.stderr
    assert not os.path.exists(hf + "2")
    help_text = _ckptbeam("export", "--help").stdout
    for flag in ("--hf_config", "--scan_layers", "--weight_dtype", "--max_shard_size", "--only", "--dry_run"):
        assert flag in help_text


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


def test_convert_refuses_arguments_it_would_otherwise_ignore(tmp_path):
    """A typo or a MaxText-style key=value must not silently give the default conversion."""
    source = os.path.join(FIXTURES, "llama_bf16")
    for args, hint in [
        (["scan_layers=false"], "--name value"),
        (["--scan-layers", "false"], "did you mean --scan_layers"),
        (["--model_name", "llama3.1-8b"], "unrecognized argument '--model_name'"),
    ]:
        out = tmp_path / "o"
        result = _ckptbeam("convert", "--source", source, "--output", str(out), *args)
        assert result.returncode == 2, (args, result.stderr)
        assert hint in result.stderr and "Traceback" not in result.stderr
        assert not out.exists()
