"""Gemma3 (4B / 12B / 27B, `Gemma3ForConditionalGeneration`): text decoder, and optionally the
SigLIP vision tower and the multimodal projector (`--use_multimodal`, MaxText's flag).

Evidence, all from MaxText (read for facts):
- Names: param_mapping.py `GEMMA3_MAXTEXT_TO_HF_PARAM_MAPPING`. Text layers (models/gemma3.py
  `Gemma3DecoderLayer`): `pre_self_attention_norm`, `post_self_attention_norm`, `pre_ffw_norm`,
  `post_ffw_norm` (HF input / post_attention / pre_feedforward / post_feedforward layernorm),
  `self_attention/{query,key,value,out}/kernel`, `self_attention/{query,key}_norm/scale`
  (per-head, [head_dim]) and `mlp/{wi_0,wi_1,wo}/kernel`.
- Scan-block structure: layers/decoders.py `_apply_gemma3_scanned_blocks` scans
  `num_decoder_layers // 6` `Gemma3ScannableBlock`s named `layers`, each holding `layers_0 ..
  layers_5` (len(GEMMA3_ATTENTION_PATTERN) = 6: five sliding, one global), so scanned params are
  `decoder/layers/layers_{b}/...` stacked over HF layers b, b+6, ...; the num_decoder_layers % 6
  layers left over form one unscanned block `decoder/layers_remainder/layers_{r}`. Unscanned:
  `decoder/layers_{i}`. config.json's layer_types must follow that pattern.
- Transforms, `GEMMA3_MAXTEXT_TO_HF_PARAM_HOOK_FN`: kernels `reshape_kernel` (no query scaling,
  unlike Gemma2); every RMSNorm scale (the six per layer, `decoder_norm`, and the projector's
  `mm_soft_embedding_norm`) is `x + 1.0`, which numpy evaluates in float32 for MaxText's bf16
  arrays, so those leaves are float32 (AddScalar; see gemma2.py). The embedding is multiplied by
  `np.dtype("bfloat16").type(hidden_size ** 0.5)` (a bf16 scalar: the product is rounded once to
  the embedding's dtype) and then padded or truncated to MaxText's vocab_size: the gemma3 model
  configs say 262144 while the official checkpoints have 262208 rows, so those are cut to
  262144; a checkpoint with another vocabulary keeps its size; `vocab_size` (MaxText's
  option) pads or cuts to that many rows instead.
- Vision (only with use_multimodal; base.yml's default is false and the gemma3 model configs do
  not change it): `vision_encoder/Gemma3VisionEncoderLayer_0/...`: the patch conv kernel
  transposed (2, 3, 1, 0) to [patch, patch, channels, width] and its bias; `pos_embedding` with
  a leading 1 (`pos_embed`; base.yml `posemb_type_for_vit: learn` makes it a param);
  `Transformer/encoder_norm` = post_layernorm; per encoder layer `encoderblock_{i}` (never
  scanned: models/gemma3.py `Encoder`): `LayerNorm_0/1` = layer_norm1/2, attention q/k/v
  kernels [width, heads, head_dim], biases [heads, head_dim] (`vis_bias`), out kernel [heads,
  head_dim, width] with its [width] bias, `MlpBlockViT_0/Dense_0/1` = fc1/fc2 (transposed).
  `vision_encoder/VisionEmbedder_0/mm_input_projection/w` is the projector weight as it is and
  `mm_soft_embedding_norm/scale` is `+ 1`.
- Key names: MaxText's mapping reads `model.language_model.*`, `model.vision_tower.vision_model.*`
  and `model.multi_modal_projector.*` (transformers' in-memory names; its safetensors path
  therefore fails on real files). Checkpoints on disk say `language_model.model.*`,
  `vision_tower.vision_model.*` (official files) or `vision_tower.*` (transformers 5's
  save_pretrained) and `multi_modal_projector.*`; a text-only `Gemma3ForCausalLM` says `model.*`.
  The rules use save_pretrained's spelling and each key is read under whichever spelling the
  checkpoint has (ModelMap.key_aliases). Without use_multimodal the vision tensors are reported as known
  extras; SigLIP's pooling head (`vision_use_head`) is never part of MaxText's model.
- The gemma3 model configs set `logits_via_embedding: true` (no lm_head is mapped): an untied
  checkpoint is refused.
- Sizes: fields absent from config.json take transformers' Gemma3TextConfig / SiglipVisionConfig
  defaults (the official configs list only what differs from them).
"""

from __future__ import annotations

import ml_dtypes

from ckpt_transforms.planning.specs import LayerGroup, ModelMap, ParamRule
from ckpt_transforms.tensors.ops import ScaleBy, SplitAxis, Transpose
from model_maps.common import (
    KERNEL,
    MAX_HEADS,
    MAX_LAYERS,
    MAX_WIDTH,
    NORM_PLUS_ONE,
    ConfigError,
    Dims,
    attention_rules,
    check_layer_types,
    config_bool,
    config_int,
    gated_mlp_rules,
    heads_bias,
    heads_kernel,
    out_kernel,
    require_quant_method,
    sub_config,
    vocab_resize,
    vocab_rows,
)

