"""Qwen2 / Qwen2.5 (q/k/v biases) and Qwen3 dense (q_norm / k_norm).

MaxText's Qwen hooks only transpose/reshape kernels and reshape biases to [heads, head_dim]:
no query scaling and no RoPE re-interleave (MaxText's Qwen attention matches HF's layout).
"""

from __future__ import annotations

from ckpt_transforms.specs import ModelMap
from model_maps.common import Dims, attention_rules, common_extras, dense_mlp_rules, embedding_rules, layer_norm_rules


def qwen_map(config: dict) -> ModelMap:
    d = Dims.from_config(config)
    model_type = config.get("model_type", "qwen3")
    # Qwen2 attention always has q/k/v biases; Qwen3 has them only if attention_bias is set.
    bias = model_type == "qwen2" or bool(config.get("attention_bias", False))
    rules = attention_rules(d, bias=bias, qk_norm=model_type == "qwen3")
    rules += dense_mlp_rules(d) + layer_norm_rules(d)
    return ModelMap(
        family=model_type,
        num_layers=d.layers,
        global_rules=tuple(embedding_rules(d)),
        layer_rules=tuple(rules),
        known_extras=common_extras(d),
    )
