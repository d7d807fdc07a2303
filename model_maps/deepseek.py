"""DeepSeek-V2 / V2-Lite, DeepSeek-V3 / R1 and DeepSeek-V3.2: MLA attention, dense then MoE layers.

Evidence, all from MaxText (read for facts):
- Names and stacking: param_mapping.py `DEEPSEEK_MAXTEXT_TO_HF_PARAM_MAPPING`. Scanned, HF layers
  [0, first_k_dense_replace) form `decoder/dense_layers` and the rest `decoder/moe_layers`,
  each stacked at `param_scan_axis` (layers/decoders.py scans the two groups separately);
  routed experts are a nested [expert][layer] list stacked at axes (0, 1) (to_maxtext.py
  `_build_multi_axis_stacked_tensor`). Unscanned: `dense_layers_{i}` and
  `moe_layers_{i - first_k_dense_replace}` (decoders.py names layers by index within group).
- Transforms: `DEEPSEEK_MAXTEXT_TO_HF_PARAM_HOOK_FN` only has `reshape_kernel` (transpose, then
  reshape to the MaxText shape) for kernels; norms, the router bias and everything else are
  taken as they are. No RoPE re-interleave and no query scaling.
- Shapes: layers/attention_mla.py `MLA._init_projections`: q_lora_rank 0 (V2-Lite) ->
  `query` [emb, heads, qk_nope+qk_rope]; else `wq_a` [emb, q_lora_rank], `q_norm`
  [q_lora_rank], `wq_b` [q_lora_rank, heads, qk_nope+qk_rope]; `wkv_a` [emb,
  kv_lora_rank+qk_rope], `kv_norm` [kv_lora_rank], `wkv_b` [kv_lora_rank, heads,
  qk_nope+v_head_dim], `out` [heads, v_head_dim, emb] (attentions.py `init_out_w`).
  `Indexer` (V3.2, `use_indexer`): `wq_b` [q_lora_rank, index_n_heads, index_head_dim], `wk`
  [emb, index_head_dim], `k_norm` scale+bias [index_head_dim], `weights_proj` [emb, index_n_heads].
  layers/moe.py `RoutedAndSharedMoE`: `MoeBlock_0` (RoutedMoE: gate kernel [emb, experts],
  gate bias [experts] only with `routed_bias`, wi_0/wi_1 [experts, emb, moe_mlp], wo
  [experts, moe_mlp, emb]) and `shared_experts` (an MLP of width shared_experts * moe_mlp).
- Variant facts from the model configs: deepseek2-16b.yml `routed_bias: false`;
  deepseek3-671b.yml `routed_bias: true`; deepseek3.2-671b.yml also `use_indexer: true`. Every
  size comes from config.json (hidden_size, q_lora_rank, kv_lora_rank, qk_nope_head_dim,
  qk_rope_head_dim, v_head_dim, n_routed_experts, n_shared_experts, moe_intermediate_size,
  first_k_dense_replace, index_n_heads, index_head_dim).
- MTP layers (`model.layers.{num_hidden_layers + i}.*`, num_nextn_predict_layers of them) are
  not part of MaxText's decoder (to_maxtext.py reads them only for a separate MTP model): known
  extras, reported and not converted.
- FP8 checkpoints (`quantization_config.quant_method: fp8`): every linear projection of a
  layer is an e4m3 weight with a `<key>_scale_inv` grid, except the router (`mlp.gate`) and
  the V3.2 indexer's `weights_proj` (DeepSeek's reference model code keeps both in bf16), and
  the embedding / LM head. Modules named in `modules_to_not_convert` stay unquantized. As
  deepseek_dequantize.py rewrites every other tensor in bf16 before MaxText's converter reads
  it, those are rounded to bf16 first (RoundOnce; matters for --save_dtype float32 only).
"""

from __future__ import annotations

from dataclasses import dataclass

from ckpt_transforms.planning.specs import LayerGroup, ModelMap, ParamRule
from model_maps.common import (
    KERNEL,
    LAYER,
    MAX_EXPERTS,
    MAX_HEADS,
    MAX_LAYERS,
    MAX_WIDTH,
    ConfigError,
    Dims,
    common_extras,
    config_int,
    config_list,
    embedding_rules,
    expert_rules,
    fp8_block_size,
    fp8_weight,
    gated_mlp_rules,
    heads_kernel,
    layer_norm_rules,
    not_converted,
    out_kernel,
    require_quant_method,
    rounded_like_dequantize_scripts,
)