# models/gemma3.py GEMMA3_ATTENTION_PATTERN, in HF's layer_types spelling.
ATTENTION_PATTERN = ("sliding_attention",) * 5 + ("full_attention",)
MAXTEXT_VOCAB = {262208: 262144}  # official HF vocabulary -> gemma3-*.yml vocab_size
# transformers' Gemma3TextConfig / SiglipVisionConfig defaults for fields config.json may omit.
TEXT_DEFAULTS = {
    "vocab_size": 262208,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "tie_word_embeddings": True,
}
VISION_DEFAULTS = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 16,
}
# Canonical spellings: what transformers 5's save_pretrained writes (and `ckptbeam plan` assumes
# for a config-only plan); the aliases are MaxText's mapping names (transformers' in-memory
# names), the official files' `vision_tower.vision_model.` and Gemma3ForCausalLM's flat `model.`.
TEXT = "language_model.model"
VISION = "vision_tower"
PROJECTOR = "multi_modal_projector"
KEY_ALIASES = (
    (f"{TEXT}.", ("model.language_model.", "model.")),
    (f"{VISION}.", ("vision_tower.vision_model.", "model.vision_tower.vision_model.", "model.vision_tower.")),
    (f"{PROJECTOR}.", ("model.multi_modal_projector.",)),
)
VISION_EXTRAS = (
    "vision_tower.*",
    "multi_modal_projector.*",
    "model.vision_tower.*",
    "model.multi_modal_projector.*",
)
POOLING_HEAD_EXTRAS = tuple(f"{p}.head.*" for p in ("vision_tower", "vision_tower.vision_model", "model.vision_tower"))
HF_LAYER = f"{TEXT}.layers.{{layer}}"
VE = "vision_encoder/Gemma3VisionEncoderLayer_0"


def text_rules(d: Dims) -> list[ParamRule]:
    rules = attention_rules(d, layer=HF_LAYER) + gated_mlp_rules("mlp", f"{HF_LAYER}.mlp", d.mlp, d.hidden)
    a = f"{HF_LAYER}.self_attn"
    norms = [
        ("pre_self_attention_norm/scale", f"{HF_LAYER}.input_layernorm.weight", d.hidden),
        ("post_self_attention_norm/scale", f"{HF_LAYER}.post_attention_layernorm.weight", d.hidden),
        ("self_attention/query_norm/scale", f"{a}.q_norm.weight", d.head_dim),
        ("self_attention/key_norm/scale", f"{a}.k_norm.weight", d.head_dim),
        ("pre_ffw_norm/scale", f"{HF_LAYER}.pre_feedforward_layernorm.weight", d.hidden),
        ("post_ffw_norm/scale", f"{HF_LAYER}.post_feedforward_layernorm.weight", d.hidden),
    ]
    return rules + [ParamRule(t, k, (n,), NORM_PLUS_ONE) for t, k, n in norms]


