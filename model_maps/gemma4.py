"""Gemma4: 26B-A4B (MoE), 31B (dense), and the small E2B / E4B variants, with the vision tower of
26B / 31B when `--use_multimodal` asks for it.

Evidence, all from MaxText (read for facts):
- 26B / 31B: param_mapping.py `GEMMA4_MAXTEXT_TO_HF_PARAM_MAPPING` / `..._HOOK_FN`, models/gemma4.py.
  - Layer pattern `GEMMA4_ATTENTION_PATTERN`: five sliding layers, then one global
    (config.json's layer_types must repeat it). Global layers use `global_head_dim` and
    `global_num_kv_heads` (gemma4-26b.yml: 512 / 2, gemma4-31b.yml: 512 / 4) and, with
    `share_kv_projections: true` in both model configs (HF: `attention_k_eq_v`), have no value
    projection. config.json says this either as `global_head_dim` / `num_global_key_value_heads`
    (official files) or as `per_layer_config` overrides of the full-attention layers (what
    transformers 5.23 writes); both are read.
  - Scanned (layers/decoders.py `_apply_gemma4_scanned_blocks`, `Gemma4ScannableBlock`): blocks of
    6 layers are scanned as `decoder/scanned_blocks`; inside a block the 5 local layers are
    themselves scanned (`local_layers`, nnx scan at param_scan_axis), the global layer is not
    (`global_layer`). So `scanned_blocks/local_layers/*` stacks HF layers [6b + l] at axes (1, 2)
    (to_maxtext.py `_build_multi_axis_stacked_tensor` moves [block][local] there for
    "scanned_blocks-local_layers" keys) and `scanned_blocks/global_layer/*` stacks HF layers 6b + 5
    at axis 1. Layers after the last whole block are created without the names the mapping
    gives them, so a layer count that is not a multiple of 6 is only converted unscanned.
    Unscanned: `decoder/layers_{i}`.
  - Per layer: `self_attention/{query,key,value,out}/kernel` (`reshape_kernel`),
    `self_attention/{query,key}_norm/scale`, the four norms (`pre_self_attention_norm`,
    `post_self_attention_norm`, `pre_ffw_norm`, `post_ffw_norm`), `layer_scalar` [1]. Norms are
    taken as they are: "Gemma 4 folds the +1 shift into the checkpoint scale" (no `+ 1`, so
    every leaf keeps the save dtype). value_norm has no scale (`v_norm_with_scale: false`).
  - Dense (31B): `mlp/{wi_0,wi_1,wo}/kernel`. MoE (26B, `Gemma4MoE`, num_experts > 1):
    `mlp/moe_block/MoeBlock_0/gate/kernel` (router.proj, transposed), `MoeBlock_0/wi_0|wi_1` =
    the first / second half of the fused `experts.gate_up_proj` [experts, 2 * moe_mlp, emb] moved to
    [experts, emb, moe_mlp] (`split_moe_wi0/1`), `MoeBlock_0/wo` = `experts.down_proj` transposed
    (0, 2, 1), `MoeBlock_0/per_expert_scale` (router.per_expert_scale), the shared expert
    `mlp/moe_block/shared_experts/*` = the layer's mlp.gate/up/down_proj, `mlp/pre_forward_scale_2`
    (router.scale), `mlp/pre_feedforward_layernorm_2`, `mlp/post_feedforward_layernorm_1/2`.
  - Embedding (`pad_hf_embedding_layer`): times `np.float32(hidden_size ** 0.5)`, cast back; the
    gemma4 model configs' vocab_size (262144) is the HF vocabulary, so nothing is padded unless
    `vocab_size` (MaxText's option) asks for other rows. The E2B/E4B per-layer embedding keeps
    its rows: MaxText sizes it by `vocab_size_per_layer_input`, not `vocab_size`.
    `logits_via_embedding: true`: an untied checkpoint is refused.
  - Vision (layers/encoders.py names `Gemma4VisionEncoderLayer_0` and `Gemma4VisionProjector_0`;
    models/gemma4_vision.py): `vision_entry/input_projection/kernel` (input_proj transposed),
    `vision_entry/pos_emb_param` (position_embedding_table [2, positions, width] transposed
    (1, 0, 2)), `std_scale`, `std_bias`, per encoder layer `layer_{i}` the attention kernels
    [width, heads, head_dim] / [heads, head_dim, width], q/k norms, four norms and the MLP
    (`*.linear.weight`, transposed); `Gemma4VisionProjector_0/projection/kernel` is
    embed_vision.embedding_projection transposed. MaxText always has std_scale / std_bias, so the
    vision tower converts only for checkpoints that store them (`standardize: true`, as 26B / 31B).
- E2B / E4B (`GEMMA4_SMALL_*`, models/gemma4_small.py; decoder_block gemma4_small): MaxText
  has no scanned form ("Scan layers is not supported for the gemma4_small decoder block"); its
  vision mapping is marked not yet supported, so they convert text-only and unscanned:
  `decoder/layers_{i}` with the per-layer-embedding (PLE) gate/projection/norm, the last
  `num_kv_shared_layers` layers without key/value projections and key norm (they reuse a donor
  layer's) and, with `use_double_wide_mlp`, twice as wide an MLP; plus
  `decoder/per_layer_embedder/{embed_tokens_per_layer, per_layer_model_projection/kernel,
  per_layer_projection_norm/scale}`. The sliding/global pattern comes from layer_types (MaxText
  picks it by model name: period 5 for gemma4-e2b, 6 for gemma4-e4b).
- Key names: MaxText reads `model.language_model.*` (what save_pretrained writes for
  `Gemma4ForConditionalGeneration`); a text-only `Gemma4ForCausalLM` says `model.*`.
  The audio tower (E2B / E4B) is never part of MaxText's model: known extras.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ckpt_transforms.planning.specs import LayerGroup, ModelMap, ParamRule
from ckpt_transforms.tensors.ops import ScaleBy, SliceAxis, Transpose
from model_maps.common import (
    KERNEL,
    MAX_EXPERTS,
    MAX_HEADS,
    MAX_LAYERS,
    MAX_VOCAB,
    MAX_WIDTH,
    ConfigError,
    Dims,
    check_layer_types,
    config_bool,
    config_int,
    config_list,
    gated_mlp_rules,
    heads_kernel,
    out_kernel,
    require_quant_method,
    vocab_resize,
    vocab_rows,
)

BLOCK = ("sliding_attention",) * 5 + ("full_attention",)  # models/gemma4.py GEMMA4_ATTENTION_PATTERN
TEXT = "model.language_model"
HF_LAYER = f"{TEXT}.layers.{{layer}}"
VISION = "model.vision_tower"
AUDIO_EXTRAS = ("model.audio_tower.*", "model.embed_audio.*")
VISION_EXTRAS = ("model.vision_tower.*", "model.embed_vision.*")


@dataclasses.dataclass(frozen=True)
class Attn:
    heads: int
    kv_heads: int
    head_dim: int


def _text_config(config: dict) -> dict:
    text = config.get("text_config") if "text_config" in config else config
    if not isinstance(text, dict):
        raise ConfigError("config.json's text_config is not an object")
    return text


def global_attention(text: dict, d: Dims, layer_types: list[str]) -> Attn:
    """Head dim and KV heads of the full-attention layers, from either config.json spelling."""
    full = [i for i, t in enumerate(layer_types) if t == "full_attention"]
    overrides = per_layer_overrides(text, d.layers)
    if overrides:
        per = [overrides.get(i, {}) for i in full]
        if any(p != per[0] for p in per) or any(k not in full for k in overrides):
            raise ConfigError("per_layer_config overrides differ between layers; MaxText has one global layer shape")
        o = per[0] if per else {}
        where = "config.json per_layer_config"
        kv = config_int(o, "num_key_value_heads", d.heads, default=d.kv_heads, where=where)
        return Attn(d.heads, kv, config_int(o, "head_dim", MAX_WIDTH, default=d.head_dim, where=where))
    kv = (
        config_int(text, "num_global_key_value_heads", d.heads, default=d.kv_heads)
        if text.get("attention_k_eq_v")
        else d.kv_heads
    )
    return Attn(d.heads, kv, config_int(text, "global_head_dim", MAX_WIDTH, default=512))


def per_layer_overrides(text: dict, layers: int) -> dict[int, dict]:
    """per_layer_config as {layer index: overrides}; keys must be layer numbers, values objects."""
    raw = text.get("per_layer_config") or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config.json: per_layer_config is {raw!r}; expected an object")
    out = {}
    for k, v in raw.items():
        if not (k.isdigit() and int(k) < layers and isinstance(v, dict)):
            raise ConfigError(
                f"config.json: per_layer_config[{k!r}] is not a layer number below {layers} with an object of overrides"
            )
        out[int(k)] = v
    return out


def attention_rules(a: Attn, hidden: int, with_kv: bool = True, with_value: bool = True) -> list[ParamRule]:
    s, t = f"{HF_LAYER}.self_attn", "self_attention"
    q, kv = a.heads * a.head_dim, a.kv_heads * a.head_dim
    rules = [
        ParamRule(f"{t}/query/kernel", f"{s}.q_proj.weight", (q, hidden), heads_kernel(a.head_dim)),
        ParamRule(f"{t}/out/kernel", f"{s}.o_proj.weight", (hidden, q), out_kernel(a.head_dim)),
        ParamRule(f"{t}/query_norm/scale", f"{s}.q_norm.weight", (a.head_dim,)),
    ]
    if with_kv:
        rules += [
            ParamRule(f"{t}/key/kernel", f"{s}.k_proj.weight", (kv, hidden), heads_kernel(a.head_dim)),
            ParamRule(f"{t}/key_norm/scale", f"{s}.k_norm.weight", (a.head_dim,)),
        ]
    if with_kv and with_value:
        rules.append(ParamRule(f"{t}/value/kernel", f"{s}.v_proj.weight", (kv, hidden), heads_kernel(a.head_dim)))
    return rules


def norm_rules(hidden: int) -> list[ParamRule]:
    return [
        ParamRule(f"{t}/scale", f"{HF_LAYER}.{hf}.weight", (hidden,))
        for t, hf in (
            ("pre_self_attention_norm", "input_layernorm"),
            ("post_self_attention_norm", "post_attention_layernorm"),
            ("pre_ffw_norm", "pre_feedforward_layernorm"),
            ("post_ffw_norm", "post_feedforward_layernorm"),
        )
    ] + [ParamRule("layer_scalar", f"{HF_LAYER}.layer_scalar", (1,))]


def moe_rules(text: dict, d: Dims) -> list[ParamRule]:
    e = config_int(text, "num_experts", MAX_EXPERTS)
    m = config_int(text, "moe_intermediate_size", MAX_WIDTH, lo=0, default=0)
    if not m:
        raise ConfigError("config.json has no 'moe_intermediate_size' for its experts")
    b, hf = "mlp/moe_block", HF_LAYER
    fused = (e, 2 * m, d.hidden)
    to_maxtext = (Transpose((0, 2, 1)),)
    return [
        ParamRule(f"{b}/MoeBlock_0/gate/kernel", f"{hf}.router.proj.weight", (e, d.hidden), KERNEL),
        ParamRule(
            f"{b}/MoeBlock_0/wi_0", f"{hf}.experts.gate_up_proj", fused, (SliceAxis(1, 0, m, 2 * m),) + to_maxtext
        ),
        ParamRule(
            f"{b}/MoeBlock_0/wi_1", f"{hf}.experts.gate_up_proj", fused, (SliceAxis(1, m, 2 * m, 2 * m),) + to_maxtext
        ),
        ParamRule(f"{b}/MoeBlock_0/wo", f"{hf}.experts.down_proj", (e, d.hidden, m), to_maxtext),
        ParamRule(f"{b}/MoeBlock_0/per_expert_scale", f"{hf}.router.per_expert_scale", (e,)),
        *gated_mlp_rules(f"{b}/shared_experts", f"{hf}.mlp", d.mlp, d.hidden),
        ParamRule("mlp/pre_forward_scale_2", f"{hf}.router.scale", (d.hidden,)),
        ParamRule("mlp/pre_feedforward_layernorm_2/scale", f"{hf}.pre_feedforward_layernorm_2.weight", (d.hidden,)),
        ParamRule("mlp/post_feedforward_layernorm_1/scale", f"{hf}.post_feedforward_layernorm_1.weight", (d.hidden,)),
        ParamRule("mlp/post_feedforward_layernorm_2/scale", f"{hf}.post_feedforward_layernorm_2.weight", (d.hidden,)),
    ]


def vision_rules(vision: dict, text_hidden: int) -> list[ParamRule]:
    def need(name: str, hi: int = MAX_WIDTH) -> int:
        return config_int(vision, name, hi, where="config.json vision_config")

    w, mlp, heads, patch = (
        need("hidden_size"),
        need("intermediate_size"),
        need("num_attention_heads", MAX_HEADS),
        need("patch_size"),
    )
    if not vision.get("standardize"):
        raise ConfigError(
            "vision_config.standardize is false: the checkpoint has no std_scale/std_bias, which MaxText's "
            "Gemma4 vision encoder always has (convert text-only)"
        )
    hd, ve = w // heads, "vision_encoder/Gemma4VisionEncoderLayer_0"
    rules = [
        ParamRule(
            f"{ve}/vision_entry/input_projection/kernel",
            f"{VISION}.patch_embedder.input_proj.weight",
            (w, patch * patch * 3),
            KERNEL,
        ),
        ParamRule(
            f"{ve}/vision_entry/pos_emb_param",
            f"{VISION}.patch_embedder.position_embedding_table",
            (2, need("position_embedding_size"), w),
            (Transpose((1, 0, 2)),),
        ),
        ParamRule(f"{ve}/std_scale", f"{VISION}.std_scale", (w,)),
        ParamRule(f"{ve}/std_bias", f"{VISION}.std_bias", (w,)),
        ParamRule(
            "vision_encoder/Gemma4VisionProjector_0/projection/kernel",
            "model.embed_vision.embedding_projection.weight",
            (text_hidden, w),
            KERNEL,
        ),
    ]
    for i in range(need("num_hidden_layers", MAX_LAYERS)):
        t, hf = f"{ve}/layer_{i}", f"{VISION}.encoder.layers.{i}"
        rules += [
            ParamRule(f"{t}/attention/{n}/kernel", f"{hf}.self_attn.{p}_proj.linear.weight", (w, w), heads_kernel(hd))
            for n, p in (("query", "q"), ("key", "k"), ("value", "v"))
        ]
        rules += [
            ParamRule(f"{t}/attention/out/kernel", f"{hf}.self_attn.o_proj.linear.weight", (w, w), out_kernel(hd)),
            ParamRule(f"{t}/attention/query_norm/scale", f"{hf}.self_attn.q_norm.weight", (hd,)),
            ParamRule(f"{t}/attention/key_norm/scale", f"{hf}.self_attn.k_norm.weight", (hd,)),
            ParamRule(f"{t}/mlp/wi_0/kernel", f"{hf}.mlp.gate_proj.linear.weight", (mlp, w), KERNEL),
            ParamRule(f"{t}/mlp/wi_1/kernel", f"{hf}.mlp.up_proj.linear.weight", (mlp, w), KERNEL),
            ParamRule(f"{t}/mlp/wo/kernel", f"{hf}.mlp.down_proj.linear.weight", (w, mlp), KERNEL),
        ]
        rules += [
            ParamRule(f"{t}/{n}/scale", f"{hf}.{h}.weight", (w,))
            for n, h in (
                ("pre_attention_norm", "input_layernorm"),
                ("post_attention_norm", "post_attention_layernorm"),
                ("pre_ffw_norm", "pre_feedforward_layernorm"),
                ("post_ffw_norm", "post_feedforward_layernorm"),
            )
        ]
    return rules


def small_layer_groups(text: dict, d: Dims, local: Attn, glob: Attn, types: list[str]) -> tuple[LayerGroup, ...]:
    """E2B / E4B: unscanned; KV-shared layers (the last num_kv_shared_layers) in a second group."""
    ple = config_int(text, "hidden_size_per_layer_input", MAX_WIDTH, lo=0, default=0)
    shared_from = d.layers - config_int(text, "num_kv_shared_layers", d.layers, lo=0, default=0)
    if "full_attention" not in types:
        raise ConfigError(
            "layer_types has no full_attention layer; MaxText's gemma4_small pattern ends each period with one"
        )
    period = types.index("full_attention") + 1
    check_layer_types(text, ("sliding_attention",) * (period - 1) + ("full_attention",), "gemma4_small", d.layers)
    reason = "MaxText's gemma4_small decoder (E2B/E4B) has no scanned form"

    def group(layers: range, shared: bool) -> LayerGroup:
        mlp = d.mlp * (2 if shared and text.get("use_double_wide_mlp") else 1)
        common = norm_rules(d.hidden) + gated_mlp_rules("mlp", f"{HF_LAYER}.mlp", mlp, d.hidden)
        if ple:
            common += [
                ParamRule(
                    "per_layer_input_gate/kernel", f"{HF_LAYER}.per_layer_input_gate.weight", (ple, d.hidden), KERNEL
                ),
                ParamRule(
                    "per_layer_projection/kernel", f"{HF_LAYER}.per_layer_projection.weight", (d.hidden, ple), KERNEL
                ),
                ParamRule(
                    "post_per_layer_input_norm/scale", f"{HF_LAYER}.post_per_layer_input_norm.weight", (d.hidden,)
                ),
            ]
        positions = tuple(
            tuple(attention_rules(glob if p == period - 1 else local, d.hidden, with_kv=not shared))
            for p in range(period)
        )
        return LayerGroup(
            "decoder/layers",
            tuple(layers),
            tuple(common),
            cycle=period,
            position_rules=positions,
            first_index=layers.start,
            unscannable=reason,
        )

    groups = [group(range(0, shared_from), False)]
    if shared_from < d.layers:
        groups.append(group(range(shared_from, d.layers), True))
    return tuple(groups)


def gemma4_map(config: dict, use_multimodal: bool = False, vocab_size: int | None = None) -> ModelMap:
    require_quant_method(config, "gemma4")
    text = _text_config(config)
    d = Dims.from_config(text, "config.json text_config" if text is not config else "config.json")
    if not config_bool(config, "tie_word_embeddings", d.tied):
        raise ConfigError("tie_word_embeddings is false, but MaxText's gemma4 uses the embedding as its output head")
    types = config_list(text, "layer_types") or [BLOCK[i % len(BLOCK)] for i in range(d.layers)]
    small = bool(text.get("hidden_size_per_layer_input")) or bool(text.get("num_kv_shared_layers"))
    if not small:
        check_layer_types(text, BLOCK, "gemma4", d.layers)
    local, glob = Attn(d.heads, d.kv_heads, d.head_dim), global_attention(text, d, types)
    embed_ops = vocab_resize(d.vocab, vocab_rows(d.vocab, vocab_size)) + (ScaleBy(float(np.float32(d.hidden**0.5))),)
    global_rules = [
        ParamRule("token_embedder/embedding", f"{TEXT}.embed_tokens.weight", (d.vocab, d.hidden), embed_ops),
        ParamRule("decoder/decoder_norm/scale", f"{TEXT}.norm.weight", (d.hidden,)),
    ]
    extras = ("lm_head.weight",) + AUDIO_EXTRAS
    if small:
        if use_multimodal:
            raise ConfigError(
                "MaxText converts Gemma4 E2B/E4B text-only (its gemma4_small vision mapping is unfinished)"
            )
        ple = config_int(text, "hidden_size_per_layer_input", MAX_WIDTH, lo=0, default=0)
        if ple:
            p = "decoder/per_layer_embedder"
            vocab_ple = config_int(text, "vocab_size_per_layer_input", MAX_VOCAB, default=d.vocab)
            global_rules += [
                ParamRule(
                    f"{p}/embed_tokens_per_layer", f"{TEXT}.embed_tokens_per_layer.weight", (vocab_ple, d.layers * ple)
                ),
                ParamRule(
                    f"{p}/per_layer_model_projection/kernel",
                    f"{TEXT}.per_layer_model_projection.weight",
                    (d.layers * ple, d.hidden),
                    KERNEL,
                ),
                ParamRule(f"{p}/per_layer_projection_norm/scale", f"{TEXT}.per_layer_projection_norm.weight", (ple,)),
            ]
        groups = small_layer_groups(text, d, local, glob, types)
    else:
        k_eq_v = bool(text.get("attention_k_eq_v"))
        mlp = (
            moe_rules(text, d)
            if config_int(text, "num_experts", MAX_EXPERTS, default=1) > 1
            else gated_mlp_rules("mlp", f"{HF_LAYER}.mlp", d.mlp, d.hidden)
        )
        positions = tuple(
            tuple(attention_rules(local, d.hidden))
            if p < 5
            else tuple(attention_rules(glob, d.hidden, with_value=not k_eq_v))
            for p in range(6)
        )
        groups = (
            LayerGroup(
                "decoder/layers",
                tuple(range(d.layers)),
                tuple(norm_rules(d.hidden) + mlp),
                cycle=6,
                position_rules=positions,
                slots=(("local_layers", (0, 1, 2, 3, 4)), ("global_layer", (5,))),
                scan_container="decoder/scanned_blocks",
            ),
        )
    if use_multimodal:
        if "vision_config" not in config or not isinstance(config["vision_config"], dict):
            raise ConfigError("--use_multimodal needs a Gemma4ForConditionalGeneration checkpoint with a vision_config")
        global_rules += vision_rules(config["vision_config"], d.hidden)
    else:
        extras += VISION_EXTRAS
    return ModelMap(
        family="gemma4",
        num_layers=d.layers,
        global_rules=tuple(global_rules),
        layer_rules=(),
        known_extras=extras,
        layer_groups=groups,
        key_aliases=((f"{TEXT}.", ("model.",)),),
    )
