"""`ckptbeam plan`: planning from config.json alone matches planning from real headers."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from conftest import FIXTURE_NAMES, FIXTURES, GOLDEN, UNSCANNED_ONLY

import model_maps
from ckpt_transforms.planning.convert_plan import build_plan, item_working_bytes
from ckpt_transforms.safetensors_io.index import load_source_model
from ckpt_transforms.safetensors_io.synthetic import synthetic_source
from ckpt_transforms.storage.sources import open_source
from pipelines.cli import main
from pipelines.plan_cli import estimate_seconds, make_plan


def _layout(plan):
    # Plain float tensors may be stored in any float dtype (DeepSeek keeps its router bias in F32);
    # the synthesized headers use config.json's dtype, so only decoded (quantized) inputs pin one.
    def dtype(info, decoded):
        return info.dtype if decoded else "float"

    return [
        (i.param, i.region, [(s.source.key, dtype(s.source, bool(s.aux)), s.source.shape,
                              [(a.key, a.dtype, a.shape) for a in s.aux]) for s in i.slabs])
        for i in plan.items
    ]  # fmt: skip


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("fixture", FIXTURE_NAMES)
def test_synthesized_headers_plan_like_real_ones(fixture, scan):
    if scan and fixture in UNSCANNED_ONLY:
        pytest.skip("MaxText converts this model unscanned only")
    real = load_source_model(open_source(os.path.join(FIXTURES, fixture)))
    model_map = model_maps.detect_family(real.config).build(real.config)
    budget = 256 * 1024  # small enough to split most fixtures' stacks, big enough for one MXFP4 expert
    synthetic = synthetic_source(real.config, model_map, "config.json", scan)
    a = build_plan(real, model_map, scan, "bfloat16", budget)
    b = build_plan(synthetic, model_map, scan, "bfloat16", budget)
    assert _layout(a) == _layout(b)
    assert a.arrays == b.arrays


def test_deepseek_v3_from_config_alone_is_bounded_and_small_enough():
    config = os.path.join(GOLDEN, "deepseek_v3_config.json")
    budget = 256 * 2**20
    plan, synthesized = make_plan(config, None, True, "bfloat16", budget)
    assert synthesized
    assert all(item_working_bytes(i) <= budget for i in plan.items)
    assert 1_000 < len(plan.items) < 100_000  # thousands, not millions
    written = sum(i.bytes_written for i in plan.items)
    assert 1.2e12 < written < 1.5e12  # ~671B params in bf16
    assert estimate_seconds(plan, 32, 200) < estimate_seconds(plan, 8, 200)


def test_plan_command_on_a_directory_with_only_config(tmp_path, capsys):
    shutil.copy(os.path.join(FIXTURES, "qwen3_moe_bf16", "config.json"), tmp_path / "config.json")
    assert main(["plan", "--source", str(tmp_path), "--workers", "4"]) == 0
    out = capsys.readouterr().out
    assert "headers synthesized from config.json" in out and "estimate" in out
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["model_type"] == "qwen3_moe"
