"""`ckptbeam export`: every fixture x scan/unscan x weight dtype, HF -> convert -> export -> HF.

The expectation is `export_reference.expected_hf_tensors`, an independent numpy model of
MaxText's `to_huggingface` (validated against MaxText itself), computed from the checkpoint as
orbax restores it. Where MaxText's round trip is pure data movement the result must also equal
the original HF tensors bit for bit.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import FIXTURE_NAMES, FIXTURES, UNSCANNED_ONLY, assert_bitwise_equal, convert
from export_reference import expected_hf_tensors
from helpers_safetensors import read_tensors
from test_export_reference import GEMMA3_RENAMES

# Leaves whose export does arithmetic (EXPORT.md §2): q scaling, Gemma embeddings and norms.
ARITHMETIC = ("q_proj", "embed_tokens", "layernorm", "norm.weight", "q_norm", "k_norm", "mm_soft_emb_norm")
QUANTIZED = ("deepseek3_fp8", "deepseek32_fp8", "gpt_oss_mxfp4")
EXACT_FAMILIES = ("qwen", "deepseek", "gpt_oss", "olmo3")  # no arithmetic hook at all


def export(source: str, output: str, *args: str) -> dict:
    from pipelines.export import run

    return run(["--source", source, "--output", output, *args])


def read_model(directory: str) -> dict[str, np.ndarray]:
    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    tensors = {}
    for f in files:
        tensors.update(read_tensors(os.path.join(directory, f)))
    return tensors


def _transformers_name(key: str) -> str:
    for ours, maxtexts in GEMMA3_RENAMES:
        if key.startswith(maxtexts):
            return ours + key[len(maxtexts) :]
    return key


def _cases():
    for fixture in FIXTURE_NAMES:
        for scan in (True, False):
            if scan and fixture in UNSCANNED_ONLY:
                continue
            yield pytest.param(fixture, scan, id=f"{fixture}-{'scan' if scan else 'unscan'}")


@pytest.mark.parametrize("fixture,scan", list(_cases()))
def test_fixture_round_trips_through_export(fixture, scan, tmp_path):
    source = os.path.join(FIXTURES, fixture)
    ckpt, hf = str(tmp_path / "ckpt"), str(tmp_path / "hf")
    extra = ["--use_multimodal=true"] if "_mm_" in fixture else []
    convert(source, ckpt, f"--scan_layers={str(scan).lower()}", *extra)
    # Small items: every leaf is cut into several, so region-to-tensor mapping is exercised.
    summary = export(ckpt, hf, "--max_item_bytes=24KiB")
    assert summary["scan_layers"] is scan

    written = read_model(hf)
    with open(os.path.join(source, "config.json")) as f:
        config = json.load(f)
    expected = expected_hf_tensors(os.path.join(ckpt, "0", "items"), config, scan, use_multimodal=bool(extra))
    if config["model_type"] == "gemma3":
        # MaxText writes Gemma3 as model.language_model.* / model.vision_tower.vision_model.*;
        # ckptbeam writes what transformers' own save_pretrained writes (both load).
        expected = {_transformers_name(k): v for k, v in expected.items()}
    assert sorted(written) == sorted(expected)
    for key, value in expected.items():
        assert_bitwise_equal(written[key], value, key)

    original = read_model(source) if fixture not in QUANTIZED else {}
    if original:
        for key, value in written.items():
            if any(a in key for a in ARITHMETIC) and not fixture.startswith(EXACT_FAMILIES):
                continue
            assert_bitwise_equal(value, original[key].astype(value.dtype), f"{key} (original)")

    with open(os.path.join(hf, "config.json")) as f:
        out_config = json.load(f)
    assert "quantization_config" not in out_config
    assert out_config.get("torch_dtype", out_config.get("dtype")) == "bfloat16"


@pytest.mark.parametrize("fixture", ["llama_bf16", "gemma2_bf16", "gemma2_f32", "gemma3_mm_bf16", "gemma4_moe_bf16"])
def test_float32_export_matches_maxtext(fixture, tmp_path):
    """--weight_dtype float32: leaves upcast on reading, hooks in float32 (Gemma divisions true
    float32 divisions), as MaxText's to_huggingface weight_dtype=float32."""
    source = os.path.join(FIXTURES, fixture)
    ckpt, hf = str(tmp_path / "ckpt"), str(tmp_path / "hf")
    save = ["--save_dtype=float32"] if fixture.endswith("f32") else []
    convert(source, ckpt, *save)
    export(ckpt, hf, "--weight_dtype=float32")
    with open(os.path.join(source, "config.json")) as f:
        config = json.load(f)
    expected = expected_hf_tensors(os.path.join(ckpt, "0", "items"), config, True, "float32")
    written = read_model(hf)
    if config["model_type"] == "gemma3":
        expected = {_transformers_name(k): v for k, v in expected.items()}
    assert sorted(written) == sorted(expected)
    for key, value in expected.items():
        assert_bitwise_equal(written[key], value, key)