def vision_rules(vision: dict, text_hidden: int) -> list[ParamRule]:
    v = {**VISION_DEFAULTS, **{k: val for k, val in vision.items() if val is not None}}
    where = "config.json vision_config"
    width, mlp = (
        config_int(v, "hidden_size", MAX_WIDTH, where=where),
        config_int(v, "intermediate_size", MAX_WIDTH, where=where),
    )
    heads, patch = (
        config_int(v, "num_attention_heads", MAX_HEADS, where=where),
        config_int(v, "patch_size", MAX_WIDTH, where=where),
    )
    for name, hi in (("image_size", MAX_WIDTH), ("num_channels", MAX_WIDTH), ("num_hidden_layers", MAX_LAYERS)):
        config_int(v, name, hi, where=where)
    if width % heads or v["image_size"] % patch:
        raise ConfigError("vision_config: hidden_size must divide by num_attention_heads, image_size by patch_size")
    head_dim, positions = width // heads, (v["image_size"] // patch) ** 2
    e = f"{VISION}.embeddings"
    rules = [
        ParamRule(
            f"{VE}/embedding/kernel",
            f"{e}.patch_embedding.weight",
            (width, v["num_channels"], patch, patch),
            (Transpose((2, 3, 1, 0)),),
        ),
        ParamRule(f"{VE}/embedding/bias", f"{e}.patch_embedding.bias", (width,)),
        ParamRule(
            f"{VE}/pos_embedding", f"{e}.position_embedding.weight", (positions, width), (SplitAxis(0, (1, -1)),)
        ),
        ParamRule(f"{VE}/Transformer/encoder_norm/scale", f"{VISION}.post_layernorm.weight", (width,)),
        ParamRule(f"{VE}/Transformer/encoder_norm/bias", f"{VISION}.post_layernorm.bias", (width,)),
    ]
    for i in range(v["num_hidden_layers"]):
        t, hf = f"{VE}/Transformer/encoderblock_{i}", f"{VISION}.encoder.layers.{i}"
        mha, att = f"{t}/MultiHeadDotProductAttention_0", f"{hf}.self_attn"
        rules += [
            ParamRule(f"{t}/LayerNorm_0/scale", f"{hf}.layer_norm1.weight", (width,)),
            ParamRule(f"{t}/LayerNorm_0/bias", f"{hf}.layer_norm1.bias", (width,)),
            ParamRule(f"{t}/LayerNorm_1/scale", f"{hf}.layer_norm2.weight", (width,)),
            ParamRule(f"{t}/LayerNorm_1/bias", f"{hf}.layer_norm2.bias", (width,)),
        ]
        for name, proj in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            rules += [
                ParamRule(f"{mha}/{name}/kernel", f"{att}.{proj}.weight", (width, width), heads_kernel(head_dim)),
                ParamRule(f"{mha}/{name}/bias", f"{att}.{proj}.bias", (width,), heads_bias(head_dim)),
            ]
        rules += [
            ParamRule(f"{mha}/out/kernel", f"{att}.out_proj.weight", (width, width), out_kernel(head_dim)),
            ParamRule(f"{mha}/out/bias", f"{att}.out_proj.bias", (width,)),
            ParamRule(f"{t}/MlpBlockViT_0/Dense_0/kernel", f"{hf}.mlp.fc1.weight", (mlp, width), KERNEL),
            ParamRule(f"{t}/MlpBlockViT_0/Dense_0/bias", f"{hf}.mlp.fc1.bias", (mlp,)),
            ParamRule(f"{t}/MlpBlockViT_0/Dense_1/kernel", f"{hf}.mlp.fc2.weight", (width, mlp), KERNEL),
            ParamRule(f"{t}/MlpBlockViT_0/Dense_1/bias", f"{hf}.mlp.fc2.bias", (width,)),
        ]
    emb = "vision_encoder/VisionEmbedder_0"
    return rules + [
        ParamRule(f"{emb}/mm_input_projection/w", f"{PROJECTOR}.mm_input_projection_weight", (width, text_hidden)),
        ParamRule(
            f"{emb}/mm_soft_embedding_norm/scale", f"{PROJECTOR}.mm_soft_emb_norm.weight", (width,), NORM_PLUS_ONE
        ),
    ]


def gemma3_map(config: dict, use_multimodal: bool | None = None, vocab_size: int | None = None) -> ModelMap:
    require_quant_method(config, "gemma3")
    # Gemma3ForConditionalGeneration nests the decoder's config; Gemma3ForCausalLM does not.
    text = sub_config(config, "text_config") if "text_config" in config else config
    text = {**TEXT_DEFAULTS, **{k: v for k, v in text.items() if v is not None}}
    if use_multimodal and "vision_config" not in config:
        raise ConfigError("--use_multimodal needs a Gemma3ForConditionalGeneration checkpoint (vision_config)")
    d = Dims.from_config(text, "config.json text_config" if "text_config" in config else "config.json")
    if not config_bool(config, "tie_word_embeddings", d.tied):
        raise ConfigError("tie_word_embeddings is false, but MaxText's gemma3 uses the embedding as its output head")
    check_layer_types(text, ATTENTION_PATTERN, "gemma3", d.layers)
    normalizer = float(ml_dtypes.bfloat16(d.hidden**0.5))
    embed_ops = (ScaleBy(normalizer),) + vocab_resize(d.vocab, vocab_rows(d.vocab, vocab_size, MAXTEXT_VOCAB))
    global_rules = [
        ParamRule("token_embedder/embedding", f"{TEXT}.embed_tokens.weight", (d.vocab, d.hidden), embed_ops),
        ParamRule("decoder/decoder_norm/scale", f"{TEXT}.norm.weight", (d.hidden,), NORM_PLUS_ONE),
    ]
    extras = ("lm_head.weight", "language_model.lm_head.weight") + POOLING_HEAD_EXTRAS
    if use_multimodal:
        global_rules += vision_rules(sub_config(config, "vision_config"), d.hidden)
    else:
        extras += VISION_EXTRAS
    group = LayerGroup(
        "decoder/layers",
        tuple(range(d.layers)),
        tuple(text_rules(d)),
        cycle=len(ATTENTION_PATTERN),
        remainder="decoder/layers_remainder",
    )
    return ModelMap(
        family="gemma3",
        num_layers=d.layers,
        global_rules=tuple(global_rules),
        layer_rules=(),
        known_extras=extras,
        layer_groups=(group,),
        key_aliases=KEY_ALIASES,
    )
