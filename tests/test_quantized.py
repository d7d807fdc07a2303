"""Quantized sources (FP8 blocks, MXFP4) are dequantized inside the work item, in one pass.

The decoders are checked bit-exactly against the independent formulas in reference.py (the ones
MaxText's deepseek_dequantize.py / dequantize_mxfp4.py use), and the converted checkpoints
against the bf16 originals the quantized fixtures were made from, within quantization error.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import ml_dtypes
import numpy as np
import pytest
from conftest import FIXTURES, assert_bitwise_equal, convert, restore_leaves
from reference import (
    e2m1_maxtext,
    e4m3_to_float32,
    expected_leaves,
    fp8_dequantize,
    load_raw,
    mxfp4_dequantize,
)

import model_maps
from ckpt_transforms.planning.convert_plan import PlanError, build_plan
from ckpt_transforms.safetensors_io.index import load_source_model
from ckpt_transforms.storage.sources import open_source
from ckpt_transforms.tensors import quant
from ckpt_transforms.tensors.ops import DequantFP8, DequantMXFP4, QuantizeFP8, QuantizeMXFP4
from ckpt_transforms.work_items.convert import build_region
from model_maps.common import ConfigError

BF16 = np.dtype(ml_dtypes.bfloat16)
FP8_BLOCK = (16, 32)  # the fixtures' quantization_config.weight_block_size
NAN_E4M3 = (0x7F, 0xFF)


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(f"u{a.dtype.itemsize}")


def plan(source: str, scan: bool = True, budget: int = 256 * 2**20, save: str = "bfloat16", model: str | None = None):
    sm = load_source_model(open_source(source))
    return build_plan(sm, model_maps.detect_family(sm.config, model).build(sm.config), scan, save, budget)


def copy_with_config(name: str, dst, **changes) -> str:
    """A fixture copy whose config.json has keys replaced (value None deletes the key)."""
    shutil.copytree(os.path.join(FIXTURES, name), dst)
    path = os.path.join(dst, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    with open(path, "w") as f:
        json.dump(cfg, f)
    return str(dst)


# --------------------------------------------------------------------------- FP8 decoding


def fp8_tolerance(original: np.ndarray, scale: np.ndarray, block) -> np.ndarray:
    """e4m3 keeps 3 mantissa bits: half a step is |x|/16 (normal) or 2**-10 * scale (subnormal)."""
    m, n = original.shape
    full = np.repeat(np.repeat(scale, block[0], 0), block[1], 1)[:m, :n]
    return np.abs(original) / 16 + full * 2.0**-10 + np.abs(original) / 128


def test_every_e4m3_bit_pattern_decodes_like_the_formula():
    patterns = np.array([b for b in range(256) if b not in NAN_E4M3], np.uint8)
    w = np.resize(patterns, (16, 16))
    got = quant.dequantize_fp8(w.view(ml_dtypes.float8_e4m3fn), np.ones((1, 1), np.float32), (16, 16))
    np.testing.assert_array_equal(got, e4m3_to_float32(w))
    # Subnormals: exponent field 0 -> m/8 * 2**-6; the smallest is 2**-9.
    assert e4m3_to_float32(np.array([1, 0x81, 0x07], np.uint8)).tolist() == [2.0**-9, -(2.0**-9), 7 / 8 * 2.0**-6]
    assert e4m3_to_float32(np.array([0x7E], np.uint8))[0] == 448.0


@pytest.mark.parametrize(
    "shape, block", [((16, 32), (16, 32)), ((40, 70), (16, 32)), ((96, 48), (16, 32)), ((7, 300), (3, 128))]
)
def test_fp8_dequant_equals_reference_bit_for_bit(shape, block):
    rng = np.random.default_rng(sum(shape))
    raw = rng.integers(0, 256, shape, dtype=np.uint8)
    raw[np.isin(raw, NAN_E4M3)] = 0x3C
    grid = quant.scale_grid_shape(shape, block)
    scale = (rng.random(grid, dtype=np.float32) * 1e-3 + 1e-5).astype(np.float32)  # not bf16-representable
    got = DequantFP8(block).apply_inputs(raw.view(ml_dtypes.float8_e4m3fn), scale)
    assert got.dtype == BF16
    np.testing.assert_array_equal(bits(got), bits(fp8_dequantize(raw, scale, block)))


def test_fp8_rounds_the_float32_product_once():
    """Rounding the scale to bf16 first (or truncating) would change ~25% (~40%) of values:
    MaxText's dequantizer multiplies in float32 and rounds once."""
    rng = np.random.default_rng(3)
    raw = rng.integers(0, 0x7E, (32, 32), dtype=np.uint8)
    scale = np.full((1, 1), 0.0123456, np.float32)
    got = DequantFP8((32, 32)).apply_inputs(raw.view(ml_dtypes.float8_e4m3fn), scale)
    once = (e4m3_to_float32(raw) * scale[0, 0]).astype(BF16)
    scale_first = (e4m3_to_float32(raw) * np.float32(scale[0, 0].astype(BF16))).astype(BF16)
    np.testing.assert_array_equal(bits(got), bits(once))
    assert (bits(got) != bits(scale_first)).mean() > 0.1


