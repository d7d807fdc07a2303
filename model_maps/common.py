"""Pieces every decoder family reuses: config reading and the standard attention/MLP rows."""

from __future__ import annotations

from dataclasses import dataclass

from ckpt_transforms.ops import Op, RopeInterleave, ScaleBySqrt, SplitAxis, Transpose
from ckpt_transforms.specs import ParamRule

LAYER = "model.layers.{layer}"


class ConfigError(ValueError):
    """config.json lacks a field the family map needs (message names the field)."""


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
    def from_config(cls, config: dict) -> Dims:
        def need(name: str) -> int:
            if name not in config or config[name] is None:
                raise ConfigError(f"config.json has no {name!r}")
            return int(config[name])

        hidden, heads = need("hidden_size"), need("num_attention_heads")
        return cls(
            hidden=hidden,
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            mlp=need("intermediate_size"),
            vocab=need("vocab_size"),
            layers=need("num_hidden_layers"),
            tied=bool(config.get("tie_word_embeddings", False)),
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
    d: Dims, *, rope_interleave: bool = False, scale_query: bool = False, bias: bool = False, qk_norm: bool = False
) -> list[ParamRule]:
    """Self-attention rows. `rope_interleave`/`scale_query` follow MaxText's per-family hooks."""
    a = f"{LAYER}.self_attn"
    q_ops = heads_kernel(d.head_dim)
    k_ops = heads_kernel(d.head_dim)
    if rope_interleave:
        q_ops, k_ops = q_ops + (RopeInterleave(),), k_ops + (RopeInterleave(),)
    if scale_query:
        q_ops = q_ops + (ScaleBySqrt(d.head_dim, -1),)
    q_width, kv_width = d.heads * d.head_dim, d.kv_heads * d.head_dim
    rules = [
        ParamRule("self_attention/query/kernel", f"{a}.q_proj.weight", (q_width, d.hidden), q_ops),
        ParamRule("self_attention/key/kernel", f"{a}.k_proj.weight", (kv_width, d.hidden), k_ops),
        ParamRule(
            "self_attention/value/kernel",
            f"{a}.v_proj.weight",
            (kv_width, d.hidden),
            heads_kernel(d.head_dim),
        ),
        ParamRule("self_attention/out/kernel", f"{a}.o_proj.weight", (d.hidden, q_width), out_kernel(d.head_dim)),
    ]
    if bias:
        rules += [
            ParamRule("self_attention/query/bias", f"{a}.q_proj.bias", (q_width,), heads_bias(d.head_dim)),
            ParamRule("self_attention/key/bias", f"{a}.k_proj.bias", (kv_width,), heads_bias(d.head_dim)),
            ParamRule("self_attention/value/bias", f"{a}.v_proj.bias", (kv_width,), heads_bias(d.head_dim)),
        ]
    if qk_norm:
        rules += [
            ParamRule("self_attention/query_norm/scale", f"{a}.q_norm.weight", (d.head_dim,)),
            ParamRule("self_attention/key_norm/scale", f"{a}.k_norm.weight", (d.head_dim,)),
        ]
    return rules


def layer_norm_rules(d: Dims) -> list[ParamRule]:
    return [
        ParamRule("pre_self_attention_layer_norm/scale", f"{LAYER}.input_layernorm.weight", (d.hidden,)),
        ParamRule("post_self_attention_layer_norm/scale", f"{LAYER}.post_attention_layernorm.weight", (d.hidden,)),
    ]


def dense_mlp_rules(d: Dims) -> list[ParamRule]:
    m = f"{LAYER}.mlp"
    return [
        ParamRule("mlp/wi_0/kernel", f"{m}.gate_proj.weight", (d.mlp, d.hidden), KERNEL),
        ParamRule("mlp/wi_1/kernel", f"{m}.up_proj.weight", (d.mlp, d.hidden), KERNEL),
        ParamRule("mlp/wo/kernel", f"{m}.down_proj.weight", (d.hidden, d.mlp), KERNEL),
    ]


def embedding_rules(d: Dims) -> list[ParamRule]:
    """Token embedding, final norm and (when untied) the LM head as MaxText's logits_dense."""
    rules = [
        ParamRule("token_embedder/embedding", "model.embed_tokens.weight", (d.vocab, d.hidden)),
        ParamRule("decoder/decoder_norm/scale", "model.norm.weight", (d.hidden,)),
    ]
    if not d.tied:
        rules.append(ParamRule("decoder/logits_dense/kernel", "lm_head.weight", (d.vocab, d.hidden), KERNEL))
    return rules


def common_extras(d: Dims) -> tuple[str, ...]:
    """Tensors some exports carry that feed nothing: rotary caches; a duplicated tied head."""
    extras = ("model.layers.*.self_attn.rotary_emb.inv_freq",)
    return extras + (("lm_head.weight",) if d.tied else ())
