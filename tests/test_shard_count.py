"""--shard_count: chunk arrays as MaxText's converter saves them from N devices (its
--simulated_cpu_devices_count): sharded along axis 0 if N divides it, else axis 1; an array it
replicates is split by Orbax's replica-parallel save along its first (later) axis N divides.

The layout is checked against Orbax itself: a subprocess with N fake CPU devices saves jax arrays
sharded MaxText's way with orbax.checkpoint (default options) and reports the chunk shapes it chose.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import tensorstore as ts
from conftest import FIXTURES, ROOT, assert_matches_reference, convert
from test_plan import check_plan
from test_plan_moe import DEEPSEEK3_671B, check_real_plan, deepseek3_fp8_headers, source_model

import model_maps
from ckpt_transforms.planning.convert_plan import Plan, build_plan, item_shape, shard_shape
from ckpt_transforms.planning.specs import ModelMap, ParamRule, expand_targets
from ckpt_transforms.safetensors_io.index import SourceModel, TensorInfo, load_source_model
from ckpt_transforms.storage.sources import open_source
from pipelines.cli import main
from pipelines.options import ConvertOptions

# --------------------------------------------------------------------------- the axis rule


@pytest.mark.parametrize(
    "shape, n, expected",
    [
        ((151936, 1024), 16, (9496, 1024)),  # axis 0 divisible (Qwen3-0.6B's embedding)
        ((8, 6), 4, (2, 6)),
        ((6, 8), 4, (6, 2)),  # axis 0 not divisible: axis 1
        ((3, 4, 7), 4, (3, 1, 7)),  # axis 1 of a 3-d array
        ((6, 5), 4, (6, 5)),  # neither: replicated, one chunk
        ((3, 3, 8), 4, (3, 3, 2)),  # replicated, split by Orbax's replica-parallel save on axis 2
        ((3, 5, 6, 8), 4, (3, 5, 6, 2)),  # ... on the first axis 4 divides
        ((3, 5, 7), 4, (3, 5, 7)),  # replicated, nothing divisible: one chunk
        ((12,), 4, (3,)),  # 1-d
        ((5,), 4, (5,)),  # 1-d, not divisible
        ((), 4, ()),  # 0-d: replicated
        ((7, 5), 1, (7, 5)),  # one device: the whole array
        ((), 1, ()),
        ((16, 16), 16, (1, 16)),
    ],
)
def test_shard_shape_rule(shape, n, expected):
    assert shard_shape(shape, n) == expected


@pytest.mark.parametrize("n", [0, -1])
def test_shard_shape_rejects_non_positive_counts(n):
    with pytest.raises(ValueError, match="shard_count"):
        shard_shape((4, 4), n)


@pytest.mark.parametrize("value", ["0", "-3", "two", "1.5", ""])
def test_option_rejects_bad_values(value, capsys):
    with pytest.raises(SystemExit):
        ConvertOptions(["--shard_count", value]).shard_count  # noqa: B018
    assert "--shard_count" in capsys.readouterr().err


def test_option_default_and_template_parameter():
    assert ConvertOptions([]).shard_count == 1
    assert ConvertOptions(["--shard_count", "16"]).shard_count == 16
    with open(os.path.join(ROOT, "dataflow_templates", "metadata.json"), encoding="utf-8") as f:
        (param,) = [p for p in json.load(f)["parameters"] if p["name"] == "shard_count"]
    assert param["isOptional"]
    for value, ok in [("1", True), ("16", True), ("0", False), ("-2", False), ("x", False), ("01", False)]:
        assert all(re.fullmatch(r, value) for r in param["regexes"]) == ok, value


# --------------------------------------------------------------------------- Orbax's own layout

ORBAX_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import jax, jax.numpy as jnp, numpy as np
    import orbax.checkpoint as ocp
    import tensorstore as ts
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    shapes, path = [tuple(s) for s in json.loads(sys.argv[1])], sys.argv[2]
    devices = jax.devices()
    n = len(devices)
    mesh = Mesh(np.array(devices), ("d",))

    def spec(shape):  # MaxText's shard_jax_weights rule, spelled as a PartitionSpec
        if shape and shape[0] % n == 0:
            return P("d")
        if len(shape) > 1 and shape[1] % n == 0:
            return P(None, "d")
        return P()

    tree = {
        f"a{i}": jax.device_put(jnp.zeros(s, jnp.bfloat16), NamedSharding(mesh, spec(s)))
        for i, s in enumerate(shapes)
    }
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=True, use_zarr3=True)
    ocp.Checkpointer(handler).save(path, args=ocp.args.PyTreeSave(tree))
    chunks = []
    for i in range(len(shapes)):
        store = ts.open({"driver": "zarr3", "kvstore": {"driver": "ocdbt", "base": "file://" + path + "/",
                                                        "path": f"a{i}/"}}).result()
        chunks.append(list(store.chunk_layout.write_chunk.shape or ()))
    print(json.dumps({"devices": n, "chunks": chunks}))
    """
)


