"""DeepSeek-V3 (671B) as a sparse source: real safetensors files and index, data never written.

The module writes the whole model once (~139 shards, ~689 GB apparent, a few MB on disk), reads
it back with the real header reader, plans all of it, then fills a handful of tensors with random
values and really converts them (`--only`), checking the restored arrays bit for bit against an
expectation computed here from the raw bytes with tests/reference.py's independent FP8 decoder.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct

import numpy as np
import pytest
from conftest import FIXTURES, GOLDEN, assert_bitwise_equal, convert, restore_leaves
from reference import BF16, RAW_DTYPES, _kernel, fp8_dequantize
from test_plan_moe import check_real_plan

import model_maps
from ckpt_transforms.planning.convert_plan import DEFAULT_MAX_ITEM_BYTES, PlanError, build_plan, item_working_bytes
from ckpt_transforms.safetensors_io.index import INDEX_FILE, load_source_model
from ckpt_transforms.safetensors_io.synthetic import disk_usage, fill_tensors, supports_sparse_files, write_sparse_model
from ckpt_transforms.storage.provenance import PROVENANCE_FILE
from ckpt_transforms.storage.sources import open_source

with open(os.path.join(GOLDEN, "deepseek_v3_config.json"), encoding="utf-8") as f:
    CONFIG = json.load(f)
FAMILY = model_maps.detect_family(CONFIG)
MiB = 2**20

# --only: one MoE layer's FP8 attention projections (wkv_a has 576 rows: a partial edge scale
# block), every norm of that layer (one pattern, 4 params) and its F32 router bias.
ONLY = (
    "decoder.moe_layers_0.self_attention.wq_a.kernel,"
    "*.moe_layers_0.self_attention.wkv_a.kernel,"
    "decoder.moe_layers_0.*_norm.scale,"
    "params.params.decoder.moe_layers_0.DeepSeekMoeBlock_0.MoeBlock_0.gate.bias"
)
P = "params.params.decoder.moe_layers_0."
SELECTED = {
    P + "self_attention.wq_a.kernel",
    P + "self_attention.wkv_a.kernel",
    P + "self_attention.q_norm.scale",
    P + "self_attention.kv_norm.scale",
    P + "pre_self_attention_layer_norm.scale",
    P + "post_self_attention_layer_norm.scale",
    P + "DeepSeekMoeBlock_0.MoeBlock_0.gate.bias",
}
H = "model.layers.3."  # moe_layers_0 is HF layer first_k_dense_replace = 3
FP8_KEYS = (H + "self_attn.q_a_proj.weight", H + "self_attn.kv_a_proj_with_mqa.weight")
PLAIN_KEYS = (
    H + "self_attn.q_a_layernorm.weight",
    H + "self_attn.kv_a_layernorm.weight",
    H + "input_layernorm.weight",
    H + "post_attention_layernorm.weight",
    H + "mlp.gate.e_score_correction_bias",
)
FILLED = (*FP8_KEYS, *(k + "_scale_inv" for k in FP8_KEYS), *PLAIN_KEYS)


@pytest.fixture(scope="module")
def sparse_v3(tmp_path_factory) -> tuple[str, dict]:
    directory = str(tmp_path_factory.mktemp("dsv3") / "hf")
    if not supports_sparse_files(directory):
        pytest.skip(f"{directory}: the file system does not keep holes; the source would take ~700 GB")
    return directory, write_sparse_model(directory, CONFIG, FAMILY.build)


@pytest.fixture(scope="module")
def source(sparse_v3):
    return load_source_model(open_source(sparse_v3[0]))


@pytest.fixture(scope="module")
def unscanned(source):
    return build_plan(source, FAMILY.build(CONFIG), False)


def read_raw(model_dir: str, key: str) -> tuple[str, np.ndarray]:
    """One tensor via the index and its shard's header, parsed here (not by ckptbeam's reader)."""
    with open(os.path.join(model_dir, INDEX_FILE), encoding="utf-8") as f:
        shard = json.load(f)["weight_map"][key]
    with open(os.path.join(model_dir, shard), "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        info = json.loads(f.read(n))[key]
        begin, end = info["data_offsets"]
        f.seek(8 + n + begin)
        data = f.read(end - begin)
    return info["dtype"], np.frombuffer(data, RAW_DTYPES[info["dtype"]]).reshape(info["shape"])


def test_sparse_source_is_full_size_but_takes_no_disk(sparse_v3, source):
    directory, infos = sparse_v3
    apparent, allocated = disk_usage(directory)
    assert apparent > 680e9, apparent  # DeepSeek-V3 FP8 + scales + MTP layer: ~689 GB
    assert allocated < 64 * MiB, allocated  # headers only; the data regions are holes
    with open(os.path.join(directory, INDEX_FILE), encoding="utf-8") as f:
        index = json.load(f)
    assert index["metadata"]["total_size"] == sum(i.length for i in infos.values())
    assert len(source.files) > 100 and set(index["weight_map"].values()) == set(source.files)
    # The real reader finds exactly the ranges the writer laid out.
    assert source.tensors == infos
    t = source.tensors
    assert (t[FP8_KEYS[0]].dtype, t[FP8_KEYS[0]].shape) == ("F8_E4M3", (1536, 7168))
    assert (t[FP8_KEYS[0] + "_scale_inv"].dtype, t[FP8_KEYS[0] + "_scale_inv"].shape) == ("F32", (12, 56))
    assert t[FP8_KEYS[1] + "_scale_inv"].shape == (5, 56)  # 576 rows: ceil(576 / 128)
    assert (t["model.embed_tokens.weight"].dtype, t["model.embed_tokens.weight"].shape) == ("BF16", (129280, 7168))
    assert (t[H + "mlp.gate.e_score_correction_bias"].dtype, t[H + "input_layernorm.weight"].dtype) == ("F32", "BF16")
    assert t["model.layers.60.mlp.experts.255.down_proj.weight"].shape == (7168, 2048)
    assert t["model.layers.61.mlp.experts.255.down_proj.weight_scale_inv"].shape == (56, 16)  # the MTP layer
    assert t["model.layers.61.shared_head.head.weight"].shape == (129280, 7168)


def test_671b_plan_from_real_headers_is_bounded_and_exact(source, unscanned):
    model_map = FAMILY.build(CONFIG)
    plan = build_plan(source, model_map, True)
    check_real_plan(plan, source)  # every item <= budget, every chunk once, every byte read once
    assert max(item_working_bytes(i) for i in plan.items) <= DEFAULT_MAX_ITEM_BYTES
    mtp = {k for k in source.tensors if k.startswith("model.layers.61.")}
    assert set(plan.unused_source_keys) == mtp and len(mtp) > 256 * 6
    assert len(plan.arrays) == 3 + 12 + 17  # globals + dense layer + MoE layer params, stacked
    assert sum(i.bytes_read for i in plan.items) == sum(i.length for k, i in source.tensors.items() if k not in mtp)
    assert plan.summary()["params_total"] == 32 and plan.summary()["only"] == []
    # Thousands of items, not tens of thousands: the FP8 experts, whose one-slab dequantization
    # scratch is over half the budget, are not cut into rows to overlap (that would be ~91k items).
    assert 12_000 < len(plan.items) < 14_000

    assert len(unscanned.arrays) == 3 + 3 * 12 + 58 * 17
    assert all(item_working_bytes(i) <= DEFAULT_MAX_ITEM_BYTES for i in unscanned.items)
    assert sum(i.bytes_read for i in unscanned.items) == sum(i.bytes_read for i in plan.items)


def test_only_keeps_matching_params_and_still_validates_the_whole_source(source, unscanned):
    model_map = FAMILY.build(CONFIG)
    plan = build_plan(source, model_map, False, only=ONLY.split(","))
    assert {a.name for a in plan.arrays} == {i.param for i in plan.items} == SELECTED
    assert plan.params_total == 1025 and plan.summary()["params"] == len(SELECTED)
    assert [i.item_id for i in plan.items] == list(range(len(plan.items)))
    read = {info.key for item in plan.items for slab in item.slabs for info in (slab.source, *slab.aux)}
    assert read == set(FILLED)
    # Chunks are what the full plan chooses for the same params.
    full = {a.name: a for a in unscanned.arrays}
    assert all(full[a.name] == a for a in plan.arrays)

    # A tensor missing (or unexpected) far from the selection still fails the plan.
    missing = dict(source.tensors)
    del missing["model.layers.50.mlp.experts.7.up_proj.weight"]
    with pytest.raises(PlanError, match="experts.7.up_proj.weight' .*missing"):
        build_plan(dataclasses.replace(source, tensors=missing), model_map, False, only=ONLY.split(","))
    extra = dict(source.tensors)
    extra["model.layers.40.mlp.experts.999.up_proj.weight"] = source.tensors[FP8_KEYS[0]]
    with pytest.raises(PlanError, match="not used by the deepseek3 map"):
        build_plan(dataclasses.replace(source, tensors=extra), model_map, False, only=ONLY.split(","))


def test_only_pattern_matching_nothing_is_a_clear_error(source):
    model_map = FAMILY.build(CONFIG)
    with pytest.raises(PlanError) as e:
        build_plan(source, model_map, False, only=["decoder.moe_layers_0.*", "decoder.layers_3.*"])
    message = str(e.value)
    assert "--only pattern 'decoder.layers_3.*' matches none of the 1025 params" in message
    assert "params.params.decoder." in message  # shows real names to copy from
    with pytest.raises(PlanError, match="matches none of the 32 params"):
        build_plan(source, model_map, True, only=["decoder.moe_layers_0.*"])  # scanned: no per-layer names


def test_only_converts_a_subset_of_671b_bit_exactly(sparse_v3, tmp_path, capsys):
    directory, infos = sparse_v3
    before = disk_usage(directory)[1]
    written = fill_tensors(directory, infos, FILLED, seed=3)
    assert written == sum(infos[k].length for k in FILLED)
    assert disk_usage(directory)[1] - before < written + 16 * MiB  # only the filled ranges got blocks

    out = str(tmp_path / "out")
    # A 16 MiB budget cuts the FP8 projections into 128-row slabs (the last one of wkv_a partial).
    summary = convert(directory, out, "--scan_layers", "false", "--only", ONLY, "--max_item_bytes", "16MiB")
    assert (summary["params"], summary["params_total"]) == (len(SELECTED), 1025)
    assert summary["work_items"] > len(SELECTED)
    printed = capsys.readouterr().out
    assert f"converted {len(SELECTED)} of 1025 params" in printed and "partial checkpoint" in printed

    restored = restore_leaves(out)
    assert restored.pop("step") == 0
    assert set(restored) == SELECTED  # the partial checkpoint holds exactly the selected params

    block = tuple(CONFIG["quantization_config"]["weight_block_size"])
    expected = {}
    for target, key in (("wq_a", FP8_KEYS[0]), ("wkv_a", FP8_KEYS[1])):
        dtype, bits = read_raw(directory, key)
        _, scale = read_raw(directory, key + "_scale_inv")
        assert dtype == "F8_E4M3" and (scale > 0).all() and (bits & 0x7F != 0x7F).all()  # finite codes
        expected[f"{P}self_attention.{target}.kernel"] = _kernel(fp8_dequantize(bits, scale, block))
    norms = ("self_attention.q_norm", "self_attention.kv_norm", "pre_self_attention_layer_norm")
    for name, key in zip((*norms, "post_self_attention_layer_norm"), PLAIN_KEYS[:4], strict=True):
        expected[f"{P}{name}.scale"] = read_raw(directory, key)[1]  # BF16, taken as it is
    dtype, bias = read_raw(directory, PLAIN_KEYS[-1])
    assert dtype == "F32"
    expected[P + "DeepSeekMoeBlock_0.MoeBlock_0.gate.bias"] = bias.astype(BF16)  # round to nearest even
    assert set(expected) == SELECTED
    for name, value in expected.items():
        assert np.count_nonzero(value.astype(np.float32)) > value.size // 2, name  # real data, not the hole
        assert_bitwise_equal(restored[name], value, name)

    with open(os.path.join(out, "0", PROVENANCE_FILE), encoding="utf-8") as f:
        assert json.load(f)["options"]["only"] == ONLY.split(",")


def test_only_is_recorded_in_provenance_only_when_set(capsys):
    """Records without --only stay equal to earlier ones; a partial one differs from a whole one."""
    from apache_beam.options.pipeline_options import PipelineOptions

    from ckpt_transforms.storage.provenance import differences
    from pipelines.convert import make_plan
    from pipelines.options import ConvertOptions
    from pipelines.plan_cli import plan_command

    fixture = os.path.join(FIXTURES, "deepseek3_fp8")

    def options(*args: str) -> ConvertOptions:
        return PipelineOptions(["--source", fixture, "--output", "unused", *args]).view_as(ConvertOptions)

    _, whole = make_plan(options())
    assert "only" not in whole["options"]
    plan, partial = make_plan(options("--only", " decoder.moe_layers.* ,"))
    assert partial["options"]["only"] == ["decoder.moe_layers.*"] and plan.params_total == 32
    assert differences(partial, whole) == ["option only: ['decoder.moe_layers.*'] -> None"]

    assert plan_command(["--source", fixture, "--only", "decoder.moe_layers.*"]) == 0
    assert f"params          {len(plan.arrays)} of 32 (partial checkpoint" in capsys.readouterr().out


def test_only_never_silently_replaces_a_whole_checkpoint(tmp_path):
    fixture = os.path.join(FIXTURES, "deepseek3_fp8")
    out = str(tmp_path / "out")
    convert(fixture, out)
    with pytest.raises(FileExistsError, match="is a whole checkpoint; --only would replace it"):
        convert(fixture, out, "--only", "decoder.moe_layers.*")
    assert "decoder.dense_layers.mlp.wo.kernel" in {n.removeprefix("params.params.") for n in restore_leaves(out)}
