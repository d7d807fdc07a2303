"""An independent numpy reference of what MaxText's converter writes, for test expectations.

Written from MaxText's param_mapping.py rules directly (not from ckptbeam's model maps): read every
tensor, cast to the save dtype first, then transpose/reshape, re-interleave RoPE halves
(Llama-3.1), scale the query in float32 (Llama/Mistral/Mixtral), stack.

Quantized checkpoints go through what MaxText's two-step pipeline does: its standalone script
dequantizes to a bf16 checkpoint first (deepseek_dequantize.py: float32 `w * scale_inv` per block,
one rounding to bf16; dequantize_mxfp4.py: its e2m1 formula times 2**(scale - 127), to bf16, then
permute(0, 2, 1)), and the converter then reads that bf16 checkpoint. The FP8 and e2m1 bit
patterns are decoded here by formula, not with ml_dtypes, so the decoders are checked too.
"""

from __future__ import annotations

import glob
import json
import os
import struct

import ml_dtypes
import numpy as np

SAVE = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.dtype(np.float32)}
BF16 = np.dtype(ml_dtypes.bfloat16)
RAW_DTYPES = {
    "BF16": BF16,
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "U8": np.dtype(np.uint8),
    "F8_E4M3": np.dtype(np.uint8),  # raw bits, decoded by e4m3_to_float32
}


def load_raw(model_dir: str) -> dict[str, tuple[str, np.ndarray]]:
    """Every tensor of every *.safetensors file: key -> (safetensors dtype, array)."""
    tensors: dict[str, tuple[str, np.ndarray]] = {}
    for path in sorted(glob.glob(os.path.join(model_dir, "*.safetensors"))):
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
            data = f.read()
        header.pop("__metadata__", None)
        for key, info in header.items():
            begin, end = info["data_offsets"]
            arr = np.frombuffer(data[begin:end], RAW_DTYPES[info["dtype"]]).reshape(info["shape"])
            tensors[key] = (info["dtype"], arr)
    return tensors


def load_tensors(model_dir: str) -> dict[str, np.ndarray]:
    return {k: v for k, (_, v) in load_raw(model_dir).items()}


# --------------------------------------------------------------------------- dequantization


def e4m3_to_float32(bits: np.ndarray) -> np.ndarray:
    """float8_e4m3fn bit patterns -> float32: sign, 4-bit exponent (bias 7), 3-bit mantissa;
    exponent 0 is subnormal (m/8 * 2**-6); S.1111.111 is NaN; no infinities."""
    b = bits.astype(np.int64)
    sign = np.where(b & 0x80, -1.0, 1.0)
    exp = (b >> 3) & 0xF
    man = b & 0x7
    value = np.where(exp == 0, man / 8.0 * 2.0**-6, (1 + man / 8.0) * 2.0 ** (exp - 7))
    value = np.where((exp == 0xF) & (man == 0x7), np.nan, value)
    return (sign * value).astype(np.float32)


