"""Qwen2 / Qwen2.5 (q/k/v biases), Qwen3 dense (q_norm / k_norm) and Qwen3-MoE.

MaxText's Qwen hooks only transpose/reshape kernels and reshape biases to [heads, head_dim]:
no query scaling and no RoPE re-interleave (MaxText's Qwen attention matches HF's layout).

Qwen3-MoE (QWEN_MAXTEXT_TO_HF_PARAM_MAPPING with num_experts > 1, `decoder_block: qwen3_moe`):
every layer is MoE (`Qwen3MoeDecoderLayer.moe_block`, a RoutedMoE): the router
`moe_block/gate/kernel` [emb, experts] is the transposed `mlp.gate.weight`; each expert's
gate/up/down_proj is transposed (`reshape_expert_kernel`) and experts stack on axis 0, so
wi_0/wi_1 are [experts, emb, moe_mlp] and wo [experts, moe_mlp, emb]; scanned, the layer axis
goes at 1 ([experts, layers, ...], to_maxtext's `_build_multi_axis_stacked_tensor`). No router
bias (`routed_bias` is unset in the qwen3-*-a*b model configs).
"""

from __future__ import annotations

from ckpt_transforms.planning.specs import ModelMap, ParamRule
from model_maps.common import (
    KERNEL,
    LAYER,
    MAX_EXPERTS,
    MAX_LAYERS,
    MAX_WIDTH,
    ConfigError,
    Dims,
    attention_rules,
    common_extras,
    config_bool,
    config_int,
    config_list,
    dense_mlp_rules,
    embedding_rules,
    expert_rules,
    layer_norm_rules,
    require_quant_method,
)


def qwen_map(config: dict, variant: str, vocab_size: int | None = None) -> ModelMap:
    """`variant` is the family chosen ('qwen2' or 'qwen3'), not config.json's model_type, so a
    wrong --model fails plan validation instead of silently converting with the wrong rules."""
    require_quant_method(config, variant)
    d = Dims.from_config(config)
    # Qwen2 attention always has q/k/v biases; Qwen3 has them only if attention_bias is set.
    bias = variant == "qwen2" or config_bool(config, "attention_bias")
    rules = attention_rules(d, bias=bias, qk_norm=variant == "qwen3")
    rules += dense_mlp_rules(d) + layer_norm_rules(d)
    return ModelMap(
        family=variant,
        num_layers=d.layers,
        global_rules=tuple(embedding_rules(d, vocab_size)),
        layer_rules=tuple(rules),
        known_extras=common_extras(d),
    )


def qwen3_moe_map(config: dict, vocab_size: int | None = None) -> ModelMap:
    require_quant_method(config, "qwen3_moe")
    d = Dims.from_config(config)
    # Qwen's config.json says num_experts; transformers 5 writes num_local_experts (MaxText reads either).
    experts = config_int(config, "num_experts", MAX_EXPERTS, lo=0, default=None)
    if experts is None:
        experts = config_int(config, "num_local_experts", MAX_EXPERTS, lo=0, default=0)
    if experts < 2:
        raise ConfigError("config.json has no 'num_experts' > 1 (not a Qwen3-MoE checkpoint?)")
    if not config.get("moe_intermediate_size"):
        raise ConfigError("config.json has no 'moe_intermediate_size'")
    if config_list(config, "mlp_only_layers") or config_int(config, "decoder_sparse_step", MAX_LAYERS, default=1) != 1:
        raise ConfigError(
            "mlp_only_layers / decoder_sparse_step make some layers dense; MaxText's qwen3_moe "
            "decoder has an MoE block in every layer"
        )
    moe_mlp = config_int(config, "moe_intermediate_size", MAX_WIDTH)
    m = f"{LAYER}.mlp"
    rules = attention_rules(d, bias=config_bool(config, "attention_bias"), qk_norm=True) + layer_norm_rules(d)
    rules.append(ParamRule("moe_block/gate/kernel", f"{m}.gate.weight", (experts, d.hidden), KERNEL))
    rules += expert_rules("moe_block", f"{m}.experts.{{expert}}", experts, moe_mlp, d.hidden)
    return ModelMap(
        family="qwen3_moe",
        num_layers=d.layers,
        global_rules=tuple(embedding_rules(d, vocab_size)),
        layer_rules=tuple(rules),
        known_extras=common_extras(d),
    )
