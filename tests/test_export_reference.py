"""Validate the export oracle (tests/export_reference.py) on every fixture: HF -> ckptbeam convert ->
oracle -> compare with the ORIGINAL fixture tensors.

Data-movement tensors must come back bit for bit (after the save dtype's rounding); the arithmetic
ones (query scaling with sqrt(head_dim) not a power of 4, Gemma embeddings, Gemma norms) must equal
the value recomputed here from the original by the forward formula and then the inverse, and be
within the stated rounding error of the original.
"""

from __future__ import annotations

import json
import os
import re

import ml_dtypes
import numpy as np
import pytest
from conftest import FIXTURES, GOLDEN, convert, restore_leaves
from export_reference import expected_hf_tensors
from reference import dequantized_state

BF16 = np.dtype(ml_dtypes.bfloat16)
F32 = np.dtype(np.float32)
DT = {"bfloat16": BF16, "float32": F32}
MANTISSA = {BF16: 7, F32: 23, np.dtype(np.float16): 10}

# (source dir, scan, save_dtype, weight_dtype, use_multimodal)
SOURCES = sorted(
    [
        os.path.join(FIXTURES, d)
        for d in os.listdir(FIXTURES)
        if os.path.isfile(os.path.join(FIXTURES, d, "config.json"))
    ]
    + [os.path.join(GOLDEN, d) for d in ("llama3.1", "mixtral", "qwen3")]
)
CASES = [
    (src, scan, "bfloat16", None, False)
    for src in SOURCES
    for scan in (True, False)
    if not (scan and os.path.basename(src) == "gemma4_small_bf16")  # no scanned form in MaxText
] + [
    (os.path.join(FIXTURES, "llama_bf16"), True, "bfloat16", "float32", False),  # f32 export of a bf16 ckpt
    (os.path.join(FIXTURES, "gemma2_bf16"), False, "bfloat16", "float32", False),
    (os.path.join(FIXTURES, "gemma2_f32"), True, "float32", "float32", False),  # f32 checkpoint, f32 export
    (os.path.join(FIXTURES, "gemma2_f32"), True, "float32", "bfloat16", False),  # f32 checkpoint, bf16 export
    (os.path.join(FIXTURES, "qwen3_f32_untied"), True, "float32", None, False),
    (os.path.join(FIXTURES, "gemma3_mm_bf16"), True, "bfloat16", None, True),  # with the vision tower
    (os.path.join(FIXTURES, "gemma3_mm_bf16"), False, "bfloat16", "float32", True),
]


