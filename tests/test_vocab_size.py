"""--vocab_size N (MaxText's option): the embedding, and an untied logits_dense, get N rows.

MaxText builds its embedding [vocab_size, emb] and logits_dense [emb, vocab_size] from its config
and cannot load other row counts, so a checkpoint converted for `vocab_size=N` must have exactly
those shapes: HF's rows, then zeros (or the first N rows), computed here independently with numpy
(reference.with_vocab_rows) and compared bit for bit after an orbax restore.
"""

from __future__ import annotations

import json
import os
import re

import ml_dtypes
import numpy as np
import pytest
from conftest import FIXTURE_NAMES, FIXTURES, UNSCANNED_ONLY, assert_bitwise_equal, convert, restore_leaves
from helpers_safetensors import fixture_config, fixture_tensors, rewrite_fixture
from reference import expected_leaves

import model_maps
from ckpt_transforms.planning.convert_plan import build_plan
from ckpt_transforms.safetensors_io.index import load_source_model
from ckpt_transforms.storage.provenance import differences
from ckpt_transforms.storage.sources import open_source
from ckpt_transforms.tensors.ops import apply_chain, invert_chain
from model_maps.common import ConfigError
from pipelines.cli import main
from pipelines.convert import make_plan
from pipelines.options import ConvertOptions

P = "params.params."
EMBED, HEAD = P + "token_embedder.embedding", P + "decoder.logits_dense.kernel"
BF16 = np.dtype(ml_dtypes.bfloat16)


def assert_converts_like_reference(source: str, out_dir: str, vocab_size: int, *args: str, scan: bool = True) -> dict:
    summary = convert(source, out_dir, f"--vocab_size={vocab_size}", f"--scan_layers={str(scan).lower()}", *args)
    restored = restore_leaves(out_dir)
    assert restored.pop("step") == 0
    expected = expected_leaves(source, scan, vocab_size=vocab_size)
    assert sorted(restored) == sorted(expected)
    for name, value in expected.items():
        assert_bitwise_equal(restored[name], value, name)
    assert restored[EMBED].shape[0] == vocab_size
    if HEAD in restored:
        assert restored[HEAD].shape[1] == vocab_size
    return summary


# --------------------------------------------------------------------------- conversions


@pytest.mark.parametrize(
    "fixture, vocab_size, budget",
    [
        ("llama_bf16", 300, "24KiB"),  # untied: embedding and head padded, row-split into items
        ("llama_bf16", 200, "24KiB"),  # untied: both cut below HF's 250
        ("qwen3_bf16_tied", 256, None),
        ("qwen3_bf16_tied", 100, None),
        ("gemma3_mm_bf16", 320, "24KiB"),  # scaled by bf16 sqrt(hidden), then resized
        ("gemma3_mm_bf16", 7, None),
        ("olmo3_bf16", 256, None),
        ("deepseek3_fp8", 260, None),  # rounded like the dequantize script, then resized
        ("gpt_oss_mxfp4", 240, None),
    ],
)
def test_convert_with_vocab_size_matches_numpy_resize(fixture, vocab_size, budget, out_dir):
    args = (f"--max_item_bytes={budget}",) if budget else ()
    assert_converts_like_reference(os.path.join(FIXTURES, fixture), out_dir, vocab_size, *args)


def test_gemma4_small_resizes_the_embedding_not_the_per_layer_embedding(out_dir):
    """MaxText sizes embed_tokens_per_layer by vocab_size_per_layer_input, not vocab_size."""
    source = os.path.join(FIXTURES, "gemma4_small_bf16")
    assert_converts_like_reference(source, out_dir, 256, scan=False)
    per_layer = restore_leaves(out_dir)[P + "decoder.per_layer_embedder.embed_tokens_per_layer"]
    assert per_layer.shape[0] == fixture_config("gemma4_small_bf16")["text_config"]["vocab_size_per_layer_input"]


@pytest.fixture(scope="module")
def gemma2_official_vocab(tmp_path_factory) -> str:
    """The gemma2 fixture with the official 256000-row vocabulary (hidden 64: 33 MB of bf16)."""
    config = fixture_config("gemma2_bf16") | {"vocab_size": 256000}
    emb = fixture_tensors("gemma2_bf16")["model.embed_tokens.weight"]
    rng = np.random.default_rng(0)
    big = (0.02 * rng.standard_normal((256000, emb.shape[1]), dtype=np.float32)).astype(BF16)
    big[: emb.shape[0]] = emb
    path = tmp_path_factory.mktemp("gemma2") / "official"
    return str(rewrite_fixture("gemma2_bf16", path, replace={"model.embed_tokens.weight": big}, config=config))