# HF module names whose weights official FP8 DeepSeek checkpoints store as e4m3 + scale_inv.
FP8_MODULES = (
    "q_proj",
    "q_a_proj",
    "q_b_proj",
    "kv_a_proj_with_mqa",
    "kv_b_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "indexer.wq_b",
    "indexer.wk",
)
VARIANTS = {
    # variant: (router bias `e_score_correction_bias`, V3.2 indexer)
    "deepseek2": (False, False),
    "deepseek3": (True, False),
    "deepseek3.2": (True, True),
}


@dataclass(frozen=True)
class MlaDims:
    hidden: int
    heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope: int
    qk_rope: int
    v_head: int
    experts: int
    shared_experts: int
    moe_mlp: int
    dense_layers: int
    index_heads: int = 0
    index_head_dim: int = 0

    @classmethod
    def from_config(cls, config: dict, indexer: bool) -> MlaDims:
        def need(name: str, hi: int = MAX_WIDTH, lo: int = 1) -> int:
            return config_int(config, name, hi, lo)

        return cls(
            hidden=need("hidden_size"),
            heads=need("num_attention_heads", MAX_HEADS),
            q_lora_rank=config_int(config, "q_lora_rank", MAX_WIDTH, lo=0, default=0),
            kv_lora_rank=need("kv_lora_rank"),
            qk_nope=need("qk_nope_head_dim"),
            qk_rope=need("qk_rope_head_dim"),
            v_head=need("v_head_dim"),
            experts=need("n_routed_experts", MAX_EXPERTS),
            shared_experts=need("n_shared_experts", MAX_EXPERTS, lo=0),
            moe_mlp=need("moe_intermediate_size"),
            dense_layers=need("first_k_dense_replace", MAX_LAYERS, lo=0),
            index_heads=need("index_n_heads", MAX_HEADS) if indexer else 0,
            index_head_dim=need("index_head_dim") if indexer else 0,
        )


def mla_rules(m: MlaDims) -> list[ParamRule]:
    a, t = f"{LAYER}.self_attn", "self_attention"
    qk = m.qk_nope + m.qk_rope
    if m.q_lora_rank:
        rules = [
            ParamRule(f"{t}/wq_a/kernel", f"{a}.q_a_proj.weight", (m.q_lora_rank, m.hidden), KERNEL),
            ParamRule(f"{t}/q_norm/scale", f"{a}.q_a_layernorm.weight", (m.q_lora_rank,)),
            ParamRule(f"{t}/wq_b/kernel", f"{a}.q_b_proj.weight", (m.heads * qk, m.q_lora_rank), heads_kernel(qk)),
        ]
    else:
        rules = [ParamRule(f"{t}/query/kernel", f"{a}.q_proj.weight", (m.heads * qk, m.hidden), heads_kernel(qk))]
    kv_out = m.qk_nope + m.v_head
    rules += [
        ParamRule(
            f"{t}/wkv_a/kernel", f"{a}.kv_a_proj_with_mqa.weight", (m.kv_lora_rank + m.qk_rope, m.hidden), KERNEL
        ),
        ParamRule(f"{t}/kv_norm/scale", f"{a}.kv_a_layernorm.weight", (m.kv_lora_rank,)),
        ParamRule(
            f"{t}/wkv_b/kernel", f"{a}.kv_b_proj.weight", (m.heads * kv_out, m.kv_lora_rank), heads_kernel(kv_out)
        ),
        ParamRule(f"{t}/out/kernel", f"{a}.o_proj.weight", (m.hidden, m.heads * m.v_head), out_kernel(m.v_head)),
    ]
    if m.index_heads:
        i, n, hd = f"{a}.indexer", m.index_heads, m.index_head_dim
        rules += [
            ParamRule(f"{t}/indexer/wq_b/kernel", f"{i}.wq_b.weight", (n * hd, m.q_lora_rank), heads_kernel(hd)),
            ParamRule(f"{t}/indexer/wk/kernel", f"{i}.wk.weight", (hd, m.hidden), KERNEL),
            ParamRule(f"{t}/indexer/k_norm/scale", f"{i}.k_norm.weight", (hd,)),
            ParamRule(f"{t}/indexer/k_norm/bias", f"{i}.k_norm.bias", (hd,)),
            ParamRule(f"{t}/indexer/weights_proj/kernel", f"{i}.weights_proj.weight", (n, m.hidden), KERNEL),
        ]
    return rules