def test_fp8_e8m0_scales_are_powers_of_two():
    raw = np.full((4, 4), 0x38, np.uint8)  # 1.0
    scale = np.array([[130]], np.uint8)
    got = DequantFP8((4, 4)).apply_inputs(raw.view(ml_dtypes.float8_e4m3fn), scale)
    assert got.astype(np.float32).tolist() == [[8.0] * 4] * 4


def test_fp8_scale_grid_mismatch_is_an_error():
    w = np.zeros((40, 70), ml_dtypes.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"scale grid \[2, 3\].*expected \[3, 3\]"):
        quant.dequantize_fp8(w, np.ones((2, 3), np.float32), (16, 32))


# --------------------------------------------------------------------------- MXFP4 decoding


def test_every_mxfp4_byte_and_scale_decodes_like_maxtext():
    """All 256 bytes (both nibbles), scales 0..254 (>= 128 included, read as uint8)."""
    blocks = np.resize(np.arange(256, dtype=np.uint8), (2, 16, 16))[:, :, None, :].repeat(2, axis=2)
    scales = np.resize(np.arange(0, 255, 8, dtype=np.uint8), (2, 16, 2))
    got = DequantMXFP4().apply_inputs(blocks, scales)  # [E, out, in]
    assert got.dtype == BF16 and got.shape == (2, 16, 64)
    expected = mxfp4_dequantize(blocks, scales).transpose(0, 2, 1)  # reference returns [E, in, out]
    np.testing.assert_array_equal(bits(got), bits(expected))
    assert (scales >= 128).any()
    # Low nibble first; code 8 (-0) decodes to +0.0 as in MaxText's dequantize_mxfp4.py.
    one = DequantMXFP4().apply_inputs(np.array([[[0x8F] + [0] * 15]], np.uint8), np.array([[127]], np.uint8))
    assert bits(one)[0, :2].tolist() == [0xC0C0, 0x0000]  # -6.0, +0.0
    assert e2m1_maxtext(np.arange(16)).tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6, 0, -0.5, -1, -1.5, -2, -3, -4, -6]


