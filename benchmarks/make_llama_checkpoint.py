"""Write a Llama-shaped HF checkpoint of random bf16 weights with real HF key names (numpy only).

    python benchmarks/make_llama_checkpoint.py OUT_DIR [--layers 6] [--hidden 2048] [--mlp 5632]

Shards are written with our own minimal safetensors writer (header + raw little-endian bytes),
so no torch is needed; ~0.8 GB with the defaults.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import struct

import ml_dtypes
import numpy as np


def write_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
    header, offset = {}, 0
    for key, arr in tensors.items():
        header[key] = {"dtype": "BF16", "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for arr in tensors.values():
            f.write(np.ascontiguousarray(arr).tobytes())


def make(out: str, layers: int, hidden: int, mlp: int, heads: int, kv_heads: int, vocab: int, seed: int = 0) -> int:
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(seed)
    head_dim = hidden // heads

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)

    shards: list[dict[str, np.ndarray]] = [
        {
            "model.embed_tokens.weight": w(vocab, hidden),
            "model.norm.weight": w(hidden),
            "lm_head.weight": w(vocab, hidden),
        }
    ]
    for i in range(layers):
        p = f"model.layers.{i}."
        shards.append(
            {
                p + "self_attn.q_proj.weight": w(heads * head_dim, hidden),
                p + "self_attn.k_proj.weight": w(kv_heads * head_dim, hidden),
                p + "self_attn.v_proj.weight": w(kv_heads * head_dim, hidden),
                p + "self_attn.o_proj.weight": w(hidden, heads * head_dim),
                p + "mlp.gate_proj.weight": w(mlp, hidden),
                p + "mlp.up_proj.weight": w(mlp, hidden),
                p + "mlp.down_proj.weight": w(hidden, mlp),
                p + "input_layernorm.weight": w(hidden),
                p + "post_attention_layernorm.weight": w(hidden),
            }
        )
    weight_map, total = {}, 0
    for n, tensors in enumerate(shards):
        name = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(os.path.join(out, name), tensors)
        weight_map.update({k: name for k in tensors})
        total += sum(a.nbytes for a in tensors.values())
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": mlp,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "num_hidden_layers": layers,
        "vocab_size": vocab,
        "tie_word_embeddings": False,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
        "dtype": "bfloat16",
    }  # fmt: skip
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    return total


def make_benchmark_model(workdir: str, layers: int) -> tuple[str, int, list[str]]:
    """The benchmarks' model: `workdir` emptied, a 2048-wide Llama with `layers` layers in
    `workdir/hf`; returns (its directory, its tensor bytes, its shard paths)."""
    shutil.rmtree(workdir, ignore_errors=True)
    src = os.path.join(workdir, "hf")
    total = make(src, layers, 2048, 5632, 16, 4, 32000)
    return src, total, sorted(glob.glob(os.path.join(src, "*.safetensors")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--mlp", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv_heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    a = ap.parse_args()
    total = make(a.out, a.layers, a.hidden, a.mlp, a.heads, a.kv_heads, a.vocab)
    print(f"wrote {total / 1e6:.0f} MB of tensors to {a.out}")


if __name__ == "__main__":
    main()