def test_gemma2_default_still_pads_the_official_vocabulary(gemma2_official_vocab, out_dir, capsys):
    summary = convert(gemma2_official_vocab, out_dir, "--max_item_bytes=8MiB")
    restored = restore_leaves(out_dir)
    expected = expected_leaves(gemma2_official_vocab, True)
    assert restored[EMBED].shape == (256128, 64)
    assert_bitwise_equal(restored[EMBED], expected[EMBED], EMBED)
    assert summary["vocab"]["run_with_vocab_size"] is False  # 256128 is every gemma2 config's vocab_size
    out = capsys.readouterr().out
    assert "vocab_size      256128 (config.json: 256000; rows 256000..256127 zero-padded)" in out
    assert "MaxText needs" not in out and "override_model_config" not in out


@pytest.mark.parametrize("vocab_size", [256000, 1000])
def test_gemma2_vocab_size_overrides_the_official_padding(gemma2_official_vocab, out_dir, capsys, vocab_size):
    summary = assert_converts_like_reference(gemma2_official_vocab, out_dir, vocab_size, "--max_item_bytes=8MiB")
    out = capsys.readouterr().out
    assert (
        f"MaxText needs   vocab_size={vocab_size} override_model_config=true (every gemma2 model config says 256128)"
        in out
    )
    assert f"load_parameters_path={summary['output']} vocab_size={vocab_size} override_model_config=true" in out
    if vocab_size < 256000:
        assert "TRUNCATED: rows 1000..255999 dropped" in out
        assert summary["bytes_read"] < 256000 * 64 * 2  # rows past 1000 are never read


# --------------------------------------------------------------------------- every family's map


def _resized_plan(fixture: str, vocab_size: int | None):
    source = load_source_model(open_source(os.path.join(FIXTURES, fixture)))
    family = model_maps.detect_family(source.config)
    model_map = family.build(source.config, vocab_size=vocab_size)
    # Small enough to cut the embedding and head into items, big enough for one MXFP4 expert.
    budget = (256 if fixture == "gpt_oss_mxfp4" else 64) * 1024
    return build_plan(source, model_map, fixture not in UNSCANNED_ONLY, "bfloat16", budget), model_map


def _hf_vocab(fixture: str) -> int:
    config = fixture_config(fixture)
    return int(config.get("text_config", config)["vocab_size"])


def _bytes_read(plan, names) -> dict[str, int]:
    out = dict.fromkeys(names, 0)
    for item in plan.items:
        if item.param in out:
            out[item.param] += sum(s.source.length for s in item.slabs)
    return out


@pytest.mark.parametrize("fixture", FIXTURE_NAMES)
def test_every_family_resizes_the_vocabulary_reading_only_existing_rows(fixture):
    hf = _hf_vocab(fixture)
    default, _ = _resized_plan(fixture, None)
    shapes = {a.name: a.shape for a in default.arrays}
    vocab_params = [n for n in (EMBED, HEAD) if n in shapes]
    others = [n for n in shapes if n not in vocab_params]
    for rows in (hf + 37, hf - 50):
        plan, model_map = _resized_plan(fixture, rows)
        resized = {a.name: a.shape for a in plan.arrays}
        assert resized[EMBED] == (rows,) + shapes[EMBED][1:]
        if HEAD in shapes:
            assert resized[HEAD] == shapes[HEAD][:-1] + (rows,)
        assert {n: resized[n] for n in others} == {n: shapes[n] for n in others}
        assert _bytes_read(plan, others) == _bytes_read(default, others)
        # The vocabulary params read each existing row they keep once; an item wholly in the
        # padding reads one row (no empty reads) and drops it.
        full = _bytes_read(default, vocab_params)
        for name, read in _bytes_read(plan, vocab_params).items():
            row_bytes = full[name] // hf
            items = [i for i in plan.items if i.param == name]
            row_axis = 0 if name == EMBED else len(resized[name]) - 1
            padding_only = sum(1 for i in items if i.region[row_axis][0] >= hf)
            assert read == (min(rows, hf) + padding_only) * row_bytes, name
            assert all(s.source.length > 0 for i in items for s in i.slabs)
        assert (
            model_maps.vocab_summary(model_maps.detect_family(plan_config(fixture)), None, model_map)["vocab_size"]
            == rows
        )


def plan_config(fixture: str) -> dict:
    return fixture_config(fixture)


@pytest.mark.parametrize("fixture", ["llama_bf16", "qwen3_bf16_tied", "gemma2_bf16", "gemma3_mm_bf16"])
@pytest.mark.parametrize("delta", [6, -50])
def test_export_builds_the_map_with_the_checkpoints_rows_and_inverts_to_hf(fixture, delta):
    """Export calls family.build(hf_config, vocab_size=<checkpoint rows>): the inverse chain maps
    the checkpoint's rows back to config.json's vocab_size (zeros where rows were cut)."""
    config, hf = fixture_config(fixture), _hf_vocab(fixture)
    family = model_maps.detect_family(config)
    model_map = family.build(config, vocab_size=hf + delta)
    rules = [
        r for r in model_map.global_rules if r.target in ("token_embedder/embedding", "decoder/logits_dense/kernel")
    ]
    assert rules
    rng = np.random.default_rng(3)
    for rule in rules:
        x = rng.standard_normal(rule.source_shape).astype(np.float32)
        y = apply_chain(x, rule.ops)
        assert y.shape == rule.slab_shape and hf + delta in y.shape
        back = apply_chain(y, invert_chain(rule.ops))
        assert back.shape == rule.source_shape
        keep = min(hf, hf + delta)
        np.testing.assert_allclose(back[:keep], x[:keep], rtol=1e-6)
        assert not back[keep:].any()


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "300"])
def test_build_refuses_a_vocab_size_that_is_not_a_row_count(bad):
    config = fixture_config("llama_bf16")
    with pytest.raises(ConfigError, match="vocab_size"):
        model_maps.detect_family(config).build(config, vocab_size=bad)


