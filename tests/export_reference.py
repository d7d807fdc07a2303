"""An independent numpy model of MaxText's `to_huggingface` (Orbax -> HF safetensors), for tests.

The mirror of tests/reference.py: written from MaxText's semantics (commit e591f30,
`src/maxtext/checkpoint_conversion/`), not from ckptbeam's model maps. It reproduces, in numpy:

1. the restore (`utils/utils.py::load_orbax_checkpoint`): every floating leaf is read *as*
   `weight_dtype` (Orbax `ArrayRestoreArgs(dtype=...)`, a TensorStore cast: round-to-nearest-even),
   integer leaves keep their stored dtype;
2. the unstacking (`utils/utils.py::process_maxtext_param`): scanned leaves are sliced at
   `param_scan_axis` 1, MoE expert stacks at axis 0 (a scanned MoE leaf is [experts, layers, ...],
   so expert e of layer l is `leaf[e, l]` == `leaf[:, l][e]`), Gemma4's nested block scan at axis 1
   twice;
3. the inverse hooks (`utils/param_mapping.py`, `HOOK_FNS[model](..., saving_to_hf=True)`), in the
   dtype MaxText computes them: JAX promotes `array * np.float32(c)` to float32 (a NumPy scalar is
   strongly typed), keeps `bf16_array / np.bfloat16(c)` in bfloat16 (evaluated in f32, rounded
   once), keeps `x - 1.0` (weak Python float) in the input dtype, and divides by a constant with a
   true float32 division (see `divide_f32`: older JAX builds differed by 1 ulp in float32 exports);
4. the final cast (`utils/utils.py::convert_jax_weight_to_numpy`): every tensor to `weight_dtype`.

The result is HF key -> array with the names and shapes MaxText writes (which are the names
`transformers` loads; for Gemma3 that is `model.language_model.*` / `model.vision_tower.vision_model.*`,
where transformers 5's `save_pretrained` writes the legacy `language_model.model.*` / `vision_tower.*`).
MTP layers are never exported (DEEPSEEK mapping "without mtp"; Qwen3-Next's `mtp.*` has no mapping).

Where MaxText's own export is absent or wrong, the *correct inverse of to_maxtext* is modelled instead
and marked "NOT MaxText" below:
- olmo3: no HF_SHAPE entry (to_huggingface raises "Mappings not found"); mistral: not in its tables;
  deepseek3.2: documented unsupported; llama with non-`llama3` RoPE: MaxText only knows llama3.1
  (always de-interleaves) but to_maxtext-style converters interleave only for llama3 RoPE.
- mixtral `out` kernel: MaxText's `reshape_and_transpose_attention` does `x.reshape(hidden, -1).T`
  on the [heads, head_dim, hidden] leaf, which scrambles o_proj unless heads*head_dim == hidden
  (true for the real 8x7b/8x22b, false for tiny test models). Its HF_SHAPE also assumes
  head_dim = hidden / heads, so such models fail to export at all.

Checked against MaxText's real to_huggingface (benchmarks/maxtext_to_hf_peer.py, tiny fixtures):
every tensor bitwise equal for llama3.1, qwen2/qwen3 (tied, untied), qwen3-moe, deepseek2/3 (bf16,
fp8), deepseek3.2, gpt-oss (bf16, mxfp4), gemma2, gemma3 (text and vision), gemma4 (moe; dense/small
equal up to the naming above), mixtral with head_dim = hidden / heads, qwen3-next (only with its
HF_SHAPE table substituted: MaxText's QWEN3_NEXT_HF_WEIGHTS_TO_SHAPE has no `return`, so its export
always fails), scanned and unscanned, weight_dtype bf16 and f32 where run; the only differences
are the NOT-MaxText rules above (llama with default RoPE and mistral: MaxText de-interleaves q/k).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable

import ml_dtypes
import numpy as np

BF16 = np.dtype(ml_dtypes.bfloat16)
F32 = np.dtype(np.float32)
DTYPES = {"bfloat16": BF16, "float32": F32, "float16": np.dtype(np.float16)}

Get = Callable[[str], np.ndarray]


# --------------------------------------------------------------------------- restore


def restore_leaves(items_dir: str) -> dict[str, np.ndarray]:
    """Every array leaf of OUT/0/items as stored: name below `params.params.` -> array.

    Our checkpoints store numpy leaves, which `PyTreeCheckpointer().restore` returns as numpy
    with no restore args (Orbax restores a leaf as the value_type its
    _METADATA records, `np.ndarray` here); the dtype cast is applied separately (`_restore_cast`)."""
    import jax
    import orbax.checkpoint as ocp

    restored = ocp.PyTreeCheckpointer().restore(os.path.abspath(items_dir))
    leaves: dict[str, np.ndarray] = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(restored):
        name = ".".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)
        if name.startswith("params.params."):
            leaves[name.removeprefix("params.params.")] = np.asarray(leaf)
    return leaves


def _restore_cast(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """load_orbax_checkpoint: floating leaves restored as weight_dtype (RNE), others as stored."""
    if np.issubdtype(x.dtype, np.floating) or x.dtype == BF16:
        return x.astype(dtype)
    return x


def _is_float(x: np.ndarray) -> bool:
    return x.dtype == BF16 or np.issubdtype(x.dtype, np.floating)


# --------------------------------------------------------------------------- hooks (saving_to_hf=True)


def kernel_in(x: np.ndarray) -> np.ndarray:
    """reshape_kernel for a kernel whose first axis is the input ([in, heads, dim] or [in, out]):
    reshape to the flipped HF shape [in, heads*dim], then .T -> HF [heads*dim, in]."""
    return x.reshape(x.shape[0], -1).T


def kernel_out(x: np.ndarray) -> np.ndarray:
    """reshape_kernel for an output projection [heads, dim, out] -> [heads*dim, out].T -> [out, heads*dim]."""
    return x.reshape(-1, x.shape[-1]).T


def scale_f32(x: np.ndarray, factor: float) -> np.ndarray:
    """`(x.astype(f32) * np.float32(factor)).astype(x.dtype)` (llama scale_query_layer) and
    `(x * np.float32(factor)).astype(x.dtype)` (mixtral/gemma2, same: JAX promotes to f32).
    The constant is computed in float64 by numpy and rounded once to float32."""
    return (x.astype(F32) * np.float32(factor)).astype(x.dtype)


def divide_f32(x: np.ndarray, divisor: float) -> np.ndarray:
    """gemma2/gemma4 pad_hf_embedding_layer: `(x / np.float32(d)).astype(x.dtype)`, a true division
    computed in f32 and rounded once. That is what MaxText's float32 export gives with the JAX of the
    peer build (0.12.1); an older JAX compiled it as `x * f32(1 / f32(d))` (1 ulp away in ~30-40 % of
    float32 results; after a bfloat16 rounding the two agree for every bf16 input, checked
    exhaustively for sqrt(32), sqrt(2304), bf16(sqrt(48)), bf16(sqrt(62)))."""
    return (x.astype(F32) / np.float32(divisor)).astype(x.dtype)


def divide_bf16(x: np.ndarray, divisor: float) -> np.ndarray:
    """gemma3 pad_and_scale_embedding: `x / np.bfloat16(d)` stays in x's dtype (bf16 / bf16 scalar
    -> bf16, evaluated in f32 and rounded once; f32 / bf16 scalar -> f32), with the normaliser a
    bfloat16 and a true division (see divide_f32)."""
    return (x.astype(F32) / np.float32(BF16.type(divisor))).astype(x.dtype)


def minus_one(x: np.ndarray) -> np.ndarray:
    """gemma2/gemma3 scale_rmsnorm(_layer): `x - 1.0`, in x's dtype (one rounding from f32)."""
    return (x.astype(F32) - np.float32(1.0)).astype(x.dtype) if x.dtype != F32 else x - np.float32(1.0)


