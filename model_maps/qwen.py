"""Qwen2 / Qwen2.5 (q/k/v biases) and Qwen3 dense (q_norm / k_norm).

MaxText's Qwen hooks only transpose/reshape kernels and reshape biases to [heads, head_dim]:
no query scaling and no RoPE re-interleave (MaxText's Qwen attention matches HF's layout).
"""

from __future__ import annotations

from ckpt_transforms.specs import ModelMap
from model_maps.common import Dims, attention_rules, common_extras, dense_mlp_rules, embedding_rules, layer_norm_rules


def qwen_map(config: dict, variant: str) -> ModelMap:
    """`variant` is the family chosen ('qwen2' or 'qwen3'), not config.json's model_type, so a
    wrong --model fails plan validation instead of silently converting with the wrong rules."""
    d = Dims.from_config(config)
    # Qwen2 attention always has q/k/v biases; Qwen3 has them only if attention_bias is set.
    bias = variant == "qwen2" or bool(config.get("attention_bias", False))
    rules = attention_rules(d, bias=bias, qk_norm=variant == "qwen3")
    rules += dense_mlp_rules(d) + layer_norm_rules(d)
    return ModelMap(
        family=variant,
        num_layers=d.layers,
        global_rules=tuple(embedding_rules(d)),
        layer_rules=tuple(rules),
        known_extras=common_extras(d),
    )