def test_maxtext_vocab_table_matches_maxtexts_model_configs():
    """Every MaxText name in the registry has its configs/models/<name>.yml vocab_size (checked
    against MaxText's sources when they are at hand)."""
    names = {n for f in model_maps.FAMILIES for n in f.maxtext_names}
    assert names - set(model_maps.MAXTEXT_VOCAB_SIZES) == {"qwen3-coder-480b-a35b"}  # no model config
    models = "/tmp/maxtext-src/src/maxtext/configs/models"
    if not os.path.isdir(models):
        pytest.skip("MaxText sources not at /tmp/maxtext-src")
    for name, size in model_maps.MAXTEXT_VOCAB_SIZES.items():
        with open(os.path.join(models, name.replace("-Instruct", "") + ".yml"), encoding="utf-8") as f:
            (value,) = re.findall(r"^vocab_size:\s*([\d_]+)", f.read(), re.M)
        assert int(value.replace("_", "")) == size, name


# --------------------------------------------------------------------------- summary, plan, provenance, options


def test_plan_prints_the_vocab_size_maxtext_must_be_run_with(capsys):
    config = os.path.join(FIXTURES, "qwen3_bf16_tied", "config.json")
    assert main(["plan", "--source", config, "--vocab_size", "300"]) == 0
    out = capsys.readouterr().out
    assert "vocab_size      300 (config.json: 250; rows 250..299 zero-padded)" in out
    assert "MaxText needs   vocab_size=300 override_model_config=true (every qwen3 model config says 151936)" in out

    assert main(["plan", "--source", config, "--model", "qwen3-4b"]) == 0  # HF's own 250 rows
    out = capsys.readouterr().out
    assert "MaxText needs   vocab_size=250 override_model_config=true (qwen3-4b's config says 151936)" in out
    assert "  vocab_size      " not in out


def test_unknown_maxtext_default_compares_with_config_json(capsys, out_dir):
    """Llama's MaxText configs disagree (32000, 128256): say it only when the rows change."""
    source = os.path.join(FIXTURES, "llama_bf16")
    convert(source, out_dir, "--dry_run")
    assert "MaxText needs" not in capsys.readouterr().out
    convert(source, out_dir, "--dry_run", "--vocab_size", "256")
    out = capsys.readouterr().out
    assert "MaxText needs   vocab_size=256 override_model_config=true (rows differ from config.json's 250)" in out
    assert main(["plan", "--source", source, "--model", "llama3.1-8b"]) == 0
    assert "(llama3.1-8b's config says 128256)" in capsys.readouterr().out
    assert not os.path.exists(out_dir)


def test_provenance_records_vocab_size_only_when_set():
    source = os.path.join(FIXTURES, "llama_bf16")
    _, default = make_plan(ConvertOptions(["--source", source]))
    _, same = make_plan(ConvertOptions(["--source", source, "--vocab_size", "250"]))
    _, padded = make_plan(ConvertOptions(["--source", source, "--vocab_size", "256"]))
    assert "vocab_size" not in default["options"]  # records written before the option stay equal
    assert padded["options"]["vocab_size"] == 256
    assert differences(default, padded) == ["option vocab_size: None -> 256"]
    assert differences(padded, same) == ["option vocab_size: 256 -> 250"]


@pytest.mark.parametrize("value", ["0", "-1", "1.5", "abc", ""])
@pytest.mark.parametrize("command", ["convert", "plan"])
def test_bad_vocab_size_is_an_argparse_error(command, value, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [command, "--source", os.path.join(FIXTURES, "llama_bf16"), "--vocab_size", value]
    if command == "convert":
        argv += ["--output", str(out)]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "--vocab_size" in capsys.readouterr().err
    assert not out.exists()


def test_help_and_template_parameter():
    from test_dataflow_template import _convert_options

    assert "MaxText's vocab_size" in _convert_options()["vocab_size"].help
    with open(os.path.join(FIXTURES, "..", "..", "dataflow_templates", "metadata.json"), encoding="utf-8") as f:
        (param,) = [p for p in json.load(f)["parameters"] if p["name"] == "vocab_size"]
    assert param["isOptional"]
    for value, ok in [("1", True), ("262144", True), ("0", False), ("-2", False), ("1.5", False), ("01", False)]:
        assert all(re.fullmatch(r, value) for r in param["regexes"]) == ok, value