def orbax_chunk_shapes(shapes: list[tuple[int, ...]], devices: int, tmp_dir: str) -> dict[tuple, tuple]:
    """shape -> the zarr chunk shape Orbax (default options, as MaxText saves) writes for it,
    sharded MaxText's way over `devices`."""
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
    }
    unique = sorted(set(shapes))
    path = os.path.join(tmp_dir, "orbax")
    out = subprocess.run(
        [sys.executable, "-c", ORBAX_SCRIPT, json.dumps(unique), path],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["devices"] == devices
    return {s: tuple(c) for s, c in zip(unique, result["chunks"], strict=True)}


# Shapes hitting every branch of the rule with 4 devices: axis 0, axis 1, replicated and split
# by replica-parallel (axis 2, 3), replicated whole, 1-d, 0-d.
RULE_SHAPES = [(8, 6), (6, 8), (3, 4, 7), (3, 3, 8), (3, 5, 6, 8), (6, 5), (3, 5, 7), (12,), (5,), ()]
DEVICES = 4


def _one_param_per_shape(shapes: list[tuple[int, ...]]) -> tuple[SourceModel, ModelMap]:
    """A model map with one plain (op-free) param per shape, each read from its own bf16 tensor."""
    rules, tensors, pos = [], {}, 8
    for i, shape in enumerate(shapes):
        key = f"w{i}"
        rules.append(ParamRule(f"p/{key}", key, shape))
        tensors[key] = TensorInfo(key, "f.safetensors", "BF16", shape, pos, math.prod(shape) * 2)
        pos += math.prod(shape) * 2
    return SourceModel("mem://shapes", {}, tensors, ["f.safetensors"], {}), ModelMap("synthetic", 0, tuple(rules), ())


def _fixture_plan(name: str, scan: bool, shard_count: int, budget: int = 256 * 2**20) -> tuple[Plan, SourceModel]:
    sm = load_source_model(open_source(os.path.join(FIXTURES, name)))
    model_map = model_maps.detect_family(sm.config).build(sm.config)
    return build_plan(sm, model_map, scan, "bfloat16", budget, shard_count=shard_count), sm


# GPT-OSS's fused gate_up_proj (and its MXFP4 blocks/scales/bias) is read once per half.
FUSED_TWICE = {k: 2 for k in ("gate_up_proj", "gate_up_proj_blocks", "gate_up_proj_scales", "gate_up_proj_bias")}


@pytest.fixture(scope="module")
def orbax_layout(tmp_path_factory):
    """Orbax's chunk shapes for RULE_SHAPES and every param shape of the fixtures tested here."""
    shapes = list(RULE_SHAPES)
    for name, scan in [("llama_bf16", True), ("gpt_oss_bf16", False)]:
        plan, _ = _fixture_plan(name, scan, 1)
        shapes += [a.shape for a in plan.arrays]
    return orbax_chunk_shapes(shapes, DEVICES, str(tmp_path_factory.mktemp("orbax")))


def test_rule_shapes_hit_every_branch():
    shards = [shard_shape(s, DEVICES) for s in RULE_SHAPES]
    axes = {
        next((a for a, (x, y) in enumerate(zip(s, h, strict=True)) if x != y), None)
        for s, h in zip(RULE_SHAPES, shards, strict=True)
    }
    assert axes == {0, 1, 2, 3, None}
    assert () in RULE_SHAPES and any(len(s) == 1 for s in RULE_SHAPES)


def test_planner_chunks_equal_orbax_chunks_for_every_rule_branch(orbax_layout):
    sm, model_map = _one_param_per_shape(RULE_SHAPES)
    plan = build_plan(sm, model_map, True, shard_count=DEVICES)
    check_plan(plan, sm)
    for array, shape in zip(plan.arrays, RULE_SHAPES, strict=True):
        assert array.shape == shape
        assert array.chunk_shape == orbax_layout[shape], (shape, array.chunk_shape, orbax_layout[shape])


@pytest.mark.parametrize("name, scan", [("llama_bf16", True), ("gpt_oss_bf16", False)])
def test_planner_chunks_equal_orbax_chunks_for_fixture_params(name, scan, orbax_layout):
    plan, sm = _fixture_plan(name, scan, DEVICES)
    check_real_plan(plan, sm, FUSED_TWICE)
    for array in plan.arrays:
        assert array.chunk_shape == orbax_layout[array.shape], array.name


# --------------------------------------------------------------------------- plans


@pytest.mark.parametrize("n", [2, 3, 4, 16])
@pytest.mark.parametrize("name", ["llama_bf16", "qwen3_moe_bf16", "deepseek3_fp8", "gpt_oss_mxfp4", "gemma2_bf16"])
def test_fixture_plans_are_exact_and_use_whole_shards(name, n):
    """With room in the budget every chunk is exactly one shard; items are unions of chunks."""
    for scan in (True, False):
        plan, sm = _fixture_plan(name, scan, n)
        check_real_plan(plan, sm, FUSED_TWICE)
        for array in plan.arrays:
            assert array.chunk_shape == shard_shape(array.shape, n), array.name


def test_one_shard_is_one_chunk_per_array():
    for scan in (True, False):
        plan, _ = _fixture_plan("deepseek3_fp8", scan, 1)
        assert all(a.chunk_shape == a.shape for a in plan.arrays)
        assert len(plan.items) == len(plan.arrays)


def test_small_budget_cuts_shards_further_within_the_shard():
    plan, sm = _fixture_plan("llama_bf16", True, 4, budget=20_000)
    check_real_plan(plan, sm)
    cut = 0
    for array in plan.arrays:
        shard = shard_shape(array.shape, 4)
        assert all(c <= s for c, s in zip(array.chunk_shape, shard, strict=True)), array.name
        cut += array.chunk_shape != shard
    assert cut > 0


def test_items_span_chunks_on_axes_they_cannot_cut():
    """A kernel split along its input axis (source columns) is written by items spanning it."""
    plan, _ = _fixture_plan("llama_bf16", True, 4)
    arrays = {a.name: a for a in plan.arrays}
    wi = arrays["params.params.decoder.layers.mlp.wi_0.kernel"]
    assert wi.shape == (64, 3, 160) and wi.chunk_shape == (16, 3, 160)
    (item,) = [i for i in plan.items if i.param == wi.name]
    assert item.region == ((0, 64), (0, 3), (0, 160))  # 4 chunks, one source read per layer


def test_deepseek3_fp8_items_start_on_scale_blocks_when_a_shard_does_not():
    """Unscanned DeepSeek-V3 with 112 devices: the dense (18432, 7168) and shared-expert
    (2048, 7168) down-proj kernels split along axis 1, where FP8 weight rows land, in 64-row
    shards, but scale blocks are 128 rows: each item takes two shards (an aligned union of
    chunks) and reads exactly its scale rows."""
    config = DEEPSEEK3_671B | {"n_routed_experts": 4, "num_hidden_layers": 4}
    sm = source_model(config, deepseek3_fp8_headers(config))
    model_map = model_maps.detect_family(config).build(config)
    plan = build_plan(sm, model_map, False, "bfloat16", 256 * 2**20, shard_count=112)
    check_real_plan(plan, sm)
    targets = {t.name: t for t in expand_targets(model_map, False)}
    wo = next(a for a in plan.arrays if a.name.endswith("dense_layers_0.mlp.wo.kernel"))
    assert wo.chunk_shape == (18432, 64)
    assert item_shape(targets[wo.name], wo.chunk_shape) == (18432, 128)
    spanning = 0
    for item in plan.items:
        for slab in item.slabs:
            if not slab.aux:
                continue
            full, scale, grid = sm.tensors[slab.source.key], slab.aux[0], sm.tensors[slab.aux[0].key]
            r0 = (slab.source.offset - full.offset) // (full.length // full.shape[0])
            s0 = (scale.offset - grid.offset) // (grid.length // grid.shape[0])
            assert r0 % 128 == 0 and (s0, s0 + scale.shape[0]) == (
                r0 // 128,
                math.ceil((r0 + slab.source.shape[0]) / 128),
            )
        chunk = next(a for a in plan.arrays if a.name == item.param).chunk_shape
        spanning += any(r > c for r, c in zip(item.region_shape, chunk, strict=True))
    assert spanning > 0


def test_plan_command_takes_shard_count(capsys):
    config = os.path.join(FIXTURES, "llama_bf16", "config.json")
    assert main(["plan", "--source", config, "--shard_count", "4"]) == 0
    out = capsys.readouterr().out
    plan, _ = _fixture_plan("llama_bf16", True, 4)
    assert re.search(rf"work items\s+{len(plan.items)}\b", out), out
    with pytest.raises(SystemExit):
        main(["plan", "--source", config, "--shard_count", "0"])


# --------------------------------------------------------------------------- end to end


def _zarr_chunks(out_dir: str, name: str, use_ocdbt: bool = True) -> tuple[int, ...]:
    """The chunk shape in a param's zarr metadata, read straight from the checkpoint."""
    items = os.path.join(out_dir, "0", "items")
    if use_ocdbt:
        kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{items}/"}).result()
        meta = json.loads(kv.read(f"{name}/zarr.json").result().value)
        return tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
    with open(os.path.join(items, name, ".zarray"), encoding="utf-8") as f:
        return tuple(json.load(f)["chunks"])


def test_conversion_writes_orbax_layout_and_same_values(out_dir, orbax_layout):
    """llama_bf16 with 4 shards: values equal the independent reference and every param's
    zarr.json has the chunk shape Orbax writes for that shape sharded over 4 devices."""
    convert(os.path.join(FIXTURES, "llama_bf16"), out_dir, "--shard_count", "4")
    assert_matches_reference(out_dir, os.path.join(FIXTURES, "llama_bf16"), scan=True)
    plan, _ = _fixture_plan("llama_bf16", True, 1)
    for array in plan.arrays:
        assert _zarr_chunks(out_dir, array.name) == orbax_layout[array.shape], array.name


def _convert_and_check(name: str, scan: bool, n: int, budget: int, out_dir: str, use_ocdbt: bool = True) -> Plan:
    """Convert with --shard_count n; values must equal the reference, chunks the plan's."""
    source = os.path.join(FIXTURES, name)
    layout = [] if use_ocdbt else ["--use_ocdbt=false", "--use_zarr3=false"]
    args = [f"--scan_layers={str(scan).lower()}", f"--shard_count={n}", f"--max_item_bytes={budget}", *layout]
    convert(source, out_dir, *args)
    assert_matches_reference(out_dir, source, scan=scan)
    plan, _ = _fixture_plan(name, scan, n, budget)
    for array in plan.arrays:
        assert _zarr_chunks(out_dir, array.name, use_ocdbt) == array.chunk_shape, array.name
    return plan


def test_fp8_items_spanning_row_shards_to_a_scale_block_restore_bit_exact(out_dir):
    """Unscanned deepseek3_fp8 on 64 devices: the dense down-proj kernel (160, 64) is split along
    axis 1, where FP8 weight rows land, into 1-row chunks; scale blocks are 16 rows, so each of
    its items writes 16 chunks and dequantizes with exactly its scale row."""
    plan = _convert_and_check("deepseek3_fp8", False, 64, 256 * 2**20, out_dir)
    wo = next(a for a in plan.arrays if a.name.endswith("dense_layers_0.mlp.wo.kernel"))
    assert (wo.shape, wo.chunk_shape) == ((160, 64), (160, 1))
    regions = [i.region for i in plan.items if i.param == wo.name]
    assert regions == [((0, 160), (r, r + 16)) for r in range(0, 64, 16)]


def test_shards_cut_by_the_budget_in_the_pathways_layout_restore_bit_exact(out_dir):
    """llama_bf16 on 4 devices at a 20 kB budget, zarr2 without OCDBT: chunks smaller than their
    shard, items spanning chunks, every chunk file present."""
    plan = _convert_and_check("llama_bf16", True, 4, 20_000, out_dir, use_ocdbt=False)
    arrays = {a.name: a for a in plan.arrays}
    assert any(a.chunk_shape != shard_shape(a.shape, 4) for a in plan.arrays)
    assert any(any(r > c for r, c in zip(i.region_shape, arrays[i.param].chunk_shape, strict=True)) for i in plan.items)


def test_stack_axes_split_into_shards_restore_bit_exact(out_dir):
    """qwen3_moe_bf16 on 4 devices: the expert axis (a stack axis, one source tensor per expert)
    is what the shards split."""
    plan = _convert_and_check("qwen3_moe_bf16", True, 4, 256 * 2**20, out_dir)
    wi = next(a for a in plan.arrays if a.name.endswith("moe_block.wi_0"))
    assert (wi.shape, wi.chunk_shape) == ((4, 3, 64, 32), (1, 3, 64, 32))
    assert [i.region[0] for i in plan.items if i.param == wi.name] == [(e, e + 1) for e in range(4)]


# --------------------------------------------------------------------------- provenance


def test_other_shard_count_is_not_up_to_date(tmp_path, out_dir, capsys):
    model = str(tmp_path / "model")
    shutil.copytree(os.path.join(FIXTURES, "llama_f32_sharded"), model)
    name = "params.params.token_embedder.embedding"

    convert(model, out_dir)
    with open(os.path.join(out_dir, "0", "ckptbeam_provenance.json"), encoding="utf-8") as f:
        assert "shard_count" not in json.load(f)["options"]  # records made before the option stay equal
    assert _zarr_chunks(out_dir, name) == (250, 64)
    assert convert(model, out_dir, "--shard_count", "1")["up_to_date"] is True

    capsys.readouterr()
    summary = convert(model, out_dir, "--shard_count", "4")
    assert "up_to_date" not in summary
    assert "option shard_count: None -> 4" in capsys.readouterr().out
    with open(os.path.join(out_dir, "0", "ckptbeam_provenance.json"), encoding="utf-8") as f:
        assert json.load(f)["options"]["shard_count"] == 4
    assert _zarr_chunks(out_dir, name) == (250, 16)
    assert_matches_reference(out_dir, model, scan=True)
    assert os.listdir(out_dir) == ["0"]

    assert convert(model, out_dir, "--shard_count", "4")["up_to_date"] is True
    assert "up_to_date" not in convert(model, out_dir)  # back to one chunk per array
    assert _zarr_chunks(out_dir, name) == (250, 64)