def test_quantize_ops_are_the_inverses():
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((8, 64)) * np.exp2(rng.integers(-12, 12, (8, 1)))).astype(np.float32)
    deq = DequantFP8((4, 16))
    assert deq.inverse() == QuantizeFP8((4, 16)) and QuantizeFP8((4, 16)).inverse() == deq
    q, scale = deq.inverse().apply(x)
    y = deq.apply_inputs(q, scale).astype(np.float32)
    assert np.all(np.abs(y - x) <= fp8_tolerance(x, scale, (4, 16)))
    # float32 values already on the grid come back unchanged.
    on_grid = quant.dequantize_fp8(q, scale, (4, 16))
    np.testing.assert_array_equal(quant.dequantize_fp8(*quant.quantize_fp8(on_grid, (4, 16)), (4, 16)), on_grid)
    mx = DequantMXFP4()
    assert mx.inverse() == QuantizeMXFP4()
    z = mx.apply_inputs(*mx.inverse().apply(x)).astype(np.float32)
    group_max = np.abs(x).reshape(8, 2, 32).max(-1, keepdims=True)
    assert np.all(np.abs(z - x).reshape(8, 2, 32) < group_max / 3)
    np.testing.assert_array_equal(mx.apply_inputs(*mx.inverse().apply(z)).astype(np.float32), z)
    assert mx.output_shape((4, 128, 2, 16)) == (4, 128, 64)
    assert mx.inverse().output_shape((4, 128, 64)) == (4, 128, 2, 16)


# --------------------------------------------------------------------------- the fixtures' tensors


def test_fp8_fixture_weights_decode_exactly_and_near_the_bf16_originals():
    raw = load_raw(os.path.join(FIXTURES, "deepseek3_fp8"))
    originals = load_raw(os.path.join(FIXTURES, "deepseek3_bf16"))
    weights = [k for k, (dtype, _) in raw.items() if dtype == "F8_E4M3"]
    # per layer 5 attention projections + 3 MLP (dense) or 3 shared + 3 x 4 experts (MoE)
    assert len(weights) == 3 * 5 + 3 + 2 * (3 + 12)
    subnormal = 0
    for key in weights:
        w, s = raw[key][1], raw[key + "_scale_inv"][1]
        got = DequantFP8(FP8_BLOCK).apply_inputs(w.view(ml_dtypes.float8_e4m3fn), s)
        np.testing.assert_array_equal(bits(got), bits(fp8_dequantize(w, s, FP8_BLOCK)), key)
        original = originals[key][1].astype(np.float32)
        err = np.abs(got.astype(np.float32) - original)
        assert np.all(err <= fp8_tolerance(original, s, FP8_BLOCK)), key
        subnormal += int(((w & 0x78) == 0).sum())
    assert subnormal > 0, "no subnormal e4m3 values exercised"


def test_mxfp4_fixture_experts_decode_exactly_and_near_the_bf16_originals():
    raw = load_raw(os.path.join(FIXTURES, "gpt_oss_mxfp4"))
    originals = load_raw(os.path.join(FIXTURES, "gpt_oss_bf16"))
    keys = sorted(k.removesuffix("_blocks") for k in raw if k.endswith("_blocks"))
    assert len(keys) == 8
    big = 0
    for key in keys:
        blocks, scales = raw[key + "_blocks"][1], raw[key + "_scales"][1]
        got = DequantMXFP4().apply_inputs(blocks, scales).transpose(0, 2, 1)  # HF [E, in, out]
        np.testing.assert_array_equal(bits(got), bits(mxfp4_dequantize(blocks, scales)), key)
        step = np.repeat(np.exp2(scales.astype(np.float32) - 127), 32, axis=-1).transpose(0, 2, 1)
        assert np.all(np.abs(got.astype(np.float32) - originals[key][1].astype(np.float32)) <= step), key
        big += int((scales >= 128).sum())
    assert big > 0, "no scale byte >= 128 exercised"


# --------------------------------------------------------------------------- conversion in one pass


QUANTIZED_PAIRS = [("deepseek3_fp8", "deepseek3_bf16", True), ("gpt_oss_mxfp4", "gpt_oss_bf16", False)]


