"""`ckptbeam export` as a user meets it: options, existing outputs, bad checkpoints and configs."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from conftest import FIXTURES, assert_bitwise_equal, convert, tree_hashes
from export_reference import expected_hf_tensors
from helpers_safetensors import read_tensors

from ckpt_transforms.orbax_io.reader import CheckpointError
from ckpt_transforms.planning.convert_plan import PlanError
from pipelines.export import run

LLAMA = os.path.join(FIXTURES, "llama_bf16")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ckpt") / "llama")
    convert(LLAMA, out)
    return out


def _export(ckpt: str, out: str, *args: str) -> dict:
    return run(["--source", ckpt, "--output", out, *args])


def _no_staging_left(out: str) -> bool:
    parent, name = os.path.split(out)
    return not [e for e in os.listdir(parent) if e.startswith(name + ".ckptbeam-")]


def test_export_accepts_base_step_and_items_paths(ckpt, tmp_path):
    for i, source in enumerate([ckpt, os.path.join(ckpt, "0"), os.path.join(ckpt, "0", "items")]):
        summary = _export(source, str(tmp_path / f"hf{i}"))
        assert summary["hf_tensors"] == 30
    first = tree_hashes(str(tmp_path / "hf0"))
    assert tree_hashes(str(tmp_path / "hf2"))["model.safetensors"] == first["model.safetensors"]


def test_rerun_is_up_to_date_and_changed_options_replace(ckpt, tmp_path):
    out = str(tmp_path / "hf")
    _export(ckpt, out)
    before = tree_hashes(out)
    assert _export(ckpt, out).get("up_to_date") is True
    assert tree_hashes(out) == before
    summary = _export(ckpt, out, "--weight_dtype=float32")
    assert summary.get("up_to_date") is None and summary["weight_dtype"] == "float32"
    written = read_tensors(os.path.join(out, "model.safetensors"))
    with open(os.path.join(LLAMA, "config.json")) as f:
        expected = expected_hf_tensors(os.path.join(ckpt, "0", "items"), json.load(f), True, "float32")
    for key, value in expected.items():
        assert_bitwise_equal(written[key], value, key)
    assert _no_staging_left(out)


def test_an_output_ckptbeam_did_not_write_is_never_replaced_without_force(ckpt, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "weights.safetensors").write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="--force"):
        _export(ckpt, str(out))
    assert (out / "weights.safetensors").read_bytes() == b"precious"
    _export(ckpt, str(out), "--force")
    assert not (out / "weights.safetensors").exists() and (out / "model.safetensors").exists()


def test_dry_run_writes_nothing(ckpt, tmp_path, capsys):
    out = str(tmp_path / "hf")
    summary = _export(ckpt, out, "--dry_run")
    assert summary["work_items"] >= 1 and not os.path.exists(out)
    assert "HF tensors" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args,message",
    [
        (["--weight_dtyp=float32"], "did you mean --weight_dtype"),
        (["per_device_batch_size=4"], "unrecognized argument"),
        (["weight_dtype=float16x"], "weight_dtype=float16x: invalid choice"),
        (["load_parameters_path=/elsewhere"], "and load_parameters_path=/elsewhere set --source"),
        (["--weight_dtype=float64"], "invalid choice"),
        (["--max_shard_size=lots"], "not a shard size"),
    ],
)
def test_arguments_that_are_not_ours_or_beams_are_errors(ckpt, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        _export(ckpt, str(tmp_path / "hf"), *args)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "hf")


def test_pasted_to_huggingface_command_line(ckpt, tmp_path, capsys):
    """MaxText's to_huggingface arguments mean what they mean there: weight_dtype=float32 gives
    float32 tensors equal to the reference's; hardware=cpu is accepted and said to be ignored."""
    out = str(tmp_path / "hf")
    items = os.path.join(ckpt, "0", "items")
    summary = run(
        ["src/maxtext/configs/base.yml", "model_name=llama3.1-8b", f"load_parameters_path={items}",
         f"base_output_directory={out}", "hardware=cpu", "skip_jax_distributed_system=true", "scan_layers=true",
         "use_multimodal=false", "weight_dtype=float32"]
    )  # fmt: skip
    assert summary["weight_dtype"] == "float32" and summary["output"] == out
    assert "hardware=cpu: accepted and ignored" in capsys.readouterr().err
    written = read_tensors(os.path.join(out, "model.safetensors"))
    with open(os.path.join(LLAMA, "config.json")) as f:
        expected = expected_hf_tensors(items, json.load(f), True, "float32")
    assert sorted(written) == sorted(expected)
    for key, value in expected.items():
        assert_bitwise_equal(written[key], value, key)


def test_scan_layers_that_disagree_with_the_checkpoint_is_an_error(ckpt, tmp_path):
    with pytest.raises(PlanError, match="scan_layers=false but the checkpoint .* scan_layers=true"):
        _export(ckpt, str(tmp_path / "hf"), "--scan_layers=false")


def test_scan_layers_is_inferred_from_param_names_when_not_recorded(ckpt, tmp_path):
    copy = str(tmp_path / "ckpt")
    shutil.copytree(ckpt, copy)
    meta_path = os.path.join(copy, "0", "_CHECKPOINT_METADATA")
    with open(meta_path) as f:
        meta = json.load(f)
    meta["custom_metadata"] = {}
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    assert _export(copy, str(tmp_path / "hf"))["scan_layers"] is True


