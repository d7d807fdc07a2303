"""Pieces every decoder family reuses: config reading and the standard attention/MLP rows."""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass

from ckpt_transforms.planning.specs import Aux, ParamRule
from ckpt_transforms.tensors import quant
from ckpt_transforms.tensors.ops import (
    AddScalar,
    DequantFP8,
    Op,
    PadAxis,
    RopeInterleave,
    RoundOnce,
    ScaleBySqrt,
    SplitAxis,
    Transpose,
    TruncateAxis,
    split_decode,
)

LAYER = "model.layers.{layer}"


class ConfigError(ValueError):
    """config.json lacks a field the family map needs, or holds a value out of range (message
    names the field and what was expected)."""


# Ranges a size in config.json must fall in (several times the largest released model's value),
# checked before a map builds anything proportional to it. The README's Safety section lists them.
MAX_LAYERS = 4096
MAX_EXPERTS = 4096
MAX_HEADS = 4096
MAX_WIDTH = 2**20  # hidden, intermediate, head_dim, LoRA ranks, conv kernels, ...
MAX_VOCAB = 2**24
_REQUIRED = object()


def config_int(
    config: dict,
    name: str,
    hi: int,
    lo: int = 1,
    default: object = _REQUIRED,
    where: str = "config.json",
) -> int:
    """config[name] as an int in [lo, hi]; a bool, float, string, list or out-of-range value is a
    ConfigError naming the field. Missing or null gives `default` (ConfigError if there is none);
    `default` is returned as is, so callers may derive it from other validated fields."""
    value = config.get(name) if isinstance(config, dict) else None
    if value is None:
        if default is _REQUIRED:
            raise ConfigError(f"{where} has no {name!r} (expected an integer in [{lo}, {hi}])")
        return default  # type: ignore[return-value]
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"{where}: {name} is {value!r}; expected an integer in [{lo}, {hi}]")
    return value


def config_bool(config: dict, name: str, default: bool = False, where: str = "config.json") -> bool:
    """config[name] as a bool (missing or null: `default`); "false" or 0 is a ConfigError."""
    value = config.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: {name} is {value!r}; expected true or false")
    return value


def config_list(config: dict, name: str, where: str = "config.json") -> list | None:
    """config[name] as a list, or None when missing/null; any other type is a ConfigError."""
    value = config.get(name)
    if value is not None and not isinstance(value, list):
        raise ConfigError(f"{where}: {name} is {value!r}; expected a list")
    return value