@pytest.mark.parametrize("quantized, original, scan", QUANTIZED_PAIRS)
def test_quantized_checkpoint_converts_in_one_pass_close_to_its_original(quantized, original, scan, out_dir):
    source = os.path.join(FIXTURES, quantized)
    before = {f: os.stat(os.path.join(source, f)).st_mtime_ns for f in os.listdir(source)}
    p = plan(source, scan)
    # One pass: every quantized slab reads its weight and its scales, and nothing else is read.
    sm = load_source_model(open_source(source))
    used = {s.source.key for i in p.items for s in i.slabs} | {a.key for i in p.items for s in i.slabs for a in s.aux}
    assert used == set(sm.tensors) - set(p.unused_source_keys)
    assert any(s.aux for i in p.items for s in i.slabs)
    convert(source, out_dir, f"--scan_layers={str(scan).lower()}")
    assert {f: os.stat(os.path.join(source, f)).st_mtime_ns for f in os.listdir(source)} == before
    for _, _, files in os.walk(out_dir):
        assert not any(f.endswith(".safetensors") for f in files), "no intermediate bf16 checkpoint"

    restored = restore_leaves(out_dir)
    restored.pop("step")
    exact = expected_leaves(source, scan)
    near = expected_leaves(os.path.join(FIXTURES, original), scan)
    assert sorted(restored) == sorted(exact) == sorted(near)
    changed = 0
    for name, value in restored.items():
        assert_bitwise_equal(value, exact[name], name)
        a, b = value.astype(np.float32), near[name].astype(np.float32)
        if np.array_equal(bits(value), bits(near[name])):
            continue
        changed += 1
        if "GptOssMlp" in name:  # MXFP4: error <= 2**(scale-127) < group max / 3 (scale = ceil(log2(max/6)))
            limit = np.max(np.abs(b), axis=tuple(range(1, b.ndim)), keepdims=True) / 3
        else:  # FP8: 3 mantissa bits
            limit = np.abs(b) / 16 + np.abs(a) / 128 + 1e-6
        assert np.all(np.abs(a - b) <= limit), name
    assert changed >= (8 if quantized.startswith("deepseek") else 12)


# --------------------------------------------------------------------------- row-split slabs


def test_row_split_fp8_slab_reads_the_matching_scale_rows():
    source = os.path.join(FIXTURES, "deepseek3_fp8")
    p = plan(source, True, budget=50_000)
    sm = load_source_model(open_source(source))
    expected = expected_leaves(source, True)
    split = 0
    for item in p.items:
        for slab in item.slabs:
            if not slab.aux:
                continue
            full = sm.tensors[slab.source.key]
            (scale,) = slab.aux
            scale_full = sm.tensors[scale.key]
            assert scale.key == slab.source.key + "_scale_inv"
            if slab.source.shape == full.shape:
                assert scale == scale_full
                continue
            split += 1
            row_bytes = full.length // full.shape[0]
            r0 = (slab.source.offset - full.offset) // row_bytes
            r1 = r0 + slab.source.shape[0]
            assert r0 % FP8_BLOCK[0] == 0, "a slab starts inside a scale block"
            s0 = (scale.offset - scale_full.offset) // (scale_full.length // scale_full.shape[0])
            assert (s0, s0 + scale.shape[0]) == (r0 // FP8_BLOCK[0], math.ceil(r1 / FP8_BLOCK[0]))
        index = tuple(slice(a, b) for a, b in item.region)
        got = build_region(item, open_source(source))
        assert_bitwise_equal(got, expected[item.param][index], f"{item.param} {item.region}")
    assert split > 0, "budget did not force a row split of an FP8 weight"


def test_mxfp4_experts_split_along_the_expert_axis():
    source = os.path.join(FIXTURES, "gpt_oss_mxfp4")
    p = plan(source, False, budget=120_000)
    expected = expected_leaves(source, False)
    items = [i for i in p.items if i.param.endswith("layers_0.GptOssMlp.wi_1")]
    assert len(items) > 1
    for item in items:
        (e0, e1), *_ = item.region
        (slab,) = item.slabs
        (scales,) = slab.aux
        assert slab.source.shape[0] == scales.shape[0] == e1 - e0
        got = build_region(item, open_source(source))
        assert_bitwise_equal(got, expected[item.param][e0:e1], item.param)


# --------------------------------------------------------------------------- decided by quantization_config


def test_fp8_tensors_without_quantization_config_are_refused(tmp_path):
    d = copy_with_config("deepseek3_fp8", tmp_path / "m", quantization_config=None)
    with pytest.raises(PlanError, match=r"dtype F8_E4M3.*quantization_config"):
        plan(d)


def test_quantization_config_on_bf16_tensors_is_refused(tmp_path):
    cfg = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [16, 32]}
    d = copy_with_config("deepseek3_bf16", tmp_path / "m", quantization_config=cfg)
    with pytest.raises(PlanError, match=r"dtype BF16; the model's quantization_config implies F8_E4M3"):
        plan(d)


