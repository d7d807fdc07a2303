"""Runners for the opt-in MaxText peer suite: MaxText's own converters and model, driven offline on
the tiny fixtures, next to ckptbeam's CLI and transformers' model.

MaxText runs in its own virtualenv (`benchmarks/setup_maxtext_peer.sh`), never in the project's;
everything here talks to it through subprocesses (`peer_main.py`) and files (.npy, checkpoints).
HF logits are computed by the project's interpreter with torch + transformers.

The one adaptation MaxText needs for a tiny model: its model config (`override_model_config=true`
plus the dims read from the fixture's config.json, `maxtext_dims`) and, for the converters, its
built-in HF config table entry (replaced by the fixture's config in `peer_main.py`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
PEER_PYTHON = os.environ.get("CKPTBEAM_MAXTEXT_PYTHON", "/tmp/maxtext-peer-venv/bin/python")
MAXTEXT_SRC = os.environ.get("CKPTBEAM_MAXTEXT_SRC", "/tmp/maxtext-src")
SETUP_HINT = "build it with: bash benchmarks/setup_maxtext_peer.sh (or set CKPTBEAM_MAXTEXT_PYTHON/_SRC)"


def unavailable_reason() -> str | None:
    """Why the peer cannot run here (one line), or None when it can."""
    if not os.access(PEER_PYTHON, os.X_OK):
        return f"MaxText peer venv not found ({PEER_PYTHON}); {SETUP_HINT}"
    if not os.path.isfile(os.path.join(MAXTEXT_SRC, "src", "maxtext", "checkpoint_conversion", "to_maxtext.py")):
        return f"MaxText source not found ({MAXTEXT_SRC}); {SETUP_HINT}"
    return None


def load_config(hf_dir: str) -> dict:
    with open(os.path.join(hf_dir, "config.json")) as f:
        return json.load(f)


def text_config(config: dict) -> dict:
    return config.get("text_config") or config


def _rope_theta(t: dict, kind: str | None = None) -> float:
    rope = t.get("rope_parameters") or {}
    if kind and kind in rope:
        rope = rope[kind]
    elif "full_attention" in rope:
        rope = rope["full_attention"]
    return float(rope.get("rope_theta") or t.get("rope_theta") or 10000.0)


def base_dims(t: dict) -> dict:
    """The dims every family shares (MaxText's base_* names); families add or change some."""
    heads = int(t["num_attention_heads"])
    head_dim = int(t.get("head_dim") or int(t["hidden_size"]) // heads)
    dims = {
        "base_emb_dim": t["hidden_size"],
        "base_num_query_heads": heads,
        "base_num_kv_heads": t.get("num_key_value_heads") or heads,
        "head_dim": head_dim,
        "base_mlp_dim": t["intermediate_size"],
        "base_num_decoder_layers": t["num_hidden_layers"],
        "vocab_size": t["vocab_size"],
        "normalization_layer_epsilon": t.get("rms_norm_eps", 1e-6),
        "rope_max_timescale": _rope_theta(t),
        "logits_via_embedding": bool(t.get("tie_word_embeddings", False)),
    }
    return dims


def _moe(t: dict) -> dict:
    return {
        "num_experts": t.get("num_experts") or t.get("num_local_experts") or t.get("n_routed_experts"),
        "num_experts_per_tok": t.get("num_experts_per_tok") or t.get("top_k_experts"),
        "base_moe_mlp_dim": t.get("moe_intermediate_size") or t["intermediate_size"],
        "norm_topk_prob": t.get("norm_topk_prob"),
    }


def _deepseek(t: dict) -> dict:
    d = base_dims(t) | _moe(t)
    d |= {
        "first_num_dense_layers": t["first_k_dense_replace"],
        "shared_experts": t["n_shared_experts"],
        "q_lora_rank": t.get("q_lora_rank") or 0,
        "kv_lora_rank": t["kv_lora_rank"],
        "qk_nope_head_dim": t["qk_nope_head_dim"],
        "qk_rope_head_dim": t["qk_rope_head_dim"],
        "v_head_dim": t["v_head_dim"],
        "routed_scaling_factor": t.get("routed_scaling_factor", 1.0),
        "max_position_embeddings": t["max_position_embeddings"],
    }
    d.pop("head_dim")
    if t.get("n_group"):
        d |= {"n_routing_groups": t["n_group"], "topk_routing_group": t["topk_group"]}
    if t.get("index_n_heads"):
        d |= {
            "indexer_n_heads": t["index_n_heads"],
            "indexer_head_dim": t["index_head_dim"],
            "indexer_topk": t["index_topk"],
        }
    return d


def _gemma2(t: dict) -> dict:
    # MaxText's gemma2 layer is a (local, global) pair of HF layers.
    return base_dims(t) | {
        "base_num_decoder_layers": t["num_hidden_layers"] // 2,
        "sliding_window_size": t["sliding_window"],
        "attn_logits_soft_cap": t.get("attn_logit_softcapping") or 0.0,
        "final_logits_soft_cap": t.get("final_logit_softcapping") or 0.0,
    }


def _gemma3(t: dict) -> dict:
    return base_dims(t) | {
        "sliding_window_size": t["sliding_window"],
        "rope_max_timescale": _rope_theta(t, "full_attention"),
        "local_rope_max_timescale": int(_rope_theta(t, "sliding_attention")),
        "rope_linear_scaling_factor": 1.0,
    }


def _gemma4(t: dict) -> dict:
    per_layer = t.get("per_layer_config") or {}
    glob = next(iter(per_layer.values()), {}) if per_layer else {}
    d = base_dims(t) | {
        "sliding_window_size": t["sliding_window"],
        "global_head_dim": t.get("global_head_dim") or glob.get("head_dim", t["head_dim"]),
        "global_num_kv_heads": t.get("num_global_key_value_heads")
        or glob.get("num_key_value_heads", t["num_key_value_heads"]),
        "rope_max_timescale": int(_rope_theta(t, "full_attention")),
        "global_rope_max_timescale": int(_rope_theta(t, "full_attention")),
        "local_rope_max_timescale": int(_rope_theta(t, "sliding_attention")),
        "final_logits_soft_cap": t.get("final_logit_softcapping") or 0.0,
        "share_kv_projections": bool(t.get("attention_k_eq_v")),
    }
    if t.get("enable_moe_block"):
        d |= _moe(t) | {"shared_experts": 1}
    if t.get("hidden_size_per_layer_input"):
        d |= {
            "hidden_size_per_layer_input": t["hidden_size_per_layer_input"],
            "vocab_size_per_layer_input": t["vocab_size_per_layer_input"],
            "num_kv_shared_layers": t["num_kv_shared_layers"],
            "use_double_wide_mlp": bool(t.get("use_double_wide_mlp")),
        }
    return d


def _gpt_oss(t: dict) -> dict:
    rope = t["rope_parameters"]
    return (
        base_dims(t)
        | _moe(t)
        | {
            "base_moe_mlp_dim": t["intermediate_size"],
            "sliding_window_size": t["sliding_window"],
            "max_position_embeddings": t["max_position_embeddings"],
            "original_max_position_embeddings": rope["original_max_position_embeddings"],
            "rope_factor": rope["factor"],
        }
    )


def _olmo3(t: dict) -> dict:
    return base_dims(t) | {
        "sliding_window_size": t["sliding_window"],
        "rope_type": "default",  # the fixture's rope is the default one, the 7B's is YaRN
    }


def _qwen3_next(t: dict) -> dict:
    rope = t["rope_parameters"]
    return (
        base_dims(t)
        | _moe(t)
        | {
            "base_mlp_dim": t["moe_intermediate_size"],
            "shared_experts": 1,
            "inhomogeneous_layer_cycle_interval": t["layer_types"].index("full_attention") + 1,
            "gdn_conv_kernel_dim": t["linear_conv_kernel_dim"],
            "gdn_key_head_dim": t["linear_key_head_dim"],
            "gdn_value_head_dim": t["linear_value_head_dim"],
            "gdn_num_key_heads": t["linear_num_key_heads"],
            "gdn_num_value_heads": t["linear_num_value_heads"],
            "partial_rotary_factor": rope.get("partial_rotary_factor", 1.0),
        }
    )


def _llama(t: dict) -> dict:
    return base_dims(t)


def _mixtral(t: dict) -> dict:
    return base_dims(t) | _moe(t)


@dataclasses.dataclass(frozen=True)
class Fold:
    """A constant MaxText's to_maxtext multiplies into a weight, the product rounded to the
    checkpoint's bf16, where transformers applies the constant at run time instead (MaxText's query
    kernel is stored times head_dim ** -0.5, Gemma's embedding times sqrt(hidden_size)). Unless the
    constant is a power of two, the bf16 checkpoint holds a slightly different weight than the HF
    one (relative error up to 2 ** -9), so the reference model is given that same weight:
    `w <- bf16(w * stored) / applied`. Found diagnosing the Mixtral and Gemma4 logit gaps: with
    the fold their max |diff| drops from 0.13 / 0.02 to ~1e-5 (README, MaxText peer suite)."""

    suffix: str  # the transformers parameter name ends with this
    stored: np.generic  # the constant as MaxText's hook types it (float32; bfloat16 for Gemma3)
    applied: float  # the constant transformers' model applies at run time


def query_fold(t: dict) -> tuple[Fold, ...]:
    """MaxText's llama / mixtral / gemma2 hooks (scale_query_layer): q kernel * float32(1/sqrt(head_dim))."""
    head_dim = int(t.get("head_dim") or int(t["hidden_size"]) // int(t["num_attention_heads"]))
    return (Fold("self_attn.q_proj.weight", np.float32(1 / np.sqrt(head_dim)), head_dim**-0.5),)


def embedding_fold(t: dict) -> tuple[Fold, ...]:
    """MaxText's gemma2 / gemma4 hooks: embedding * float32(sqrt(hidden_size))."""
    return (Fold("embed_tokens.weight", np.float32(t["hidden_size"] ** 0.5), t["hidden_size"] ** 0.5),)


def gemma2_folds(t: dict) -> tuple[Fold, ...]:
    return query_fold(t) + embedding_fold(t)


def gemma3_folds(t: dict) -> tuple[Fold, ...]:
    """MaxText's gemma3 hook: embedding * bfloat16(sqrt(hidden_size)) (the constant itself in bf16)."""
    import ml_dtypes

    return (Fold("embed_tokens.weight", ml_dtypes.bfloat16(t["hidden_size"] ** 0.5), t["hidden_size"] ** 0.5),)


def apply_folds(model: object, folds: tuple[Fold, ...]) -> int:
    """Give a transformers model the weights MaxText's bf16 checkpoint holds (Fold); returns how
    many parameters changed (tied ones once)."""
    import ml_dtypes
    import torch

    done = 0
    with torch.no_grad():
        for name, param in model.named_parameters():  # type: ignore[attr-defined]
            for fold in folds:
                if name.endswith(fold.suffix):
                    w = param.detach().float().numpy()
                    stored = (w * fold.stored).astype(ml_dtypes.bfloat16).astype(np.float32)
                    param.copy_(torch.from_numpy(stored / np.float32(fold.applied)))
                    done += 1
    return done


def same_after_folds(name: str, got: np.ndarray, want: np.ndarray, folds: tuple[Fold, ...]) -> bool:
    """Whether MaxText's export `got` of the HF tensor `want` is `want` exactly or, for a folded
    tensor, the checkpoint's bf16 product unfolded (bf16(got * c) == bf16(want * c)). A float32
    source tensor (DeepSeek-V3's e_score_correction_bias) is held in bf16 by both converters
    (--save_dtype bfloat16), so it comes back as bf16(want)."""
    import ml_dtypes

    if want.dtype == np.float32:
        want = want.astype(ml_dtypes.bfloat16)
        got = got.astype(ml_dtypes.bfloat16)
    got, want = got.astype(np.float32), want.astype(np.float32)
    for fold in folds:
        if name.endswith(fold.suffix):
            got = (got * fold.stored).astype(ml_dtypes.bfloat16)
            want = (want * fold.stored).astype(ml_dtypes.bfloat16)
            return got.tobytes() == want.tobytes()
    return np.array_equal(got, want)


@dataclasses.dataclass(frozen=True)
class Family:
    """One fixture as MaxText sees it: the MaxText model whose config and HF-table entry it
    stands in for, and how to derive MaxText's dims from its config.json."""

    name: str
    fixture: str  # a directory under ROOT
    model_name: str
    dims: Callable[[dict], dict]
    # The reference's top-k breaks exact ties by lower index, as MaxText's DeepSeek-V3.2 indexer
    # does (indexer_mask_exact_topk, its default: "keeping only the first k ... along sequence");
    # torch.topk leaves the order of ties unspecified. The tiny fixture's relu'd indexer scores
    # tie at exactly 0 at the cut-off (layer 0, position 10), where the two picks differ.
    hf_topk_lower_index_first: bool = False
    # A source for MaxText that differs from ckptbeam's (MaxText needs pre-dequantized input).
    maxtext_source: Callable[[str, str], str] | None = None
    # Extra MaxText settings for running the model (not needed to convert).
    run_overrides: tuple[str, ...] = ()
    # HF config changes for the reference logits, where the fixture says something MaxText's model
    # cannot express (each one says why).
    hf_config_overrides: Callable[[dict], dict] | None = None
    hf_class: str = "AutoModelForCausalLM"
    # Entries MaxText's own HF config table has for this model that the fixture's config.json
    # (as transformers saves it) omits, and MaxText's exporter reads from that table.
    hf_table_entries: tuple[tuple[str, object], ...] = ()
    # Constants MaxText's checkpoint format multiplies into a bf16 weight (see Fold).
    folds: Callable[[dict], tuple[Fold, ...]] | None = None

    @property
    def path(self) -> str:
        return os.path.join(ROOT, self.fixture)


def dequantized_copy(src: str, dst: str) -> str:
    """An unquantized copy of an FP8 / MXFP4 checkpoint, what MaxText's converter expects as input
    (its docs: run its dequantize script first). Made with the tests' own numpy dequantizer
    (`reference.dequantized_state`: MaxText's formulas, float32 product rounded once to bf16), not with MaxText's
    deepseek_dequantize.py, which assumes 128x128 blocks (the fixtures use [16, 32])."""
    import reference
    from helpers_safetensors import write_tensors

    if os.path.isfile(os.path.join(dst, "model.safetensors")):
        return dst
    os.makedirs(dst, exist_ok=True)
    config = load_config(src)
    tensors = {k: np.ascontiguousarray(v) for k, v in reference.dequantized_state(src, config).items()}
    write_tensors(Path(dst) / "model.safetensors", tensors, metadata={"format": "pt"})
    config.pop("quantization_config")
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    return dst


def renamed_copy(*renames: tuple[str, str]) -> Callable[[str, str], str]:
    """A copy of a checkpoint with key prefixes renamed, for a MaxText mapping that reads only one
    spelling of the keys (ckptbeam reads the fixture as it is)."""

    def make(src: str, dst: str) -> str:
        import reference
        from helpers_safetensors import write_tensors

        if os.path.isfile(os.path.join(dst, "model.safetensors")):
            return dst
        os.makedirs(dst, exist_ok=True)
        tensors = {}
        for key, value in reference.load_tensors(src).items():
            for old, new in renames:
                if key.startswith(old):
                    key = new + key[len(old) :]
                    break
            tensors[key] = np.ascontiguousarray(value)
        write_tensors(Path(dst) / "model.safetensors", tensors, metadata={"format": "pt"})
        with open(os.path.join(dst, "config.json"), "w") as f:
            json.dump(load_config(src), f, indent=1)
        return dst

    return make


# transformers 5.23's save_pretrained writes Gemma3 as `language_model.model.*`; MaxText's gemma3
# mapping reads only the `model.language_model.*` spelling (what from_pretrained names them).
GEMMA3_KEYS = renamed_copy(
    ("language_model.model.", "model.language_model."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)
# MaxText's gemma4 mapping reads `model.language_model.*` only when the config has a
# vision_config, else `model.*`; these text-only fixtures have none but the long spelling.
GEMMA4_TEXT_KEYS = renamed_copy(("model.language_model.", "model."))

# MaxText models the peer cannot run its converter for (its to_maxtext has no mapping); the
# logits check (MaxText restoring ckptbeam's checkpoint) still runs.
NO_TO_MAXTEXT = {"mistral": "MaxText's to_maxtext has no param mapping for mistral-7b (KeyError in PARAM_MAPPING)"}


def gemma_query_scale_is_head_dim(t: dict) -> dict:
    """MaxText scales Gemma2 / Gemma3-4b queries by head_dim ** -0.5 (its gemma2 query hook,
    gemma3.py get_query_pre_attn_scalar); HF by query_pre_attn_scalar ** -0.5. Every real
    checkpoint of these has query_pre_attn_scalar == head_dim (256); the tiny fixtures keep 256
    with head_dim 24 / 16, which MaxText cannot express, so the reference uses head_dim."""
    return {"query_pre_attn_scalar": t["head_dim"]}


def topk_weights_normalized(t: dict) -> dict:
    """MaxText's MoE router (mixtral / qwen3 path, moe.py get_topk) takes the softmax over the
    top-k logits, i.e. the top-k weights always sum to 1 (its norm_topk_prob only renormalizes
    again); HF Qwen3-MoE with norm_topk_prob=false keeps the full softmax's top-k probabilities.
    Real Qwen3-MoE checkpoints say true; the tiny fixture says false, which MaxText cannot express
    (max |diff| 1.3e-2 against it; 3.6e-7 with true)."""
    return {"norm_topk_prob": True}


# DeepSeek's MLA RoPE in MaxText is its YaRN embedding in the interleaved layout (the layout of
# HF's weights, which to_maxtext copies as they are); the fixtures' rope is the default one, i.e.
# YaRN with factor 1 (no interpolation, mscale 1). rope_type=default would select MaxText's
# half-split RotaryEmbedding instead: DeepSeek max |diff| 2.4-3.9e-3 (1.8e-7 with yarn + factor 1).
# The Linen decode path (which builds KV caches; training mode has none): MaxText's default naive
# MLA cache is one KVCache sized head_dim for both keys (qk_nope + qk_rope: 24 here) and values
# (v_head_dim: 12), so it cannot hold these ("q, k depths must match"); its MLA latent cache can.
DEEPSEEK_RUN = ("rope_type=yarn", "rope_factor=1", "mla_naive_kvcache=false")


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family("llama", "tests/fixtures/llama_bf16", "llama3.1-8b", _llama, folds=query_fold),
        Family("mistral", "tests/fixtures/mistral_bf16", "mistral-7b", _llama, folds=query_fold),
        # transformers' Qwen2Config has no attention_bias (Qwen2 always has q/k/v biases); MaxText's
        # table sets it and its qwen2 export reads the biases only when it is true.
        Family(
            "qwen2",
            "tests/fixtures/qwen2_bf16_tied",
            "qwen2.5-7b",
            _llama,
            hf_table_entries=(("attention_bias", True),),
        ),
        Family("qwen3", "tests/fixtures/qwen3_bf16_tied", "qwen3-0.6b", _llama),
        Family(
            "qwen3_moe",
            "tests/fixtures/qwen3_moe_bf16",
            "qwen3-30b-a3b",
            _mixtral,
            hf_config_overrides=topk_weights_normalized,
        ),
        Family("mixtral", "tests/golden/mixtral", "mixtral-8x7b", _mixtral, folds=query_fold),
        Family("deepseek2", "tests/fixtures/deepseek2_bf16", "deepseek2-16b", _deepseek, run_overrides=DEEPSEEK_RUN),
        Family("deepseek3", "tests/fixtures/deepseek3_bf16", "deepseek3-671b", _deepseek, run_overrides=DEEPSEEK_RUN),
        Family(
            "deepseek3_fp8",
            "tests/fixtures/deepseek3_fp8",
            "deepseek3-671b",
            _deepseek,
            maxtext_source=dequantized_copy,
            run_overrides=DEEPSEEK_RUN,
        ),
        Family(
            "deepseek32",
            "tests/fixtures/deepseek32_fp8",
            "deepseek3.2-671b",
            _deepseek,
            maxtext_source=dequantized_copy,
            run_overrides=DEEPSEEK_RUN,
            hf_topk_lower_index_first=True,
        ),
        Family("gpt_oss", "tests/fixtures/gpt_oss_bf16", "gpt-oss-20b", _gpt_oss),
        Family(
            "gpt_oss_mxfp4", "tests/fixtures/gpt_oss_mxfp4", "gpt-oss-20b", _gpt_oss, maxtext_source=dequantized_copy
        ),
        Family(
            "gemma2",
            "tests/fixtures/gemma2_bf16",
            "gemma2-2b",
            _gemma2,
            hf_config_overrides=gemma_query_scale_is_head_dim,
            folds=gemma2_folds,
        ),
        Family(
            "gemma3",
            "tests/fixtures/gemma3_mm_bf16",
            "gemma3-4b",
            _gemma3,
            maxtext_source=GEMMA3_KEYS,
            hf_config_overrides=gemma_query_scale_is_head_dim,
            folds=gemma3_folds,
        ),
        Family(
            "gemma4_dense",
            "tests/fixtures/gemma4_dense_bf16",
            "gemma4-31b",
            _gemma4,
            maxtext_source=GEMMA4_TEXT_KEYS,
            folds=embedding_fold,
        ),
        Family("gemma4_moe", "tests/fixtures/gemma4_moe_bf16", "gemma4-26b", _gemma4, folds=embedding_fold),
        Family(
            "gemma4_small",
            "tests/fixtures/gemma4_small_bf16",
            "gemma4-e2b",
            _gemma4,
            maxtext_source=GEMMA4_TEXT_KEYS,
            folds=embedding_fold,
        ),
        Family("olmo3", "tests/fixtures/olmo3_bf16", "olmo3-7b", _olmo3),
        Family("qwen3_next", "tests/fixtures/qwen3_next_bf16", "qwen3-next-80b-a3b", _qwen3_next),
    ]
}


def maxtext_dims(family: Family) -> list[str]:
    """MaxText config overrides (`key=value`) that give its model the fixture's dims."""
    dims = family.dims(text_config(load_config(family.path)))
    return ["override_model_config=true", *(f"{k}={_fmt(v)}" for k, v in dims.items() if v is not None)]


def _fmt(v: object) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def _peer_env() -> dict[str, str]:
    env = dict(os.environ)
    env |= {
        "PYTHONPATH": os.path.join(MAXTEXT_SRC, "src"),
        "DECOUPLE_GCLOUD": "TRUE",  # no Google Cloud SDK in the peer venv
        "HF_HUB_OFFLINE": "1",  # sources are local directories
        "JAX_PLATFORMS": "cpu",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    return env


def _run(cmd: list[str], log: str, env: dict[str, str] | None = None, cwd: str | None = None) -> None:
    with open(log, "w") as f:
        f.write(" ".join(shlex.quote(c) for c in cmd) + "\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd).returncode
    if rc != 0:
        with open(log, errors="replace") as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"command failed (exit {rc}), log {log}:\n{tail}")


def _common_args(family: Family, scan_layers: bool) -> list[str]:
    return [
        f"model_name={family.model_name}",
        f"scan_layers={scan_layers}",
        "use_multimodal=false",
        "hardware=cpu",
        "skip_jax_distributed_system=true",
        "attention=dot_product",  # CPU; DeepSeek-V3.2's sparse indexer also requires it
        *maxtext_dims(family),
    ]


def maxtext_source(family: Family, workdir: str) -> str:
    """The HF directory MaxText's converter reads for this family."""
    if family.maxtext_source is None:
        return family.path
    return family.maxtext_source(family.path, os.path.join(workdir, f"{family.name}-maxtext-src"))


def run_to_maxtext(family: Family, out: str, scan_layers: bool, workdir: str) -> str:
    """MaxText's `to_maxtext` on the fixture; returns the checkpoint's `0/items`."""
    src = maxtext_source(family, workdir)
    shutil.rmtree(out, ignore_errors=True)  # a failed run leaves a partial step behind
    args = [
        *_common_args(family, scan_layers),
        f"base_output_directory={out}",
        f"--hf_model_path={src}",
        "--simulated_cpu_devices_count=1",
        "--save_dtype=bfloat16",
    ]
    cmd = [PEER_PYTHON, os.path.join(HERE, "peer_main.py"), "to_maxtext", src, family.model_name, *args]
    _run(cmd, out + ".log", env=_peer_env(), cwd=workdir)
    return os.path.join(out, "0", "items")


def write_tiny_tokenizer(hf_dir: str, vocab_size: int) -> None:
    """A word-level tokenizer over `vocab_size` tokens: MaxText's `to_huggingface` saves a
    tokenizer next to the weights and cannot run without one (the fixtures have none)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0").save_pretrained(hf_dir)


def run_to_huggingface(family: Family, items: str, out: str, scan_layers: bool, workdir: str) -> str:
    """MaxText's `to_huggingface` on a MaxText checkpoint (`.../0/items`); writes HF safetensors +
    config.json to `out` and returns it. Its HF config comes from its table (patched with the
    fixture's config) and it copies a tokenizer from `--hf_model_path`, so a directory with the
    fixture's config.json and a tiny tokenizer is passed there."""
    hf_dir = os.path.join(workdir, f"{family.name}-tokenizer")
    config = load_config(family.path) | dict(family.hf_table_entries)
    if not os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):
        os.makedirs(hf_dir, exist_ok=True)
        write_tiny_tokenizer(hf_dir, int(text_config(config)["vocab_size"]))
    with open(os.path.join(hf_dir, "config.json"), "w") as f:
        json.dump(config, f)
    args = [
        *_common_args(family, scan_layers),
        f"load_parameters_path={items}",
        f"base_output_directory={out}",
        f"--hf_model_path={hf_dir}",
        # Its architecture check compares HF config fields with MaxText's dims by its own rules
        # (e.g. Qwen3 MoE intermediate_size == mlp_dim * top-k), which a tiny fixture's unused
        # fields need not meet; this only lets MaxText's values into the config.json it writes.
        "--override_model_architecture",
    ]
    cmd = [PEER_PYTHON, os.path.join(HERE, "peer_main.py"), "to_huggingface", hf_dir, family.model_name, *args]
    _run(cmd, out + ".log", env=_peer_env(), cwd=workdir)
    return out


def run_ckptbeam_export(items: str, out: str, weight_dtype: str) -> str:
    """ckptbeam's CLI exporting a checkpoint (this worktree's code); returns the HF directory."""
    cmd = [sys.executable, "-m", "pipelines.cli", "export", "--source", items, "--output", out]
    cmd += ["--weight_dtype", weight_dtype, "--force"]
    env = dict(os.environ) | {"PYTHONPATH": ROOT}
    _run(cmd, out + ".log", env=env, cwd=ROOT)
    return out


def run_ckptbeam_convert(family: Family, out: str, scan_layers: bool) -> str:
    """ckptbeam's CLI on the fixture (this worktree's code); returns the checkpoint's `0/items`."""
    cmd = [sys.executable, "-m", "pipelines.cli", "convert", "--source", family.path, "--output", out]
    cmd += ["--scan_layers", str(scan_layers).lower()]
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ) | {"PYTHONPATH": ROOT}
    _run(cmd, out + ".log", env=env, cwd=ROOT)
    return os.path.join(out, "0", "items")


def read_leaves(items: str) -> dict[str, np.ndarray]:
    """Every param leaf of an Orbax checkpoint, read with TensorStore (as Orbax reads it)."""
    from ckpt_transforms.orbax_io.inspect import inspect_checkpoint
    from ckpt_transforms.orbax_io.reader import open_leaf, resolve_items_dir

    leaves, _ = inspect_checkpoint(items)
    items_dir = resolve_items_dir(items)
    return {leaf.name: open_leaf(items_dir, leaf.name, True, True).read().result() for leaf in leaves}


# MaxText's to_maxtext saves what its hooks return in eager mode (`--lazy_load_tensors=false`:
# Gemma's `x + 1` norms come back float32 from a bf16 input) but casts every leaf to save_dtype in
# lazy mode, its default and the only one without torch (this peer). ckptbeam writes the eager
# result (the golden fingerprints in tests/golden were made in eager mode). A float32 leaf of ours
# that MaxText's lazy run wrote as bf16 is therefore accepted iff rounding ours to bf16 gives its
# exact bytes; it is reported as a note, not hidden.
LAZY_CAST_NOTE = "float32 here, bf16 in MaxText's lazy mode (its eager mode saves float32); bf16(ours) == MaxText"


def compare_leaves(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray]) -> tuple[list[str], list[str]]:
    """(differences, notes) between two checkpoints' leaves (name, shape, dtype, bytes), one line each."""
    import ml_dtypes

    diffs = [f"only ckptbeam: {n} {ours[n].shape} {ours[n].dtype}" for n in sorted(set(ours) - set(theirs))]
    diffs += [f"only MaxText: {n} {theirs[n].shape} {theirs[n].dtype}" for n in sorted(set(theirs) - set(ours))]
    notes = []
    for n in sorted(set(ours) & set(theirs)):
        a, b = ours[n], theirs[n]
        lazy_cast = a.dtype == np.float32 and b.dtype == ml_dtypes.bfloat16 and a.shape == b.shape
        if lazy_cast and a.astype(ml_dtypes.bfloat16).tobytes() == b.tobytes():
            notes.append(f"{n}: {LAZY_CAST_NOTE}")
        elif a.shape != b.shape or a.dtype != b.dtype:
            diffs.append(f"{n}: ckptbeam {a.shape} {a.dtype}, MaxText {b.shape} {b.dtype}")
        elif a.tobytes() != b.tobytes():
            bad = np.count_nonzero(a.astype(np.float32) != b.astype(np.float32))
            diffs.append(f"{n}: values differ in {bad} of {a.size} elements")
    return diffs, notes


TOKENS = np.array([[2, 17, 101, 5, 233, 64, 9, 150, 42, 7, 199, 3]], dtype=np.int64)


LOADERS = ("nnx", "linen")  # MaxText's default NNX loader (from_pretrained), its Linen decode path (MaxEngine)


def maxtext_logits(
    family: Family, items: str, scan_layers: bool, workdir: str, loader: str = "nnx", tokens: np.ndarray = TOKENS
) -> np.ndarray:
    """MaxText's model (float32 compute and weights) over `tokens`, params restored from `items`
    through its normal load path (`load_parameters_path`) by `loader` (one of LOADERS)."""
    tag = os.path.basename(os.path.dirname(os.path.dirname(items))) + f"-{loader}"
    tokens_path, out_path = os.path.join(workdir, f"{tag}-tokens.npy"), os.path.join(workdir, f"{tag}-logits.npy")
    np.save(tokens_path, tokens)
    args = [
        *_common_args(family, scan_layers),
        f"load_parameters_path={items}",
        f"base_output_directory={os.path.join(workdir, tag + '-run')}",
        "per_device_batch_size=1",
        # The decode path's KV cache needs room past the prompt (MaxText checks target > prefill).
        f"max_target_length={tokens.shape[1] + (4 if loader == 'linen' else 0)}",
        f"max_prefill_predict_length={tokens.shape[1]}",
        "dtype=float32",
        "weight_dtype=float32",
        "matmul_precision=highest",
        "async_checkpointing=false",
        *family.run_overrides,
    ]
    cmd = [PEER_PYTHON, os.path.join(HERE, "peer_main.py"), "logits", loader, tokens_path, out_path, *args]
    _run(cmd, out_path + ".log", env=_peer_env(), cwd=workdir)
    return np.load(out_path)


def hf_logits(
    family: Family, tokens: np.ndarray = TOKENS, hf_dir: str | None = None, folded: bool = False
) -> np.ndarray:
    """transformers' model (float32) over `tokens`, in the project's interpreter (needs torch);
    `folded`: with the weights MaxText's bf16 checkpoint holds (the family's Folds)."""
    import torch
    import transformers

    path = hf_dir or family.path
    config = transformers.AutoConfig.from_pretrained(path)
    if family.hf_config_overrides is not None:
        target = getattr(config, "text_config", None) or config
        for key, value in family.hf_config_overrides(text_config(load_config(path))).items():
            setattr(target, key, value)
    cls = getattr(transformers, family.hf_class)
    model = cls.from_pretrained(path, config=config, dtype=torch.float32).eval()
    if folded and family.folds is not None:
        folds = family.folds(text_config(load_config(path)))
        if not apply_folds(model, folds):
            raise AssertionError(f"{family.name}: no parameter ends with {[f.suffix for f in folds]}")
    with torch.no_grad(), _topk_lower_index_first(family.hf_topk_lower_index_first):
        return model(input_ids=torch.tensor(tokens)).logits.float().numpy()


@contextlib.contextmanager
def _topk_lower_index_first(enabled: bool) -> Iterator[None]:
    """Within the block, torch's Tensor.topk returns tied values lower index first (a stable
    descending sort), the rule of MaxText's indexer (Family.hf_topk_lower_index_first)."""
    import torch

    if not enabled:
        yield
        return
    original = torch.Tensor.topk

    def topk(self, k, dim=-1, largest=True, sorted=True):  # noqa: A002 (torch's signature)
        values, indices = torch.sort(self, dim=dim, descending=largest, stable=True)
        return torch.return_types.topk((values.narrow(dim, 0, k), indices.narrow(dim, 0, k)))

    torch.Tensor.topk = topk
    try:
        yield
    finally:
        torch.Tensor.topk = original


def logit_stats(ours: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """max |diff|, mean KL(ref || ours) per position, top-1 agreement."""
    a, b = ours.astype(np.float64), ref.astype(np.float64)
    la = a - a.max(-1, keepdims=True)
    la -= np.log(np.exp(la).sum(-1, keepdims=True))
    lb = b - b.max(-1, keepdims=True)
    lb -= np.log(np.exp(lb).sum(-1, keepdims=True))
    kl = (np.exp(lb) * (lb - la)).sum(-1)
    return {
        "max_abs": float(np.abs(a - b).max()),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "top1": float((a.argmax(-1) == b.argmax(-1)).mean()),
    }


# The results table (README, MaxText peer suite): one column per check, direction and layout.
TABLE_COLUMNS = (
    ("to_maxtext", "scan", None, "to_maxtext scan"),
    ("to_maxtext", "unscan", None, "to_maxtext unscan"),
    ("logits", "scan", "nnx", "logits NNX scan"),
    ("logits", "unscan", "nnx", "logits NNX unscan"),
    ("logits", "scan", "linen", "logits Linen scan"),
    ("logits", "unscan", "linen", "logits Linen unscan"),
    ("to_huggingface", None, None, "to_huggingface = fixture"),
    ("export_vs_to_huggingface", "scan", None, "export = to_hf scan"),
    ("export_vs_to_huggingface", "unscan", None, "export = to_hf unscan"),
)


def _cell(row: dict) -> str:
    if row["check"] == "logits":
        ok = "ok" if row["top1"] == 1.0 and row["kl_max"] < 1e-4 else f"FAIL top1 {row['top1']:.2f}"
        plain = row.get("plain_max_abs", row["max_abs"])
        plain = f" (plain HF {plain:.2g})" if plain != row["max_abs"] else ""
        return f"{ok} {row['max_abs']:.1e}{plain}"
    if row["check"] == "to_maxtext":
        return f"= {row['leaves']} leaves" if not row["diffs"] else f"FAIL {len(row['diffs'])} diffs"
    bad = len(row["diffs"]) + len(row.get("only_one_side", []))
    cell = "=" if not bad else f"FAIL {bad}"
    return cell + (f" ({len(row['missing'])} not exported)" if row.get("missing") else "")


def results_table(rows: list[dict]) -> str:
    """A Markdown table family x (check, layout, loader) from results.jsonl rows (last row wins;
    `-` = not run here: skipped, see the suite's skip reasons)."""
    cells: dict[tuple, str] = {}
    for row in rows:
        scan = None if "scan" not in row else ("scan" if row["scan"] else "unscan")
        cells[(row["family"], row["check"], scan, row.get("loader"))] = _cell(row)
    lines = ["| family | " + " | ".join(c[3] for c in TABLE_COLUMNS) + " |", "|---" * (len(TABLE_COLUMNS) + 1) + "|"]
    for name in sorted(FAMILIES):
        row = [cells.get((name, check, scan, loader), "-") for check, scan, loader, _ in TABLE_COLUMNS]
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    return "\n".join(lines)


if __name__ == "__main__":  # python tests/maxtext/peer.py WORKDIR/results.jsonl
    with open(sys.argv[1]) as f:
        print(results_table([json.loads(line) for line in f if line.strip()]))