def moe_rules(m: MlaDims, router_bias: bool) -> list[ParamRule]:
    hf, b = f"{LAYER}.mlp", "DeepSeekMoeBlock_0"
    rules = gated_mlp_rules(f"{b}/shared_experts", f"{hf}.shared_experts", m.shared_experts * m.moe_mlp, m.hidden)
    rules.append(ParamRule(f"{b}/MoeBlock_0/gate/kernel", f"{hf}.gate.weight", (m.experts, m.hidden), KERNEL))
    if router_bias:
        rules.append(ParamRule(f"{b}/MoeBlock_0/gate/bias", f"{hf}.gate.e_score_correction_bias", (m.experts,)))
    return rules + expert_rules(f"{b}/MoeBlock_0", f"{hf}.experts.{{expert}}", m.experts, m.moe_mlp, m.hidden)


def _check_layer_layout(config: dict, dense: int, layers: int) -> None:
    """MaxText has exactly one dense stack then one MoE stack; refuse other layouts."""
    if not 0 < dense < layers:
        raise ConfigError(
            f"first_k_dense_replace={dense} with num_hidden_layers={layers}: MaxText's deepseek "
            "decoder needs at least one dense and one MoE layer"
        )
    if config_int(config, "moe_layer_freq", MAX_LAYERS, default=1) != 1:
        raise ConfigError("moe_layer_freq != 1 interleaves dense and MoE layers; MaxText's deepseek decoder does not")
    kinds = config_list(config, "mlp_layer_types")
    if kinds is not None and kinds != ["dense"] * dense + ["sparse"] * (layers - dense):
        raise ConfigError("mlp_layer_types is not first_k_dense_replace dense layers followed by sparse ones")


def fp8_layer(config: dict, rules: list[ParamRule], block: tuple[int, int]) -> list[ParamRule]:
    """The layer's rules as an FP8 checkpoint stores them: quantized linear weights read with
    their scale_inv grids, everything else (and modules_to_not_convert) unchanged."""
    suffixes = tuple(f".{name}.weight" for name in FP8_MODULES)
    return rounded_like_dequantize_scripts(
        [
            fp8_weight(r, block) if r.hf_key.endswith(suffixes) and not not_converted(config, r.hf_key) else r
            for r in rules
        ]
    )


def deepseek_map(config: dict, variant: str, vocab_size: int | None = None) -> ModelMap:
    """`variant` ('deepseek2', 'deepseek3', 'deepseek3.2') is the family chosen, as for Qwen."""
    router_bias, indexer = VARIANTS[variant]
    method = require_quant_method(config, variant, ("fp8",))
    d = Dims.from_config(config)
    m = MlaDims.from_config(config, indexer)
    _check_layer_layout(config, m.dense_layers, d.layers)
    if indexer and not m.q_lora_rank:
        raise ConfigError("the V3.2 indexer reads the query LoRA; config.json has no q_lora_rank")
    attention = mla_rules(m) + layer_norm_rules(d)
    dense = attention + gated_mlp_rules("mlp", f"{LAYER}.mlp", d.mlp, d.hidden)
    moe = attention + moe_rules(m, router_bias)
    if method == "fp8":
        block = fp8_block_size(config)
        dense, moe = (fp8_layer(config, rules, block) for rules in (dense, moe))
    global_rules = embedding_rules(d, vocab_size)
    if method == "fp8":
        global_rules = rounded_like_dequantize_scripts(global_rules)
    mtp = config_int(config, "num_nextn_predict_layers", MAX_LAYERS, lo=0, default=0)
    return ModelMap(
        family=variant,
        num_layers=d.layers,
        global_rules=tuple(global_rules),
        layer_rules=(),
        known_extras=common_extras(d) + tuple(f"model.layers.{d.layers + i}.*" for i in range(mtp)),
        layer_groups=(
            LayerGroup("decoder/dense_layers", tuple(range(m.dense_layers)), tuple(dense)),
            LayerGroup("decoder/moe_layers", tuple(range(m.dense_layers, d.layers)), tuple(moe)),
        ),
    )
