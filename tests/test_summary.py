"""What convert, export and plan tell the user: --dry_run and --only list their selection, one
unit system per summary."""

from __future__ import annotations

import os
import re

from conftest import FIXTURES, convert, restore_leaves
from reference import expected_leaves

from pipelines.cli import main

LLAMA = os.path.join(FIXTURES, "llama_bf16")
LISTED = re.compile(r"^    (\S+)\s+\[[\d, ]*\] \w+$", re.M)


def _listed(text: str) -> set[str]:
    return set(LISTED.findall(text))


def _units(text: str) -> set[str]:
    """The byte units a text uses: decimal (kB, MB, GB, TB) and binary (KiB, MiB, GiB, TiB)."""
    return {"binary" if "i" in u else "decimal" for u in re.findall(r"\d\s?(KiB|MiB|GiB|TiB|kB|MB|GB|TB)\b", text)}


def test_dry_run_lists_every_param_it_would_write_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "o"
    convert(LLAMA, str(out), "--dry_run", "--scan_layers=false")
    text = capsys.readouterr().out
    assert _listed(text) == set(expected_leaves(LLAMA, False))
    assert not out.exists()


def test_only_lists_what_it_selected_in_a_real_run(tmp_path, capsys):
    out = tmp_path / "o"
    summary = convert(LLAMA, str(out), "--only", "decoder.layers.mlp.*,token_embedder.*")
    text = capsys.readouterr().out
    restored = set(restore_leaves(str(out))) - {"step"}
    assert _listed(text) == restored and len(restored) == summary["params"] == 4
    assert "params selected (4):" in text


def test_convert_summary_uses_one_unit_system(tmp_path, capsys):
    convert(LLAMA, str(tmp_path / "o"))
    assert _units(capsys.readouterr().out) == {"binary"}


def test_export_dry_run_lists_the_hf_tensors(tmp_path, capsys):
    from ckpt_transforms.safetensors_io.index import load_source_model
    from ckpt_transforms.storage.sources import open_source

    ckpt = tmp_path / "ckpt"
    convert(LLAMA, str(ckpt))
    capsys.readouterr()
    assert main(["export", "--source", str(ckpt), "--output", str(tmp_path / "hf"), "--dry_run"]) == 0
    text = capsys.readouterr().out
    source_keys = {k for k in load_source_model(open_source(LLAMA)).tensors if "rotary_emb" not in k}
    assert _listed(text) == source_keys
    assert not (tmp_path / "hf").exists()
    assert _units(text) == {"binary"}


def test_plan_only_lists_and_uses_one_unit_system(capsys):
    assert main(["plan", "--source", LLAMA, "--only", "decoder.layers.self_attention.*", "--worker_mb_s", "50"]) == 0
    text = capsys.readouterr().out
    assert _listed(text) == {
        f"params.params.decoder.layers.self_attention.{p}.kernel" for p in ("query", "key", "value", "out")
    }
    assert _units(text) == {"binary"}
