"""Qwen3-Next (80B-A3B): gated-delta-net linear attention with a full-attention layer every Nth
layer, and an MoE block with a gated shared expert in every layer.

Evidence, all from MaxText (read for facts):
- Names and stacking: param_mapping.py `QWEN3_NEXT_MAXTEXT_TO_HF_PARAM_MAPPING`. Scanned,
  layers/decoders.py scans `num_decoder_layers / inhomogeneous_layer_cycle_interval`
  `Qwen3NextScannableBlock`s named `layers`, each holding `layer_0 .. layer_{N-1}` (models/qwen3.py;
  note `layer_`, not `layers_`), so params are `decoder/layers/layer_{b}/...` stacked over HF
  layers b, b+N, ... at `param_scan_axis`; routed experts are a nested [expert][layer] list,
  stacked at axes (0, 1). Unscanned: `decoder/layers_{i}`, experts stacked on axis 0.
- Layer kinds (models/qwen3.py `Qwen3NextDecoderLayer`): position p of the cycle is full attention
  iff (p + 1) % N == 0. N is `inhomogeneous_layer_cycle_interval` (4 in qwen3-next-80b-a3b.yml);
  here it comes from config.json (`layer_types`, or `full_attention_interval` in older files),
  which must repeat (N - 1) linear layers then one full one.
  - full attention (`Qwen3NextFullAttention`, its `attention` is an Attention module):
    `attention/attention/{query,key,value}/kernel`, `reshape_kernel`; the query holds the
    output gate too: [emb, heads, 2 * head_dim] (layers/attentions.py `init_query_w`,
    `is_qwen3_hybrid`). The output projection is NOT split into heads: `init_out_w` gives
    qwen3 hybrids one flat input axis, so `out/kernel` is o_proj transposed, [heads * head_dim,
    emb] (param_mapping.py's hook reshapes it to heads, which MaxText then refuses to restore:
    its own to_maxtext writes the flat shape). `attention/attention/{query,key}_norm/scale`
    [head_dim] as they are.
  - linear attention (`Qwen3NextGatedDeltaNet`): `attention/in_proj_qkvz/kernel` [emb, 2*key_dim
    + 2*value_dim] and `attention/in_proj_ba/kernel` [emb, 2*num_v_heads] transposed,
    `attention/out_proj/kernel` transposed, `attention/conv1d/kernel` permuted (2, 1, 0) from HF
    [channels, 1, kernel] to [kernel, 1, channels] (`permute_conv`), `attention/A_log`,
    `attention/dt_bias` [num_v_heads] and `attention/norm/rms_norm/scale` [head_v_dim] as they are.
  - MoE (`Qwen3NextSparseMoeBlock`): `mlp/routed_experts/gate/kernel` [emb, experts] and each
    expert's gate/up/down_proj transposed (`mlp/routed_experts/wi_0|wi_1|wo`); the shared expert
    `mlp/shared_expert/{wi_0,wi_1,wo}/kernel` and its gate `mlp/shared_expert_gate/kernel`
    [emb, 1], all transposed.
  - `input_layernorm/scale`, `post_attention_layernorm/scale`, `decoder_norm/scale`: as they
    are (Qwen3NextRMSNorm applies 1 + scale itself; no hook). `logits_dense` transposed.
- No hook changes dtypes: every leaf is in the save dtype. Every layer has the MoE block (MaxText
  has no dense Qwen3-Next layer), so `mlp_only_layers` / `decoder_sparse_step` != 1 are refused.
- The official checkpoint's multi-token-prediction head (`mtp.*`) is not part of MaxText's
  decoder: known extras.
"""

from __future__ import annotations

from ckpt_transforms.planning.specs import LayerGroup, ModelMap, ParamRule
from ckpt_transforms.tensors.ops import Transpose
from model_maps.common import (
    KERNEL,
    LAYER,
    MAX_EXPERTS,
    MAX_HEADS,
    MAX_LAYERS,
    MAX_WIDTH,
    ConfigError,
    Dims,
    check_layer_types,
    common_extras,
    config_int,
    config_list,
    embedding_rules,
    expert_rules,
    gated_mlp_rules,
    heads_kernel,
    require_quant_method,
)


def layer_cycle(config: dict, layers: int) -> int:
    """Length of the linear..., full cycle (MaxText's inhomogeneous_layer_cycle_interval)."""
    types = config_list(config, "layer_types")
    if types:
        if "full_attention" not in types:
            raise ConfigError("layer_types has no full_attention layer; MaxText's qwen3_next needs one per cycle")
        n = types.index("full_attention") + 1
    else:
        n = config_int(config, "full_attention_interval", layers, default=4)
    check_layer_types(config, ("linear_attention",) * (n - 1) + ("full_attention",), "qwen3_next", layers)
    return n


