"""Plans for the real MoE checkpoints, from headers alone (fake TensorInfos, no data).

DeepSeek-V3 in its official FP8 layout (61 layers + 1 MTP layer, 256 experts, 128x128 scale
blocks) and GPT-OSS-120B in its MXFP4 layout: every target covered exactly once, every source
byte read exactly once (a fused gate_up_proj once per half), no item over --max_item_bytes, and
scanned expert stacks cut into one expert by a few layers per work item.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter, defaultdict

import pytest
from test_moe_families import DEEPSEEK3_671B, GPT_OSS_120B

import model_maps
from ckpt_transforms.planning.convert_plan import DEFAULT_MAX_ITEM_BYTES, Plan, build_plan, item_working_bytes
from ckpt_transforms.safetensors_io.index import SourceModel, TensorInfo

BITS = {"BF16": 16, "F32": 32, "F8_E4M3": 8, "U8": 8}
MiB = 2**20


def deepseek3_fp8_headers(c: dict) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The official DeepSeek-V3 checkpoint's tensors: FP8 linear weights + F32 scale_inv grids."""
    h, n, e = c["hidden_size"], c["num_hidden_layers"], c["n_routed_experts"]
    heads, qk, kv = c["num_attention_heads"], c["qk_nope_head_dim"] + c["qk_rope_head_dim"], c["kv_lora_rank"]
    out = {
        "model.embed_tokens.weight": ("BF16", (c["vocab_size"], h)),
        "model.norm.weight": ("BF16", (h,)),
        "lm_head.weight": ("BF16", (c["vocab_size"], h)),
    }

    def fp8(key: str, rows: int, cols: int) -> None:
        out[key] = ("F8_E4M3", (rows, cols))
        out[key + "_scale_inv"] = ("F32", (math.ceil(rows / 128), math.ceil(cols / 128)))

    for layer in range(n + c["num_nextn_predict_layers"]):
        p = f"model.layers.{layer}."
        out[p + "input_layernorm.weight"] = ("BF16", (h,))
        out[p + "post_attention_layernorm.weight"] = ("BF16", (h,))
        out[p + "self_attn.q_a_layernorm.weight"] = ("BF16", (c["q_lora_rank"],))
        out[p + "self_attn.kv_a_layernorm.weight"] = ("BF16", (kv,))
        fp8(p + "self_attn.q_a_proj.weight", c["q_lora_rank"], h)
        fp8(p + "self_attn.q_b_proj.weight", heads * qk, c["q_lora_rank"])
        fp8(p + "self_attn.kv_a_proj_with_mqa.weight", kv + c["qk_rope_head_dim"], h)
        fp8(p + "self_attn.kv_b_proj.weight", heads * (c["qk_nope_head_dim"] + c["v_head_dim"]), kv)
        fp8(p + "self_attn.o_proj.weight", h, heads * c["v_head_dim"])
        if layer < c["first_k_dense_replace"]:
            mlps = {"mlp": c["intermediate_size"]}
        else:
            out[p + "mlp.gate.weight"] = ("BF16", (e, h))
            out[p + "mlp.gate.e_score_correction_bias"] = ("F32", (e,))
            mlps = {f"mlp.experts.{j}": c["moe_intermediate_size"] for j in range(e)}
            mlps["mlp.shared_experts"] = c["n_shared_experts"] * c["moe_intermediate_size"]
        for m, width in mlps.items():
            fp8(p + m + ".gate_proj.weight", width, h)
            fp8(p + m + ".up_proj.weight", width, h)
            fp8(p + m + ".down_proj.weight", h, width)
    if c["num_nextn_predict_layers"]:
        p = f"model.layers.{n}."
        for key, shape in {"enorm.weight": (h,), "hnorm.weight": (h,), "eh_proj.weight": (h, 2 * h)}.items():
            out[p + key] = ("BF16", shape)
    return out


