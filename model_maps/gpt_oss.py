"""GPT-OSS 20B / 120B: biased attention with sinks, MoE with fused gate_up_proj, layer cycle.

Evidence, all from MaxText (read for facts):
- param_mapping.py `GPT_OSS_MAXTEXT_TO_HF_PARAM_MAPPING` / `GPT_OSS_TO_HF_PARAM_HOOK_FN`:
  q/k/v kernels `reshape_kernel` (transpose, split heads), biases reshaped to [heads, head_dim],
  `out` kernel [heads, head_dim, emb], `out/bias` and `sinks` as they are; router
  `GptOssMlp/gate/kernel` transposed, `gate/bias` as is; experts are fused HF tensors already
  in [experts, in, out] orientation: `wo` = down_proj [experts, mlp, emb] and `wo_bias` as they
  are; the composite key (wi_0, wi_1) <- gate_up_proj [experts, emb, 2*mlp] is split by the
  `interleave` hook: wi_0 = [..., ::2], wi_1 = [..., 1::2] (likewise the biases). Here the two
  halves are two rules reading the same tensor with TakeEvery (read twice, simplest).
- Layer cycle: scanned, MaxText's decoder scans `GptOssScannableBlock`s (models/gpt_oss.py)
  holding sub-layers `layers_0 .. layers_{cycle-1}`, so params are
  `decoder/layers/layers_{b}/...` stacked over HF layers b, b+cycle, ... (the mapping's
  `range(block_idx, n_layers, layer_cycle_interval)`); unscanned they are `decoder/layers_{i}`.
  `inhomogeneous_layer_cycle_interval: 2` (gpt-oss-20b.yml / gpt-oss-120b.yml) is the length of
  the hard-coded attention pattern `GPT_OSS_ATTENTION_PATTERN` (sliding, global); we derive it
  from config.json's `layer_types` and refuse a layout MaxText would model differently.
- MXFP4 checkpoints (`quantization_config.quant_method: mxfp4`): the expert gate_up_proj /
  down_proj are `<key>_blocks` [experts, out, in/32, 16] + `<key>_scales` [experts, out, in/32];
  MaxText's dequantize_mxfp4.py dequantizes them and permutes (0, 2, 1) to HF's [experts, in, out]
  before its converter runs. Here the same happens inside the work item.
"""

from __future__ import annotations

from ckpt_transforms.planning.specs import Aux, LayerGroup, ModelMap, ParamRule
from ckpt_transforms.tensors.ops import DequantMXFP4, Op, TakeEvery, Transpose
from ckpt_transforms.tensors.quant import MXFP4_GROUP
from model_maps.common import (
    KERNEL,
    LAYER,
    MAX_EXPERTS,
    ConfigError,
    Dims,
    attention_rules,
    common_extras,
    config_int,
    config_list,
    embedding_rules,
    layer_norm_rules,
    require_quant_method,
    rounded_like_dequantize_scripts,
)

# models/gpt_oss.py GPT_OSS_ATTENTION_PATTERN, in HF's layer_types spelling.
ATTENTION_PATTERN = ("sliding_attention", "full_attention")
EXPERTS_TO_HF = (Transpose((0, 2, 1)),)  # [experts, out, in] -> [experts, in, out]


def layer_cycle(config: dict, layers: int) -> int:
    n = len(ATTENTION_PATTERN)
    expected = [ATTENTION_PATTERN[i % n] for i in range(layers)]
    types = config_list(config, "layer_types")
    if types is not None and types != expected:
        raise ConfigError(
            f"layer_types {types[:64]!r} is not the alternating {'/'.join(ATTENTION_PATTERN)} cycle MaxText's gpt_oss decoder uses"
        )
    return n


def _expert_rule(
    target: str, key: str, experts: int, out: int, inp: int, mxfp4: bool, select: tuple[Op, ...] = ()
) -> ParamRule:
    """An expert projection: bf16 [experts, in, out], or MXFP4 blocks/scales of [experts, out, in]."""
    if not mxfp4:
        return ParamRule(target, key, (experts, inp, out), select)
    if inp % MXFP4_GROUP:
        raise ConfigError(f"{key}: input size {inp} is not a multiple of the MXFP4 group of {MXFP4_GROUP}")
    groups = inp // MXFP4_GROUP
    scales = Aux(f"{key}_scales", (experts, out, groups))
    ops = (DequantMXFP4(),) + EXPERTS_TO_HF + select
    return ParamRule(target, f"{key}_blocks", (experts, out, groups, MXFP4_GROUP // 2), ops, aux=(scales,))


def gpt_oss_map(config: dict, vocab_size: int | None = None) -> ModelMap:
    mxfp4 = require_quant_method(config, "gpt_oss", ("mxfp4",)) == "mxfp4"
    d = Dims.from_config(config)
    if not config.get("num_local_experts"):
        raise ConfigError("config.json has no 'num_local_experts' (not a GPT-OSS checkpoint?)")
    e, a, hf, t = (
        config_int(config, "num_local_experts", MAX_EXPERTS),
        f"{LAYER}.self_attn",
        f"{LAYER}.mlp",
        "GptOssMlp",
    )
    rules = layer_norm_rules(d) + attention_rules(d, bias=True, prefix="GptOssAttention")
    rules += [
        ParamRule("GptOssAttention/out/bias", f"{a}.o_proj.bias", (d.hidden,)),
        ParamRule("GptOssAttention/sinks", f"{a}.sinks", (d.heads,)),
        ParamRule(f"{t}/gate/kernel", f"{hf}.router.weight", (e, d.hidden), KERNEL),
        ParamRule(f"{t}/gate/bias", f"{hf}.router.bias", (e,)),
        _expert_rule(f"{t}/wi_0", f"{hf}.experts.gate_up_proj", e, 2 * d.mlp, d.hidden, mxfp4, (TakeEvery(-1, 0, 2),)),
        _expert_rule(f"{t}/wi_1", f"{hf}.experts.gate_up_proj", e, 2 * d.mlp, d.hidden, mxfp4, (TakeEvery(-1, 1, 2),)),
        ParamRule(f"{t}/wi_0_bias", f"{hf}.experts.gate_up_proj_bias", (e, 2 * d.mlp), (TakeEvery(-1, 0, 2),)),
        ParamRule(f"{t}/wi_1_bias", f"{hf}.experts.gate_up_proj_bias", (e, 2 * d.mlp), (TakeEvery(-1, 1, 2),)),
        _expert_rule(f"{t}/wo", f"{hf}.experts.down_proj", e, d.hidden, d.mlp, mxfp4),
        ParamRule(f"{t}/wo_bias", f"{hf}.experts.down_proj_bias", (e, d.hidden)),
    ]
    global_rules = embedding_rules(d, vocab_size)
    if mxfp4:  # dequantize_mxfp4.py rewrites the other tensors in its target dtype (bf16)
        rules, global_rules = rounded_like_dequantize_scripts(rules), rounded_like_dequantize_scripts(global_rules)
    group = LayerGroup("decoder/layers", tuple(range(d.layers)), tuple(rules), cycle=layer_cycle(config, d.layers))
    return ModelMap(
        family="gpt_oss",
        num_layers=d.layers,
        global_rules=tuple(global_rules),
        layer_rules=(),
        known_extras=common_extras(d),
        layer_groups=(group,),
    )
