"""Gemma2 (2B / 9B / 27B): one MaxText layer holds a local and a global HF layer.

Evidence, all from MaxText (read for facts):
- Names and pairing: param_mapping.py `GEMMA2_MAXTEXT_TO_HF_PARAM_MAPPING`: MaxText layer i
  holds HF layer 2i as its `*_local` sub-layer and HF layer 2i+1 as `*_global` (so config.json's
  layer_types must alternate sliding, full)
  (models/gemma2.py `Gemma2DecoderLayer`: `pre_self_attention_norm_{local,global}`,
  `self_attention_{local,global}`, `post_self_attention_norm_*`, `pre_ffw_norm_*`, `mlp_*`,
  `post_ffw_norm_*`); HF input_layernorm / post_attention_layernorm / pre_feedforward_layernorm /
  post_feedforward_layernorm feed the four norms. The gemma2 model configs say
  `base_num_decoder_layers` is half the HF layer count; scanned, `decoder/layers` stacks the
  num_hidden_layers / 2 MaxText layers at `param_scan_axis` (layers/decoders.py scans
  `Gemma2DecoderLayer` `num_decoder_layers` times); unscanned they are `decoder/layers_{i}`.
- Transforms, `GEMMA2_MAXTEXT_TO_HF_PARAM_HOOK_FN`:
  - kernels `reshape_kernel` (transpose, reshape to [emb, heads, head_dim] / [heads, head_dim,
    emb]); the query is also multiplied by `np.float32(1 / sqrt(head_dim))` and cast back to
    its dtype (`scale_query_layer`; config.json's head_dim).
  - norms `scale_rmsnorm_layer`: `x + 1.0`. On the bf16 array MaxText's eager loader returns,
    numpy (with ml_dtypes) computes that in float32 and returns float32, so these leaves are
    saved as float32 even with save_dtype bfloat16 (its lazy path would save bf16 instead, with
    the same values rounded); we follow the eager path (AddScalar).
  - embedding `pad_hf_embedding_layer`: zero-padded to MaxText's vocab_size, then multiplied by
    `np.float32(hidden_size ** 0.5)` (float32 product, cast back to the embedding's dtype).
    Every gemma2 model config has `vocab_size: 256128` and the HF checkpoints 256000 rows
    (the hook's docstring: "MaxText pads Gemma2 embedding to 256128"), so a checkpoint with
    that official vocabulary is padded to 256128; a checkpoint with another vocabulary keeps it
    (MaxText has to be given `vocab_size` to load it then). `vocab_size` (MaxText's option)
    pads or cuts to that many rows instead.
- The model configs set `logits_via_embedding: true` and the mapping has no lm_head: the
  output head is the embedding, so an untied checkpoint is refused.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ckpt_transforms.planning.specs import LayerGroup, ModelMap, ParamRule
from ckpt_transforms.tensors.ops import ScaleBy, ScaleBySqrt
from model_maps.common import (
    KERNEL,
    NORM_PLUS_ONE,
    ConfigError,
    Dims,
    check_layer_types,
    common_extras,
    heads_kernel,
    out_kernel,
    require_quant_method,
    vocab_resize,
    vocab_rows,
)

# HF vocabulary of the official checkpoints -> MaxText's vocab_size (gemma2-*.yml).
MAXTEXT_VOCAB = {256000: 256128}
HF_LAYER = "model.layers.{layer}"


def sub_layer_rules(d: Dims, kind: str, offset: int) -> list[ParamRule]:
    """The `*_{kind}` half of a MaxText layer, read from HF layer 2n + offset."""
    a, q_width, kv_width = f"{HF_LAYER}.self_attn", d.heads * d.head_dim, d.kv_heads * d.head_dim
    att, mlp = f"self_attention_{kind}", f"mlp_{kind}"
    rules = [
        ParamRule(
            f"{att}/query/kernel",
            f"{a}.q_proj.weight",
            (q_width, d.hidden),
            heads_kernel(d.head_dim) + (ScaleBySqrt(d.head_dim, -1),),
        ),
        ParamRule(f"{att}/key/kernel", f"{a}.k_proj.weight", (kv_width, d.hidden), heads_kernel(d.head_dim)),
        ParamRule(f"{att}/value/kernel", f"{a}.v_proj.weight", (kv_width, d.hidden), heads_kernel(d.head_dim)),
        ParamRule(f"{att}/out/kernel", f"{a}.o_proj.weight", (d.hidden, q_width), out_kernel(d.head_dim)),
        ParamRule(f"{mlp}/wi_0/kernel", f"{HF_LAYER}.mlp.gate_proj.weight", (d.mlp, d.hidden), KERNEL),
        ParamRule(f"{mlp}/wi_1/kernel", f"{HF_LAYER}.mlp.up_proj.weight", (d.mlp, d.hidden), KERNEL),
        ParamRule(f"{mlp}/wo/kernel", f"{HF_LAYER}.mlp.down_proj.weight", (d.hidden, d.mlp), KERNEL),
    ]
    for norm, hf in (
        ("pre_self_attention_norm", "input_layernorm"),
        ("post_self_attention_norm", "post_attention_layernorm"),
        ("pre_ffw_norm", "pre_feedforward_layernorm"),
        ("post_ffw_norm", "post_feedforward_layernorm"),
    ):
        rules.append(ParamRule(f"{norm}_{kind}/scale", f"{HF_LAYER}.{hf}.weight", (d.hidden,), NORM_PLUS_ONE))
    return [dataclasses.replace(r, layer_stride=2, layer_offset=offset) for r in rules]


def gemma2_map(config: dict, vocab_size: int | None = None) -> ModelMap:
    require_quant_method(config, "gemma2")
    d = Dims.from_config(config)
    if d.layers % 2:
        raise ConfigError(
            f"num_hidden_layers is {d.layers}: MaxText's gemma2 layer pairs a local and a global HF layer"
        )
    if not d.tied:
        raise ConfigError("tie_word_embeddings is false, but MaxText's gemma2 uses the embedding as its output head")
    check_layer_types(config, ("sliding_attention", "full_attention"), "gemma2", d.layers)
    normalizer = float(np.float32(d.hidden**0.5))
    embed_ops = vocab_resize(d.vocab, vocab_rows(d.vocab, vocab_size, MAXTEXT_VOCAB)) + (ScaleBy(normalizer),)
    global_rules = (
        ParamRule("token_embedder/embedding", "model.embed_tokens.weight", (d.vocab, d.hidden), embed_ops),
        ParamRule("decoder/decoder_norm/scale", "model.norm.weight", (d.hidden,), NORM_PLUS_ONE),
    )
    rules = sub_layer_rules(d, "local", 0) + sub_layer_rules(d, "global", 1)
    return ModelMap(
        family="gemma2",
        num_layers=d.layers // 2,
        global_rules=global_rules,
        layer_rules=(),
        known_extras=common_extras(d),
        layer_groups=(LayerGroup("decoder/layers", tuple(range(d.layers // 2)), tuple(rules)),),
    )