@dataclass(frozen=True)
class Dims:
    """Sizes a decoder map needs, read from config.json (so any size or fine-tune works)."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int
    vocab: int
    layers: int
    tied: bool

    @classmethod
    def from_config(cls, config: dict, where: str = "config.json") -> Dims:
        """Every size type- and range-checked (see `config_int`); `where` names a nested config
        (e.g. "config.json text_config") in messages."""
        hidden = config_int(config, "hidden_size", MAX_WIDTH, where=where)
        heads = config_int(config, "num_attention_heads", MAX_HEADS, where=where)
        kv_heads = config_int(config, "num_key_value_heads", heads, default=heads, where=where)
        if heads % kv_heads:
            raise ConfigError(
                f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
            )
        return cls(
            hidden=hidden,
            heads=heads,
            kv_heads=kv_heads,
            head_dim=config_int(config, "head_dim", MAX_WIDTH, default=max(1, hidden // heads), where=where),
            mlp=config_int(config, "intermediate_size", MAX_WIDTH, where=where),
            vocab=config_int(config, "vocab_size", MAX_VOCAB, where=where),
            layers=config_int(config, "num_hidden_layers", MAX_LAYERS, where=where),
            tied=config_bool(config, "tie_word_embeddings", False, where=where),
        )


# HF Linear weights are [out, in]; MaxText kernels are [in, out].
KERNEL: tuple[Op, ...] = (Transpose(),)


# Head splits name only head_dim: the head count follows from the slab, so a work item can take
# a contiguous range of heads (source rows) of a huge projection.
def heads_kernel(head_dim: int) -> tuple[Op, ...]:
    """[heads*head_dim, hidden] -> [hidden, heads, head_dim] (query/key/value)."""
    return (Transpose(), SplitAxis(1, (-1, head_dim)))


def out_kernel(head_dim: int) -> tuple[Op, ...]:
    """[hidden, heads*head_dim] -> [heads, head_dim, hidden] (attention output)."""
    return (Transpose(), SplitAxis(0, (-1, head_dim)))


def heads_bias(head_dim: int) -> tuple[Op, ...]:
    """[heads*head_dim] -> [heads, head_dim]."""
    return (SplitAxis(0, (-1, head_dim)),)


def attention_rules(
    d: Dims,
    *,
    rope_interleave: bool = False,
    scale_query: bool = False,
    bias: bool = False,
    qk_norm: bool = False,
    prefix: str = "self_attention",
    layer: str = LAYER,
) -> list[ParamRule]:
    """Self-attention rows. `rope_interleave`/`scale_query` follow MaxText's per-family hooks;
    `prefix` is the attention module's name in MaxText (GPT-OSS: GptOssAttention); `layer` the
    HF layer prefix (Gemma3: model.language_model.layers.{layer})."""
    a = f"{layer}.self_attn"
    t = prefix
    q_ops = heads_kernel(d.head_dim)
    k_ops = heads_kernel(d.head_dim)
    if rope_interleave:
        q_ops, k_ops = q_ops + (RopeInterleave(),), k_ops + (RopeInterleave(),)
    if scale_query:
        q_ops = q_ops + (ScaleBySqrt(d.head_dim, -1),)
    q_width, kv_width = d.heads * d.head_dim, d.kv_heads * d.head_dim
    rules = [
        ParamRule(f"{t}/query/kernel", f"{a}.q_proj.weight", (q_width, d.hidden), q_ops),
        ParamRule(f"{t}/key/kernel", f"{a}.k_proj.weight", (kv_width, d.hidden), k_ops),
        ParamRule(
            f"{t}/value/kernel",
            f"{a}.v_proj.weight",
            (kv_width, d.hidden),
            heads_kernel(d.head_dim),
        ),
        ParamRule(f"{t}/out/kernel", f"{a}.o_proj.weight", (d.hidden, q_width), out_kernel(d.head_dim)),
    ]
    if bias:
        rules += [
            ParamRule(f"{t}/query/bias", f"{a}.q_proj.bias", (q_width,), heads_bias(d.head_dim)),
            ParamRule(f"{t}/key/bias", f"{a}.k_proj.bias", (kv_width,), heads_bias(d.head_dim)),
            ParamRule(f"{t}/value/bias", f"{a}.v_proj.bias", (kv_width,), heads_bias(d.head_dim)),
        ]
    if qk_norm:
        rules += [
            ParamRule(f"{t}/query_norm/scale", f"{a}.q_norm.weight", (d.head_dim,)),
            ParamRule(f"{t}/key_norm/scale", f"{a}.k_norm.weight", (d.head_dim,)),
        ]
    return rules


def layer_norm_rules(d: Dims) -> list[ParamRule]:
    return [
        ParamRule("pre_self_attention_layer_norm/scale", f"{LAYER}.input_layernorm.weight", (d.hidden,)),
        ParamRule("post_self_attention_layer_norm/scale", f"{LAYER}.post_attention_layernorm.weight", (d.hidden,)),
    ]


def dense_mlp_rules(d: Dims) -> list[ParamRule]:
    return gated_mlp_rules("mlp", f"{LAYER}.mlp", d.mlp, d.hidden)


def gated_mlp_rules(target: str, hf: str, mlp: int, hidden: int) -> list[ParamRule]:
    """SwiGLU MLP: HF gate/up/down_proj -> MaxText wi_0/wi_1/wo kernels (transposed)."""
    return [
        ParamRule(f"{target}/wi_0/kernel", f"{hf}.gate_proj.weight", (mlp, hidden), KERNEL),
        ParamRule(f"{target}/wi_1/kernel", f"{hf}.up_proj.weight", (mlp, hidden), KERNEL),
        ParamRule(f"{target}/wo/kernel", f"{hf}.down_proj.weight", (hidden, mlp), KERNEL),
    ]


def expert_rules(target: str, hf_expert: str, experts: int, mlp: int, hidden: int) -> list[ParamRule]:
    """Routed experts, one HF tensor per expert: MaxText wi_0/wi_1 [experts, in, mlp], wo [experts, mlp, in]."""
    return [
        ParamRule(f"{target}/wi_0", f"{hf_expert}.gate_proj.weight", (mlp, hidden), KERNEL, experts),
        ParamRule(f"{target}/wi_1", f"{hf_expert}.up_proj.weight", (mlp, hidden), KERNEL, experts),
        ParamRule(f"{target}/wo", f"{hf_expert}.down_proj.weight", (hidden, mlp), KERNEL, experts),
    ]


EMBEDDING = "token_embedder/embedding"


def embedding_rules(d: Dims, vocab_size: int | None = None) -> list[ParamRule]:
    """Token embedding, final norm and (when untied) the LM head as MaxText's logits_dense.

    With `vocab_size` (MaxText's option) both vocabulary-sized params get that many rows: MaxText
    builds its embedding [vocab_size, emb] and logits_dense [emb, vocab_size] from the option, so
    a head left at HF's size could not be loaded next to a resized embedding. (MaxText's own
    converter pads the embedding for Qwen, Olmo3 and Gemma only, truncates it for Gemma3 only,
    and its logits_dense hooks are plain transposes, so to_maxtext fails with a shape error in
    the other cases.) The head is resized on its source rows, before the transpose, so work
    items still read only the rows that exist."""
    resize = vocab_resize(d.vocab, vocab_rows(d.vocab, vocab_size))
    rules = [
        ParamRule(EMBEDDING, "model.embed_tokens.weight", (d.vocab, d.hidden), resize),
        ParamRule("decoder/decoder_norm/scale", "model.norm.weight", (d.hidden,)),
    ]
    if not d.tied:
        rules.append(ParamRule("decoder/logits_dense/kernel", "lm_head.weight", (d.vocab, d.hidden), resize + KERNEL))
    return rules


def common_extras(d: Dims) -> tuple[str, ...]:
    """Tensors some exports carry that feed nothing: rotary caches; a duplicated tied head."""
    extras = ("model.layers.*.self_attn.rotary_emb.inv_freq",)
    return extras + (("lm_head.weight",) if d.tied else ())


def quantization_config(config: dict) -> dict:
    q = config.get("quantization_config") or {}
    if not isinstance(q, dict):
        raise ConfigError("config.json's quantization_config is not an object")
    return q


def quant_method(config: dict) -> str | None:
    """quantization_config.quant_method, or None for an unquantized checkpoint."""
    method = quantization_config(config).get("quant_method")
    if method is not None and not isinstance(method, str):
        raise ConfigError(f"config.json: quantization_config.quant_method is {method!r}; expected a string")
    return method


def require_quant_method(config: dict, family: str, supported: tuple[str, ...] = ()) -> str | None:
    """The checkpoint's quant_method if this family can read it; else a ConfigError."""
    method = quant_method(config)
    if method is not None and method not in supported:
        can = f"; {family} supports {', '.join(supported)}" if supported else ""
        raise ConfigError(f"quantization_config.quant_method {method!r} is not supported for {family}{can}")
    return method


