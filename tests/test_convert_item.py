"""Executing work items: build_region vs. an independent numpy computation on the fixtures."""

from __future__ import annotations

import dataclasses
import functools

import ml_dtypes
import numpy as np
import pytest
from helpers_safetensors import FIXTURES, fixture_tensors
from reference import expected_leaves
from safetensors import safe_open

import model_maps
from ckpt_transforms.planning.convert_plan import Plan, build_plan
from ckpt_transforms.safetensors_io.index import load_source_model
from ckpt_transforms.storage.sources import open_source
from ckpt_transforms.work_items.convert import build_region

BF16 = np.dtype(ml_dtypes.bfloat16)
P = "params.params."


# --------------------------------------------------------------------------- independent reference


def rne_bf16(x: np.ndarray) -> np.ndarray:
    """float -> bfloat16, round to nearest even, by integer arithmetic on the float32 bits."""
    bits = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16).view(BF16)


def to_save(x: np.ndarray, save: np.dtype) -> np.ndarray:
    if save == BF16:
        return x if x.dtype == BF16 else rne_bf16(x.astype(np.float32))
    return x.astype(save)


def source_tensors(name: str) -> dict[str, np.ndarray]:
    """Read with the safetensors library where it can (not BF16), else with our own reader."""
    tensors = fixture_tensors(name)
    if any(t.dtype == BF16 for t in tensors.values()):
        return tensors
    out = {}
    for file in sorted({p.name for p in (FIXTURES / name).glob("*.safetensors")}):
        with safe_open(str(FIXTURES / name / file), framework="np") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key)
    assert set(out) == set(tensors)
    return out


# --------------------------------------------------------------------------- running the items


@functools.cache
def plan_for(name: str, scan: bool, budget: int, save: str) -> Plan:
    sm = load_source_model(open_source(str(FIXTURES / name)))
    mm = model_maps.detect_family(sm.config).build(sm.config)
    return build_plan(sm, mm, scan, save, max_item_bytes=budget)


def assemble(plan: Plan, name: str, params=None) -> dict[str, np.ndarray]:
    source = open_source(str(FIXTURES / name))
    arrays = {a.name: a for a in plan.arrays}
    out = {}
    written = {}
    for item in plan.items:
        if params is not None and item.param not in params:
            continue
        a = arrays[item.param]
        if item.param not in out:
            out[item.param] = np.zeros(a.shape, np.dtype(a.dtype))
            written[item.param] = np.zeros(a.shape, bool)
        region = build_region(item, source)
        assert region.dtype == np.dtype(plan.save_dtype)
        assert region.shape == item.region_shape
        index = tuple(slice(lo, hi) for lo, hi in item.region)
        assert not written[item.param][index].any()
        out[item.param][index] = region
        written[item.param][index] = True
    for param, w in written.items():
        assert w.all(), param
    return out


def assert_bits_equal(actual: np.ndarray, expected: np.ndarray, name: str) -> None:
    assert actual.shape == expected.shape, f"{name}: {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{name}: {actual.dtype} != {expected.dtype}"
    unsigned = f"u{actual.itemsize}"
    a = np.ascontiguousarray(actual).view(unsigned)
    b = np.ascontiguousarray(expected).view(unsigned)
    if not np.array_equal(a, b):
        bad = np.argwhere(a != b)
        raise AssertionError(f"{name}: {len(bad)} elements differ, first at {bad[0].tolist()}")


# --------------------------------------------------------------------------- tests


def test_rne_reference_is_round_to_nearest_even():
    """Sanity of the independent cast itself against ml_dtypes, including ties."""
    one = np.float32(1.0)
    ulp = np.float32(2.0**-7)  # bf16 spacing at 1.0
    ties = np.array([one + ulp / 2, one + 3 * ulp / 2, -(one + ulp / 2), one + ulp / 2 + 2.0**-20], np.float32)
    got = rne_bf16(ties).astype(np.float32)
    np.testing.assert_array_equal(got, [1.0, one + 2 * ulp, -1.0, one + ulp])
    x = np.random.default_rng(0).standard_normal(10_000).astype(np.float32) * 1e3
    assert_bits_equal(rne_bf16(x), x.astype(ml_dtypes.bfloat16), "rne")


def test_llama_q_proj_at_layer_matches_independent_formula():
    """q_proj of layer 1: cast -> [out,in].T -> [hidden, heads, head_dim] -> RoPE pairs -> x 1/sqrt(24)."""
    name = "llama_bf16"
    plan = plan_for(name, True, 10**6, "bfloat16")
    (item,) = [i for i in plan.items if i.param == P + "decoder.layers.self_attention.query.kernel"]
    region = build_region(item, open_source(str(FIXTURES / name)))
    x = fixture_tensors(name)["model.layers.1.self_attn.q_proj.weight"].astype(BF16)
    t = x.T.reshape(64, 4, 24)
    expected = np.empty_like(t)
    expected[..., 0::2] = t[..., :12]
    expected[..., 1::2] = t[..., 12:]
    expected = (expected.astype(np.float32) * np.float32(1 / np.sqrt(24))).astype(BF16)
    assert_bits_equal(region[:, 1], expected, "q layer 1")
    # The transform is not a no-op on these weights.
    assert not np.array_equal(region[:, 1].view(np.uint16), x.T.reshape(64, 4, 24).view(np.uint16))