def test_modules_to_not_convert_keeps_modules_unquantized(tmp_path):
    cfg = {"quant_method": "fp8", "weight_block_size": [16, 32], "modules_to_not_convert": ["model.layers.*"]}
    d = copy_with_config("deepseek3_bf16", tmp_path / "m", quantization_config=cfg)
    p = plan(d)
    assert not any(s.aux for i in p.items for s in i.slabs)


def test_block_size_comes_from_quantization_config(tmp_path):
    cfg = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [32, 32]}
    d = copy_with_config("deepseek3_fp8", tmp_path / "m", quantization_config=cfg)
    with pytest.raises(PlanError, match=r"_scale_inv' in .* has shape \[\d+, \d+\], expected"):
        plan(d)


@pytest.mark.parametrize(
    "qcfg, message",
    [
        ({"quant_method": "gptq"}, r"'gptq' is not supported for deepseek3; deepseek3 supports fp8"),
        ({"quant_method": "fp8"}, r"weight_block_size is None"),
        ({"quant_method": "fp8", "weight_block_size": [16, 32], "fmt": "e5m2"}, r"fmt 'e5m2'"),
    ],
)
def test_unsupported_quantization_configs(tmp_path, qcfg, message):
    d = copy_with_config("deepseek3_fp8", tmp_path / "m", quantization_config=qcfg)
    with pytest.raises(ConfigError, match=message):
        plan(d)


def test_mxfp4_experts_without_quantization_config_are_refused(tmp_path):
    d = copy_with_config("gpt_oss_mxfp4", tmp_path / "m", quantization_config=None)
    with pytest.raises(PlanError, match=r"'model\.layers\.0\.mlp\.experts\.gate_up_proj' .* missing"):
        plan(d)


def test_dense_families_refuse_quantized_checkpoints(tmp_path):
    d = copy_with_config("qwen3_bf16_tied", tmp_path / "m", quantization_config={"quant_method": "fp8"})
    with pytest.raises(ConfigError, match=r"'fp8' is not supported for qwen3"):
        plan(d)


def test_float32_save_keeps_what_the_dequantize_script_wrote():
    """deepseek_dequantize.py rewrites the float32 router bias in bf16 before MaxText converts
    it, so a float32 save of the FP8 checkpoint holds the rounded bias; the bf16 checkpoint
    (read directly by the converter) keeps its float32 bits."""
    name = "decoder.moe_layers.DeepSeekMoeBlock_0.MoeBlock_0.gate.bias"
    bias = np.stack(
        [
            load_raw(os.path.join(FIXTURES, "deepseek3_bf16"))[k][1]
            for k in (
                "model.layers.1.mlp.gate.e_score_correction_bias",
                "model.layers.2.mlp.gate.e_score_correction_bias",
            )
        ],
        axis=1,
    )
    assert bias.dtype == np.float32 and not np.array_equal(bias, bias.astype(BF16).astype(np.float32))
    for fixture, expected in (("deepseek3_fp8", bias.astype(BF16).astype(np.float32)), ("deepseek3_bf16", bias)):
        source = os.path.join(FIXTURES, fixture)
        (item,) = [i for i in plan(source, save="float32").items if i.param == "params.params." + name]
        assert_bitwise_equal(build_region(item, open_source(source)), expected, f"{fixture} {name}")
