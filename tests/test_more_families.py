"""Olmo3, Gemma2, Gemma3 (text and multimodal), Gemma4 (26B/31B, E2B/E4B), Qwen3-Next: the MaxText
tree, layer routing, dtypes, vocabulary padding through row-split work items, and what MaxText
cannot represent.

Values are compared bit-exactly for every fixture x scan x save dtype in test_convert_fixtures.py
(against reference.py, text-only for Gemma3/Gemma4; the vision towers here); the target names
and shapes are written out independently from MaxText's modules (models/olmo3.py,
gemma2.py Gemma2DecoderLayer, gemma3.py Gemma3DecoderLayer / Encoder1DBlock / VisionEmbedder,
gemma4.py Gemma4DecoderLayer / Gemma4MoE / Gemma4ScannableBlock, gemma4_small.py,
gemma4_vision.py, qwen3.py Qwen3NextDecoderLayer / Qwen3NextGatedDeltaNet /
Qwen3NextSparseMoeBlock, layers/decoders.py for the scan structure), for the tiny fixtures and
the real model sizes.
"""

from __future__ import annotations

import json
import os
import re

import ml_dtypes
import numpy as np
import pytest
from conftest import FIXTURES, assert_bitwise_equal, assert_matches_reference, convert, restore_leaves
from helpers_safetensors import fixture_config, fixture_tensors, write_tensors
from reference import expected_leaves

import model_maps
from ckpt_transforms.planning.convert_plan import PlanError, build_plan, item_working_bytes
from ckpt_transforms.planning.specs import ModelMap, ParamRule, expand_targets
from ckpt_transforms.safetensors_io.index import SourceModel, TensorInfo, load_source_model
from ckpt_transforms.storage.sources import open_source
from ckpt_transforms.tensors.ops import AddScalar, PadAxis, ScaleBy, SliceAxis, TruncateAxis
from ckpt_transforms.work_items.convert import build_region
from model_maps.common import ConfigError
from pipelines.options import ConvertOptions

P = "params.params."
BF16 = np.dtype(ml_dtypes.bfloat16)


def map_for(config: dict, model: str | None = None, use_multimodal: bool | None = None) -> ModelMap:
    return model_maps.detect_family(config, model).build(config, use_multimodal=use_multimodal)


def target_shapes(config: dict, scan: bool, **kw) -> dict[str, tuple[int, ...]]:
    return {t.name.removeprefix(P): t.shape for t in expand_targets(map_for(config, **kw), scan)}