def fp8_dequantize(bits: np.ndarray, scale: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """deepseek_dequantize.py: f32(w) * (scale repeated per block, cropped), rounded to bf16."""
    m, n = bits.shape
    full = np.repeat(np.repeat(scale.astype(np.float32), block[0], axis=0), block[1], axis=1)[:m, :n]
    return (e4m3_to_float32(bits) * full).astype(BF16)


def e2m1_maxtext(code: np.ndarray) -> np.ndarray:
    """dequantize_mxfp4.py's e2m1_to_fp: [S E E M]; code 8 (negative zero) gives +0.0."""
    x = code.astype(np.int64)
    sign = 1 - 2 * ((x >> 3) & 1)
    exp = 2.0 ** (((x >> 1) & 0x3) - 1)
    mantissa = np.where((x & 0b111) == 0b001, 1.0, 0.5 * (x & 1) + 1)
    return np.where((x & 0b111) == 0, 0.0, mantissa * exp * sign).astype(np.float32)


def mxfp4_dequantize(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """dequantize_mxfp4.py: [E, out, G, 16] blocks + [E, out, G] scales -> bf16 [E, in, out]."""
    factor = (2.0 ** (scales.astype(np.float32) - 127)).astype(np.float32)[..., None, None]
    pairs = np.stack([e2m1_maxtext(blocks & 0xF), e2m1_maxtext(blocks >> 4)], axis=-1) * factor
    values = pairs.reshape(pairs.shape[:-3] + (-1,)).astype(BF16)
    return values.transpose(0, 2, 1)


def dequantized_state(model_dir: str, cfg: dict) -> dict[str, np.ndarray]:
    """The checkpoint as MaxText's dequantize scripts would leave it (unquantized: as read)."""
    raw = load_raw(model_dir)
    method = (cfg.get("quantization_config") or {}).get("quant_method")
    out: dict[str, np.ndarray] = {}
    for key, (dtype, arr) in raw.items():
        if method == "fp8" and key.endswith("_scale_inv"):
            continue
        if method == "fp8" and dtype == "F8_E4M3":
            block = tuple(cfg["quantization_config"]["weight_block_size"])
            out[key] = fp8_dequantize(arr, raw[key + "_scale_inv"][1], block)
        elif method == "mxfp4" and key.endswith("_scales"):
            continue
        elif method == "mxfp4" and key.endswith("_blocks"):
            out[key.removesuffix("_blocks")] = mxfp4_dequantize(arr, raw[key.removesuffix("_blocks") + "_scales"][1])
        elif method:
            out[key] = arr.astype(BF16)  # both scripts rewrite every other tensor in bf16
        else:
            out[key] = arr
    return out


# --------------------------------------------------------------------------- per-family layer tables


def _interleave_halves(w: np.ndarray) -> np.ndarray:
    # out[..., 2i] = first_half[i], out[..., 2i+1] = second_half[i]
    d = w.shape[-1]
    return w.reshape(*w.shape[:-1], 2, d // 2).swapaxes(-1, -2).reshape(w.shape)


def _scale_query(w: np.ndarray, head_dim: int) -> np.ndarray:
    return (w.astype(np.float32) * np.float32(1.0 / np.sqrt(head_dim))).astype(w.dtype)


def _kernel(w: np.ndarray, *shape: int) -> np.ndarray:
    """MaxText's reshape_kernel: transpose, then reshape to the target shape."""
    return w.T.reshape(shape) if shape else w.T


def expected_leaves(
    model_dir: str,
    scan_layers: bool,
    save_dtype: str = "bfloat16",
    use_multimodal: bool = False,
    vocab_size: int | None = None,
) -> dict[str, np.ndarray]:
    """Dotted Orbax leaf name -> expected array (without `step`); `vocab_size` as MaxText's option."""
    leaves = _expected_leaves(model_dir, scan_layers, save_dtype, use_multimodal)
    return leaves if vocab_size is None else with_vocab_rows(leaves, vocab_size)


def _fit(x: np.ndarray, n: int, axis: int) -> np.ndarray:
    """The first n entries of `axis`, zeros past the end of x."""
    shape = list(x.shape)
    shape[axis] = n
    out = np.zeros(shape, x.dtype)
    keep = min(n, x.shape[axis])
    index = tuple(slice(0, keep) if a == axis else slice(None) for a in range(x.ndim))
    out[index] = x[index]
    return out


def with_vocab_rows(leaves: dict[str, np.ndarray], vocab_size: int) -> dict[str, np.ndarray]:
    """MaxText run with `vocab_size=N`: its embedding is [N, emb] (pad_embedding_layer /
    pad_and_scale_embedding: HF rows, then zeros; or the first N rows) and an untied
    logits_dense [emb, N] (the same vocabulary columns). The Gemma scalings commute with this
    (padding rows are zero), so resizing the default expectation gives the same arrays."""
    out = dict(leaves)
    for name, axis in (("params.params.token_embedder.embedding", 0), ("params.params.decoder.logits_dense.kernel", 1)):
        if name in out:
            out[name] = _fit(out[name], vocab_size, axis)
    return out


def _expected_leaves(model_dir: str, scan_layers: bool, save_dtype: str, use_multimodal: bool) -> dict[str, np.ndarray]:
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    t = dequantized_state(model_dir, cfg)
    save = SAVE[save_dtype]
    mt = cfg["model_type"]
    if mt in MORE_FAMILIES:
        return MORE_FAMILIES[mt](cfg, {k: v.astype(save) for k, v in t.items()}, scan_layers, use_multimodal)
    hidden, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_heads
    head_dim = cfg.get("head_dim") or hidden // n_heads
    n_layers = cfg["num_hidden_layers"]
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    llama31_rope = mt == "llama" and rope.get("rope_type") == "llama3"
    scales_query = mt in ("llama", "mistral", "mixtral")

    def get(key: str) -> np.ndarray:
        return t[key].astype(save)

    def attention(p: str, prefix: str = "self_attention") -> dict[str, np.ndarray]:
        q = get(p + "self_attn.q_proj.weight").T.reshape(hidden, n_heads, head_dim)
        k = get(p + "self_attn.k_proj.weight").T.reshape(hidden, n_kv, head_dim)
        if llama31_rope:
            q, k = _interleave_halves(q), _interleave_halves(k)
        if scales_query:
            q = _scale_query(q, head_dim)
        out = {
            f"{prefix}.query.kernel": q,
            f"{prefix}.key.kernel": k,
            f"{prefix}.value.kernel": get(p + "self_attn.v_proj.weight").T.reshape(hidden, n_kv, head_dim),
            f"{prefix}.out.kernel": get(p + "self_attn.o_proj.weight").T.reshape(n_heads, head_dim, hidden),
        }
        if p + "self_attn.q_proj.bias" in t:
            for name, heads in (("query", n_heads), ("key", n_kv), ("value", n_kv)):
                out[f"{prefix}.{name}.bias"] = get(p + f"self_attn.{name[0]}_proj.bias").reshape(heads, head_dim)
        if p + "self_attn.q_norm.weight" in t:
            out[f"{prefix}.query_norm.scale"] = get(p + "self_attn.q_norm.weight")
            out[f"{prefix}.key_norm.scale"] = get(p + "self_attn.k_norm.weight")
        return out

    def norms(p: str) -> dict[str, np.ndarray]:
        return {
            "pre_self_attention_layer_norm.scale": get(p + "input_layernorm.weight"),
            "post_self_attention_layer_norm.scale": get(p + "post_attention_layernorm.weight"),
        }

    def mlp(p: str, name: str = "mlp") -> dict[str, np.ndarray]:
        return {
            f"{name}.wi_0.kernel": get(p + "gate_proj.weight").T,
            f"{name}.wi_1.kernel": get(p + "up_proj.weight").T,
            f"{name}.wo.kernel": get(p + "down_proj.weight").T,
        }

    def experts(p: str, name: str, n: int) -> dict[str, np.ndarray]:
        # reshape_expert_kernel / reshape_kernel per expert, stacked on axis 0
        return {
            f"{name}.wi_0": np.stack([get(f"{p}{j}.gate_proj.weight").T for j in range(n)]),
            f"{name}.wi_1": np.stack([get(f"{p}{j}.up_proj.weight").T for j in range(n)]),
            f"{name}.wo": np.stack([get(f"{p}{j}.down_proj.weight").T for j in range(n)]),
        }

    def layer_params(i: int) -> dict[str, np.ndarray]:
        p = f"model.layers.{i}."
        out = attention(p) | norms(p)
        if mt == "mixtral":
            e = range(cfg["num_local_experts"])
            moe = p + "block_sparse_moe."
            out["MoeBlock_0.gate.kernel"] = get(moe + "gate.weight").T
            for mt_name, hf in (("wi_0", "w1"), ("wi_1", "w3"), ("wo", "w2")):
                out[f"MoeBlock_0.{mt_name}"] = np.stack([get(f"{moe}experts.{j}.{hf}.weight").T for j in e])
        elif mt == "qwen3_moe":
            n = cfg.get("num_experts") or cfg["num_local_experts"]
            out["moe_block.gate.kernel"] = get(p + "mlp.gate.weight").T
            out |= experts(p + "mlp.experts.", "moe_block", n)
        else:
            out |= mlp(p + "mlp.")
        return out

    def deepseek_layer(i: int) -> dict[str, np.ndarray]:
        """DEEPSEEK_MAXTEXT_TO_HF_PARAM_MAPPING: attention_keys (+ dense or MoE keys)."""
        p, a = f"model.layers.{i}.", "self_attention."
        heads, nope, rope_dim, v = n_heads, cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
        q_lora, kv_lora = cfg.get("q_lora_rank") or 0, cfg["kv_lora_rank"]
        out = norms(p)
        if q_lora:
            out[a + "wq_a.kernel"] = _kernel(get(p + "self_attn.q_a_proj.weight"))
            out[a + "q_norm.scale"] = get(p + "self_attn.q_a_layernorm.weight")
            out[a + "wq_b.kernel"] = _kernel(get(p + "self_attn.q_b_proj.weight"), q_lora, heads, nope + rope_dim)
        else:
            out[a + "query.kernel"] = _kernel(get(p + "self_attn.q_proj.weight"), hidden, heads, nope + rope_dim)
        out[a + "wkv_a.kernel"] = _kernel(get(p + "self_attn.kv_a_proj_with_mqa.weight"))
        out[a + "kv_norm.scale"] = get(p + "self_attn.kv_a_layernorm.weight")
        out[a + "wkv_b.kernel"] = _kernel(get(p + "self_attn.kv_b_proj.weight"), kv_lora, heads, nope + v)
        out[a + "out.kernel"] = _kernel(get(p + "self_attn.o_proj.weight"), heads, v, hidden)
        if mt == "deepseek_v32":
            ix, n_ix, d_ix = p + "self_attn.indexer.", cfg["index_n_heads"], cfg["index_head_dim"]
            out[a + "indexer.wq_b.kernel"] = _kernel(get(ix + "wq_b.weight"), q_lora, n_ix, d_ix)
            out[a + "indexer.wk.kernel"] = _kernel(get(ix + "wk.weight"))
            out[a + "indexer.k_norm.scale"] = get(ix + "k_norm.weight")
            out[a + "indexer.k_norm.bias"] = get(ix + "k_norm.bias")
            out[a + "indexer.weights_proj.kernel"] = _kernel(get(ix + "weights_proj.weight"))
        if i < cfg["first_k_dense_replace"]:
            return out | mlp(p + "mlp.")
        b = "DeepSeekMoeBlock_0."
        out |= mlp(p + "mlp.shared_experts.", b + "shared_experts")
        out[b + "MoeBlock_0.gate.kernel"] = _kernel(get(p + "mlp.gate.weight"))
        if mt in ("deepseek_v3", "deepseek_v32"):
            out[b + "MoeBlock_0.gate.bias"] = get(p + "mlp.gate.e_score_correction_bias")
        return out | experts(p + "mlp.experts.", b + "MoeBlock_0", cfg["n_routed_experts"])

    def gpt_oss_layer(i: int) -> dict[str, np.ndarray]:
        """GPT_OSS mapping + hooks: interleave splits gate_up_proj (and its bias) even/odd."""
        p, m = f"model.layers.{i}.", f"model.layers.{i}.mlp."
        out = norms(p) | attention(p, "GptOssAttention")
        out["GptOssAttention.out.bias"] = get(p + "self_attn.o_proj.bias")
        out["GptOssAttention.sinks"] = get(p + "self_attn.sinks")
        gate_up, gate_up_bias = get(m + "experts.gate_up_proj"), get(m + "experts.gate_up_proj_bias")
        return out | {
            "GptOssMlp.gate.kernel": get(m + "router.weight").T,
            "GptOssMlp.gate.bias": get(m + "router.bias"),
            "GptOssMlp.wi_0": gate_up[..., ::2],
            "GptOssMlp.wi_1": gate_up[..., 1::2],
            "GptOssMlp.wi_0_bias": gate_up_bias[..., ::2],
            "GptOssMlp.wi_1_bias": gate_up_bias[..., 1::2],
            "GptOssMlp.wo": get(m + "experts.down_proj"),
            "GptOssMlp.wo_bias": get(m + "experts.down_proj_bias"),
        }

    leaves = {
        "params.params.token_embedder.embedding": get("model.embed_tokens.weight"),
        "params.params.decoder.decoder_norm.scale": get("model.norm.weight"),
    }
    if not cfg.get("tie_word_embeddings", False):
        leaves["params.params.decoder.logits_dense.kernel"] = get("lm_head.weight").T

    def put(container: str, layers: list[int], build) -> None:
        """Scanned: one stack at param_scan_axis 1 under `container`; else `<container>_<i>`."""
        per_layer = [build(i) for i in layers]
        for name in per_layer[0]:
            if scan_layers:
                leaves[f"params.params.decoder.{container}.{name}"] = np.stack([lp[name] for lp in per_layer], axis=1)
            else:
                for j, lp in enumerate(per_layer):
                    leaves[f"params.params.decoder.{container}_{j}.{name}"] = lp[name]

    if mt.startswith("deepseek"):
        k = cfg["first_k_dense_replace"]
        put("dense_layers", list(range(k)), deepseek_layer)
        put("moe_layers", list(range(k, n_layers)), deepseek_layer)
    elif mt == "gpt_oss" and scan_layers:
        for block in range(2):  # inhomogeneous_layer_cycle_interval: 2
            put(f"layers.layers_{block}", list(range(block, n_layers, 2)), gpt_oss_layer)
    elif mt == "gpt_oss":
        put("layers", list(range(n_layers)), gpt_oss_layer)
    else:
        put("layers", list(range(n_layers)), layer_params)
    return leaves


# --------------------------------------------------------------------------- Olmo3, Gemma2/3/4, Qwen3-Next
#
# Each hook below is written as MaxText's param_mapping.py hook computes it, on the arrays its
# eager loader returns (every HF tensor already cast to the save dtype), with numpy's own dtype
# rules: e.g. a bf16 array `+ 1.0` comes back float32 (ml_dtypes), `* np.float32(s)` is a float32
# product cast back with `.astype`, `* bf16_scalar` stays bf16.

P = "params.params."


def _stack(per_layer: list[dict[str, np.ndarray]], axis: int = 1) -> dict[str, np.ndarray]:
    return {name: np.stack([lp[name] for lp in per_layer], axis=axis) for name in per_layer[0]}


def _prefixed(prefix: str, leaves: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {f"{prefix}{k}": v for k, v in leaves.items()}


def _reshape_kernel(x: np.ndarray, *shape: int) -> np.ndarray:
    return x.T.reshape(shape) if shape else x.T


def _gemma_norm(x: np.ndarray) -> np.ndarray:
    return x + 1.0  # scale_rmsnorm(_layer): float32 for a bf16 array


def _cycled(n_layers: int, cycle: int, scan: bool, build, remainder: str | None = None) -> dict[str, np.ndarray]:
    """Scanned: `layers.<cycle_name>_{b}` stacks over layers b, b+cycle, ... of whole cycles (plus
    an unstacked remainder block); unscanned: `layers_{i}`. `build(i)` -> (cycle_name, leaves)."""
    out: dict[str, np.ndarray] = {}
    if not scan:
        for i in range(n_layers):
            out |= _prefixed(f"{P}decoder.layers_{i}.", build(i)[1])
        return out
    whole = n_layers - n_layers % cycle
    for b in range(cycle):
        layers = list(range(b, whole, cycle))
        if layers:
            name = build(b)[0]
            out |= _prefixed(f"{P}decoder.layers.{name}_{b}.", _stack([build(i)[1] for i in layers]))
    for r, i in enumerate(range(whole, n_layers)):
        out |= _prefixed(f"{P}decoder.{remainder}.{build(i)[0]}_{r}.", build(i)[1])
    return out


def olmo3_leaves(cfg: dict, t: dict, scan: bool, use_multimodal: bool) -> dict[str, np.ndarray]:
    """OLMO3 mapping + hooks: reshape_kernel, identity norms, 4-layer cycle when scanned."""
    h, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or h // heads

    def layer(i: int) -> tuple[str, dict[str, np.ndarray]]:
        p = f"model.layers.{i}."
        return "layers", {
            "attention.query.kernel": _reshape_kernel(t[p + "self_attn.q_proj.weight"], h, heads, hd),
            "attention.key.kernel": _reshape_kernel(t[p + "self_attn.k_proj.weight"], h, kv, hd),
            "attention.value.kernel": _reshape_kernel(t[p + "self_attn.v_proj.weight"], h, kv, hd),
            "attention.out.kernel": _reshape_kernel(t[p + "self_attn.o_proj.weight"], heads, hd, h),
            "attention.query_norm.scale": t[p + "self_attn.q_norm.weight"],
            "attention.key_norm.scale": t[p + "self_attn.k_norm.weight"],
            "mlp.wi_0.kernel": _reshape_kernel(t[p + "mlp.gate_proj.weight"]),
            "mlp.wi_1.kernel": _reshape_kernel(t[p + "mlp.up_proj.weight"]),
            "mlp.wo.kernel": _reshape_kernel(t[p + "mlp.down_proj.weight"]),
            "post_self_attention_layer_norm.scale": t[p + "post_attention_layernorm.weight"],
            "post_mlp_layer_norm.scale": t[p + "post_feedforward_layernorm.weight"],
        }

    out = {
        P + "token_embedder.embedding": t["model.embed_tokens.weight"],
        P + "decoder.decoder_norm.scale": t["model.norm.weight"],
        P + "decoder.logits_dense.kernel": _reshape_kernel(t["lm_head.weight"]),
    }
    return out | _cycled(cfg["num_hidden_layers"], 4, scan, layer)


def gemma2_leaves(cfg: dict, t: dict, scan: bool, use_multimodal: bool) -> dict[str, np.ndarray]:
    """GEMMA2 mapping + hooks: HF layers 2i (local) and 2i+1 (global) form MaxText layer i."""
    h, heads, kv, hd = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]

    def half(j: int, kind: str) -> dict[str, np.ndarray]:
        p, a = f"model.layers.{j}.", f"self_attention_{kind}."
        depth_scale = np.dtype("float32").type(1 / np.sqrt(hd))
        q = _reshape_kernel(t[p + "self_attn.q_proj.weight"], h, heads, hd)
        return {
            a + "query.kernel": (q * depth_scale).astype(q.dtype),
            a + "key.kernel": _reshape_kernel(t[p + "self_attn.k_proj.weight"], h, kv, hd),
            a + "value.kernel": _reshape_kernel(t[p + "self_attn.v_proj.weight"], h, kv, hd),
            a + "out.kernel": _reshape_kernel(t[p + "self_attn.o_proj.weight"], heads, hd, h),
            f"mlp_{kind}.wi_0.kernel": _reshape_kernel(t[p + "mlp.gate_proj.weight"]),
            f"mlp_{kind}.wi_1.kernel": _reshape_kernel(t[p + "mlp.up_proj.weight"]),
            f"mlp_{kind}.wo.kernel": _reshape_kernel(t[p + "mlp.down_proj.weight"]),
            f"pre_self_attention_norm_{kind}.scale": _gemma_norm(t[p + "input_layernorm.weight"]),
            f"post_self_attention_norm_{kind}.scale": _gemma_norm(t[p + "post_attention_layernorm.weight"]),
            f"pre_ffw_norm_{kind}.scale": _gemma_norm(t[p + "pre_feedforward_layernorm.weight"]),
            f"post_ffw_norm_{kind}.scale": _gemma_norm(t[p + "post_feedforward_layernorm.weight"]),
        }

    def layer(i: int) -> tuple[str, dict[str, np.ndarray]]:
        return "layers", half(2 * i, "local") | half(2 * i + 1, "global")

    emb = t["model.embed_tokens.weight"]
    rows = 256128 if emb.shape[0] == 256000 else emb.shape[0]  # gemma2-*.yml vocab_size
    padded = np.zeros((rows, emb.shape[1]), dtype=emb.dtype)
    padded[: emb.shape[0]] = emb
    normalizer = np.dtype("float32").type(h**0.5)
    out = {
        P + "token_embedder.embedding": (padded * normalizer).astype(emb.dtype),
        P + "decoder.decoder_norm.scale": _gemma_norm(t["model.norm.weight"]),
    }
    n = cfg["num_hidden_layers"] // 2
    if scan:
        return out | _prefixed(P + "decoder.layers.", _stack([layer(i)[1] for i in range(n)]))
    return out | {f"{P}decoder.layers_{i}.{k}": v for i in range(n) for k, v in layer(i)[1].items()}


GEMMA3_SPELLINGS = {
    "model.language_model.": ("model.language_model.", "language_model.model.", "model."),
    "model.vision_tower.vision_model.": (
        "model.vision_tower.vision_model.",
        "vision_tower.vision_model.",
        "vision_tower.",
    ),
    "model.multi_modal_projector.": ("model.multi_modal_projector.", "multi_modal_projector."),
}


def _spelled(t: dict, key: str) -> np.ndarray:
    """MaxText's key under whichever spelling the file has (to_maxtext's mapping names)."""
    for canonical, spellings in GEMMA3_SPELLINGS.items():
        if key.startswith(canonical):
            for s in spellings:
                if s + key[len(canonical) :] in t:
                    return t[s + key[len(canonical) :]]
    return t[key]


def gemma3_leaves(cfg: dict, t: dict, scan: bool, use_multimodal: bool) -> dict[str, np.ndarray]:
    """GEMMA3 mapping + hooks: 6-layer scan blocks + remainder; vision tower when multimodal."""
    tc = cfg.get("text_config", cfg)
    h, heads, kv, hd = tc["hidden_size"], tc["num_attention_heads"], tc["num_key_value_heads"], tc["head_dim"]

    def get(key: str) -> np.ndarray:
        return _spelled(t, key)

    def layer(i: int) -> tuple[str, dict[str, np.ndarray]]:
        p = f"model.language_model.layers.{i}."
        return "layers", {
            "pre_self_attention_norm.scale": _gemma_norm(get(p + "input_layernorm.weight")),
            "post_self_attention_norm.scale": _gemma_norm(get(p + "post_attention_layernorm.weight")),
            "self_attention.query_norm.scale": _gemma_norm(get(p + "self_attn.q_norm.weight")),
            "self_attention.key_norm.scale": _gemma_norm(get(p + "self_attn.k_norm.weight")),
            "pre_ffw_norm.scale": _gemma_norm(get(p + "pre_feedforward_layernorm.weight")),
            "post_ffw_norm.scale": _gemma_norm(get(p + "post_feedforward_layernorm.weight")),
            "self_attention.query.kernel": _reshape_kernel(get(p + "self_attn.q_proj.weight"), h, heads, hd),
            "self_attention.key.kernel": _reshape_kernel(get(p + "self_attn.k_proj.weight"), h, kv, hd),
            "self_attention.value.kernel": _reshape_kernel(get(p + "self_attn.v_proj.weight"), h, kv, hd),
            "self_attention.out.kernel": _reshape_kernel(get(p + "self_attn.o_proj.weight"), heads, hd, h),
            "mlp.wi_0.kernel": _reshape_kernel(get(p + "mlp.gate_proj.weight")),
            "mlp.wi_1.kernel": _reshape_kernel(get(p + "mlp.up_proj.weight")),
            "mlp.wo.kernel": _reshape_kernel(get(p + "mlp.down_proj.weight")),
        }

    emb = get("model.language_model.embed_tokens.weight")
    normalizer = np.dtype("bfloat16").type(h**0.5)
    scaled = (emb * normalizer).astype(emb.dtype)
    rows = 262144 if emb.shape[0] == 262208 else emb.shape[0]  # gemma3-*.yml vocab_size
    if rows < emb.shape[0]:
        scaled = scaled[:rows]
    out = {
        P + "token_embedder.embedding": scaled,
        P + "decoder.decoder_norm.scale": _gemma_norm(get("model.language_model.norm.weight")),
    }
    out |= _cycled(tc["num_hidden_layers"], 6, scan, layer, remainder="layers_remainder")
    if use_multimodal:
        out |= gemma3_vision_leaves(cfg["vision_config"], h, get)
    return out


def gemma3_vision_leaves(vc: dict, text_hidden: int, get) -> dict[str, np.ndarray]:
    w, heads, n = vc["hidden_size"], vc["num_attention_heads"], vc["num_hidden_layers"]
    hd = w // heads
    v, ve = "model.vision_tower.vision_model.", P + "vision_encoder.Gemma3VisionEncoderLayer_0."
    out = {
        ve + "embedding.kernel": get(v + "embeddings.patch_embedding.weight").transpose(2, 3, 1, 0),
        ve + "embedding.bias": get(v + "embeddings.patch_embedding.bias"),
        ve + "pos_embedding": get(v + "embeddings.position_embedding.weight")[None, :, :],
        ve + "Transformer.encoder_norm.scale": get(v + "post_layernorm.weight"),
        ve + "Transformer.encoder_norm.bias": get(v + "post_layernorm.bias"),
    }
    for i in range(n):
        p, b = f"{v}encoder.layers.{i}.", f"{ve}Transformer.encoderblock_{i}."
        m = b + "MultiHeadDotProductAttention_0."
        out |= {
            b + "LayerNorm_0.scale": get(p + "layer_norm1.weight"),
            b + "LayerNorm_0.bias": get(p + "layer_norm1.bias"),
            b + "LayerNorm_1.scale": get(p + "layer_norm2.weight"),
            b + "LayerNorm_1.bias": get(p + "layer_norm2.bias"),
            m + "out.kernel": _reshape_kernel(get(p + "self_attn.out_proj.weight"), heads, hd, w),
            m + "out.bias": get(p + "self_attn.out_proj.bias").reshape(w),
            b + "MlpBlockViT_0.Dense_0.kernel": _reshape_kernel(get(p + "mlp.fc1.weight")),
            b + "MlpBlockViT_0.Dense_0.bias": get(p + "mlp.fc1.bias"),
            b + "MlpBlockViT_0.Dense_1.kernel": _reshape_kernel(get(p + "mlp.fc2.weight")),
            b + "MlpBlockViT_0.Dense_1.bias": get(p + "mlp.fc2.bias"),
        }
        for name in ("q", "k", "v"):
            full = {"q": "query", "k": "key", "v": "value"}[name]
            out[m + f"{full}.kernel"] = _reshape_kernel(get(p + f"self_attn.{name}_proj.weight"), w, heads, hd)
            out[m + f"{full}.bias"] = get(p + f"self_attn.{name}_proj.bias").reshape(heads, hd)
    e = P + "vision_encoder.VisionEmbedder_0."
    out[e + "mm_input_projection.w"] = get("model.multi_modal_projector.mm_input_projection_weight")
    out[e + "mm_soft_embedding_norm.scale"] = _gemma_norm(get("model.multi_modal_projector.mm_soft_emb_norm.weight"))
    return out


def qwen3_next_leaves(cfg: dict, t: dict, scan: bool, use_multimodal: bool) -> dict[str, np.ndarray]:
    """QWEN3_NEXT mapping + hooks: cycle of linear-attention layers closed by a full-attention one."""
    h, heads, kv, hd = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    n_layers, e = cfg["num_hidden_layers"], cfg["num_experts"]
    cycle = cfg["layer_types"].index("full_attention") + 1

    def layer(i: int) -> tuple[str, dict[str, np.ndarray]]:
        p = f"model.layers.{i}."
        out = {
            "input_layernorm.scale": t[p + "input_layernorm.weight"],
            "post_attention_layernorm.scale": t[p + "post_attention_layernorm.weight"],
            "mlp.routed_experts.gate.kernel": t[p + "mlp.gate.weight"].T,
            "mlp.shared_expert.wi_0.kernel": t[p + "mlp.shared_expert.gate_proj.weight"].T,
            "mlp.shared_expert.wi_1.kernel": t[p + "mlp.shared_expert.up_proj.weight"].T,
            "mlp.shared_expert.wo.kernel": t[p + "mlp.shared_expert.down_proj.weight"].T,
            "mlp.shared_expert_gate.kernel": t[p + "mlp.shared_expert_gate.weight"].T,
        }
        for name, hf in (("wi_0", "gate_proj"), ("wi_1", "up_proj"), ("wo", "down_proj")):
            out[f"mlp.routed_experts.{name}"] = np.stack([t[f"{p}mlp.experts.{j}.{hf}.weight"].T for j in range(e)])
        if (i % cycle + 1) % cycle == 0:
            a, s = "attention.attention.", p + "self_attn."
            out |= {
                a + "query.kernel": _reshape_kernel(t[s + "q_proj.weight"], h, heads, 2 * hd),
                a + "key.kernel": _reshape_kernel(t[s + "k_proj.weight"], h, kv, hd),
                a + "value.kernel": _reshape_kernel(t[s + "v_proj.weight"], h, kv, hd),
                # MaxText's to_maxtext writes o_proj.T with heads NOT split: [heads*head_dim, emb].
                a + "out.kernel": t[s + "o_proj.weight"].T,
                a + "query_norm.scale": t[s + "q_norm.weight"],
                a + "key_norm.scale": t[s + "k_norm.weight"],
            }
        else:
            s = p + "linear_attn."
            out |= {
                "attention.in_proj_qkvz.kernel": t[s + "in_proj_qkvz.weight"].T,
                "attention.in_proj_ba.kernel": t[s + "in_proj_ba.weight"].T,
                "attention.out_proj.kernel": t[s + "out_proj.weight"].T,
                "attention.conv1d.kernel": t[s + "conv1d.weight"].transpose(2, 1, 0),
                "attention.A_log": t[s + "A_log"],
                "attention.dt_bias": t[s + "dt_bias"],
                "attention.norm.rms_norm.scale": t[s + "norm.weight"],
            }
        return "layer", out

    out = {
        P + "token_embedder.embedding": t["model.embed_tokens.weight"],
        P + "decoder.decoder_norm.scale": t["model.norm.weight"],
        P + "decoder.logits_dense.kernel": t["lm_head.weight"].T,
    }
    # Experts are [experts, ...] per layer: stacking layers at axis 1 gives [experts, layers, ...].
    return out | _cycled(n_layers, cycle, scan, layer)


def _gemma4_dims(tc: dict) -> tuple[int, int, int]:
    """(global head_dim, global kv heads) from per_layer_config or the official spelling."""
    plc = tc.get("per_layer_config") or {}
    if plc:
        o = next(iter(plc.values()))
        return o.get("head_dim", tc["head_dim"]), o.get("num_key_value_heads", tc["num_key_value_heads"])
    kv = tc.get("num_global_key_value_heads") if tc.get("attention_k_eq_v") else None
    return tc.get("global_head_dim", 512), kv or tc["num_key_value_heads"]


def gemma4_leaves(cfg: dict, t: dict, scan: bool, use_multimodal: bool) -> dict[str, np.ndarray]:
    """GEMMA4 / GEMMA4_SMALL mappings + hooks (identity norms, fused expert halves, nested scan)."""
    tc = cfg.get("text_config", cfg)
    h, heads, kv, hd, n = (
        tc[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "num_hidden_layers")
    )
    ghd, gkv = _gemma4_dims(tc)
    types = tc["layer_types"]
    ple = tc.get("hidden_size_per_layer_input") or 0
    n_shared = tc.get("num_kv_shared_layers") or 0
    small = bool(ple or n_shared)
    moe = (tc.get("num_experts") or 1) > 1
    base = "model.language_model."

    def layer(i: int) -> dict[str, np.ndarray]:
        p, a = f"{base}layers.{i}.", "self_attention."
        is_global = types[i] == "full_attention"
        d, k = (ghd, gkv) if is_global else (hd, kv)
        shared = small and i >= n - n_shared
        out = {
            "pre_self_attention_norm.scale": t[p + "input_layernorm.weight"],
            "post_self_attention_norm.scale": t[p + "post_attention_layernorm.weight"],
            "pre_ffw_norm.scale": t[p + "pre_feedforward_layernorm.weight"],
            "post_ffw_norm.scale": t[p + "post_feedforward_layernorm.weight"],
            "layer_scalar": t[p + "layer_scalar"].reshape(1),
            a + "query.kernel": _reshape_kernel(t[p + "self_attn.q_proj.weight"], h, heads, d),
            a + "out.kernel": _reshape_kernel(t[p + "self_attn.o_proj.weight"], heads, d, h),
            a + "query_norm.scale": t[p + "self_attn.q_norm.weight"],
        }
        if not shared:
            out[a + "key.kernel"] = _reshape_kernel(t[p + "self_attn.k_proj.weight"], h, k, d)
            out[a + "key_norm.scale"] = t[p + "self_attn.k_norm.weight"]
            if p + "self_attn.v_proj.weight" in t:  # absent on K=V global layers (share_kv_projections)
                out[a + "value.kernel"] = _reshape_kernel(t[p + "self_attn.v_proj.weight"], h, k, d)
        mlp = "mlp.moe_block.shared_experts." if moe else "mlp."
        out |= {
            mlp + "wi_0.kernel": _reshape_kernel(t[p + "mlp.gate_proj.weight"]),
            mlp + "wi_1.kernel": _reshape_kernel(t[p + "mlp.up_proj.weight"]),
            mlp + "wo.kernel": _reshape_kernel(t[p + "mlp.down_proj.weight"]),
        }
        if moe:
            gate_up, ff = t[p + "experts.gate_up_proj"], tc["moe_intermediate_size"]
            b = "mlp.moe_block.MoeBlock_0."
            out |= {
                b + "gate.kernel": _reshape_kernel(t[p + "router.proj.weight"]),
                b + "wi_0": gate_up[:, :ff, :].transpose(0, 2, 1),  # split_moe_wi0
                b + "wi_1": gate_up[:, ff:, :].transpose(0, 2, 1),  # split_moe_wi1
                b + "wo": t[p + "experts.down_proj"].transpose(0, 2, 1),  # reshape_moe_wo
                b + "per_expert_scale": t[p + "router.per_expert_scale"],
                "mlp.pre_forward_scale_2": t[p + "router.scale"],
                "mlp.pre_feedforward_layernorm_2.scale": t[p + "pre_feedforward_layernorm_2.weight"],
                "mlp.post_feedforward_layernorm_1.scale": t[p + "post_feedforward_layernorm_1.weight"],
                "mlp.post_feedforward_layernorm_2.scale": t[p + "post_feedforward_layernorm_2.weight"],
            }
        if ple:
            out |= {
                "per_layer_input_gate.kernel": _reshape_kernel(t[p + "per_layer_input_gate.weight"]),
                "per_layer_projection.kernel": _reshape_kernel(t[p + "per_layer_projection.weight"]),
                "post_per_layer_input_norm.scale": t[p + "post_per_layer_input_norm.weight"],
            }
        return out

    emb = t[base + "embed_tokens.weight"]
    normalizer = np.dtype("float32").type(h**0.5)
    out = {
        P + "token_embedder.embedding": (np.zeros_like(emb) + emb) * normalizer,
        P + "decoder.decoder_norm.scale": t[base + "norm.weight"],
    }
    out[P + "token_embedder.embedding"] = out[P + "token_embedder.embedding"].astype(emb.dtype)
    if ple:
        e = P + "decoder.per_layer_embedder."
        out[e + "embed_tokens_per_layer"] = t[base + "embed_tokens_per_layer.weight"]
        out[e + "per_layer_model_projection.kernel"] = _reshape_kernel(t[base + "per_layer_model_projection.weight"])
        out[e + "per_layer_projection_norm.scale"] = t[base + "per_layer_projection_norm.weight"]
    if not scan:
        for i in range(n):
            out |= _prefixed(f"{P}decoder.layers_{i}.", layer(i))
    else:
        blocks = n // 6
        local = [[layer(6 * b + j) for j in range(5)] for b in range(blocks)]
        for name in local[0][0]:
            stacked = np.stack([np.stack([lp[name] for lp in row]) for row in local])  # (blocks, local, ...)
            out[f"{P}decoder.scanned_blocks.local_layers.{name}"] = np.moveaxis(stacked, (0, 1), (1, 2))
        out |= _prefixed(f"{P}decoder.scanned_blocks.global_layer.", _stack([layer(6 * b + 5) for b in range(blocks)]))
    if use_multimodal:
        vc, v, ve = cfg["vision_config"], "model.vision_tower.", P + "vision_encoder.Gemma4VisionEncoderLayer_0."
        w, vh = vc["hidden_size"], vc["num_attention_heads"]
        out |= {
            ve + "vision_entry.input_projection.kernel": t[v + "patch_embedder.input_proj.weight"].T,
            ve + "vision_entry.pos_emb_param": t[v + "patch_embedder.position_embedding_table"].transpose(1, 0, 2),
            ve + "std_scale": t[v + "std_scale"],
            ve + "std_bias": t[v + "std_bias"],
            P + "vision_encoder.Gemma4VisionProjector_0.projection.kernel": _reshape_kernel(
                t["model.embed_vision.embedding_projection.weight"]
            ),
        }
        for i in range(vc["num_hidden_layers"]):
            p, b = f"{v}encoder.layers.{i}.", f"{ve}layer_{i}."
            for name, proj in (("query", "q"), ("key", "k"), ("value", "v")):
                out[b + f"attention.{name}.kernel"] = _reshape_kernel(
                    t[p + f"self_attn.{proj}_proj.linear.weight"], w, vh, w // vh
                )
            out |= {
                b + "attention.out.kernel": _reshape_kernel(t[p + "self_attn.o_proj.linear.weight"], vh, w // vh, w),
                b + "attention.query_norm.scale": t[p + "self_attn.q_norm.weight"],
                b + "attention.key_norm.scale": t[p + "self_attn.k_norm.weight"],
                b + "pre_attention_norm.scale": t[p + "input_layernorm.weight"],
                b + "post_attention_norm.scale": t[p + "post_attention_layernorm.weight"],
                b + "pre_ffw_norm.scale": t[p + "pre_feedforward_layernorm.weight"],
                b + "post_ffw_norm.scale": t[p + "post_feedforward_layernorm.weight"],
                b + "mlp.wi_0.kernel": _reshape_kernel(t[p + "mlp.gate_proj.linear.weight"]),
                b + "mlp.wi_1.kernel": _reshape_kernel(t[p + "mlp.up_proj.linear.weight"]),
                b + "mlp.wo.kernel": _reshape_kernel(t[p + "mlp.down_proj.linear.weight"]),
            }
    return out


MORE_FAMILIES = {
    "gemma4": gemma4_leaves,
    "gemma4_text": gemma4_leaves,
    "qwen3_next": qwen3_next_leaves,
    "olmo3": olmo3_leaves,
    "gemma2": gemma2_leaves,
    "gemma3": gemma3_leaves,
    "gemma3_text": gemma3_leaves,
}