def full_attention_rules(d: Dims) -> list[ParamRule]:
    a, t = f"{LAYER}.self_attn", "attention/attention"
    q_width, kv_width = d.heads * d.head_dim, d.kv_heads * d.head_dim
    return [
        # q_proj carries the query and its output gate per head: [heads * 2 * head_dim, emb].
        ParamRule(f"{t}/query/kernel", f"{a}.q_proj.weight", (2 * q_width, d.hidden), heads_kernel(2 * d.head_dim)),
        ParamRule(f"{t}/key/kernel", f"{a}.k_proj.weight", (kv_width, d.hidden), heads_kernel(d.head_dim)),
        ParamRule(f"{t}/value/kernel", f"{a}.v_proj.weight", (kv_width, d.hidden), heads_kernel(d.head_dim)),
        # One flat input axis (attentions.py init_out_w for qwen3 hybrids): [heads * head_dim, emb].
        ParamRule(f"{t}/out/kernel", f"{a}.o_proj.weight", (d.hidden, q_width), KERNEL),
        ParamRule(f"{t}/query_norm/scale", f"{a}.q_norm.weight", (d.head_dim,)),
        ParamRule(f"{t}/key_norm/scale", f"{a}.k_norm.weight", (d.head_dim,)),
    ]


def linear_attention_rules(config: dict, d: Dims) -> list[ParamRule]:
    def need(name: str, hi: int = MAX_WIDTH) -> int:
        return config_int(config, name, hi)

    k_heads, v_heads = need("linear_num_key_heads", MAX_HEADS), need("linear_num_value_heads", MAX_HEADS)
    k_dim, v_dim = k_heads * need("linear_key_head_dim"), v_heads * need("linear_value_head_dim")
    conv_dim, kernel = 2 * k_dim + v_dim, need("linear_conv_kernel_dim")
    a, t = f"{LAYER}.linear_attn", "attention"
    return [
        ParamRule(f"{t}/in_proj_qkvz/kernel", f"{a}.in_proj_qkvz.weight", (2 * k_dim + 2 * v_dim, d.hidden), KERNEL),
        ParamRule(f"{t}/in_proj_ba/kernel", f"{a}.in_proj_ba.weight", (2 * v_heads, d.hidden), KERNEL),
        ParamRule(f"{t}/conv1d/kernel", f"{a}.conv1d.weight", (conv_dim, 1, kernel), (Transpose((2, 1, 0)),)),
        ParamRule(f"{t}/A_log", f"{a}.A_log", (v_heads,)),
        ParamRule(f"{t}/dt_bias", f"{a}.dt_bias", (v_heads,)),
        ParamRule(f"{t}/norm/rms_norm/scale", f"{a}.norm.weight", (need("linear_value_head_dim"),)),
        ParamRule(f"{t}/out_proj/kernel", f"{a}.out_proj.weight", (d.hidden, v_dim), KERNEL),
    ]


def moe_rules(config: dict, d: Dims) -> list[ParamRule]:
    experts = config_int(config, "num_experts", MAX_EXPERTS, lo=0, default=0)
    if experts < 2 or not config.get("moe_intermediate_size"):
        raise ConfigError("config.json needs num_experts > 1 and moe_intermediate_size (Qwen3-Next MoE)")
    if config_list(config, "mlp_only_layers") or config_int(config, "decoder_sparse_step", MAX_LAYERS, default=1) != 1:
        raise ConfigError("mlp_only_layers / decoder_sparse_step make some layers dense; MaxText's qwen3_next has none")
    moe_mlp = config_int(config, "moe_intermediate_size", MAX_WIDTH)
    shared = config_int(config, "shared_expert_intermediate_size", MAX_WIDTH, default=moe_mlp)
    m = f"{LAYER}.mlp"
    return [
        ParamRule("mlp/routed_experts/gate/kernel", f"{m}.gate.weight", (experts, d.hidden), KERNEL),
        *expert_rules("mlp/routed_experts", f"{m}.experts.{{expert}}", experts, moe_mlp, d.hidden),
        *gated_mlp_rules("mlp/shared_expert", f"{m}.shared_expert", shared, d.hidden),
        ParamRule("mlp/shared_expert_gate/kernel", f"{m}.shared_expert_gate.weight", (1, d.hidden), KERNEL),
    ]


def qwen3_next_map(config: dict, vocab_size: int | None = None) -> ModelMap:
    require_quant_method(config, "qwen3_next")
    d = Dims.from_config(config)
    n = layer_cycle(config, d.layers)
    shared = [
        ParamRule("input_layernorm/scale", f"{LAYER}.input_layernorm.weight", (d.hidden,)),
        ParamRule("post_attention_layernorm/scale", f"{LAYER}.post_attention_layernorm.weight", (d.hidden,)),
        *moe_rules(config, d),
    ]
    linear, full = tuple(linear_attention_rules(config, d)), tuple(full_attention_rules(d))
    group = LayerGroup(
        "decoder/layers",
        tuple(range(d.layers)),
        tuple(shared),
        cycle=n,
        cycle_name="layer",
        position_rules=tuple(full if (p + 1) % n == 0 else linear for p in range(n)),
    )
    return ModelMap(
        family="qwen3_next",
        num_layers=d.layers,
        global_rules=tuple(embedding_rules(d, vocab_size)),
        layer_rules=(),
        known_extras=common_extras(d) + ("mtp.*",),
        layer_groups=(group,),
    )