def _case_id(case) -> str:
    src, scan, save, weight, mm = case
    parts = [os.path.basename(src), "scan" if scan else "unscan"]
    if save != "bfloat16":
        parts.append(f"save_{save}")
    if weight:
        parts.append(f"export_{weight}")
    if mm:
        parts.append("mm")
    return "-".join(parts)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One conversion per (source, scan, save dtype, multimodal), shared by the export cases."""
    cache: dict[tuple, str] = {}

    def get(src: str, scan: bool, save: str, mm: bool) -> str:
        key = (src, scan, save, mm)
        if key not in cache:
            out = str(tmp_path_factory.mktemp("ckpt") / "out")
            args = [f"--scan_layers={str(scan).lower()}", f"--save_dtype={save}"]
            convert(src, out, *args, *(["--use_multimodal=true"] if mm else []))
            cache[key] = out
        return cache[key]

    return get


# --------------------------------------------------------------------------- expectations from the fixture

GEMMA3_RENAMES = (
    ("language_model.model.", "model.language_model."),
    ("vision_tower.", "model.vision_tower.vision_model."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)


def hf_originals(src: str, cfg: dict, mm: bool) -> dict[str, np.ndarray]:
    """The fixture's tensors under the names MaxText exports: FP8/MXFP4 dequantized as MaxText's
    dequantize scripts do (tests/reference.py), Gemma3's legacy transformers-5 spellings mapped to
    the `model.language_model.` / `model.vision_tower.vision_model.` names, and the known extras
    dropped: MTP layers (DeepSeek `model.layers.{n >= num_hidden_layers}`, Qwen3-Next `mtp.*`) and,
    when not multimodal, the vision tower and projector."""
    t = dequantized_state(src, cfg)
    tc = cfg.get("text_config", cfg)
    out = {}
    for key, value in t.items():
        if cfg["model_type"] == "gemma3":
            for old, new in GEMMA3_RENAMES:
                if key.startswith(old):
                    key = new + key[len(old) :]
                    break
        m = re.match(r"model\.layers\.(\d+)\.", key)
        if key.startswith("mtp.") or (m and int(m.group(1)) >= tc["num_hidden_layers"]):
            continue
        if not mm and re.match(r"model\.(vision_tower|embed_vision|multi_modal_projector)\.", key):
            continue
        out[key] = value
    return out


def arithmetic_kind(cfg: dict, key: str) -> tuple[str, float] | None:
    """Which HF tensors the MaxText round trip does arithmetic on (EXPORT.md §2), with the factor."""
    mt, tc = cfg["model_type"], cfg.get("text_config", cfg)
    hd = tc.get("head_dim") or tc["hidden_size"] // tc["num_attention_heads"]
    if mt in ("llama", "mistral", "mixtral", "gemma2") and key.endswith("self_attn.q_proj.weight"):
        return "query", float(np.sqrt(hd))
    if mt in ("gemma2", "gemma4") and key.endswith("embed_tokens.weight"):
        return "embedding_f32", tc["hidden_size"] ** 0.5
    if mt == "gemma3" and key.endswith("embed_tokens.weight"):
        return "embedding_bf16", tc["hidden_size"] ** 0.5
    gemma_norm = key.endswith("norm.weight") and ("language_model" in key or mt == "gemma2" or "soft_emb" in key)
    if mt in ("gemma2", "gemma3") and gemma_norm:
        return "norm", 1.0
    return None


def forward_then_inverse(x: np.ndarray, kind: str, factor: float, save: np.dtype, export: np.dtype) -> np.ndarray:
    """The original through to_maxtext's hook (rounded to the save dtype; Gemma norms stored float32,
    as MaxText's eager converter does) and back through to_huggingface's, computed directly."""
    s = x.astype(save).astype(F32)
    if kind == "query":
        stored = (s * np.float32(1 / factor)).astype(save)
        return (stored.astype(export).astype(F32) * np.float32(factor)).astype(export)
    if kind == "embedding_f32":
        stored = (s * np.float32(factor)).astype(save)
        # to_huggingface divides, in float32
        return (stored.astype(export).astype(F32) / np.float32(factor)).astype(export)
    if kind == "embedding_bf16":  # gemma3: the normaliser is bfloat16
        n = np.float32(BF16.type(factor))
        stored = (s * n).astype(save)
        return (stored.astype(export).astype(F32) / n).astype(export)
    stored = s + np.float32(1.0)  # norm: float32 leaf
    return (stored.astype(export).astype(F32) - np.float32(1.0)).astype(export)


def ulp(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """One unit in the last place of |x| in `dtype` (normal range)."""
    a = np.abs(x.astype(np.float64))
    e = np.floor(np.log2(np.where(a > 0, a, 1.0)))
    return np.where(a > 0, 2.0 ** (e - MANTISSA[dtype]), 0.0)


# --------------------------------------------------------------------------- the test


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_oracle_inverts_the_conversion(case, checkpoints):
    src, scan, save_name, weight_name, mm = case
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    out = checkpoints(src, scan, save_name, mm)
    items = os.path.join(out, "0", "items")
    got = expected_hf_tensors(items, cfg, scan, weight_name, use_multimodal=mm)

    save, export = DT[save_name], DT[weight_name or save_name]
    originals = hf_originals(src, cfg, mm)
    assert sorted(got) == sorted(originals)
    for key, x in originals.items():
        y = got[key]
        assert y.shape == x.shape, key
        assert y.dtype == export, key
        kind = arithmetic_kind(cfg, key)
        if kind is None:  # pure data movement: bit-exact after the save (and export) dtype
            expected = x.astype(save).astype(export)
            assert y.tobytes() == expected.tobytes(), f"{key}: data movement must be bit-exact"
            continue
        expected = forward_then_inverse(x, *kind, save, export)
        assert y.tobytes() == expected.tobytes(), f"{key}: not MaxText's {kind[0]} arithmetic"
        # ...and close to the original: each rounding on the way is at most half an ulp of the value
        # it rounds, in the narrower of the save/export dtypes (a norm's is an ulp of x + 1), plus,
        # for a float32 round trip, the error of the two rounded constants (f32(c) * f32(1/c) != 1).
        narrow = save if MANTISSA[save] < MANTISSA[export] else export
        xs = x.astype(save).astype(np.float64)
        err = np.abs(y.astype(np.float64) - xs)
        bound = ulp(xs + 1.0, narrow) + ulp(xs, narrow) if kind[0] == "norm" else 2 * ulp(xs, narrow)
        assert np.all(err <= bound), f"{key}: off by more than the rounding allows"


def test_arithmetic_leaves_really_round(checkpoints):
    """head_dim 24 and the gemma norms are not exact round trips: an exporter that skipped MaxText's
    arithmetic (or did it in another dtype) would be caught by the bitwise checks above."""
    src = os.path.join(FIXTURES, "llama_bf16")
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    got = expected_hf_tensors(os.path.join(checkpoints(src, True, "bfloat16", False), "0", "items"), cfg, True)
    q, x = (
        got["model.layers.0.self_attn.q_proj.weight"],
        hf_originals(src, cfg, False)["model.layers.0.self_attn.q_proj.weight"],
    )
    same = np.mean(q.astype(np.float64) == x.astype(np.float64))
    assert 0.5 < same < 1.0


def test_default_weight_dtype_is_the_embedding_dtype(checkpoints):
    src = os.path.join(FIXTURES, "qwen3_f32_untied")
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    items = os.path.join(checkpoints(src, True, "float32", False), "0", "items")
    assert {v.dtype for v in expected_hf_tensors(items, cfg, True).values()} == {F32}
    assert {v.dtype for v in expected_hf_tensors(items, cfg, True, "bfloat16").values()} == {BF16}


def test_restore_cast_is_round_to_nearest_even(checkpoints):
    """A float32 checkpoint exported as bfloat16 rounds each leaf once, RNE (TensorStore's cast)."""
    src = os.path.join(FIXTURES, "qwen3_f32_untied")
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    out = checkpoints(src, True, "float32", False)
    got = expected_hf_tensors(os.path.join(out, "0", "items"), cfg, True, "bfloat16")
    stored = restore_leaves(out)["params.params.token_embedder.embedding"]
    bits = stored.view(np.uint32).astype(np.uint64)
    rne = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # by hand, no NaNs here
    assert got["model.embed_tokens.weight"].view(np.uint16).tobytes() == rne.tobytes()
