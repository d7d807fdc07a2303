"""An independent numpy reference of what MaxText's converter writes, for test expectations.

Written from MaxText's param_mapping.py rules directly (not from ckptbeam's model maps): read every
tensor with the `safetensors` library, cast to the save dtype first, then transpose/reshape,
re-interleave RoPE halves (Llama-3.1), scale the query in float32 (Llama/Mistral/Mixtral), stack.
"""

from __future__ import annotations

import glob
import json
import os

import ml_dtypes
import numpy as np
from safetensors.numpy import load_file

SAVE = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.dtype(np.float32)}


def load_tensors(model_dir: str) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    for f in sorted(glob.glob(os.path.join(model_dir, "*.safetensors"))):
        tensors.update(load_file(f))
    return tensors


def _interleave_halves(w: np.ndarray) -> np.ndarray:
    # out[..., 2i] = first_half[i], out[..., 2i+1] = second_half[i]
    d = w.shape[-1]
    return w.reshape(*w.shape[:-1], 2, d // 2).swapaxes(-1, -2).reshape(w.shape)


def _scale_query(w: np.ndarray, head_dim: int) -> np.ndarray:
    return (w.astype(np.float32) * np.float32(1.0 / np.sqrt(head_dim))).astype(w.dtype)


def expected_leaves(model_dir: str, scan_layers: bool, save_dtype: str = "bfloat16") -> dict[str, np.ndarray]:
    """Dotted Orbax leaf name -> expected array (without `step`)."""
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    t = load_tensors(model_dir)
    save = SAVE[save_dtype]
    mt = cfg["model_type"]
    hidden, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_heads
    head_dim = cfg.get("head_dim") or hidden // n_heads
    n_layers = cfg["num_hidden_layers"]
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    llama31_rope = mt == "llama" and rope.get("rope_type") == "llama3"
    scales_query = mt in ("llama", "mistral", "mixtral")

    def get(key: str) -> np.ndarray:
        return t[key].astype(save)

    def layer_params(i: int) -> dict[str, np.ndarray]:
        p = f"model.layers.{i}."
        q = get(p + "self_attn.q_proj.weight").T.reshape(hidden, n_heads, head_dim)
        k = get(p + "self_attn.k_proj.weight").T.reshape(hidden, n_kv, head_dim)
        if llama31_rope:
            q, k = _interleave_halves(q), _interleave_halves(k)
        if scales_query:
            q = _scale_query(q, head_dim)
        out = {
            "self_attention.query.kernel": q,
            "self_attention.key.kernel": k,
            "self_attention.value.kernel": get(p + "self_attn.v_proj.weight").T.reshape(hidden, n_kv, head_dim),
            "self_attention.out.kernel": get(p + "self_attn.o_proj.weight").T.reshape(n_heads, head_dim, hidden),
            "pre_self_attention_layer_norm.scale": get(p + "input_layernorm.weight"),
            "post_self_attention_layer_norm.scale": get(p + "post_attention_layernorm.weight"),
        }
        if p + "self_attn.q_proj.bias" in t:
            for name, heads in (("query", n_heads), ("key", n_kv), ("value", n_kv)):
                out[f"self_attention.{name}.bias"] = get(p + f"self_attn.{name[0]}_proj.bias").reshape(heads, head_dim)
        if p + "self_attn.q_norm.weight" in t:
            out["self_attention.query_norm.scale"] = get(p + "self_attn.q_norm.weight")
            out["self_attention.key_norm.scale"] = get(p + "self_attn.k_norm.weight")
        if mt == "mixtral":
            e = range(cfg["num_local_experts"])
            moe = p + "block_sparse_moe."
            out["MoeBlock_0.gate.kernel"] = get(moe + "gate.weight").T
            for mt_name, hf in (("wi_0", "w1"), ("wi_1", "w3"), ("wo", "w2")):
                out[f"MoeBlock_0.{mt_name}"] = np.stack([get(f"{moe}experts.{j}.{hf}.weight").T for j in e])
        else:
            out["mlp.wi_0.kernel"] = get(p + "mlp.gate_proj.weight").T
            out["mlp.wi_1.kernel"] = get(p + "mlp.up_proj.weight").T
            out["mlp.wo.kernel"] = get(p + "mlp.down_proj.weight").T
        return out

    leaves = {
        "params.params.token_embedder.embedding": get("model.embed_tokens.weight"),
        "params.params.decoder.decoder_norm.scale": get("model.norm.weight"),
    }
    if not cfg.get("tie_word_embeddings", False):
        leaves["params.params.decoder.logits_dense.kernel"] = get("lm_head.weight").T
    per_layer = [layer_params(i) for i in range(n_layers)]
    for name in per_layer[0]:
        if scan_layers:
            leaves[f"params.params.decoder.layers.{name}"] = np.stack([lp[name] for lp in per_layer], axis=1)
        else:
            for i, lp in enumerate(per_layer):
                leaves[f"params.params.decoder.layers_{i}.{name}"] = lp[name]
    return leaves
