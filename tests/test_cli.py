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


def _tree_bytes(root) -> dict[str, bytes]:
    return {
        os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
        for d, _, files in os.walk(root)
        for f in files
    }


def test_demo_never_replaces_an_existing_checkpoint(tmp_path):
    """A checkpoint ckptbeam made from another model is one `convert` would replace as made from
    other inputs; the demo must refuse it without --force and leave it byte for byte."""
    out = tmp_path / "demo"
    made = _ckptbeam("convert", "--source", os.path.join(FIXTURES, "qwen3_bf16_tied"), "--output", str(out))
    assert made.returncode == 0, made.stderr
    before = _tree_bytes(out)
    result = _ckptbeam("demo", "--output", str(out))
    assert result.returncode != 0
    assert "--force" in result.stderr and "Traceback" not in result.stderr
    assert _tree_bytes(out) == before


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
    """A typo or a setting ckptbeam has no equivalent for must not silently give the default conversion."""
    source = os.path.join(FIXTURES, "llama_bf16")
    for args, hint in [
        (["per_device_batch_size=1"], "unrecognized argument 'per_device_batch_size=1'"),
        (["scan_layer=false"], "did you mean scan_layers?"),
        (["--scan-layers", "false"], "did you mean --scan_layers"),
        (["--eager_load_method", "pytorch"], "--eager_load_method pytorch: expected one of safetensors, transformers"),
        (["scan_layers=maybe"], "scan_layers=maybe: expected true or false"),
        (["hf_access_token=hf_x"], "HF_TOKEN"),
        (["scan_layers=false", "--scan_layers", "true"], "scan_layers=false and --scan_layers true"),
        (["model_name=llama3.1-8b", "--model", "llama2-7b"], "model_name=llama3.1-8b and --model llama2-7b"),
        (["configs/other.yml"], "reads no MaxText config file"),
    ]:
        out = tmp_path / "o"
        result = _ckptbeam("convert", "--source", source, "--output", str(out), *args)
        assert result.returncode == 2, (args, result.stderr)
        assert hint in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)
        assert not out.exists()


def test_pasted_maxtext_command_line_converts_unscanned(tmp_path):
    """MaxText's to_maxtext arguments, pasted after `ckptbeam convert`, mean what they mean there:
    scan_layers=false gives decoder/layers_N leaves (it used to give a scanned checkpoint)."""
    from conftest import restore_leaves

    out = tmp_path / "o"
    result = _ckptbeam(
        "convert", "maxtext/configs/base.yml", "model_name=llama3.1-8b", f"base_output_directory={out}",
        "scan_layers=false", "hardware=cpu", "skip_jax_distributed_system=true", "--save_dtype=bfloat16",
        "--lazy_load_tensors", "true", f"--hf_model_path={os.path.join(FIXTURES, 'llama_bf16')}",
        "checkpoint_storage_use_ocdbt=1", "checkpoint_storage_use_zarr3=1", "--simulated_cpu_devices_count=1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for ignored in ("hardware=cpu", "skip_jax_distributed_system=true", "--lazy_load_tensors true"):
        assert f"{ignored}: accepted and ignored" in result.stderr
    names = set(restore_leaves(str(out)))
    assert "params.params.decoder.layers_0.self_attention.query.kernel" in names
    assert not any(n.startswith("params.params.decoder.layers.") for n in names)
    load = "model_name=llama3.1-8b scan_layers=false load_parameters_path=" + str(out / "0" / "items")
    assert load in result.stdout


def test_json_summary_on_stdout(tmp_path):
    """--json: stdout is one JSON object (logs and the human summary go to stderr)."""
    import json

    out, hf = tmp_path / "o", tmp_path / "hf"
    source = os.path.join(FIXTURES, "qwen3_bf16_tied")
    first = _ckptbeam("convert", "--source", source, "--output", str(out), "--json", "--model", "qwen3-0.6b")
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout)
    assert summary["up_to_date"] is False and summary["seconds"] > 0 and summary["bytes_written"] > 0
    assert summary["output"] == str(out / "0" / "items") and summary["provenance"]["family"] == "qwen3"
    assert summary["maxtext_args"] == (
        f"model_name=qwen3-0.6b scan_layers=true load_parameters_path={out}/0/items "
        "vocab_size=250 override_model_config=true"  # the tiny fixture's rows, not qwen3-0.6b's 151936
    )
    assert "converted" in first.stderr
    again = json.loads(_ckptbeam("convert", "--source", source, "--output", str(out), "--json").stdout)
    assert again["up_to_date"] is True
    exported = _ckptbeam("export", "--source", str(out), "--output", str(hf), "--json")
    assert exported.returncode == 0, exported.stderr
    summary = json.loads(exported.stdout)
    assert summary["output"] == str(hf) and summary["hf_tensors"] > 0 and summary["up_to_date"] is False