@pytest.mark.parametrize(
    "name, scan, budget, save",
    [
        ("llama_bf16", True, 10**6, "bfloat16"),
        ("llama_bf16", True, 20_000, "bfloat16"),  # row splits: heads of q/k/v, embedding/head rows
        ("llama_bf16", False, 13_000, "bfloat16"),
        ("llama_f32_sharded", True, 20_000, "bfloat16"),  # f32 -> bf16 round to nearest even
        ("llama_f32_sharded", False, 10**6, "float32"),
        ("mistral_bf16", True, 16_000, "bfloat16"),
        ("qwen2_f16_untied", True, 20_000, "bfloat16"),
        ("qwen3_f32_untied", False, 30_000, "bfloat16"),
        ("qwen3_bf16_tied", True, 10**6, "float32"),
    ],
)
def test_all_leaves_match_independent_reference(name, scan, budget, save):
    plan = plan_for(name, scan, budget, save)
    got = assemble(plan, name)
    expected = expected_leaves(str(FIXTURES / name), scan, plan.save_dtype)
    assert set(got) == set(expected)
    for param in sorted(expected):
        assert_bits_equal(got[param], expected[param], param)


def test_row_split_embedding_items():
    name = "llama_bf16"
    plan = plan_for(name, True, 20_000, "bfloat16")
    emb = P + "token_embedder.embedding"
    items = [i for i in plan.items if i.param == emb]
    assert len(items) > 1, "embedding was not row-split"
    source = open_source(str(FIXTURES / name))
    table = fixture_tensors(name)["model.embed_tokens.weight"]
    for item in items:
        (r0, r1), (c0, c1) = item.region
        assert (c0, c1) == (0, 64)
        assert_bits_equal(build_region(item, source), table[r0:r1], f"rows {r0}:{r1}")


def test_f32_shards_cast_to_bf16_round_to_nearest_even():
    name = "llama_f32_sharded"
    plan = plan_for(name, True, 20_000, "bfloat16")
    t = source_tensors(name)
    assert t["model.embed_tokens.weight"].dtype == np.float32
    params = {P + "token_embedder.embedding", P + "decoder.layers.mlp.wi_0.kernel", P + "decoder.layers.mlp.wo.kernel"}
    got = assemble(plan, name, params)
    emb = t["model.embed_tokens.weight"]
    assert_bits_equal(got[P + "token_embedder.embedding"], emb.astype(ml_dtypes.bfloat16), "embedding vs ml_dtypes")
    assert_bits_equal(got[P + "token_embedder.embedding"], rne_bf16(emb), "embedding vs RNE bits")
    # Layers 0..2 of gate/down live in different shards.
    files = {
        load_source_model(open_source(str(FIXTURES / name))).tensors[f"model.layers.{i}.mlp.down_proj.weight"].file
        for i in range(3)
    }
    assert len(files) > 1
    for layer in range(3):
        g = t[f"model.layers.{layer}.mlp.gate_proj.weight"]
        d = t[f"model.layers.{layer}.mlp.down_proj.weight"]
        assert_bits_equal(got[P + "decoder.layers.mlp.wi_0.kernel"][:, layer], g.T.astype(ml_dtypes.bfloat16), "wi_0")
        assert_bits_equal(got[P + "decoder.layers.mlp.wo.kernel"][:, layer], rne_bf16(d.T), "wo")
    # Rounding really happened (the f32 sources are not bf16-representable).
    assert not np.array_equal(emb, emb.astype(ml_dtypes.bfloat16).astype(np.float32))


def test_build_region_reads_exactly_the_slab_ranges():
    name = "llama_f32_sharded"
    plan = plan_for(name, True, 20_000, "bfloat16")
    inner = open_source(str(FIXTURES / name))
    reads = []

    class Recording:
        uri = inner.uri

        def read_range(self, file, offset, length):
            reads.append((file, offset, length))
            return inner.read_range(file, offset, length)

    for item in plan.items[:40]:
        reads.clear()
        build_region(item, Recording())
        assert reads == [(s.source.file, s.source.offset, s.source.length) for s in item.slabs]


def test_build_region_rejects_a_slab_of_the_wrong_shape():
    plan = plan_for("llama_bf16", True, 10**6, "bfloat16")
    (item,) = [i for i in plan.items if i.param == P + "decoder.layers.self_attention.out.kernel"]
    broken = dataclasses.replace(item, ops=item.ops[:1])  # transpose only, no head split
    with pytest.raises(ValueError, match=r"o_proj\.weight"):
        build_region(broken, open_source(str(FIXTURES / "llama_bf16")))