def deinterleave(x: np.ndarray) -> np.ndarray:
    """llama adjust_rope (saving_to_hf): concat(x[..., ::2], x[..., 1::2]) on head_dim."""
    return np.concatenate([x[..., ::2], x[..., 1::2]], axis=-1)


def truncate_vocab(x: np.ndarray, vocab: int) -> np.ndarray:
    """pad_embedding_layer / pad_hf_embedding_layer (saving_to_hf): keep the HF vocab rows."""
    return x[:vocab]


# --------------------------------------------------------------------------- layer views


def _view(leaves: dict[str, np.ndarray], prefix: str, index: tuple[int, ...] = ()) -> Get:
    """A layer's leaves: `prefix + name`, sliced at axis 1 (param_scan_axis) by `index`
    (one index: a scanned stack; two: Gemma4's [.., block, local, ..])."""

    def get(name: str) -> np.ndarray:
        x = leaves[prefix + name]
        return x[(slice(None), *index)] if index else x

    get.has = lambda name: prefix + name in leaves  # type: ignore[attr-defined]
    return get


def _cycled_view(leaves: dict[str, np.ndarray], scan: bool, i: int, block: str = "layers") -> Get:
    """HF layer i of a model scanned in blocks `decoder.layers.<block>_{b}` (b = i % cycle, layer
    i // cycle of that stack) plus unstacked `decoder.layers_remainder.<block>_{r}` (gemma3);
    unscanned: `decoder.layers_{i}`. The cycle length is read off the checkpoint's block names."""
    if not scan:
        return _view(leaves, f"decoder.layers_{i}.")
    pat = re.compile(rf"decoder\.layers\.{block}_(\d+)\.")
    cycle = 1 + max(int(m.group(1)) for k in leaves if (m := pat.match(k)))
    some = next(k for k in leaves if k.startswith(f"decoder.layers.{block}_0."))
    whole = leaves[some].shape[1] * cycle
    if i < whole:
        return _view(leaves, f"decoder.layers.{block}_{i % cycle}.", (i // cycle,))
    return _view(leaves, f"decoder.layers_remainder.{block}_{i - whole}.")


def _n_layers(cfg: dict) -> int:
    return cfg["num_hidden_layers"]


# --------------------------------------------------------------------------- families


def llama_like(leaves: dict[str, np.ndarray], cfg: dict, scan: bool) -> dict[str, np.ndarray]:
    """LLAMA31 / MIXTRAL mappings + hooks; Mistral (NOT MaxText: absent from its tables) as llama
    without the RoPE permutation. q: `scale_query_layer` (x f32(sqrt(head_dim)), f32) first, then
    RoPE de-interleave, then reshape_kernel (llama order; mixtral: reshape then scale, the same)."""
    mt = cfg["model_type"]
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    # MaxText's llama3.1 always de-interleaves; a to_maxtext-style converter interleaves only for
    # llama3 RoPE (tests/reference.py), so the correct inverse follows the config (NOT MaxText for
    # other llama RoPE types, which MaxText cannot name anyway).
    permute = mt == "llama" and rope.get("rope_type") == "llama3"
    out = _globals(leaves, cfg)
    for i in range(_n_layers(cfg)):
        g = _view(leaves, "decoder.layers.", (i,)) if scan else _view(leaves, f"decoder.layers_{i}.")
        p = f"model.layers.{i}."
        q = scale_f32(g("self_attention.query.kernel"), np.sqrt(hd))
        k = g("self_attention.key.kernel")
        if permute:
            q, k = deinterleave(q), deinterleave(k)
        out |= {
            p + "self_attn.q_proj.weight": kernel_in(q),
            p + "self_attn.k_proj.weight": kernel_in(k),
            p + "self_attn.v_proj.weight": kernel_in(g("self_attention.value.kernel")),
            # mixtral: NOT MaxText when heads*head_dim != hidden (see module docstring)
            p + "self_attn.o_proj.weight": kernel_out(g("self_attention.out.kernel")),
            p + "input_layernorm.weight": g("pre_self_attention_layer_norm.scale"),
            p + "post_attention_layernorm.weight": g("post_self_attention_layer_norm.scale"),
        }
        if mt == "mixtral":
            m = p + "block_sparse_moe."
            out[m + "gate.weight"] = g("MoeBlock_0.gate.kernel").T
            for mt_name, hf in (("wi_0", "w1"), ("wi_1", "w3"), ("wo", "w2")):
                w = g(f"MoeBlock_0.{mt_name}")
                for e in range(w.shape[0]):
                    out[f"{m}experts.{e}.{hf}.weight"] = w[e].T
        else:
            out |= _mlp(g, p + "mlp.", "mlp")
    return out


def _globals(leaves: dict[str, np.ndarray], cfg: dict, base: str = "model.") -> dict[str, np.ndarray]:
    """Embedding (vocab-truncated to the HF config's vocab_size), final norm, untied lm_head
    (`logits_dense` [hidden, vocab] .T; absent when tied, so not written)."""
    out = {
        base + "embed_tokens.weight": truncate_vocab(leaves["token_embedder.embedding"], cfg["vocab_size"]),
        base + "norm.weight": leaves["decoder.decoder_norm.scale"],
    }
    if "decoder.logits_dense.kernel" in leaves:
        out["lm_head.weight"] = truncate_vocab(leaves["decoder.logits_dense.kernel"].T, cfg["vocab_size"])
    return out


def _mlp(g: Get, p: str, name: str) -> dict[str, np.ndarray]:
    return {
        p + "gate_proj.weight": g(f"{name}.wi_0.kernel").T,
        p + "up_proj.weight": g(f"{name}.wi_1.kernel").T,
        p + "down_proj.weight": g(f"{name}.wo.kernel").T,
    }


def _experts(g: Get, p: str, name: str) -> dict[str, np.ndarray]:
    """reshape_expert_kernel / reshape_kernel per expert: expert e = leaf[e] ([in, out]) .T."""
    out = {}
    for mt_name, hf in (("wi_0", "gate_proj"), ("wi_1", "up_proj"), ("wo", "down_proj")):
        w = g(f"{name}.{mt_name}")
        for e in range(w.shape[0]):
            out[f"{p}{e}.{hf}.weight"] = w[e].T
    return out


def qwen(leaves: dict[str, np.ndarray], cfg: dict, scan: bool) -> dict[str, np.ndarray]:
    """QWEN mapping + hooks (qwen2.5, qwen3, qwen3-moe): reshape_kernel, bias reshape to 1-D,
    identity q/k norms, moe gate .T, experts transpose(0, 2, 1)."""
    out = _globals(leaves, cfg)
    for i in range(_n_layers(cfg)):
        g = _view(leaves, "decoder.layers.", (i,)) if scan else _view(leaves, f"decoder.layers_{i}.")
        p, a = f"model.layers.{i}.", "self_attention."
        out |= {
            p + "self_attn.q_proj.weight": kernel_in(g(a + "query.kernel")),
            p + "self_attn.k_proj.weight": kernel_in(g(a + "key.kernel")),
            p + "self_attn.v_proj.weight": kernel_in(g(a + "value.kernel")),
            p + "self_attn.o_proj.weight": kernel_out(g(a + "out.kernel")),
            p + "input_layernorm.weight": g("pre_self_attention_layer_norm.scale"),
            p + "post_attention_layernorm.weight": g("post_self_attention_layer_norm.scale"),
        }
        for mt_name, hf in (("query", "q"), ("key", "k"), ("value", "v")):
            if g.has(f"{a}{mt_name}.bias"):  # type: ignore[attr-defined]
                out[f"{p}self_attn.{hf}_proj.bias"] = g(f"{a}{mt_name}.bias").reshape(-1)
        if g.has(a + "query_norm.scale"):  # type: ignore[attr-defined]
            out[p + "self_attn.q_norm.weight"] = g(a + "query_norm.scale")
            out[p + "self_attn.k_norm.weight"] = g(a + "key_norm.scale")
        if g.has("moe_block.gate.kernel"):  # type: ignore[attr-defined]
            out[p + "mlp.gate.weight"] = g("moe_block.gate.kernel").T
            out |= _experts(g, p + "mlp.experts.", "moe_block")
        else:
            out |= _mlp(g, p + "mlp.", "mlp")
    return out


def deepseek(leaves: dict[str, np.ndarray], cfg: dict, scan: bool) -> dict[str, np.ndarray]:
    """DEEPSEEK mapping + hooks (v2, v3; v3.2 NOT MaxText-supported, same table): reshape_kernel for
    every kernel (MLA, shared + routed experts, router), identity norms and router bias. Layers
    [0, first_k_dense_replace) are `dense_layers`, the rest `moe_layers`; MTP layers not exported."""
    out = _globals(leaves, cfg)
    k_dense = cfg["first_k_dense_replace"]
    for i in range(_n_layers(cfg)):
        container, j = ("dense_layers", i) if i < k_dense else ("moe_layers", i - k_dense)
        g = _view(leaves, f"decoder.{container}.", (j,)) if scan else _view(leaves, f"decoder.{container}_{j}.")
        p, a, s = f"model.layers.{i}.", "self_attention.", f"model.layers.{i}.self_attn."
        out |= {
            p + "input_layernorm.weight": g("pre_self_attention_layer_norm.scale"),
            p + "post_attention_layernorm.weight": g("post_self_attention_layer_norm.scale"),
            s + "kv_a_proj_with_mqa.weight": kernel_in(g(a + "wkv_a.kernel")),
            s + "kv_a_layernorm.weight": g(a + "kv_norm.scale"),
            s + "kv_b_proj.weight": kernel_in(g(a + "wkv_b.kernel")),
            s + "o_proj.weight": kernel_out(g(a + "out.kernel")),
        }
        if g.has(a + "wq_a.kernel"):  # type: ignore[attr-defined]
            out[s + "q_a_proj.weight"] = kernel_in(g(a + "wq_a.kernel"))
            out[s + "q_a_layernorm.weight"] = g(a + "q_norm.scale")
            out[s + "q_b_proj.weight"] = kernel_in(g(a + "wq_b.kernel"))
        else:
            out[s + "q_proj.weight"] = kernel_in(g(a + "query.kernel"))
        if g.has(a + "indexer.wk.kernel"):  # type: ignore[attr-defined]
            ix = s + "indexer."
            out[ix + "wq_b.weight"] = kernel_in(g(a + "indexer.wq_b.kernel"))
            out[ix + "wk.weight"] = kernel_in(g(a + "indexer.wk.kernel"))
            out[ix + "weights_proj.weight"] = kernel_in(g(a + "indexer.weights_proj.kernel"))
            out[ix + "k_norm.weight"] = g(a + "indexer.k_norm.scale")
            out[ix + "k_norm.bias"] = g(a + "indexer.k_norm.bias")
        if i < k_dense:
            out |= _mlp(g, p + "mlp.", "mlp")
            continue
        b = "DeepSeekMoeBlock_0."
        out |= _mlp(g, p + "mlp.shared_experts.", b + "shared_experts")
        out[p + "mlp.gate.weight"] = kernel_in(g(b + "MoeBlock_0.gate.kernel"))
        if g.has(b + "MoeBlock_0.gate.bias"):  # type: ignore[attr-defined]
            out[p + "mlp.gate.e_score_correction_bias"] = g(b + "MoeBlock_0.gate.bias")
        out |= _experts(g, p + "mlp.experts.", b + "MoeBlock_0")
    return out


def gpt_oss(leaves: dict[str, np.ndarray], cfg: dict, scan: bool) -> dict[str, np.ndarray]:
    """GPT_OSS mapping + GPT_OSS_TO_HF_PARAM_HOOK_FN: scanned blocks `layers.layers_{b}`; the
    composite (wi_0, wi_1) `interleave`: gate_up[..., 0::2] = wi_0, [..., 1::2] = wi_1 (and biases)."""

    def interleave(w0: np.ndarray, w1: np.ndarray) -> np.ndarray:
        fused = np.empty((*w0.shape[:-1], 2 * w0.shape[-1]), dtype=w0.dtype)
        fused[..., 0::2], fused[..., 1::2] = w0, w1
        return fused

    out = _globals(leaves, cfg)
    for i in range(_n_layers(cfg)):
        g = _cycled_view(leaves, scan, i)
        p, a, m = f"model.layers.{i}.", "GptOssAttention.", "GptOssMlp."
        out |= {
            p + "input_layernorm.weight": g("pre_self_attention_layer_norm.scale"),
            p + "post_attention_layernorm.weight": g("post_self_attention_layer_norm.scale"),
            p + "self_attn.o_proj.weight": kernel_out(g(a + "out.kernel")),
            p + "self_attn.o_proj.bias": g(a + "out.bias"),
            p + "self_attn.sinks": g(a + "sinks"),
            p + "mlp.router.weight": g(m + "gate.kernel").T,
            p + "mlp.router.bias": g(m + "gate.bias"),
            p + "mlp.experts.gate_up_proj": interleave(g(m + "wi_0"), g(m + "wi_1")),
            p + "mlp.experts.gate_up_proj_bias": interleave(g(m + "wi_0_bias"), g(m + "wi_1_bias")),
            p + "mlp.experts.down_proj": g(m + "wo"),
            p + "mlp.experts.down_proj_bias": g(m + "wo_bias"),
        }
        for mt_name, hf in (("query", "q"), ("key", "k"), ("value", "v")):
            out[f"{p}self_attn.{hf}_proj.weight"] = kernel_in(g(f"{a}{mt_name}.kernel"))
            out[f"{p}self_attn.{hf}_proj.bias"] = g(f"{a}{mt_name}.bias").reshape(-1)
    return out


def olmo3(leaves: dict[str, np.ndarray], cfg: dict, scan: bool) -> dict[str, np.ndarray]:
    """OLMO3 mapping + hooks (NOT MaxText: no HF_SHAPE entry, to_huggingface raises): reshape_kernel,
    identity norms (post-norm layout), scanned blocks `layers.layers_{b}`."""
    out = _globals(leaves, cfg)
    for i in range(_n_layers(cfg)):
        g = _cycled_view(leaves, scan, i)
        p, a = f"model.layers.{i}.", "attention."
        out |= {
            p + "self_attn.q_proj.weight": kernel_in(g(a + "query.kernel")),
            p + "self_attn.k_proj.weight": kernel_in(g(a + "key.kernel")),
            p + "self_attn.v_proj.weight": kernel_in(g(a + "value.kernel")),
            p + "self_attn.o_proj.weight": kernel_out(g(a + "out.kernel")),
            p + "self_attn.q_norm.weight": g(a + "query_norm.scale"),
            p + "self_attn.k_norm.weight": g(a + "key_norm.scale"),
            p + "post_attention_layernorm.weight": g("post_self_attention_layer_norm.scale"),
            p + "post_feedforward_layernorm.weight": g("post_mlp_layer_norm.scale"),
        } | _mlp(g, p + "mlp.", "mlp")
    return out


def qwen3_next(leaves: dict[str, np.ndarray], cfg: dict, scan: bool) -> dict[str, np.ndarray]:
    """QWEN3_NEXT mapping + hooks: scanned blocks `layers.layer_{b}`; full attention on the last
    block of each cycle (reshape_kernel), linear attention (transposes, conv1d transpose(2, 1, 0))."""
    out = _globals(leaves, cfg)
    for i in range(_n_layers(cfg)):
        g = _cycled_view(leaves, scan, i, block="layer")
        p = f"model.layers.{i}."
        out |= {
            p + "input_layernorm.weight": g("input_layernorm.scale"),
            p + "post_attention_layernorm.weight": g("post_attention_layernorm.scale"),
            p + "mlp.gate.weight": g("mlp.routed_experts.gate.kernel").T,
            p + "mlp.shared_expert_gate.weight": g("mlp.shared_expert_gate.kernel").T,
        }
        out |= _mlp(g, p + "mlp.shared_expert.", "mlp.shared_expert")
        out |= _experts(g, p + "mlp.experts.", "mlp.routed_experts")
        if g.has("attention.attention.query.kernel"):  # type: ignore[attr-defined]
            a, s = "attention.attention.", p + "self_attn."
            out |= {
                s + "q_proj.weight": kernel_in(g(a + "query.kernel")),
                s + "k_proj.weight": kernel_in(g(a + "key.kernel")),
                s + "v_proj.weight": kernel_in(g(a + "value.kernel")),
                s + "o_proj.weight": kernel_out(g(a + "out.kernel")),
                s + "q_norm.weight": g(a + "query_norm.scale"),
                s + "k_norm.weight": g(a + "key_norm.scale"),
            }
        else:
            a, s = "attention.", p + "linear_attn."
            out |= {
                s + "in_proj_qkvz.weight": g(a + "in_proj_qkvz.kernel").T,
                s + "in_proj_ba.weight": g(a + "in_proj_ba.kernel").T,
                s + "out_proj.weight": g(a + "out_proj.kernel").T,
                s + "conv1d.weight": g(a + "conv1d.kernel").transpose(2, 1, 0),
                s + "A_log": g(a + "A_log"),
                s + "dt_bias": g(a + "dt_bias"),
                s + "norm.weight": g(a + "norm.rms_norm.scale"),
            }
    return out


def gemma2(leaves: dict[str, np.ndarray], cfg: dict, scan: bool) -> dict[str, np.ndarray]:
    """GEMMA2 mapping + hooks: MaxText layer i = HF layers 2i (local) and 2i+1 (global). Embedding
    sliced, then `/ f32(sqrt(hidden))`, cast; every norm `x - 1.0`; q reshape_kernel, then
    `x f32(sqrt(head_dim))` in f32, cast. Tied: no lm_head."""
    h, hd = cfg["hidden_size"], cfg["head_dim"]
    out = {
        "model.embed_tokens.weight": divide_f32(
            truncate_vocab(leaves["token_embedder.embedding"], cfg["vocab_size"]), h**0.5
        ),
        "model.norm.weight": minus_one(leaves["decoder.decoder_norm.scale"]),
    }
    for i in range(_n_layers(cfg) // 2):
        g = _view(leaves, "decoder.layers.", (i,)) if scan else _view(leaves, f"decoder.layers_{i}.")
        for j, kind in ((2 * i, "local"), (2 * i + 1, "global")):
            p, a = f"model.layers.{j}.", f"self_attention_{kind}."
            out |= {
                p + "self_attn.q_proj.weight": scale_f32(kernel_in(g(a + "query.kernel")), np.sqrt(hd)),
                p + "self_attn.k_proj.weight": kernel_in(g(a + "key.kernel")),
                p + "self_attn.v_proj.weight": kernel_in(g(a + "value.kernel")),
                p + "self_attn.o_proj.weight": kernel_out(g(a + "out.kernel")),
                p + "input_layernorm.weight": minus_one(g(f"pre_self_attention_norm_{kind}.scale")),
                p + "post_attention_layernorm.weight": minus_one(g(f"post_self_attention_norm_{kind}.scale")),
                p + "pre_feedforward_layernorm.weight": minus_one(g(f"pre_ffw_norm_{kind}.scale")),
                p + "post_feedforward_layernorm.weight": minus_one(g(f"post_ffw_norm_{kind}.scale")),
            } | _mlp(g, p + "mlp.", f"mlp_{kind}")
    return out


def gemma3(leaves: dict[str, np.ndarray], cfg: dict, scan: bool, use_multimodal: bool) -> dict[str, np.ndarray]:
    """GEMMA3 mapping + hooks: embedding `/ bf16(sqrt(hidden))` (bfloat16 normaliser) then vocab
    truncation; every norm (incl. q/k norms) `x - 1.0`; kernels reshape_kernel; 6-layer scan blocks
    `layers.layers_{b}` + `layers_remainder.layers_{r}`. Vision tower only if use_multimodal."""
    tc = cfg.get("text_config", cfg)
    base = "model.language_model."
    emb = divide_bf16(leaves["token_embedder.embedding"], tc["hidden_size"] ** 0.5)
    out = {
        base + "embed_tokens.weight": truncate_vocab(emb, tc["vocab_size"]),
        base + "norm.weight": minus_one(leaves["decoder.decoder_norm.scale"]),
    }
    for i in range(tc["num_hidden_layers"]):
        g = _cycled_view(leaves, scan, i)
        p, a = f"{base}layers.{i}.", "self_attention."
        out |= {
            p + "self_attn.q_proj.weight": kernel_in(g(a + "query.kernel")),
            p + "self_attn.k_proj.weight": kernel_in(g(a + "key.kernel")),
            p + "self_attn.v_proj.weight": kernel_in(g(a + "value.kernel")),
            p + "self_attn.o_proj.weight": kernel_out(g(a + "out.kernel")),
            p + "self_attn.q_norm.weight": minus_one(g(a + "query_norm.scale")),
            p + "self_attn.k_norm.weight": minus_one(g(a + "key_norm.scale")),
            p + "input_layernorm.weight": minus_one(g("pre_self_attention_norm.scale")),
            p + "post_attention_layernorm.weight": minus_one(g("post_self_attention_norm.scale")),
            p + "pre_feedforward_layernorm.weight": minus_one(g("pre_ffw_norm.scale")),
            p + "post_feedforward_layernorm.weight": minus_one(g("post_ffw_norm.scale")),
        } | _mlp(g, p + "mlp.", "mlp")
    if use_multimodal:
        out |= _gemma3_vision(leaves, cfg["vision_config"])
    return out


def _gemma3_vision(leaves: dict[str, np.ndarray], vc: dict) -> dict[str, np.ndarray]:
    """GEMMA3 vision hooks: patch kernel transpose(3, 2, 0, 1), pos_embed squeeze(0), q/k/v/out
    biases flattened, kernels reshape_kernel, mm_soft_embedding_norm `x - 1.0`."""
    ve, v = "vision_encoder.Gemma3VisionEncoderLayer_0.", "model.vision_tower.vision_model."
    out = {
        v + "embeddings.patch_embedding.weight": leaves[ve + "embedding.kernel"].transpose(3, 2, 0, 1),
        v + "embeddings.patch_embedding.bias": leaves[ve + "embedding.bias"],
        v + "embeddings.position_embedding.weight": leaves[ve + "pos_embedding"].squeeze(0),
        v + "post_layernorm.weight": leaves[ve + "Transformer.encoder_norm.scale"],
        v + "post_layernorm.bias": leaves[ve + "Transformer.encoder_norm.bias"],
        "model.multi_modal_projector.mm_input_projection_weight": leaves[
            "vision_encoder.VisionEmbedder_0.mm_input_projection.w"
        ],
        "model.multi_modal_projector.mm_soft_emb_norm.weight": minus_one(
            leaves["vision_encoder.VisionEmbedder_0.mm_soft_embedding_norm.scale"]
        ),
    }
    for i in range(vc["num_hidden_layers"]):
        b, p = f"{ve}Transformer.encoderblock_{i}.", f"{v}encoder.layers.{i}."
        m = b + "MultiHeadDotProductAttention_0."
        out |= {
            p + "layer_norm1.weight": leaves[b + "LayerNorm_0.scale"],
            p + "layer_norm1.bias": leaves[b + "LayerNorm_0.bias"],
            p + "layer_norm2.weight": leaves[b + "LayerNorm_1.scale"],
            p + "layer_norm2.bias": leaves[b + "LayerNorm_1.bias"],
            p + "self_attn.out_proj.weight": kernel_out(leaves[m + "out.kernel"]),
            p + "self_attn.out_proj.bias": leaves[m + "out.bias"].reshape(-1),
            p + "mlp.fc1.weight": leaves[b + "MlpBlockViT_0.Dense_0.kernel"].T,
            p + "mlp.fc1.bias": leaves[b + "MlpBlockViT_0.Dense_0.bias"],
            p + "mlp.fc2.weight": leaves[b + "MlpBlockViT_0.Dense_1.kernel"].T,
            p + "mlp.fc2.bias": leaves[b + "MlpBlockViT_0.Dense_1.bias"],
        }
        for mt_name, hf in (("query", "q"), ("key", "k"), ("value", "v")):
            out[f"{p}self_attn.{hf}_proj.weight"] = kernel_in(leaves[f"{m}{mt_name}.kernel"])
            out[f"{p}self_attn.{hf}_proj.bias"] = leaves[f"{m}{mt_name}.bias"].reshape(-1)
    return out


def gemma4(leaves: dict[str, np.ndarray], cfg: dict, scan: bool, use_multimodal: bool) -> dict[str, np.ndarray]:
    """GEMMA4 / GEMMA4_SMALL mappings + hooks: embedding sliced then `/ f32(sqrt(hidden))`; norms
    identity (+1 folded into the checkpoint); kernels reshape_kernel; MoE `gate_up_proj =
    swapaxes(concat(wi_0, wi_1, -1), -2, -1)`, `down_proj = wo.transpose(0, 2, 1)`; scanned:
    `scanned_blocks.local_layers` [.., block, local, ..] + `global_layer` [.., block, ..] (6-layer
    blocks) + `layers_remainder.layers_{r}`."""
    tc = cfg.get("text_config", cfg)
    # GEMMA4 mapping: `model.language_model` if the HF config has a vision_config, else `model`.
    # MaxText's own Gemma4 configs (hf_model_configs.py) all have one; our tiny dense/small fixtures
    # say `"vision_config": null`, for which MaxText would write `model.*` that
    # Gemma4ForConditionalGeneration does not load. So a container config (text_config present)
    # means `model.language_model.` here (NOT MaxText for a null vision_config).
    base = "model.language_model." if "text_config" in cfg or cfg.get("vision_config") else "model."
    n = tc["num_hidden_layers"]
    out = {
        base + "embed_tokens.weight": divide_f32(
            truncate_vocab(leaves["token_embedder.embedding"], tc["vocab_size"]), tc["hidden_size"] ** 0.5
        ),
        base + "norm.weight": leaves["decoder.decoder_norm.scale"],
    }
    if "decoder.per_layer_embedder.embed_tokens_per_layer" in leaves:
        e = "decoder.per_layer_embedder."
        out[base + "embed_tokens_per_layer.weight"] = leaves[e + "embed_tokens_per_layer"]
        out[base + "per_layer_model_projection.weight"] = kernel_in(leaves[e + "per_layer_model_projection.kernel"])
        out[base + "per_layer_projection_norm.weight"] = leaves[e + "per_layer_projection_norm.scale"]
    whole = n - n % 6
    for i in range(n):
        if not scan:
            g = _view(leaves, f"decoder.layers_{i}.")
        elif i >= whole:
            g = _view(leaves, f"decoder.layers_remainder.layers_{i - whole}.")
        elif i % 6 == 5:
            g = _view(leaves, "decoder.scanned_blocks.global_layer.", (i // 6,))
        else:
            g = _view(leaves, "decoder.scanned_blocks.local_layers.", (i // 6, i % 6))
        out |= _gemma4_layer(g, f"{base}layers.{i}.")
    if use_multimodal:
        out |= _gemma4_vision(leaves, cfg["vision_config"])
    return out


def _gemma4_layer(g: Get, p: str) -> dict[str, np.ndarray]:
    a, has = "self_attention.", g.has  # type: ignore[attr-defined]
    out = {
        p + "input_layernorm.weight": g("pre_self_attention_norm.scale"),
        p + "post_attention_layernorm.weight": g("post_self_attention_norm.scale"),
        p + "pre_feedforward_layernorm.weight": g("pre_ffw_norm.scale"),
        p + "post_feedforward_layernorm.weight": g("post_ffw_norm.scale"),
        p + "layer_scalar": g("layer_scalar").reshape(1),  # HF_SHAPE: [1]
        p + "self_attn.q_proj.weight": kernel_in(g(a + "query.kernel")),
        p + "self_attn.o_proj.weight": kernel_out(g(a + "out.kernel")),
        p + "self_attn.q_norm.weight": g(a + "query_norm.scale"),
    }
    if has(a + "key.kernel"):  # absent on KV-shared layers (gemma4 small)
        out[p + "self_attn.k_proj.weight"] = kernel_in(g(a + "key.kernel"))
        out[p + "self_attn.k_norm.weight"] = g(a + "key_norm.scale")
    if has(a + "value.kernel"):  # absent on K=V global layers (share_kv_projections)
        out[p + "self_attn.v_proj.weight"] = kernel_in(g(a + "value.kernel"))
    if has("mlp.moe_block.MoeBlock_0.wi_0"):
        b = "mlp.moe_block.MoeBlock_0."
        wi = np.concatenate([g(b + "wi_0"), g(b + "wi_1")], axis=-1)  # [E, H, 2FF]
        out |= {
            p + "experts.gate_up_proj": np.swapaxes(wi, -2, -1),
            p + "experts.down_proj": g(b + "wo").transpose(0, 2, 1),
            p + "router.proj.weight": kernel_in(g(b + "gate.kernel")),
            p + "router.per_expert_scale": g(b + "per_expert_scale"),
            p + "router.scale": g("mlp.pre_forward_scale_2"),
            p + "pre_feedforward_layernorm_2.weight": g("mlp.pre_feedforward_layernorm_2.scale"),
            p + "post_feedforward_layernorm_1.weight": g("mlp.post_feedforward_layernorm_1.scale"),
            p + "post_feedforward_layernorm_2.weight": g("mlp.post_feedforward_layernorm_2.scale"),
        }
        out |= _mlp(g, p + "mlp.", "mlp.moe_block.shared_experts")
    else:
        out |= _mlp(g, p + "mlp.", "mlp")
    if has("per_layer_input_gate.kernel"):
        out |= {
            p + "per_layer_input_gate.weight": kernel_in(g("per_layer_input_gate.kernel")),
            p + "per_layer_projection.weight": kernel_in(g("per_layer_projection.kernel")),
            p + "post_per_layer_input_norm.weight": g("post_per_layer_input_norm.scale"),
        }
    return out


def _gemma4_vision(leaves: dict[str, np.ndarray], vc: dict) -> dict[str, np.ndarray]:
    """GEMMA4 vision hooks: input_proj .T, pos_emb transpose(1, 0, 2), kernels reshape_kernel,
    identity norms and std_scale/std_bias."""
    ve, v = "vision_encoder.Gemma4VisionEncoderLayer_0.", "model.vision_tower."
    out = {
        v + "patch_embedder.input_proj.weight": leaves[ve + "vision_entry.input_projection.kernel"].T,
        v + "patch_embedder.position_embedding_table": leaves[ve + "vision_entry.pos_emb_param"].transpose(1, 0, 2),
        "model.embed_vision.embedding_projection.weight": kernel_in(
            leaves["vision_encoder.Gemma4VisionProjector_0.projection.kernel"]
        ),
    }
    if ve + "std_scale" in leaves:
        out[v + "std_scale"], out[v + "std_bias"] = leaves[ve + "std_scale"], leaves[ve + "std_bias"]
    for i in range(vc["num_hidden_layers"]):
        b, p = f"{ve}layer_{i}.", f"{v}encoder.layers.{i}."
        out |= {
            p + "self_attn.o_proj.linear.weight": kernel_out(leaves[b + "attention.out.kernel"]),
            p + "self_attn.q_norm.weight": leaves[b + "attention.query_norm.scale"],
            p + "self_attn.k_norm.weight": leaves[b + "attention.key_norm.scale"],
            p + "input_layernorm.weight": leaves[b + "pre_attention_norm.scale"],
            p + "post_attention_layernorm.weight": leaves[b + "post_attention_norm.scale"],
            p + "pre_feedforward_layernorm.weight": leaves[b + "pre_ffw_norm.scale"],
            p + "post_feedforward_layernorm.weight": leaves[b + "post_ffw_norm.scale"],
            p + "mlp.gate_proj.linear.weight": leaves[b + "mlp.wi_0.kernel"].T,
            p + "mlp.up_proj.linear.weight": leaves[b + "mlp.wi_1.kernel"].T,
            p + "mlp.down_proj.linear.weight": leaves[b + "mlp.wo.kernel"].T,
        }
        for mt_name, hf in (("query", "q"), ("key", "k"), ("value", "v")):
            out[f"{p}self_attn.{hf}_proj.linear.weight"] = kernel_in(leaves[f"{b}attention.{mt_name}.kernel"])
    return out


FAMILIES: dict[str, Callable[..., dict[str, np.ndarray]]] = {
    "llama": llama_like,
    "mistral": llama_like,
    "mixtral": llama_like,
    "qwen2": qwen,
    "qwen3": qwen,
    "qwen3_moe": qwen,
    "deepseek_v2": deepseek,
    "deepseek_v3": deepseek,
    "deepseek_v32": deepseek,
    "gpt_oss": gpt_oss,
    "olmo3": olmo3,
    "qwen3_next": qwen3_next,
    "gemma2": gemma2,
}
MULTIMODAL_FAMILIES = {"gemma3": gemma3, "gemma3_text": gemma3, "gemma4": gemma4, "gemma4_text": gemma4}


def expected_hf_tensors(
    items_dir: str,
    hf_config: dict,
    scan_layers: bool,
    weight_dtype: str | None = None,
    use_multimodal: bool = False,
) -> dict[str, np.ndarray]:
    """HF key -> array, as MaxText's to_huggingface would write for this checkpoint.

    `items_dir`: the Orbax `<base>/0/items` directory. `hf_config`: the HF config.json dict.
    `weight_dtype`: "bfloat16" / "float32"; None = the token embedding's stored dtype (ckptbeam's
    default; MaxText's own default is float32). `use_multimodal`: also export the vision tower
    (MaxText skips `vision_encoder` leaves unless use_multimodal)."""
    stored = restore_leaves(items_dir)
    dtype = DTYPES[weight_dtype] if weight_dtype else stored["token_embedder.embedding"].dtype
    leaves = {k: _restore_cast(v, dtype) for k, v in stored.items()}
    mt = hf_config["model_type"]
    if mt in MULTIMODAL_FAMILIES:
        out = MULTIMODAL_FAMILIES[mt](leaves, hf_config, scan_layers, use_multimodal)
    else:
        out = FAMILIES[mt](leaves, hf_config, scan_layers)
    # convert_jax_weight_to_numpy: cast to weight_dtype after the hooks (a no-op here, every leaf
    # already has it), then np.asarray: C-contiguous, as safetensors writes.
    return {k: np.ascontiguousarray(v.astype(dtype) if _is_float(v) else v) for k, v in out.items()}
