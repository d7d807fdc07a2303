"""MoE and MLA families: the MaxText tree each map produces, written out from MaxText's modules.

Values are compared bit-exactly for every fixture x scan x save dtype in test_convert_fixtures.py
(against reference.py); here the target names and shapes are spelled out independently, per
family, from MaxText's layer definitions (attention_mla.py MLA/Indexer, moe.py RoutedMoE /
RoutedAndSharedMoE / GateLogit, gpt_oss.py GptOssDecoderLayer / GptOssScannableBlock,
qwen3.py Qwen3MoeDecoderLayer), for the tiny fixtures and for the real model sizes.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
from conftest import FIXTURES

import model_maps
from ckpt_transforms.planning.convert_plan import PlanError, build_plan
from ckpt_transforms.planning.specs import expand_targets
from ckpt_transforms.safetensors_io.index import load_source_model
from ckpt_transforms.tensors.ops import PutEvery, TakeEvery
from model_maps.common import ConfigError

P = "params.params."


def fixture_config(name: str) -> dict:
    with open(os.path.join(FIXTURES, name, "config.json")) as f:
        return json.load(f)


def target_shapes(config: dict, scan: bool, model: str | None = None) -> dict[str, tuple[int, ...]]:
    mm = model_maps.detect_family(config, model).build(config)
    return {t.name.removeprefix(P): t.shape for t in expand_targets(mm, scan)}


def layout(globals_: dict, groups: list[tuple[str, int, dict]], scan: bool, cycle: int = 1) -> dict:
    """Expected leaves from per-layer shapes: scanned, the layer count goes in at axis 1
    (param_scan_axis; after the expert axis for expert stacks); unscanned, `<group>_<i>`."""
    out = {k: tuple(v) for k, v in globals_.items()}
    for container, n, per_layer in groups:
        for name, shape in per_layer.items():
            if scan and cycle > 1:
                for b in range(cycle):
                    out[f"decoder.{container}.layers_{b}.{name}"] = shape[:1] + (n // cycle,) + shape[1:]
            elif scan:
                out[f"decoder.{container}.{name}"] = shape[:1] + (n,) + shape[1:]
            else:
                for i in range(n):
                    out[f"decoder.{container}_{i}.{name}"] = shape
    return out


def embeddings(vocab: int, hidden: int) -> dict:
    return {
        "token_embedder.embedding": (vocab, hidden),
        "decoder.decoder_norm.scale": (hidden,),
        "decoder.logits_dense.kernel": (hidden, vocab),
    }


def norms(h: int) -> dict:
    return {"pre_self_attention_layer_norm.scale": (h,), "post_self_attention_layer_norm.scale": (h,)}


def mla(h, heads, q_lora, kv_lora, nope, rope, v, index=None) -> dict:
    a = "self_attention."
    out = (
        {a + "query.kernel": (h, heads, nope + rope)}
        if not q_lora
        else {
            a + "wq_a.kernel": (h, q_lora),
            a + "q_norm.scale": (q_lora,),
            a + "wq_b.kernel": (q_lora, heads, nope + rope),
        }
    )
    out |= {
        a + "wkv_a.kernel": (h, kv_lora + rope),
        a + "kv_norm.scale": (kv_lora,),
        a + "wkv_b.kernel": (kv_lora, heads, nope + v),
        a + "out.kernel": (heads, v, h),
    }
    if index:
        n, d = index
        out |= {
            a + "indexer.wq_b.kernel": (q_lora, n, d),
            a + "indexer.wk.kernel": (h, d),
            a + "indexer.k_norm.scale": (d,),
            a + "indexer.k_norm.bias": (d,),
            a + "indexer.weights_proj.kernel": (h, n),
        }
    return out


def mlp(prefix: str, h: int, m: int) -> dict:
    return {f"{prefix}.wi_0.kernel": (h, m), f"{prefix}.wi_1.kernel": (h, m), f"{prefix}.wo.kernel": (m, h)}


def routed(prefix: str, e: int, h: int, m: int) -> dict:
    return {f"{prefix}.wi_0": (e, h, m), f"{prefix}.wi_1": (e, h, m), f"{prefix}.wo": (e, m, h)}


def deepseek(cfg: dict, scan: bool, router_bias: bool, index=None) -> dict:
    h, k, n = cfg["hidden_size"], cfg["first_k_dense_replace"], cfg["num_hidden_layers"]
    e, m = cfg["n_routed_experts"], cfg["moe_intermediate_size"]
    attn = norms(h) | mla(
        h,
        cfg["num_attention_heads"],
        cfg.get("q_lora_rank") or 0,
        cfg["kv_lora_rank"],
        cfg["qk_nope_head_dim"],
        cfg["qk_rope_head_dim"],
        cfg["v_head_dim"],
        index,
    )
    b = "DeepSeekMoeBlock_0"
    moe = attn | mlp(f"{b}.shared_experts", h, cfg["n_shared_experts"] * m) | routed(f"{b}.MoeBlock_0", e, h, m)
    moe[f"{b}.MoeBlock_0.gate.kernel"] = (h, e)
    if router_bias:
        moe[f"{b}.MoeBlock_0.gate.bias"] = (e,)
    dense = attn | mlp("mlp", h, cfg["intermediate_size"])
    return layout(embeddings(cfg["vocab_size"], h), [("dense_layers", k, dense), ("moe_layers", n - k, moe)], scan)


def qwen3_moe(cfg: dict, scan: bool) -> dict:
    h, heads, kv, hd = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    e = cfg.get("num_experts") or cfg["num_local_experts"]
    a = "self_attention."
    layer = norms(h) | {
        a + "query.kernel": (h, heads, hd),
        a + "key.kernel": (h, kv, hd),
        a + "value.kernel": (h, kv, hd),
        a + "out.kernel": (heads, hd, h),
        a + "query_norm.scale": (hd,),
        a + "key_norm.scale": (hd,),
        "moe_block.gate.kernel": (h, e),
    }
    layer |= routed("moe_block", e, h, cfg["moe_intermediate_size"])
    return layout(embeddings(cfg["vocab_size"], h), [("layers", cfg["num_hidden_layers"], layer)], scan)


def gpt_oss(cfg: dict, scan: bool) -> dict:
    h, heads, kv, hd = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    e, m = cfg["num_local_experts"], cfg["intermediate_size"]
    a, t = "GptOssAttention.", "GptOssMlp."
    layer = norms(h) | {
        a + "query.kernel": (h, heads, hd),
        a + "key.kernel": (h, kv, hd),
        a + "value.kernel": (h, kv, hd),
        a + "out.kernel": (heads, hd, h),
        a + "query.bias": (heads, hd),
        a + "key.bias": (kv, hd),
        a + "value.bias": (kv, hd),
        a + "out.bias": (h,),
        a + "sinks": (heads,),
        t + "gate.kernel": (h, e),
        t + "gate.bias": (e,),
        t + "wi_0": (e, h, m),
        t + "wi_1": (e, h, m),
        t + "wi_0_bias": (e, m),
        t + "wi_1_bias": (e, m),
        t + "wo": (e, m, h),
        t + "wo_bias": (e, h),
    }
    return layout(embeddings(cfg["vocab_size"], h), [("layers", cfg["num_hidden_layers"], layer)], scan, cycle=2)


EXPECTED = {
    "qwen3_moe_bf16": lambda c, s: qwen3_moe(c, s),
    "deepseek2_bf16": lambda c, s: deepseek(c, s, router_bias=False),
    "deepseek3_bf16": lambda c, s: deepseek(c, s, router_bias=True),
    "deepseek3_fp8": lambda c, s: deepseek(c, s, router_bias=True),
    "deepseek32_fp8": lambda c, s: deepseek(c, s, router_bias=True, index=(c["index_n_heads"], c["index_head_dim"])),
    "gpt_oss_bf16": lambda c, s: gpt_oss(c, s),
    "gpt_oss_mxfp4": lambda c, s: gpt_oss(c, s),
}


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unscan"])
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_targets_match_maxtext_modules(name, scan):
    cfg = fixture_config(name)
    assert target_shapes(cfg, scan) == EXPECTED[name](cfg, scan)


# Real sizes, from the config.json values MaxText's hf_model_configs.py records for each model.
DEEPSEEK3_671B = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "first_k_dense_replace": 3,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "vocab_size": 129280,
    "num_nextn_predict_layers": 1,
    "tie_word_embeddings": False,
    "topk_method": "noaux_tc",
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
}
DEEPSEEK32_671B = DEEPSEEK3_671B | {
    "architectures": ["DeepseekV32ForCausalLM"],
    "model_type": "deepseek_v32",
    "index_head_dim": 128,
    "index_n_heads": 64,
    "index_topk": 2048,
}
DEEPSEEK2_16B = {
    "architectures": ["DeepseekV2ForCausalLM"],
    "model_type": "deepseek_v2",
    "hidden_size": 2048,
    "intermediate_size": 10944,
    "moe_intermediate_size": 1408,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "q_lora_rank": None,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "vocab_size": 102400,
    "tie_word_embeddings": False,
    "topk_method": "greedy",
}
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "vocab_size": 151936,
    "tie_word_embeddings": False,
}
GPT_OSS_120B = {
    "architectures": ["GptOssForCausalLM"],
    "model_type": "gpt_oss",
    "hidden_size": 2880,
    "intermediate_size": 2880,
    "num_hidden_layers": 36,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "num_local_experts": 128,
    "vocab_size": 201088,
    "tie_word_embeddings": False,
    "layer_types": ["sliding_attention", "full_attention"] * 18,
    "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn"], "quant_method": "mxfp4"},
}


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unscan"])
@pytest.mark.parametrize(
    "config, expected",
    [
        (DEEPSEEK3_671B, lambda c, s: deepseek(c, s, router_bias=True)),
        (DEEPSEEK32_671B, lambda c, s: deepseek(c, s, router_bias=True, index=(64, 128))),
        (DEEPSEEK2_16B, lambda c, s: deepseek(c, s, router_bias=False)),
        (QWEN3_30B_A3B, qwen3_moe),
        (GPT_OSS_120B, gpt_oss),
    ],
    ids=["deepseek3-671b", "deepseek3.2-671b", "deepseek2-16b", "qwen3-30b-a3b", "gpt-oss-120b"],
)
def test_real_model_targets(config, expected, scan):
    assert target_shapes(config, scan) == expected(config, scan)


def test_headline_shapes_of_deepseek3_671b():
    shapes = target_shapes(DEEPSEEK3_671B, True)
    moe = "decoder.moe_layers."
    assert shapes[moe + "DeepSeekMoeBlock_0.MoeBlock_0.wi_0"] == (256, 58, 7168, 2048)
    assert shapes[moe + "DeepSeekMoeBlock_0.MoeBlock_0.wo"] == (256, 58, 2048, 7168)
    assert shapes[moe + "DeepSeekMoeBlock_0.MoeBlock_0.gate.bias"] == (256, 58)
    assert shapes[moe + "self_attention.wkv_b.kernel"] == (512, 58, 128, 256)
    assert shapes["decoder.dense_layers.mlp.wi_0.kernel"] == (7168, 3, 18432)
    assert target_shapes(GPT_OSS_120B, True)["decoder.layers.layers_1.GptOssMlp.wi_1"] == (128, 18, 2880, 2880)


# --------------------------------------------------------------------------- which HF layer feeds which slab


def map_for(config: dict, model: str | None = None):
    return model_maps.detect_family(config, model).build(config)


def test_deepseek_groups_route_hf_layers():
    cfg = fixture_config("deepseek3_bf16")  # first_k_dense_replace 1, 3 layers
    targets = {t.name.removeprefix(P): t for t in expand_targets(map_for(cfg), True)}
    kv = targets["decoder.moe_layers.self_attention.wkv_b.kernel"]
    assert kv.hf_keys == ("model.layers.1.self_attn.kv_b_proj.weight", "model.layers.2.self_attn.kv_b_proj.weight")
    wi = targets["decoder.moe_layers.DeepSeekMoeBlock_0.MoeBlock_0.wi_0"]
    assert wi.stack_axes == (0, 1)  # experts outer, layers inner (to_maxtext's nested list)
    assert wi.hf_key_at((3, 1)) == "model.layers.2.mlp.experts.3.gate_proj.weight"
    unscanned = {t.name.removeprefix(P): t for t in expand_targets(map_for(cfg), False)}
    assert unscanned["decoder.moe_layers_0.self_attention.out.kernel"].hf_keys == (
        "model.layers.1.self_attn.o_proj.weight",
    )
    assert unscanned["decoder.dense_layers_0.mlp.wo.kernel"].hf_keys == ("model.layers.0.mlp.down_proj.weight",)


def test_gpt_oss_cycle_routes_alternate_layers_to_the_two_blocks():
    cfg = fixture_config("gpt_oss_bf16")  # 4 layers
    targets = {t.name.removeprefix(P): t for t in expand_targets(map_for(cfg), True)}
    for block, layers in ((0, (0, 2)), (1, (1, 3))):
        sinks = targets[f"decoder.layers.layers_{block}.GptOssAttention.sinks"]
        assert sinks.hf_keys == tuple(f"model.layers.{i}.self_attn.sinks" for i in layers)
        wi_1 = targets[f"decoder.layers.layers_{block}.GptOssMlp.wi_1"]
        assert wi_1.hf_keys == tuple(f"model.layers.{i}.mlp.experts.gate_up_proj" for i in layers)
        assert wi_1.stack_axes == (1,)  # experts are inside each fused tensor


def test_gpt_oss_composite_reads_the_fused_tensor_once_per_half():
    sm = load_source_model_of("gpt_oss_bf16")
    plan = build_plan(sm, map_for(sm.config), False)
    reads = [s.source.key for i in plan.items for s in i.slabs]
    assert reads.count("model.layers.2.mlp.experts.gate_up_proj") == 2
    assert reads.count("model.layers.2.mlp.experts.down_proj") == 1


def load_source_model_of(name: str):
    from ckpt_transforms.storage.sources import open_source

    return load_source_model(open_source(os.path.join(FIXTURES, name)))


@pytest.mark.parametrize("name", ["deepseek3_bf16", "deepseek3_fp8", "deepseek32_fp8"])
def test_mtp_layers_are_known_extras(name):
    sm = load_source_model_of(name)
    plan = build_plan(sm, map_for(sm.config), True, max_item_bytes=10**6)
    mtp = sorted(k for k in sm.tensors if k.startswith("model.layers.3."))
    assert mtp and plan.unused_source_keys == mtp


def test_qwen3_moe_reads_num_experts_or_num_local_experts():
    cfg = fixture_config("qwen3_moe_bf16")
    renamed = {k: v for k, v in cfg.items() if k != "num_local_experts"} | {"num_experts": cfg["num_local_experts"]}
    assert target_shapes(renamed, True) == target_shapes(cfg, True)


# --------------------------------------------------------------------------- configs MaxText cannot represent


@pytest.mark.parametrize(
    "name, change, message",
    [
        ("qwen3_moe_bf16", {"mlp_only_layers": [1]}, "mlp_only_layers"),
        ("qwen3_moe_bf16", {"decoder_sparse_step": 2}, "decoder_sparse_step"),
        ("deepseek3_bf16", {"first_k_dense_replace": 0}, "first_k_dense_replace=0"),
        ("deepseek3_bf16", {"first_k_dense_replace": 3}, "first_k_dense_replace=3"),
        ("deepseek2_bf16", {"moe_layer_freq": 2}, "moe_layer_freq"),
        ("deepseek32_fp8", {"index_n_heads": None}, "index_n_heads"),
        ("gpt_oss_bf16", {"layer_types": ["full_attention", "sliding_attention"] * 2}, "layer_types"),
        ("gpt_oss_bf16", {"num_local_experts": None}, "num_local_experts"),
    ],
)
def test_unrepresentable_configs_are_config_errors(name, change, message):
    cfg = fixture_config(name) | change
    with pytest.raises(ConfigError, match=re.escape(message)):
        map_for(cfg)


def test_gpt_oss_odd_layer_count_scans_only_unscanned():
    cfg = fixture_config("gpt_oss_bf16") | {"num_hidden_layers": 3, "layer_types": None}
    assert "decoder.layers_2.GptOssMlp.wo" in target_shapes(cfg, False)
    with pytest.raises(ValueError, match="whole 2-layer cycles"):
        target_shapes(cfg, True)


@pytest.mark.parametrize(
    "name, model, needed",
    [
        ("deepseek3_bf16", "deepseek2-16b", None),  # unused e_score_correction_bias
        ("deepseek3_bf16", "deepseek3.2-671b", r"indexer"),
        ("deepseek2_bf16", "deepseek3-671b", r"e_score_correction_bias"),
    ],
)
def test_wrong_deepseek_model_name_is_an_error(name, model, needed):
    sm = load_source_model_of(name)
    cfg = dict(sm.config)
    if needed == "indexer":
        cfg |= {"index_n_heads": 4, "index_head_dim": 16}
    with pytest.raises(PlanError, match=needed or r"e_score_correction_bias"):
        build_plan(sm, map_for(cfg, model), True)


# --------------------------------------------------------------------------- the split op


@pytest.mark.parametrize("shape, axis, start", [((3, 8), -1, 0), ((3, 8), -1, 1), ((2, 6, 4), 1, 1)])
def test_take_every_and_its_inverse(shape, axis, start):
    x = np.arange(np.prod(shape)).reshape(shape)
    op = TakeEvery(axis, start, 2)
    y = op.apply(x)
    assert y.shape == op.output_shape(shape)
    np.testing.assert_array_equal(y, np.take(x, range(start, shape[axis], 2), axis=axis))
    inv = op.inverse()
    assert isinstance(inv, PutEvery) and inv.inverse() == op
    np.testing.assert_array_equal(op.apply(inv.apply(y)), y)
    # The two halves, each put back, rebuild the fused tensor (the Orbax -> HF direction).
    other = TakeEvery(axis, 1 - start, 2)
    np.testing.assert_array_equal(inv.apply(y) + other.inverse().apply(other.apply(x)), x)
    assert op.map_axis(0 if axis != 0 else 1, len(shape)) is not None
    assert op.map_axis(axis % len(shape), len(shape)) is None