def fp8_block_size(config: dict) -> tuple[int, int]:
    """quantization_config.weight_block_size of a block-scaled FP8 checkpoint."""
    q = quantization_config(config)
    fmt = q.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ConfigError(f"quantization_config.fmt {fmt!r} is not supported (only e4m3 FP8 weights)")
    block = q.get("weight_block_size")
    ok = isinstance(block, list) and len(block) == 2
    if not (ok and all(isinstance(b, int) and not isinstance(b, bool) and 0 < b <= MAX_WIDTH for b in block)):
        raise ConfigError(
            f"quantization_config.weight_block_size is {block!r}; need [rows, cols], integers in [1, {MAX_WIDTH}] "
            "(per-tensor FP8 is not supported)"
        )
    return (block[0], block[1])


def not_converted(config: dict, hf_key: str) -> bool:
    """quantization_config.modules_to_not_convert lists the module of `hf_key` (glob patterns)."""
    module = hf_key.removesuffix(".weight")
    patterns = quantization_config(config).get("modules_to_not_convert") or []
    if not (isinstance(patterns, list) and all(isinstance(p, str) for p in patterns)):
        raise ConfigError(
            f"config.json: quantization_config.modules_to_not_convert is {patterns!r}; expected a list of strings"
        )
    return any(fnmatch.fnmatchcase(module, p) or fnmatch.fnmatchcase(module, p + ".*") for p in patterns)