def test_a_config_that_contradicts_the_checkpoint_is_refused(ckpt, tmp_path):
    config = json.load(open(os.path.join(LLAMA, "config.json")))
    config["intermediate_size"] += 8
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps(config))
    out = str(tmp_path / "hf")
    with pytest.raises(PlanError, match="contradicts the checkpoint"):
        _export(ckpt, out, f"--hf_config={bad}")
    assert not os.path.exists(out) and _no_staging_left(out)


def test_another_family_config_is_refused(ckpt, tmp_path):
    with pytest.raises(PlanError, match="missing|not part of"):
        _export(ckpt, str(tmp_path / "hf"), f"--hf_config={os.path.join(FIXTURES, 'qwen3_bf16_tied')}")


def test_a_checkpoint_without_a_kept_config_needs_hf_config(ckpt, tmp_path):
    copy = str(tmp_path / "ckpt")
    shutil.copytree(ckpt, copy)
    shutil.rmtree(os.path.join(copy, "0", "ckptbeam_hf"))
    with pytest.raises(PlanError, match="--hf_config"):
        _export(copy, str(tmp_path / "hf"))
    _export(copy, str(tmp_path / "hf"), f"--hf_config={LLAMA}")
    assert read_tensors(os.path.join(tmp_path, "hf", "model.safetensors"))


def test_a_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        _export(str(tmp_path / "nope"), str(tmp_path / "hf"))


def test_a_truncated_chunk_fails_and_publishes_nothing(ckpt, tmp_path):
    copy = str(tmp_path / "ckpt")
    shutil.copytree(ckpt, copy)
    items = os.path.join(copy, "0", "items")
    data_files = [
        os.path.join(r, f)
        for r, _, fs in os.walk(items)
        for f in fs
        if "/d/" in os.path.join(r, f) and "ocdbt.process_" in r
    ]
    biggest = max(data_files, key=os.path.getsize)
    with open(biggest, "r+b") as f:
        f.truncate(os.path.getsize(biggest) // 2)
    out = str(tmp_path / "hf")
    with pytest.raises(Exception, match="export work item"):
        _export(copy, out, "--no_resume")
    assert not os.path.exists(out) and _no_staging_left(out)


def test_only_exports_the_selected_params(ckpt, tmp_path):
    out = str(tmp_path / "hf")
    summary = _export(ckpt, out, "--only=decoder.layers.mlp.*")
    written = read_tensors(os.path.join(out, "model.safetensors"))
    assert summary["hf_tensors"] == len(written) == 9
    assert all(".mlp." in k for k in written)


def test_shards_and_index_when_the_model_is_over_the_shard_size(ckpt, tmp_path):
    out = str(tmp_path / "hf")
    _export(ckpt, out, "--max_shard_size=100KB")
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    tensors = {}
    for f in files:
        part = read_tensors(os.path.join(out, f))
        assert all(index["weight_map"][k] == f for k in part)
        tensors.update(part)
    assert sum(v.nbytes for v in tensors.values()) == index["metadata"]["total_size"]
    assert sorted(tensors) == sorted(index["weight_map"])


@pytest.mark.parametrize("fixture,rows", [("llama_bf16", 300), ("qwen3_bf16_tied", 200), ("gemma3_mm_bf16", 256)])
def test_a_resized_vocabulary_exports_back_to_the_configs(fixture, rows, tmp_path):
    """--vocab_size pads (or cuts) MaxText's embedding; export resizes back to config.json's
    vocab_size: padded rows dropped, cut rows zero (they are gone)."""
    source = os.path.join(FIXTURES, fixture)
    plain, resized = str(tmp_path / "plain"), str(tmp_path / "resized")
    convert(source, plain)
    convert(source, resized, f"--vocab_size={rows}")
    _export(plain, str(tmp_path / "hf_plain"))
    _export(resized, str(tmp_path / "hf_resized"))
    a = read_tensors(os.path.join(tmp_path, "hf_plain", "model.safetensors"))
    b = read_tensors(os.path.join(tmp_path, "hf_resized", "model.safetensors"))
    assert sorted(a) == sorted(b)
    for key, value in a.items():
        if "embed_tokens" in key or key == "lm_head.weight":
            keep = min(rows, value.shape[0])
            assert_bitwise_equal(b[key][:keep], value[:keep], key)
            assert not b[key][keep:].any()
        else:
            assert_bitwise_equal(b[key], value, key)


@pytest.mark.parametrize("use_ocdbt,use_zarr3", [(False, False), (False, True), (True, False)])
def test_pathways_and_mixed_layouts_export_like_ocdbt_zarr3(use_ocdbt, use_zarr3, tmp_path):
    source = os.path.join(FIXTURES, "qwen3_moe_bf16")
    convert(source, str(tmp_path / "default"))
    convert(
        source,
        str(tmp_path / "other"),
        f"--use_ocdbt={str(use_ocdbt).lower()}",
        f"--use_zarr3={str(use_zarr3).lower()}",
    )
    _export(str(tmp_path / "default"), str(tmp_path / "hf_default"), "--max_item_bytes=16KiB")
    _export(str(tmp_path / "other"), str(tmp_path / "hf_other"), "--max_item_bytes=16KiB")
    a = tree_hashes(str(tmp_path / "hf_default"))["model.safetensors"]
    assert tree_hashes(str(tmp_path / "hf_other"))["model.safetensors"] == a
