"""Mixtral: Llama-style attention without RoPE re-interleave, experts stacked on axis 0.

From MaxText's MIXTRAL hooks: attention kernels are transposed and split into heads, the query
is scaled by 1/sqrt(head_dim) in float32, router and expert kernels are transposed; expert
weights of a layer form one [experts, in, out] array (scanned: [experts, layers, in, out]).
"""

from __future__ import annotations

from ckpt_transforms.planning.specs import ModelMap, ParamRule
from model_maps.common import (
    KERNEL,
    LAYER,
    MAX_EXPERTS,
    ConfigError,
    Dims,
    attention_rules,
    common_extras,
    config_int,
    embedding_rules,
    layer_norm_rules,
    require_quant_method,
)


def mixtral_map(config: dict, vocab_size: int | None = None) -> ModelMap:
    require_quant_method(config, "mixtral")
    d = Dims.from_config(config)
    if not config.get("num_local_experts"):
        raise ConfigError("config.json has no 'num_local_experts' (not a Mixtral MoE checkpoint?)")
    experts = config_int(config, "num_local_experts", MAX_EXPERTS)
    moe = f"{LAYER}.block_sparse_moe"
    rules = attention_rules(d, scale_query=True) + layer_norm_rules(d)
    rules += [
        ParamRule("MoeBlock_0/gate/kernel", f"{moe}.gate.weight", (experts, d.hidden), KERNEL),
        ParamRule("MoeBlock_0/wi_0", f"{moe}.experts.{{expert}}.w1.weight", (d.mlp, d.hidden), KERNEL, experts),
        ParamRule("MoeBlock_0/wi_1", f"{moe}.experts.{{expert}}.w3.weight", (d.mlp, d.hidden), KERNEL, experts),
        ParamRule("MoeBlock_0/wo", f"{moe}.experts.{{expert}}.w2.weight", (d.hidden, d.mlp), KERNEL, experts),
    ]
    return ModelMap(
        family="mixtral",
        num_layers=d.layers,
        global_rules=tuple(embedding_rules(d, vocab_size)),
        layer_rules=tuple(rules),
        known_extras=common_extras(d),
    )
