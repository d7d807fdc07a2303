"""Llama (3.1 and earlier) and Mistral.

From MaxText's converter: q/k/v/o and MLP kernels are transposed (and split into heads); the
query is scaled by 1/sqrt(head_dim) in float32. Llama-3.1-style RoPE (`rope_type: llama3`) also
re-interleaves q and k from HF's two halves into MaxText's pairs (LLAMA31 hooks); models with
default RoPE (Mistral, Llama-2) keep HF's layout, as MaxText's llama_or_mistral converter does.
"""

from __future__ import annotations

from ckpt_transforms.planning.specs import ModelMap
from model_maps.common import (
    ConfigError,
    Dims,
    attention_rules,
    common_extras,
    dense_mlp_rules,
    embedding_rules,
    layer_norm_rules,
    require_quant_method,
)


def uses_llama3_rope(config: dict) -> bool:
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise ConfigError(f"config.json: rope_scaling is {rope!r}; expected an object")
    return (rope.get("rope_type") or rope.get("type")) == "llama3"


def llama_map(config: dict, vocab_size: int | None = None) -> ModelMap:
    require_quant_method(config, config.get("model_type") or "llama")
    d = Dims.from_config(config)
    rules = attention_rules(d, rope_interleave=uses_llama3_rope(config), scale_query=True)
    rules += dense_mlp_rules(d) + layer_norm_rules(d)
    return ModelMap(
        family=config.get("model_type", "llama"),
        num_layers=d.layers,
        global_rules=tuple(embedding_rules(d, vocab_size)),
        layer_rules=tuple(rules),
        known_extras=common_extras(d),
    )