def gpt_oss_mxfp4_headers(c: dict) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The official GPT-OSS checkpoint: bf16 everywhere but the experts' MXFP4 blocks/scales."""
    h, e, m, hd = c["hidden_size"], c["num_local_experts"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    out = {
        "model.embed_tokens.weight": ("BF16", (c["vocab_size"], h)),
        "model.norm.weight": ("BF16", (h,)),
        "lm_head.weight": ("BF16", (c["vocab_size"], h)),
    }
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes = {
            "input_layernorm.weight": (h,),
            "post_attention_layernorm.weight": (h,),
            "self_attn.q_proj.weight": (q, h),
            "self_attn.q_proj.bias": (q,),
            "self_attn.k_proj.weight": (kv, h),
            "self_attn.k_proj.bias": (kv,),
            "self_attn.v_proj.weight": (kv, h),
            "self_attn.v_proj.bias": (kv,),
            "self_attn.o_proj.weight": (h, q),
            "self_attn.o_proj.bias": (h,),
            "self_attn.sinks": (c["num_attention_heads"],),
            "mlp.router.weight": (e, h),
            "mlp.router.bias": (e,),
            "mlp.experts.gate_up_proj_bias": (e, 2 * m),
            "mlp.experts.down_proj_bias": (e, h),
        }
        out.update({p + k: ("BF16", s) for k, s in shapes.items()})
        out[p + "mlp.experts.gate_up_proj_blocks"] = ("U8", (e, 2 * m, h // 32, 16))
        out[p + "mlp.experts.gate_up_proj_scales"] = ("U8", (e, 2 * m, h // 32))
        out[p + "mlp.experts.down_proj_blocks"] = ("U8", (e, h, m // 32, 16))
        out[p + "mlp.experts.down_proj_scales"] = ("U8", (e, h, m // 32))
    return out


def source_model(config: dict, headers: dict) -> SourceModel:
    tensors, pos = {}, 0
    for i, (key, (dtype, shape)) in enumerate(headers.items()):
        file = f"model-{i // 5000:05d}.safetensors"  # keys spread over shards, like the real index
        length = math.prod(shape) * BITS[dtype] // 8
        tensors[key] = TensorInfo(key, file, dtype, shape, pos, length)
        pos += length
    return SourceModel("mem://real", config, tensors, sorted({t.file for t in tensors.values()}), {})


def check_real_plan(plan: Plan, sm: SourceModel, reads_per_key: dict[str, int] | None = None) -> None:
    """Exact coverage without materializing anything (arrays are up to ~10^11 elements)."""
    arrays = {a.name: a for a in plan.arrays}
    cells: dict[str, set] = defaultdict(set)
    for item in plan.items:
        a = arrays[item.param]
        assert item_working_bytes(item) <= plan.max_item_bytes, (item.param, item.region)
        # A union of whole chunks (several when items span an axis a --shard_count split).
        spans = []
        for (lo, hi), c, n in zip(item.region, a.chunk_shape, a.shape, strict=True):
            assert lo % c == 0 and (hi % c == 0 or hi == n), (item.param, item.region, a.chunk_shape)
            spans.append(range(lo // c, math.ceil(hi / c)))
        for cell in itertools.product(*spans):
            assert cell not in cells[item.param], f"{item.param}: chunk {cell} written twice"
            cells[item.param].add(cell)
        # Slabs: one per stack index in the region, each filling the rest of the region.
        stack_axes = [i for i, d in enumerate(item.slabs[0].dest) if isinstance(d, int)]
        seen = set()
        for slab in item.slabs:
            for axis, d in enumerate(slab.dest):
                if axis not in stack_axes:
                    assert d == (0, item.region[axis][1] - item.region[axis][0])
            seen.add(tuple(slab.dest[a] for a in stack_axes))
        assert len(seen) == len(item.slabs) == math.prod(item.region[a][1] - item.region[a][0] for a in stack_axes)
    for name, a in arrays.items():
        assert len(cells[name]) == math.prod(math.ceil(n / c) for n, c in zip(a.shape, a.chunk_shape, strict=True))
    # Every used source byte is read, exactly once (or once per composite target).
    ranges: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for item in plan.items:
        for slab in item.slabs:
            for info in (slab.source, *slab.aux):
                ranges[info.key].append((info.offset, info.length))
    assert set(ranges) == set(sm.tensors) - set(plan.unused_source_keys)
    for key, rs in ranges.items():
        times = (reads_per_key or {}).get(key.rsplit(".", 1)[-1], 1)
        counts = Counter(rs)
        assert set(counts.values()) == {times}, key
        pos, info = sm.tensors[key].offset, sm.tensors[key]
        for off, length in sorted(counts):
            assert off == pos, f"{key}: gap/overlap at {off}"
            pos += length
        assert pos == info.offset + info.length, key


@pytest.fixture(scope="module")
def deepseek3():
    return source_model(DEEPSEEK3_671B, deepseek3_fp8_headers(DEEPSEEK3_671B))


def plan_for(config: dict, sm: SourceModel, scan: bool = True, budget: int = DEFAULT_MAX_ITEM_BYTES) -> Plan:
    return build_plan(sm, model_maps.detect_family(config).build(config), scan, "bfloat16", budget)


def test_deepseek3_fp8_plan_is_bounded_and_exact(deepseek3):
    plan = plan_for(DEEPSEEK3_671B, deepseek3)
    check_real_plan(plan, deepseek3)
    assert plan.summary()["largest_item_bytes"] <= DEFAULT_MAX_ITEM_BYTES
    assert plan.unused_source_keys == sorted(k for k in deepseek3.tensors if k.startswith("model.layers.61."))
    arrays = {a.name.removeprefix("params.params."): a for a in plan.arrays}
    wi_0 = arrays["decoder.moe_layers.DeepSeekMoeBlock_0.MoeBlock_0.wi_0"]
    assert wi_0.shape == (256, 58, 7168, 2048)
    # One expert by a few layers per work item, whole slabs: never the stacked array.
    assert wi_0.chunk_shape[0] == 1 and 1 <= wi_0.chunk_shape[1] <= 8 and wi_0.chunk_shape[2:] == (7168, 2048)
    emb = arrays["token_embedder.embedding"]
    assert emb.chunk_shape[0] < emb.shape[0]  # 1.85 GB of bf16 rows, cut


def test_deepseek3_fp8_unscanned_plan(deepseek3):
    plan = plan_for(DEEPSEEK3_671B, deepseek3, scan=False)
    check_real_plan(plan, deepseek3)
    names = {a.name for a in plan.arrays}
    assert "params.params.decoder.moe_layers_57.DeepSeekMoeBlock_0.MoeBlock_0.wo" in names
    assert "params.params.decoder.dense_layers_2.mlp.wo.kernel" in names
    assert not any("moe_layers_58" in n or "dense_layers_3" in n for n in names)


def test_small_budget_cuts_real_fp8_slabs_on_scale_blocks():
    """DeepSeek-V3 tensor sizes (fewer experts and layers, to keep the test fast) at 64 MiB:
    even one (expert, layer) slab is cut in rows, always at a 128-row scale block."""
    config = DEEPSEEK3_671B | {"n_routed_experts": 8, "num_hidden_layers": 5}
    sm = source_model(config, deepseek3_fp8_headers(config))
    plan = plan_for(config, sm, budget=64 * MiB)
    check_real_plan(plan, sm)
    wi_0 = next(a for a in plan.arrays if a.name.endswith("MoeBlock_0.wi_0"))
    assert wi_0.chunk_shape[:2] == (1, 1) and wi_0.chunk_shape[3] < 2048 and wi_0.chunk_shape[3] % 128 == 0
    split = 0
    for item in plan.items:
        for slab in item.slabs:
            full = sm.tensors[slab.source.key]
            if not slab.aux or slab.source.shape == full.shape:
                continue
            (scale,) = slab.aux
            grid = sm.tensors[scale.key]
            r0 = (slab.source.offset - full.offset) // (full.length // full.shape[0])
            r1 = r0 + slab.source.shape[0]
            s0 = (scale.offset - grid.offset) // (grid.length // grid.shape[0])
            assert r0 % 128 == 0 and (s0, s0 + scale.shape[0]) == (r0 // 128, math.ceil(r1 / 128))
            split += 1
    assert split > 0


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unscan"])
def test_gpt_oss_120b_mxfp4_plan(scan):
    sm = source_model(GPT_OSS_120B, gpt_oss_mxfp4_headers(GPT_OSS_120B))
    plan = plan_for(GPT_OSS_120B, sm, scan)
    # The fused gate_up_proj (blocks, scales, bias) is read once for wi_0 and once for wi_1.
    twice = {k: 2 for k in ("gate_up_proj_blocks", "gate_up_proj_scales", "gate_up_proj_bias")}
    check_real_plan(plan, sm, twice)
    assert plan.summary()["largest_item_bytes"] <= DEFAULT_MAX_ITEM_BYTES
    if scan:
        wi_0 = next(a for a in plan.arrays if a.name.endswith("layers.layers_0.GptOssMlp.wi_0"))
        assert wi_0.shape == (128, 18, 2880, 2880) and wi_0.chunk_shape[:2] == (1, 1)
