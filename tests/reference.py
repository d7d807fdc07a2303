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


def expected_leaves(model_dir: str, scan_layers: bool, save_dtype: str = "bfloat16") -> dict[str, np.ndarray]:
    """Dotted Orbax leaf name -> expected array (without `step`)."""
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    t = dequantized_state(model_dir, cfg)
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
