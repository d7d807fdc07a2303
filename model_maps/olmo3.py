"""Olmo3 (7B, 7B-pt, 32B): post-norm decoder with full-width q/k norms and a 4-layer cycle.

Evidence, all from MaxText (read for facts):
- Names and stacking: param_mapping.py `OLMO3_MAXTEXT_TO_HF_PARAM_MAPPING`. Each layer has
  `attention/{query,key,value,out}/kernel`, `attention/{query,key}_norm/scale`,
  `mlp/{wi_0,wi_1,wo}/kernel` (gate/up/down_proj), `post_self_attention_layer_norm/scale`
  (post_attention_layernorm) and `post_mlp_layer_norm/scale` (post_feedforward_layernorm); there
  is no pre-attention norm (models/olmo3.py `Olmo3DecoderLayer`). Scanned, MaxText scans
  `Olmo3ScannableBlock`s (layers/decoders.py: `num_decoder_layers / inhomogeneous_layer_cycle_interval`
  blocks named `layers`) holding `layers_0 .. layers_3`, so params are
  `decoder/layers/layers_{k}/...` stacked over HF layers k, k+4, ... at `param_scan_axis`;
  unscanned they are `decoder/layers_{i}`. The cycle length 4 is
  `inhomogeneous_layer_cycle_interval: 4` in olmo3-7b.yml / olmo3-7b-pt.yml / olmo3-32b.yml and the
  length of `OLMO3_ATTENTION_PATTERN` (3 sliding, 1 global); config.json's layer_types must match.
- Transforms: `OLMO3_MAXTEXT_TO_HF_PARAM_HOOK_FN`: kernels `reshape_kernel` (transpose, then
  reshape to [emb, heads, head_dim] / [heads, head_dim, emb]); norms and q/k norms as they are
  (identity hooks: Olmo3's RMSNorm is not zero-centred, no `+ 1`); `logits_dense` transposed.
- q/k norms span all heads: layers/attentions.py uses `GlobalRMSNorm` over num_heads * head_dim
  (num_kv_heads * head_dim for the key) for model names starting with "olmo3".
- Embedding: the hook zero-pads to MaxText's vocab_size, but MaxText's olmo3 configs have the
  same vocab as the HF checkpoints (100278), and an untied `logits_dense` can only be built when
  the two agree (its hook is a plain transpose-reshape), so the embedding is taken as it is
  unless `vocab_size` asks for another size (then the head is resized with it, embedding_rules).
  MaxText's olmo3 configs set `logits_via_embedding: false`, so a tied checkpoint is refused.
"""

from __future__ import annotations

from ckpt_transforms.planning.specs import LayerGroup, ModelMap, ParamRule
from model_maps.common import (
    LAYER,
    ConfigError,
    Dims,
    attention_rules,
    check_layer_types,
    common_extras,
    dense_mlp_rules,
    embedding_rules,
    require_quant_method,
)

# models/olmo3.py OLMO3_ATTENTION_PATTERN, in HF's layer_types spelling.
ATTENTION_PATTERN = ("sliding_attention", "sliding_attention", "sliding_attention", "full_attention")


def olmo3_map(config: dict, vocab_size: int | None = None) -> ModelMap:
    require_quant_method(config, "olmo3")
    d = Dims.from_config(config)
    if d.tied:
        raise ConfigError("tie_word_embeddings is true, but MaxText's olmo3 models have an untied logits_dense")
    check_layer_types(config, ATTENTION_PATTERN, "olmo3", d.layers)
    a = f"{LAYER}.self_attn"
    rules = attention_rules(d, prefix="attention") + [
        ParamRule("attention/query_norm/scale", f"{a}.q_norm.weight", (d.heads * d.head_dim,)),
        ParamRule("attention/key_norm/scale", f"{a}.k_norm.weight", (d.kv_heads * d.head_dim,)),
    ]
    rules += dense_mlp_rules(d) + [
        ParamRule("post_self_attention_layer_norm/scale", f"{LAYER}.post_attention_layernorm.weight", (d.hidden,)),
        ParamRule("post_mlp_layer_norm/scale", f"{LAYER}.post_feedforward_layernorm.weight", (d.hidden,)),
    ]
    group = LayerGroup("decoder/layers", tuple(range(d.layers)), tuple(rules), cycle=len(ATTENTION_PATTERN))
    return ModelMap(
        family="olmo3",
        num_layers=d.layers,
        global_rules=tuple(embedding_rules(d, vocab_size)),
        layer_rules=(),
        known_extras=common_extras(d),
        layer_groups=(group,),
    )