def stacked(per_layer: dict, container: str, n: int, scan: bool, cycle: int = 1, sub: str = "layers") -> dict:
    """Scanned: the layer count inserted at axis 1 (param_scan_axis), per cycle position in
    `<container>.<sub>_<b>`; unscanned: `<container>_<i>`."""
    out = {}
    for name, shape in per_layer.items():
        if not scan:
            out |= {f"decoder.{container}_{i}.{name}": shape for i in range(n)}
        elif cycle == 1:
            out[f"decoder.{container}.{name}"] = shape[:1] + (n,) + shape[1:]
        else:
            for b in range(cycle):
                out[f"decoder.{container}.{sub}_{b}.{name}"] = shape[:1] + (n // cycle,) + shape[1:]
    return out


# --------------------------------------------------------------------------- expected trees


def olmo3_tree(c: dict, scan: bool) -> dict:
    h, heads, kv, m = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["intermediate_size"]
    hd = c.get("head_dim") or h // heads
    layer = {
        "attention.query.kernel": (h, heads, hd),
        "attention.key.kernel": (h, kv, hd),
        "attention.value.kernel": (h, kv, hd),
        "attention.out.kernel": (heads, hd, h),
        "attention.query_norm.scale": (heads * hd,),  # GlobalRMSNorm over all heads
        "attention.key_norm.scale": (kv * hd,),
        "mlp.wi_0.kernel": (h, m),
        "mlp.wi_1.kernel": (h, m),
        "mlp.wo.kernel": (m, h),
        "post_self_attention_layer_norm.scale": (h,),
        "post_mlp_layer_norm.scale": (h,),
    }
    top = {
        "token_embedder.embedding": (c["vocab_size"], h),
        "decoder.decoder_norm.scale": (h,),
        "decoder.logits_dense.kernel": (h, c["vocab_size"]),
    }
    return top | stacked(layer, "layers", c["num_hidden_layers"], scan, cycle=4)


def gemma2_tree(c: dict, scan: bool, vocab: int | None = None) -> dict:
    h, heads, kv, hd, m = (
        c[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size")
    )
    layer = {}
    for kind in ("local", "global"):
        layer |= {
            f"self_attention_{kind}.query.kernel": (h, heads, hd),
            f"self_attention_{kind}.key.kernel": (h, kv, hd),
            f"self_attention_{kind}.value.kernel": (h, kv, hd),
            f"self_attention_{kind}.out.kernel": (heads, hd, h),
            f"mlp_{kind}.wi_0.kernel": (h, m),
            f"mlp_{kind}.wi_1.kernel": (h, m),
            f"mlp_{kind}.wo.kernel": (m, h),
        }
        layer |= {
            f"{n}_{kind}.scale": (h,)
            for n in ("pre_self_attention_norm", "post_self_attention_norm", "pre_ffw_norm", "post_ffw_norm")
        }
    top = {"token_embedder.embedding": (vocab or c["vocab_size"], h), "decoder.decoder_norm.scale": (h,)}
    return top | stacked(layer, "layers", c["num_hidden_layers"] // 2, scan)


def gemma3_text_layer(t: dict) -> dict:
    h, heads, kv, hd, m = (
        t[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size")
    )
    return {
        "pre_self_attention_norm.scale": (h,),
        "post_self_attention_norm.scale": (h,),
        "pre_ffw_norm.scale": (h,),
        "post_ffw_norm.scale": (h,),
        "self_attention.query.kernel": (h, heads, hd),
        "self_attention.key.kernel": (h, kv, hd),
        "self_attention.value.kernel": (h, kv, hd),
        "self_attention.out.kernel": (heads, hd, h),
        "self_attention.query_norm.scale": (hd,),
        "self_attention.key_norm.scale": (hd,),
        "mlp.wi_0.kernel": (h, m),
        "mlp.wi_1.kernel": (h, m),
        "mlp.wo.kernel": (m, h),
    }


def gemma3_tree(c: dict, scan: bool, multimodal: bool, vocab: int | None = None) -> dict:
    t = c["text_config"]
    n, layer = t["num_hidden_layers"], gemma3_text_layer(t)
    out = {
        "token_embedder.embedding": (vocab or t["vocab_size"], t["hidden_size"]),
        "decoder.decoder_norm.scale": (t["hidden_size"],),
    }
    if scan:  # 6-layer blocks, then one unscanned remainder block
        whole = n - n % 6
        for b in range(6):
            out |= {f"decoder.layers.layers_{b}.{k}": s[:1] + (whole // 6,) + s[1:] for k, s in layer.items()}
        for r in range(n % 6):
            out |= {f"decoder.layers_remainder.layers_{r}.{k}": s for k, s in layer.items()}
    else:
        out |= stacked(layer, "layers", n, False)
    if multimodal:
        v = c["vision_config"]
        w, heads, mlp, p = v["hidden_size"], v["num_attention_heads"], v["intermediate_size"], v["patch_size"]
        hd, ve = w // heads, "vision_encoder.Gemma3VisionEncoderLayer_0."
        out |= {
            ve + "embedding.kernel": (p, p, v.get("num_channels", 3), w),
            ve + "embedding.bias": (w,),
            ve + "pos_embedding": (1, (v["image_size"] // p) ** 2, w),
            ve + "Transformer.encoder_norm.scale": (w,),
            ve + "Transformer.encoder_norm.bias": (w,),
            "vision_encoder.VisionEmbedder_0.mm_input_projection.w": (w, t["hidden_size"]),
            "vision_encoder.VisionEmbedder_0.mm_soft_embedding_norm.scale": (w,),
        }
        for i in range(v["num_hidden_layers"]):
            b = f"{ve}Transformer.encoderblock_{i}."
            a = b + "MultiHeadDotProductAttention_0."
            out |= {b + f"LayerNorm_{j}.{x}": (w,) for j in (0, 1) for x in ("scale", "bias")}
            out |= {a + f"{q}.kernel": (w, heads, hd) for q in ("query", "key", "value")}
            out |= {a + f"{q}.bias": (heads, hd) for q in ("query", "key", "value")}
            out |= {a + "out.kernel": (heads, hd, w), a + "out.bias": (w,)}
            out |= {b + "MlpBlockViT_0.Dense_0.kernel": (w, mlp), b + "MlpBlockViT_0.Dense_0.bias": (mlp,)}
            out |= {b + "MlpBlockViT_0.Dense_1.kernel": (mlp, w), b + "MlpBlockViT_0.Dense_1.bias": (w,)}
    return out


def qwen3_next_tree(c: dict, scan: bool) -> dict:
    h, heads, kv, hd, n = (
        c[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "num_hidden_layers")
    )
    e, m, sm = c["num_experts"], c["moe_intermediate_size"], c["shared_expert_intermediate_size"]
    kh, vh, kd, vd = (
        c[k] for k in ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim")
    )
    cycle = c.get("full_attention_interval") or c["layer_types"].index("full_attention") + 1
    common = {
        "input_layernorm.scale": (h,),
        "post_attention_layernorm.scale": (h,),
        "mlp.routed_experts.gate.kernel": (h, e),
        "mlp.routed_experts.wi_0": (e, h, m),
        "mlp.routed_experts.wi_1": (e, h, m),
        "mlp.routed_experts.wo": (e, m, h),
        "mlp.shared_expert.wi_0.kernel": (h, sm),
        "mlp.shared_expert.wi_1.kernel": (h, sm),
        "mlp.shared_expert.wo.kernel": (sm, h),
        "mlp.shared_expert_gate.kernel": (h, 1),
    }
    a = "attention.attention."
    full = common | {
        a + "query.kernel": (h, heads, 2 * hd),  # query and its output gate
        a + "key.kernel": (h, kv, hd),
        a + "value.kernel": (h, kv, hd),
        # Flat, not split into heads: MaxText's to_maxtext writes [heads*head_dim, (layers,) emb]
        # and its model (attentions.py init_out_w, qwen3 hybrid) restores only that rank.
        a + "out.kernel": (heads * hd, h),
        a + "query_norm.scale": (hd,),
        a + "key_norm.scale": (hd,),
    }
    linear = common | {
        "attention.in_proj_qkvz.kernel": (h, 2 * kh * kd + 2 * vh * vd),
        "attention.in_proj_ba.kernel": (h, 2 * vh),
        "attention.conv1d.kernel": (c["linear_conv_kernel_dim"], 1, 2 * kh * kd + vh * vd),
        "attention.A_log": (vh,),
        "attention.dt_bias": (vh,),
        "attention.norm.rms_norm.scale": (vd,),
        "attention.out_proj.kernel": (vh * vd, h),
    }
    out = {
        "token_embedder.embedding": (c["vocab_size"], h),
        "decoder.decoder_norm.scale": (h,),
        "decoder.logits_dense.kernel": (h, c["vocab_size"]),
    }
    for i in range(cycle if scan else n):
        layer = full if (i % cycle + 1) % cycle == 0 else linear
        for name, shape in layer.items():
            if scan:
                out[f"decoder.layers.layer_{i}.{name}"] = shape[:1] + (n // cycle,) + shape[1:]
            else:
                out[f"decoder.layers_{i}.{name}"] = shape
    return out


TINY = {
    "olmo3_bf16": lambda c, s: olmo3_tree(c, s),
    "gemma2_bf16": lambda c, s: gemma2_tree(c, s),
    "gemma2_f32": lambda c, s: gemma2_tree(c, s),
    "gemma3_mm_bf16": lambda c, s: gemma3_tree(c, s, multimodal=False),
    "qwen3_next_bf16": lambda c, s: qwen3_next_tree(c, s),
}


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unscan"])
@pytest.mark.parametrize("name", sorted(TINY))
def test_fixture_targets_match_maxtext_modules(name, scan):
    cfg = fixture_config(name)
    assert target_shapes(cfg, scan) == TINY[name](cfg, scan)


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unscan"])
def test_gemma3_multimodal_tree(scan):
    cfg = fixture_config("gemma3_mm_bf16")
    assert target_shapes(cfg, scan, use_multimodal=True) == gemma3_tree(cfg, scan, multimodal=True)


# Real sizes, as the official config.json files (and MaxText's hf_model_configs.py) give them.
GEMMA2_9B = {
    "architectures": ["Gemma2ForCausalLM"],
    "model_type": "gemma2",
    "hidden_size": 3584,
    "intermediate_size": 14336,
    "num_hidden_layers": 42,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 256,
    "vocab_size": 256000,
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
}
GEMMA2_2B = GEMMA2_9B | {
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
}
GEMMA2_27B = GEMMA2_9B | {
    "hidden_size": 4608,
    "intermediate_size": 36864,
    "num_hidden_layers": 46,
    "num_attention_heads": 32,
    "num_key_value_heads": 16,
    "head_dim": 128,
}
# The official gemma-3-4b-it config.json lists only what differs from transformers' defaults.
GEMMA3_4B = {
    "architectures": ["Gemma3ForConditionalGeneration"],
    "model_type": "gemma3",
    "mm_tokens_per_image": 256,
    "text_config": {
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "model_type": "gemma3_text",
        "num_hidden_layers": 34,
        "sliding_window": 1024,
    },
    "vision_config": {
        "hidden_size": 1152,
        "image_size": 896,
        "intermediate_size": 4304,
        "model_type": "siglip_vision_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 27,
        "patch_size": 14,
        "vision_use_head": False,
    },
}
GEMMA3_27B = GEMMA3_4B | {
    "text_config": {
        "hidden_size": 5376,
        "intermediate_size": 21504,
        "model_type": "gemma3_text",
        "num_hidden_layers": 62,
        "num_attention_heads": 32,
        "num_key_value_heads": 16,
        "head_dim": 128,
    },
}
GEMMA3_DEFAULTS = {"vocab_size": 262208, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256}
OLMO3_7B = {
    "architectures": ["Olmo3ForCausalLM"],
    "model_type": "olmo3",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 100278,
    "tie_word_embeddings": False,
}
OLMO3_32B = OLMO3_7B | {
    "hidden_size": 5120,
    "intermediate_size": 27648,
    "num_hidden_layers": 64,
    "num_attention_heads": 40,
    "num_key_value_heads": 8,
}
QWEN3_NEXT_80B = {
    "architectures": ["Qwen3NextForCausalLM"],
    "model_type": "qwen3_next",
    "hidden_size": 2048,
    "intermediate_size": 5120,
    "num_hidden_layers": 48,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "head_dim": 256,
    "vocab_size": 151936,
    "num_experts": 512,
    "num_experts_per_tok": 10,
    "moe_intermediate_size": 512,
    "shared_expert_intermediate_size": 512,
    "full_attention_interval": 4,
    "linear_num_key_heads": 16,
    "linear_num_value_heads": 32,
    "linear_key_head_dim": 128,
    "linear_value_head_dim": 128,
    "linear_conv_kernel_dim": 4,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "tie_word_embeddings": False,
}


def with_text_defaults(c: dict) -> dict:
    return c | {"text_config": GEMMA3_DEFAULTS | c["text_config"]}


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unscan"])
@pytest.mark.parametrize(
    "config, expected",
    [
        (GEMMA2_2B, lambda c, s: gemma2_tree(c, s, vocab=256128)),
        (GEMMA2_9B, lambda c, s: gemma2_tree(c, s, vocab=256128)),
        (GEMMA2_27B, lambda c, s: gemma2_tree(c, s, vocab=256128)),
        (GEMMA3_4B, lambda c, s: gemma3_tree(with_text_defaults(c), s, multimodal=False, vocab=262144)),
        (GEMMA3_27B, lambda c, s: gemma3_tree(with_text_defaults(c), s, multimodal=False, vocab=262144)),
        (OLMO3_7B, olmo3_tree),
        (OLMO3_32B, olmo3_tree),
        (QWEN3_NEXT_80B, qwen3_next_tree),
    ],
    ids=[
        "gemma2-2b",
        "gemma2-9b",
        "gemma2-27b",
        "gemma3-4b",
        "gemma3-27b",
        "olmo3-7b",
        "olmo3-32b",
        "qwen3-next-80b-a3b",
    ],
)
def test_real_model_targets(config, expected, scan):
    assert target_shapes(config, scan) == expected(config, scan)


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unscan"])
def test_real_gemma3_multimodal_targets(scan):
    shapes = target_shapes(GEMMA3_4B, scan, use_multimodal=True)
    assert shapes == gemma3_tree(with_text_defaults(GEMMA3_4B), scan, multimodal=True, vocab=262144)
    ve = "vision_encoder.Gemma3VisionEncoderLayer_0."
    assert shapes[ve + "embedding.kernel"] == (14, 14, 3, 1152)
    assert shapes[ve + "pos_embedding"] == (1, 4096, 1152)
    assert shapes[ve + "Transformer.encoderblock_26.MultiHeadDotProductAttention_0.query.kernel"] == (1152, 16, 72)


def test_headline_shapes():
    g3 = target_shapes(GEMMA3_4B, True)
    assert g3["decoder.layers.layers_5.self_attention.query.kernel"] == (2560, 5, 8, 256)  # 34 = 5 * 6 + 4
    assert g3["decoder.layers_remainder.layers_3.mlp.wo.kernel"] == (10240, 2560)
    assert "decoder.layers_remainder.layers_4.mlp.wo.kernel" not in g3
    q3n = target_shapes(QWEN3_NEXT_80B, True)
    assert q3n["decoder.layers.layer_3.attention.attention.query.kernel"] == (2048, 12, 16, 512)
    assert q3n["decoder.layers.layer_0.mlp.routed_experts.wi_0"] == (512, 12, 2048, 512)
    assert q3n["decoder.layers.layer_2.attention.conv1d.kernel"] == (4, 12, 1, 8192)
    assert q3n["decoder.layers.layer_3.attention.attention.out.kernel"] == (4096, 12, 2048)
    assert target_shapes(QWEN3_NEXT_80B, False)["decoder.layers_7.attention.attention.out.kernel"] == (4096, 2048)
    assert target_shapes(GEMMA2_9B, True)["decoder.layers.mlp_global.wi_0.kernel"] == (3584, 21, 14336)


# --------------------------------------------------------------------------- which HF layer feeds which slab


def targets_of(config: dict, scan: bool, **kw) -> dict:
    return {t.name.removeprefix(P): t for t in expand_targets(map_for(config, **kw), scan)}


def test_gemma2_pairs_even_hf_layers_local_and_odd_global():
    cfg = fixture_config("gemma2_bf16")  # 4 HF layers -> 2 MaxText layers
    scanned = targets_of(cfg, True)
    local = scanned["decoder.layers.self_attention_local.query.kernel"].hf_keys
    glob = scanned["decoder.layers.self_attention_global.query.kernel"].hf_keys
    assert local == ("model.layers.0.self_attn.q_proj.weight", "model.layers.2.self_attn.q_proj.weight")
    assert glob == ("model.layers.1.self_attn.q_proj.weight", "model.layers.3.self_attn.q_proj.weight")
    unscanned = targets_of(cfg, False)
    assert unscanned["decoder.layers_1.pre_ffw_norm_local.scale"].hf_keys == (
        "model.layers.2.pre_feedforward_layernorm.weight",
    )
    assert unscanned["decoder.layers_1.post_ffw_norm_global.scale"].hf_keys == (
        "model.layers.3.post_feedforward_layernorm.weight",
    )


def test_gemma3_blocks_and_remainder_route_hf_layers():
    cfg = fixture_config("gemma3_mm_bf16")  # 8 layers: one 6-layer block + 2 remainder layers
    t = targets_of(cfg, True)
    assert t["decoder.layers.layers_4.mlp.wo.kernel"].hf_keys == ("language_model.model.layers.4.mlp.down_proj.weight",)
    assert t["decoder.layers_remainder.layers_1.mlp.wo.kernel"].hf_keys == (
        "language_model.model.layers.7.mlp.down_proj.weight",
    )
    assert t["decoder.layers_remainder.layers_1.mlp.wo.kernel"].stack_axes == ()


def test_olmo3_cycle_routes_every_fourth_layer():
    t = targets_of(fixture_config("olmo3_bf16"), True)  # 8 layers
    assert t["decoder.layers.layers_3.attention.key_norm.scale"].hf_keys == (
        "model.layers.3.self_attn.k_norm.weight",
        "model.layers.7.self_attn.k_norm.weight",
    )


def test_qwen3_next_positions_choose_attention_kind():
    cfg = fixture_config("qwen3_next_bf16")  # 8 layers, full attention at 3 and 7
    t = targets_of(cfg, True)
    assert t["decoder.layers.layer_3.attention.attention.out.kernel"].hf_keys == (
        "model.layers.3.self_attn.o_proj.weight",
        "model.layers.7.self_attn.o_proj.weight",
    )
    assert t["decoder.layers.layer_1.attention.A_log"].hf_keys == (
        "model.layers.1.linear_attn.A_log",
        "model.layers.5.linear_attn.A_log",
    )
    wi = t["decoder.layers.layer_2.mlp.routed_experts.wi_1"]
    assert wi.stack_axes == (0, 1) and wi.hf_key_at((3, 1)) == "model.layers.6.mlp.experts.3.up_proj.weight"
    u = targets_of(cfg, False)
    assert (
        "decoder.layers_6.attention.in_proj_qkvz.kernel" in u
        and "decoder.layers_7.attention.in_proj_qkvz.kernel" not in u
    )
    # older config.json files give the cycle as full_attention_interval instead of layer_types
    older = {k: v for k, v in cfg.items() if k != "layer_types"} | {"full_attention_interval": 4}
    assert target_shapes(older, True) == target_shapes(cfg, True)


@pytest.mark.parametrize(
    "scan, name, shape",
    [
        (True, "decoder.layers.layer_3.attention.attention.out.kernel", (64, 2, 32)),
        (False, "decoder.layers_3.attention.attention.out.kernel", (64, 32)),
        (False, "decoder.layers_7.attention.attention.out.kernel", (64, 32)),
    ],
    ids=["scan", "unscan-3", "unscan-7"],
)
def test_qwen3_next_out_kernel_is_flat_as_maxtext_writes_it(scan, name, shape, tmp_path):
    """Issue 14: the shapes MaxText's own to_maxtext wrote for this fixture (4 heads x head_dim
    16 = 64, 2 full-attention layers, emb 32); ckptbeam wrote [heads, layers, head_dim, emb],
    which MaxText refused to restore (`Checkpoint rank mismatches`). Values: o_proj transposed."""
    convert(os.path.join(FIXTURES, "qwen3_next_bf16"), str(tmp_path / "out"), "--scan_layers", str(scan).lower())
    got = restore_leaves(str(tmp_path / "out"))[P + name]
    assert got.shape == shape
    t = fixture_tensors("qwen3_next_bf16")
    layers = (3, 7) if scan else (int(name.split("_")[1].split(".")[0]),)
    want = np.stack([t[f"model.layers.{i}.self_attn.o_proj.weight"].T for i in layers], axis=1)
    assert_bitwise_equal(got, want if scan else want[:, 0], name)


def test_qwen3_next_mtp_head_is_a_known_extra():
    sm = load_source_model(open_source(os.path.join(FIXTURES, "qwen3_next_bf16")))
    plan = build_plan(sm, map_for(sm.config), True)
    assert plan.unused_source_keys == ["mtp.fc.weight", "mtp.norm.weight"]


# --------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("fixture", ["gemma2_bf16", "gemma2_f32", "gemma3_mm_bf16"])
def test_gemma_norms_are_float32_leaves_in_a_bf16_save(fixture):
    """MaxText's eager loader hands its hooks bf16 numpy arrays; `x + 1.0` returns float32 there."""
    sm = load_source_model(open_source(os.path.join(FIXTURES, fixture)))
    plan = build_plan(sm, map_for(sm.config, use_multimodal=fixture.startswith("gemma3") or None), True)
    dtypes = {a.name: a.dtype for a in plan.arrays}
    for name, dtype in dtypes.items():
        is_norm = re.search(r"norm(_local|_global)?\.scale$", name) and "encoder_norm" not in name
        is_layer_norm = ".LayerNorm_" in name
        assert dtype == ("float32" if is_norm and not is_layer_norm else "bfloat16"), name
    assert all(i.save_dtype == dtypes[i.param] for i in plan.items)


@pytest.mark.parametrize("start, stop", [(0, 3), (3, 6), (2, 5)])
def test_slice_axis_and_its_inverse(start, stop):
    x = np.arange(2 * 6 * 4).reshape(2, 6, 4)
    op = SliceAxis(1, start, stop, 6)
    y = op.apply(x)
    assert y.shape == op.output_shape(x.shape) == (2, stop - start, 4)
    np.testing.assert_array_equal(y, x[:, start:stop])
    back = op.inverse()
    assert back.output_shape(y.shape) == x.shape and back.inverse() == op
    np.testing.assert_array_equal(op.apply(back.apply(y)), y)
    halves = [SliceAxis(1, 0, 3, 6), SliceAxis(1, 3, 6, 6)]  # Gemma4's wi_0 / wi_1 put back make gate_up_proj
    np.testing.assert_array_equal(sum(h.inverse().apply(h.apply(x)) for h in halves), x)
    assert op.map_axis(1, 3) is None and op.map_axis(0, 3) == 0


def test_add_scalar_and_scale_by_follow_numpy_on_maxtext_arrays():
    x = (np.random.default_rng(0).standard_normal(257) * 3).astype(BF16)
    plus = AddScalar(1.0).apply(x)
    literal = x + 1.0  # what MaxText's hook computes
    assert plus.dtype == literal.dtype == np.float32 and np.array_equal(plus, literal)
    assert AddScalar(1.0).inverse().apply(plus).astype(BF16).tobytes() == x.tobytes()
    s32, s16 = np.float32(3584**0.5), np.dtype("bfloat16").type(2560**0.5)
    assert ScaleBy(float(s32)).apply(x).tobytes() == (x * s32).astype(x.dtype).tobytes()
    assert ScaleBy(float(s16)).apply(x).tobytes() == (x * s16).astype(x.dtype).tobytes()
    f = x.astype(np.float32)
    assert ScaleBy(float(s16)).apply(f).tobytes() == (f * s16).astype(f.dtype).tobytes()
    assert ScaleBy(2.0).inverse() == ScaleBy(2.0, divide=True)


# --------------------------------------------------------------------------- vocabulary padding


def embedding_only(rows: int, hidden: int, ops, dtype: str = "BF16") -> tuple[SourceModel, ModelMap]:
    info = TensorInfo(
        "embed", "model.safetensors", dtype, (rows, hidden), 0, rows * hidden * (2 if dtype == "BF16" else 4)
    )
    mm = ModelMap("synthetic", 0, (ParamRule("token_embedder/embedding", "embed", (rows, hidden), ops),), ())
    return SourceModel("mem://x", {}, {"embed": info}, ["model.safetensors"], {}), mm


def test_real_gemma2_9b_embedding_is_row_split_and_padded():
    """256000 x 3584 bf16 (1.8 GB) padded to 256128 rows: bounded, chunk-aligned items that read
    each existing row once and only existing rows."""
    (embed_rule, _) = map_for(GEMMA2_9B).global_rules
    sm, mm = embedding_only(256000, 3584, embed_rule.ops)
    budget = 256 * 2**20
    plan = build_plan(sm, mm, True, "bfloat16", budget)
    (array,) = plan.arrays
    assert array.shape == (256128, 3584) and array.chunk_shape[1] == 3584 and array.chunk_shape[0] < 256128
    rows = array.chunk_shape[0]
    read = []
    for item in plan.items:
        (lo, hi), _ = item.region
        assert lo % rows == 0 and (hi % rows == 0 or hi == 256128)
        assert item_working_bytes(item) <= budget
        (slab,) = item.slabs
        assert slab.source.length > 0
        pads = [op for op in item.ops if isinstance(op, PadAxis)]
        if hi <= 256000:
            assert not pads and slab.source.shape == (hi - lo, 3584)
            read.append((lo, hi))
        else:
            assert pads == [PadAxis(0, hi - lo, 256000 - lo)]
            read.append((lo, 256000))
    assert sorted(read) == [(a, min(a + rows, 256000)) for a in range(0, 256000, rows)]


@pytest.mark.parametrize(
    "target_rows, budget",
    [(16, 10_000), (16, 100), (16, 60), (7, 60), (7, 10_000), (10, 60)],
    ids=["pad-one-item", "pad-split", "pad-split-fully-padded-items", "truncate-split", "truncate-one-item", "same"],
)
def test_padded_and_truncated_row_split_items_execute_to_the_padded_array(tmp_path, target_rows, budget):
    rng = np.random.default_rng(1)
    emb = rng.standard_normal((10, 3)).astype(np.float32)
    write_tensors(tmp_path / "model.safetensors", {"embed": emb})
    (tmp_path / "config.json").write_text("{}")
    source = open_source(str(tmp_path))
    info = load_source_model_from_dir(tmp_path).tensors["embed"]
    resize = (
        (PadAxis(0, target_rows, 10),)
        if target_rows > 10
        else (TruncateAxis(0, target_rows, 10),)
        if target_rows < 10
        else ()
    )
    ops = resize + (ScaleBy(2.0),)
    sm = SourceModel("x", {}, {"embed": info}, ["model.safetensors"], {})
    mm = ModelMap("synthetic", 0, (ParamRule("token_embedder/embedding", "embed", (10, 3), ops),), ())
    plan = build_plan(sm, mm, True, "bfloat16", budget)
    out = np.full((target_rows, 3), np.nan, BF16)
    for item in plan.items:
        assert all(s.source.length > 0 for s in item.slabs)
        out[tuple(slice(a, b) for a, b in item.region)] = build_region(item, source)
    expected = np.zeros((max(target_rows, 10), 3), BF16)
    expected[:10] = (emb.astype(BF16).astype(np.float32) * 2).astype(BF16)
    assert_bitwise_equal(out, expected[:target_rows], "embedding")
    if budget == 60:
        assert len(plan.items) > 3
    if target_rows == 16 and budget == 60:  # some regions lie wholly in the padding: one row read, dropped
        assert any(TruncateAxis(0, 0, 1) in item.ops for item in plan.items)


def load_source_model_from_dir(path) -> SourceModel:
    return load_source_model(open_source(str(path)))


def test_real_gemma3_embedding_is_cut_to_maxtexts_vocab():
    (embed_rule, _) = map_for(GEMMA3_4B).global_rules
    sm, mm = embedding_only(262208, 2560, embed_rule.ops)
    plan = build_plan(sm, mm, True, "bfloat16", 256 * 2**20)
    assert plan.arrays[0].shape == (262144, 2560)
    last = max(plan.items, key=lambda i: i.region[0][1])
    assert last.region[0][1] == 262144 and last.slabs[0].source.shape[0] == 262144 - last.region[0][0]
    assert sum(s.source.length for i in plan.items for s in i.slabs) == 262144 * 2560 * 2  # rows past 262144 unread


def test_tiny_vocabularies_are_kept():
    """Only the official vocabularies map to MaxText's padded/cut sizes; others keep theirs."""
    assert target_shapes(fixture_config("gemma2_bf16"), True)["token_embedder.embedding"] == (250, 64)
    assert target_shapes(GEMMA2_9B | {"vocab_size": 256001}, True)["token_embedder.embedding"] == (256001, 3584)


# --------------------------------------------------------------------------- Gemma3: text only vs multimodal, key spellings


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unscan"])
@pytest.mark.parametrize("fixture", ["gemma3_mm_bf16", "gemma4_moe_bf16"])
def test_multimodal_converts_vision_tower(fixture, scan, out_dir):
    source = os.path.join(FIXTURES, fixture)
    convert(source, out_dir, f"--scan_layers={str(scan).lower()}", "--use_multimodal=true")
    expected = expected_leaves(source, scan, "bfloat16", use_multimodal=True)
    assert any(".vision_encoder." in k for k in expected)
    assert_matches_reference(out_dir, source, scan, use_multimodal=True)


def test_gemma3_text_only_ignores_vision_and_multimodal_adds_it():
    sm = load_source_model(open_source(os.path.join(FIXTURES, "gemma3_mm_bf16")))
    text = build_plan(sm, map_for(sm.config), True)
    mm = build_plan(sm, map_for(sm.config, use_multimodal=True), True)
    vision_keys = sorted(k for k in sm.tensors if not k.startswith("language_model."))
    assert vision_keys and text.unused_source_keys == vision_keys and mm.unused_source_keys == []
    text_names = {a.name for a in text.arrays}
    assert text_names < {a.name for a in mm.arrays}
    assert not any("vision_encoder" in n for n in text_names)


@pytest.mark.parametrize(
    "renames",
    [
        # MaxText's mapping names (transformers' in-memory names)
        {
            "language_model.model.": "model.language_model.",
            "vision_tower.": "model.vision_tower.vision_model.",
            "multi_modal_projector.": "model.multi_modal_projector.",
        },
        # the official checkpoints' names
        {"vision_tower.": "vision_tower.vision_model."},
    ],
    ids=["maxtext-names", "official-names"],
)
def test_gemma3_reads_either_key_spelling(tmp_path, renames):
    tensors = {}
    for key, value in fixture_tensors("gemma3_mm_bf16").items():
        prefix = next((p for p in renames if key.startswith(p)), None)
        tensors[renames[prefix] + key[len(prefix) :] if prefix else key] = value
    write_tensors(tmp_path / "model.safetensors", tensors, {"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(fixture_config("gemma3_mm_bf16")))
    sm = load_source_model_from_dir(tmp_path)
    original = load_source_model_from_dir(os.path.join(FIXTURES, "gemma3_mm_bf16"))
    a = build_plan(sm, map_for(sm.config, use_multimodal=True), True)
    b = build_plan(original, map_for(original.config, use_multimodal=True), True)
    assert a.unused_source_keys == [] and [x.name for x in a.arrays] == [x.name for x in b.arrays]
    for ia, ib in zip(a.items, b.items, strict=True):
        assert [s.source.length for s in ia.slabs] == [s.source.length for s in ib.slabs]
        assert all(s.source.key in tensors for s in ia.slabs)


def test_gemma3_missing_key_names_every_spelling_tried(tmp_path):
    tensors = fixture_tensors("gemma3_mm_bf16")
    del tensors["language_model.model.norm.weight"]
    write_tensors(tmp_path / "model.safetensors", tensors, {"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(fixture_config("gemma3_mm_bf16")))
    sm = load_source_model_from_dir(tmp_path)
    with pytest.raises(
        PlanError, match=r"'language_model\.model\.norm\.weight'.*also looked for 'model\.language_model\.norm\.weight'"
    ):
        build_plan(sm, map_for(sm.config), True)


def test_use_multimodal_is_an_option_defaulting_to_maxtexts_false():
    assert ConvertOptions(["--source", "s", "--output", "o"]).use_multimodal is False
    assert ConvertOptions(["--use_multimodal"]).use_multimodal is True
    assert ConvertOptions(["--use_multimodal=false"]).use_multimodal is False


# --------------------------------------------------------------------------- configs MaxText cannot represent


@pytest.mark.parametrize(
    "name, change, message",
    [
        ("gemma2_bf16", {"num_hidden_layers": 3, "layer_types": None}, "pairs a local and a global"),
        ("gemma2_bf16", {"tie_word_embeddings": False}, "tie_word_embeddings is false"),
        ("gemma2_bf16", {"layer_types": ["full_attention", "sliding_attention"] * 2}, "layer_types"),
        ("olmo3_bf16", {"tie_word_embeddings": True}, "untied logits_dense"),
        ("olmo3_bf16", {"layer_types": ["sliding_attention"] * 8}, "layer_types"),
        ("qwen3_next_bf16", {"mlp_only_layers": [2]}, "mlp_only_layers"),
        ("qwen3_next_bf16", {"layer_types": ["linear_attention"] * 8}, "no full_attention"),
        (
            "qwen3_next_bf16",
            {"layer_types": ["linear_attention", "full_attention"] * 2 + ["linear_attention"] * 4},
            "layer_types",
        ),
        ("gemma3_mm_bf16", {"tie_word_embeddings": False}, "tie_word_embeddings is false"),
    ],
)
def test_unrepresentable_configs_are_config_errors(name, change, message):
    cfg = fixture_config(name) | change
    with pytest.raises(ConfigError, match=re.escape(message)):
        map_for(cfg)


def test_use_multimodal_needs_a_vision_tower():
    with pytest.raises(ConfigError, match="no vision tower"):
        map_for(fixture_config("olmo3_bf16"), use_multimodal=True)
    text_only = fixture_config("gemma3_mm_bf16")["text_config"] | {"architectures": ["Gemma3ForCausalLM"]}
    with pytest.raises(ConfigError, match="vision_config"):
        map_for(text_only, use_multimodal=True)
    assert target_shapes(text_only, False) == {
        k: v for k, v in gemma3_tree(fixture_config("gemma3_mm_bf16"), False, False).items()
    }


def test_olmo3_partial_cycle_scans_only_unscanned():
    cfg = fixture_config("olmo3_bf16") | {"num_hidden_layers": 6, "layer_types": None}
    assert "decoder.layers_5.mlp.wo.kernel" in target_shapes(cfg, False)
    with pytest.raises(ValueError, match="whole 4-layer cycles"):
        target_shapes(cfg, True)


@pytest.mark.parametrize(
    "model, family",
    [
        ("gemma2-9b", "gemma2"),
        ("gemma3-4b", "gemma3"),
        ("olmo3-32b", "olmo3"),
        ("olmo3-7b-pt", "olmo3"),
        ("qwen3-next-80b-a3b", "qwen3_next"),
        ("gemma4-26b", "gemma4"),
        ("gemma4-e4b", "gemma4_small"),
    ],
)
def test_maxtext_model_names_are_aliases(model, family):
    assert model_maps.detect_family({}, model).name == family


def test_budget_splits_new_families_into_bounded_items():
    for name in TINY:
        sm = load_source_model_from_dir(os.path.join(FIXTURES, name))
        for scan in (True, False):
            plan = build_plan(sm, map_for(sm.config), scan, "bfloat16", 20_000)
            assert all(item_working_bytes(i) <= 20_000 for i in plan.items)
            covered = {a.name: np.zeros(a.shape, np.int8) for a in plan.arrays}
            for item in plan.items:
                covered[item.param][tuple(slice(a, b) for a, b in item.region)] += 1
            assert all((c == 1).all() for c in covered.values()), name


# --------------------------------------------------------------------------- Gemma4


def gemma4_layer(t: dict, i: int) -> dict:
    """One MaxText Gemma4(Small)DecoderLayer's params, written out from models/gemma4*.py."""
    h, heads, kv, hd, m = (
        t[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size")
    )
    ple, n = t.get("hidden_size_per_layer_input") or 0, t["num_hidden_layers"]
    shared_from = n - (t.get("num_kv_shared_layers") or 0)
    is_global = t["layer_types"][i] == "full_attention"
    if is_global:
        hd = t.get("global_head_dim", 512)
        kv = (t.get("num_global_key_value_heads") if t.get("attention_k_eq_v") else None) or kv
    shared = (ple or t.get("num_kv_shared_layers")) and i >= shared_from
    a = "self_attention."
    out = {
        f"{x}.scale": (h,)
        for x in ("pre_self_attention_norm", "post_self_attention_norm", "pre_ffw_norm", "post_ffw_norm")
    }
    out |= {
        "layer_scalar": (1,),
        a + "query.kernel": (h, heads, hd),
        a + "out.kernel": (heads, hd, h),
        a + "query_norm.scale": (hd,),
    }
    if not shared:
        out |= {a + "key.kernel": (h, kv, hd), a + "key_norm.scale": (hd,)}
        if not (is_global and t.get("attention_k_eq_v")):
            out[a + "value.kernel"] = (h, kv, hd)
    if shared and t.get("use_double_wide_mlp"):
        m *= 2
    if (t.get("num_experts") or 1) > 1:
        e, f, b = t["num_experts"], t["moe_intermediate_size"], "mlp.moe_block."
        out |= {
            b + "MoeBlock_0.gate.kernel": (h, e),
            b + "MoeBlock_0.wi_0": (e, h, f),
            b + "MoeBlock_0.wi_1": (e, h, f),
            b + "MoeBlock_0.wo": (e, f, h),
            b + "MoeBlock_0.per_expert_scale": (e,),
            b + "shared_experts.wi_0.kernel": (h, m),
            b + "shared_experts.wi_1.kernel": (h, m),
            b + "shared_experts.wo.kernel": (m, h),
            "mlp.pre_forward_scale_2": (h,),
            "mlp.pre_feedforward_layernorm_2.scale": (h,),
            "mlp.post_feedforward_layernorm_1.scale": (h,),
            "mlp.post_feedforward_layernorm_2.scale": (h,),
        }
    else:
        out |= {"mlp.wi_0.kernel": (h, m), "mlp.wi_1.kernel": (h, m), "mlp.wo.kernel": (m, h)}
    if ple:
        out |= {
            "per_layer_input_gate.kernel": (h, ple),
            "per_layer_projection.kernel": (ple, h),
            "post_per_layer_input_norm.scale": (h,),
        }
    return out


def gemma4_tree(c: dict, scan: bool, multimodal: bool = False) -> dict:
    t = c["text_config"]
    h, n, ple = t["hidden_size"], t["num_hidden_layers"], t.get("hidden_size_per_layer_input") or 0
    out = {"token_embedder.embedding": (t["vocab_size"], h), "decoder.decoder_norm.scale": (h,)}
    if ple:
        p = "decoder.per_layer_embedder."
        out |= {
            p + "embed_tokens_per_layer": (t["vocab_size_per_layer_input"], n * ple),
            p + "per_layer_model_projection.kernel": (h, n * ple),
            p + "per_layer_projection_norm.scale": (ple,),
        }
    if not scan:
        for i in range(n):
            out |= {f"decoder.layers_{i}.{k}": s for k, s in gemma4_layer(t, i).items()}
    else:  # blocks of 6: local_layers [block][local] at axes 1, 2; global_layer [block] at axis 1
        blocks = n // 6
        out |= {
            f"decoder.scanned_blocks.local_layers.{k}": s[:1] + (blocks, 5) + s[1:]
            for k, s in gemma4_layer(t, 0).items()
        }
        out |= {
            f"decoder.scanned_blocks.global_layer.{k}": s[:1] + (blocks,) + s[1:] for k, s in gemma4_layer(t, 5).items()
        }
    if multimodal:
        v = c["vision_config"]
        w, heads, m, p = v["hidden_size"], v["num_attention_heads"], v["intermediate_size"], v["patch_size"]
        ve = "vision_encoder.Gemma4VisionEncoderLayer_0."
        out |= {
            ve + "vision_entry.input_projection.kernel": (p * p * 3, w),
            ve + "vision_entry.pos_emb_param": (v["position_embedding_size"], 2, w),
            ve + "std_scale": (w,),
            ve + "std_bias": (w,),
            "vision_encoder.Gemma4VisionProjector_0.projection.kernel": (w, h),
        }
        for i in range(v["num_hidden_layers"]):
            b = f"{ve}layer_{i}."
            out |= {b + f"attention.{q}.kernel": (w, heads, w // heads) for q in ("query", "key", "value")}
            out |= {b + "attention.out.kernel": (heads, w // heads, w)}
            out |= {b + f"attention.{q}_norm.scale": (w // heads,) for q in ("query", "key")}
            out |= {
                b + f"{x}.scale": (w,)
                for x in ("pre_attention_norm", "post_attention_norm", "pre_ffw_norm", "post_ffw_norm")
            }
            out |= {b + "mlp.wi_0.kernel": (w, m), b + "mlp.wi_1.kernel": (w, m), b + "mlp.wo.kernel": (m, w)}
    return out


def official_gemma4(c: dict) -> dict:
    """The fixture's config in the official files' spelling (global_head_dim, num_global_key_value_heads)."""
    t = dict(c["text_config"])
    plc = t.pop("per_layer_config", None) or {}
    o = next(iter(plc.values()), {})
    t["global_head_dim"] = o.get("head_dim", 512)
    if "num_key_value_heads" in o:
        t["num_global_key_value_heads"] = o["num_key_value_heads"]
    return c | {"text_config": t}


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unscan"])
@pytest.mark.parametrize("name", ["gemma4_moe_bf16", "gemma4_dense_bf16"])
def test_gemma4_fixture_targets(name, scan):
    cfg = fixture_config(name)
    expected = gemma4_tree(official_gemma4(cfg), scan)
    assert target_shapes(cfg, scan) == expected
    assert target_shapes(official_gemma4(cfg), scan) == expected  # either config.json spelling


def test_gemma4_small_fixture_targets_unscanned_only():
    cfg = fixture_config("gemma4_small_bf16")
    assert target_shapes(cfg, False) == gemma4_tree(official_gemma4(cfg), False)
    with pytest.raises(ValueError, match="no scanned form"):
        target_shapes(cfg, True)
    with pytest.raises(ConfigError, match="text-only"):
        map_for(cfg, use_multimodal=True)


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unscan"])
def test_gemma4_multimodal_tree(scan):
    cfg = fixture_config("gemma4_moe_bf16")
    assert target_shapes(cfg, scan, use_multimodal=True) == gemma4_tree(official_gemma4(cfg), scan, multimodal=True)


# Official config.json values (MaxText's hf_model_configs.py gemma4_*_dict).
GEMMA4_26B = {
    "architectures": ["Gemma4ForConditionalGeneration"],
    "model_type": "gemma4",
    "tie_word_embeddings": True,
    "text_config": {
        "model_type": "gemma4_text",
        "hidden_size": 2816,
        "intermediate_size": 2112,
        "moe_intermediate_size": 704,
        "num_hidden_layers": 30,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 256,
        "global_head_dim": 512,
        "num_global_key_value_heads": 2,
        "attention_k_eq_v": True,
        "enable_moe_block": True,
        "num_experts": 128,
        "top_k_experts": 8,
        "hidden_size_per_layer_input": 0,
        "num_kv_shared_layers": 0,
        "vocab_size": 262144,
        "vocab_size_per_layer_input": 262144,
        "tie_word_embeddings": True,
        "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 5,
    },
    "vision_config": {
        "model_type": "gemma4_vision",
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "patch_size": 16,
        "position_embedding_size": 10240,
        "standardize": True,
    },
}
GEMMA4_31B = GEMMA4_26B | {
    "text_config": GEMMA4_26B["text_config"]
    | {
        "enable_moe_block": False,
        "hidden_size": 5376,
        "intermediate_size": 21504,
        "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 10,
        "num_attention_heads": 32,
        "num_experts": None,
        "num_global_key_value_heads": 4,
        "num_hidden_layers": 60,
        "num_key_value_heads": 16,
        "top_k_experts": None,
    }
}
GEMMA4_E2B = GEMMA4_26B | {
    "text_config": GEMMA4_26B["text_config"]
    | {
        "attention_k_eq_v": False,
        "enable_moe_block": False,
        "num_experts": None,
        "num_global_key_value_heads": None,
        "hidden_size": 1536,
        "intermediate_size": 6144,
        "hidden_size_per_layer_input": 256,
        "num_hidden_layers": 35,
        "num_attention_heads": 8,
        "num_key_value_heads": 1,
        "num_kv_shared_layers": 20,
        "use_double_wide_mlp": True,
        "layer_types": (["sliding_attention"] * 4 + ["full_attention"]) * 7,
    },
    "vision_config": {"hidden_size": 768, "standardize": False},
}
GEMMA4_E4B = GEMMA4_E2B | {
    "text_config": GEMMA4_E2B["text_config"]
    | {
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "num_hidden_layers": 42,
        "num_key_value_heads": 2,
        "num_kv_shared_layers": 18,
        "use_double_wide_mlp": False,
        "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 7,
    }
}


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unscan"])
@pytest.mark.parametrize("config", [GEMMA4_26B, GEMMA4_31B], ids=["gemma4-26b", "gemma4-31b"])
def test_real_gemma4_targets(config, scan):
    assert target_shapes(config, scan) == gemma4_tree(config, scan)
    assert target_shapes(config, scan, use_multimodal=True) == gemma4_tree(config, scan, multimodal=True)


@pytest.mark.parametrize("config", [GEMMA4_E2B, GEMMA4_E4B], ids=["gemma4-e2b", "gemma4-e4b"])
def test_real_gemma4_small_targets(config):
    assert target_shapes(config, False) == gemma4_tree(config, False)


def test_gemma4_headline_shapes():
    s = target_shapes(GEMMA4_26B, True)
    local, glob = "decoder.scanned_blocks.local_layers.", "decoder.scanned_blocks.global_layer."
    assert s[local + "mlp.moe_block.MoeBlock_0.wi_0"] == (128, 5, 5, 2816, 704)
    assert s[local + "self_attention.query.kernel"] == (2816, 5, 5, 16, 256)
    assert s[glob + "self_attention.key.kernel"] == (2816, 5, 2, 512)
    assert glob + "self_attention.value.kernel" not in s  # K = V
    e2b = target_shapes(GEMMA4_E2B, False)
    assert e2b["decoder.layers_14.mlp.wi_0.kernel"] == (1536, 6144)
    assert e2b["decoder.layers_15.mlp.wi_0.kernel"] == (1536, 12288)  # KV-shared: double-wide
    assert "decoder.layers_15.self_attention.key.kernel" not in e2b
    assert e2b["decoder.layers_19.self_attention.query.kernel"] == (1536, 8, 512)  # global, period 5


def test_gemma4_routes_blocks_and_fused_expert_halves():
    cfg = fixture_config("gemma4_moe_bf16")  # 12 layers: 2 blocks
    t = targets_of(cfg, True)
    q = t["decoder.scanned_blocks.local_layers.self_attention.query.kernel"]
    assert q.stack_axes == (1, 2)
    assert q.hf_key_at((1, 3)) == "model.language_model.layers.9.self_attn.q_proj.weight"
    assert t["decoder.scanned_blocks.global_layer.layer_scalar"].hf_keys == (
        "model.language_model.layers.5.layer_scalar",
        "model.language_model.layers.11.layer_scalar",
    )
    wi0, wi1 = (t[f"decoder.scanned_blocks.global_layer.mlp.moe_block.MoeBlock_0.wi_{k}"] for k in (0, 1))
    assert wi0.hf_keys == wi1.hf_keys and wi0.hf_keys[0].endswith("layers.5.experts.gate_up_proj")


def test_gemma4_text_only_reports_vision_as_extras():
    sm = load_source_model_from_dir(os.path.join(FIXTURES, "gemma4_moe_bf16"))
    plan = build_plan(sm, map_for(sm.config), False)
    assert plan.unused_source_keys and all(
        k.startswith(("model.vision_tower.", "model.embed_vision.")) for k in plan.unused_source_keys
    )


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {
                "num_hidden_layers": 8,
                "layer_types": ["sliding_attention"] * 5 + ["full_attention"] + ["sliding_attention", "full_attention"],
            },
            "layer_types",
        ),
        ({"moe_intermediate_size": None}, "moe_intermediate_size"),
    ],
)
def test_gemma4_unrepresentable_configs(change, message):
    cfg = fixture_config("gemma4_moe_bf16")
    cfg = cfg | {"text_config": cfg["text_config"] | change}
    with pytest.raises(ConfigError, match=re.escape(message)):
        map_for(cfg)