def rounded_like_dequantize_scripts(rules: list[ParamRule]) -> list[ParamRule]:
    """In a quantized checkpoint, every tensor that is not dequantized is rounded to bf16 first,
    as MaxText's dequantize scripts rewrite them (only visible with --save_dtype float32, e.g.
    for DeepSeek's float32 e_score_correction_bias)."""
    return [r if split_decode(r.ops)[0] else dataclasses.replace(r, ops=(RoundOnce(),) + r.ops) for r in rules]


def fp8_weight(rule: ParamRule, block: tuple[int, int]) -> ParamRule:
    """The same rule reading an FP8 weight and its `<key>_scale_inv` grid, dequantized first."""
    scale = Aux(rule.hf_key + "_scale_inv", quant.scale_grid_shape(rule.source_shape, block), row_block=block[0])
    return dataclasses.replace(rule, ops=(DequantFP8(block),) + rule.ops, aux=(scale,))


# Gemma's RMSNorm weights are zero-centred in HF (applied as 1 + w); MaxText stores 1 + w.
NORM_PLUS_ONE: tuple[Op, ...] = (AddScalar(1.0),)


def vocab_rows(hf_vocab: int, vocab_size: int | None, maxtext_sizes: Mapping[int, int] | None = None) -> int:
    """Rows of MaxText's embedding: the user's `vocab_size` when given; else MaxText's size for
    an official HF vocabulary (`maxtext_sizes`, HF rows -> the model configs' vocab_size: Gemma2
    pads, Gemma3 cuts); else the HF vocabulary as it is."""
    if vocab_size is not None:
        return vocab_size
    return (maxtext_sizes or {}).get(hf_vocab, hf_vocab)


def vocab_resize(hf_vocab: int, maxtext_vocab: int) -> tuple[Op, ...]:
    """Rows of the embedding to MaxText's vocabulary: zero-padded (more rows) or cut (fewer),
    as MaxText's pad/truncate embedding hooks do; nothing when the sizes agree."""
    if maxtext_vocab > hf_vocab:
        return (PadAxis(0, maxtext_vocab, hf_vocab),)
    if maxtext_vocab < hf_vocab:
        return (TruncateAxis(0, maxtext_vocab, hf_vocab),)
    return ()


def sub_config(config: dict, name: str) -> dict:
    """A nested config (text_config / vision_config); a ConfigError names what is missing."""
    sub = config.get(name)
    if not isinstance(sub, dict):
        raise ConfigError(f"config.json has no {name!r} object")
    return sub


def check_layer_types(config: dict, pattern: tuple[str, ...], family: str, layers: int) -> None:
    """config.json's layer_types, when present, must follow MaxText's fixed attention pattern."""
    types = config_list(config, "layer_types")
    if types is not None and (len(types) != layers or types != [pattern[i % len(pattern)] for i in range(layers)]):
        shown = repr(types) if len(types) <= 64 else f"[{len(types)} entries]"
        raise ConfigError(
            f"layer_types {shown} is not the repeating {'/'.join(pattern)} pattern of {layers} layers "
            f"MaxText's {family} decoder uses"
        )
