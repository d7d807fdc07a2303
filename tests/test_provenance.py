"""Provenance records: equal for the same inputs, and each kind of change is named."""

from __future__ import annotations

import os
import shutil

from conftest import FIXTURES

from ckpt_transforms.safetensors_io.index import load_source_model
from ckpt_transforms.storage.provenance import differences, provenance_record
from ckpt_transforms.storage.sources import open_source

OPTIONS = {"scan_layers": True, "save_dtype": "bfloat16", "max_item_bytes": 1 << 28}


def _record(path: str, **overrides) -> dict:
    source = load_source_model(open_source(path))
    return provenance_record(source, "llama", "1", {**OPTIONS, **overrides})


def test_same_inputs_same_record():
    path = os.path.join(FIXTURES, "llama_f32_sharded")
    assert differences(_record(path), _record(path)) == []


def test_each_change_is_named(tmp_path):
    path = tmp_path / "m"
    shutil.copytree(os.path.join(FIXTURES, "llama_bf16"), path)
    before = _record(str(path))
    assert differences(None, before) == ["no provenance recorded"]
    assert differences(before, _record(str(path), scan_layers=False)) == ["option scan_layers: True -> False"]

    shard = path / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data)  # same bytes, new mtime: a rewritten file counts as changed
    os.utime(shard, ns=(1, 1))
    reasons = differences(before, _record(str(path)))
    assert len(reasons) == 1 and reasons[0].startswith("file model.safetensors:")

    cfg = path / "config.json"
    cfg.write_text(cfg.read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05'))
    assert any(r.startswith("config_sha256") for r in differences(before, _record(str(path))))
