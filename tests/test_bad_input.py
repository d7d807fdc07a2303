"""Bad input: a clear error naming the file/key, and nothing published at OUT."""

from __future__ import annotations

import json
import os
import shutil
import struct

import pytest
from conftest import FIXTURES, convert

from ckpt_transforms.storage.sources import SourceError
from model_maps import UnknownModelError
from pipelines.graph import ConvertWorkItem


@pytest.fixture
def model(tmp_path):
    """A writable copy of a single-file fixture."""
    dst = tmp_path / "model"
    shutil.copytree(os.path.join(FIXTURES, "qwen3_bf16_tied"), dst)
    return dst


@pytest.fixture
def sharded(tmp_path):
    dst = tmp_path / "sharded"
    shutil.copytree(os.path.join(FIXTURES, "llama_f32_sharded"), dst)
    return dst


def _header(path) -> tuple[int, dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return n, json.loads(data[8 : 8 + n]), data[8 + n :]


def _write(path, header: dict, body: bytes) -> None:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def _drop_tensor(path, key: str) -> None:
    _, header, body = _header(path)
    begin, end = header.pop(key)["data_offsets"]
    for info in header.values():
        if isinstance(info, dict) and "data_offsets" in info and info["data_offsets"][0] >= end:
            info["data_offsets"] = [o - (end - begin) for o in info["data_offsets"]]
    _write(path, header, body[:begin] + body[end:])


def _assert_nothing_published(out_dir: str) -> None:
    assert not os.path.exists(os.path.join(out_dir, "0"))
    leftovers = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    assert leftovers == [], f"staging leftovers: {leftovers}"


def test_missing_config_json(model, out_dir):
    (model / "config.json").unlink()
    with pytest.raises(SourceError, match=r"config\.json not found"):
        convert(str(model), out_dir)
    _assert_nothing_published(out_dir)


def test_unknown_model_type(model, out_dir):
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(model_type="falcon", architectures=["FalconForCausalLM"])
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnknownModelError, match="model_type='falcon'"):
        convert(str(model), out_dir)
    _assert_nothing_published(out_dir)


def test_unknown_model_name(model, out_dir):
    with pytest.raises(UnknownModelError, match="gpt-7"):
        convert(str(model), out_dir, "--model=gpt-7")


def test_missing_tensor(model, out_dir):
    _drop_tensor(model / "model.safetensors", "model.layers.1.mlp.up_proj.weight")
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight'.*missing"):
        convert(str(model), out_dir)
    _assert_nothing_published(out_dir)


def test_extra_tensor_is_reported(model, out_dir):
    n, header, body = _header(model / "model.safetensors")
    end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    header["model.layers.0.mlp.mystery.weight"] = {"dtype": "BF16", "shape": [2], "data_offsets": [end, end + 4]}
    _write(model / "model.safetensors", header, body + b"\0" * 4)
    with pytest.raises(ValueError, match=r"mystery\.weight.*model\.safetensors"):
        convert(str(model), out_dir)
    _assert_nothing_published(out_dir)


def test_wrong_shape(model, out_dir):
    cfg = json.loads((model / "config.json").read_text())
    cfg["intermediate_size"] = 128  # the file holds 160
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"gate_proj\.weight.*model\.safetensors.*shape \[160, 64\].*\[128, 64\]"):
        convert(str(model), out_dir)
    _assert_nothing_published(out_dir)


def test_truncated_shard(sharded, out_dir):
    shard = sorted(p for p in sharded.iterdir() if p.suffix == ".safetensors")[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(SourceError, match=rf"{shard.name}.*truncated"):
        convert(str(sharded), out_dir)
    _assert_nothing_published(out_dir)


def test_header_length_beyond_file_size(model, out_dir):
    path = model / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(data) * 2) + data[8:])
    with pytest.raises(SourceError, match=r"model\.safetensors: header length \d+ runs past the end"):
        convert(str(model), out_dir)
    _assert_nothing_published(out_dir)


@pytest.mark.parametrize("evil", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_shard_name_escaping_the_directory(sharded, out_dir, evil):
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = evil
    index_path.write_text(json.dumps(index))
    with pytest.raises(SourceError, match="escapes the model directory"):
        convert(str(sharded), out_dir)
    _assert_nothing_published(out_dir)


def test_symlinked_shard_outside_the_directory_is_refused(sharded, tmp_path, out_dir):
    shard = sorted(p for p in sharded.iterdir() if p.suffix == ".safetensors")[0]
    outside = tmp_path / "outside.safetensors"
    shutil.move(shard, outside)
    shard.symlink_to(outside)
    with pytest.raises(SourceError, match="escapes the model directory"):
        convert(str(sharded), out_dir)


class AlwaysFails(ConvertWorkItem):
    def start_attempt(self, item, db_id):
        if item.param.endswith("wo.kernel"):
            raise OSError("disk on fire")
        return super().start_attempt(item, db_id)


def test_failure_during_conversion_publishes_nothing(model, out_dir):
    with pytest.raises(Exception, match="disk on fire"):
        convert(str(model), out_dir, "--no_resume", convert_fn=AlwaysFails)
    _assert_nothing_published(out_dir)
