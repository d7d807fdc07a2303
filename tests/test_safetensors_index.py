"""Header/index reader: exact byte ranges and precise SourceErrors on malformed input."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from helpers_safetensors import (
    FIXTURES,
    NP_DTYPES,
    encode_file,
    fixture_tensors,
    read_header,
    write_raw,
    write_tensors,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from ckpt_transforms.safetensors_io.index import (
    MAX_HEADER_BYTES,
    TensorInfo,
    load_source_model,
    read_file_header,
)
from ckpt_transforms.storage.sources import SourceError, open_source

CONFIG = {"model_type": "llama", "hidden_size": 8}


def model_dir(tmp_path: Path, config: dict | None = CONFIG) -> Path:
    d = tmp_path / "model"
    d.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (d / "config.json").write_text(json.dumps(config))
    return d


def read_bytes(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def load(d: Path):
    return load_source_model(open_source(str(d)))


# --------------------------------------------------------------------------- valid files


def assert_ranges_match_safetensors(path: Path, tensors: dict[str, TensorInfo]) -> None:
    """Reading each (offset, length) with numpy gives exactly what safetensors itself returns."""
    with safe_open(str(path), framework="np") as f:
        assert sorted(tensors) == sorted(f.keys())
        for key, info in tensors.items():
            expected = f.get_tensor(key)
            raw = read_bytes(path, info.offset, info.length)
            assert len(raw) == info.length == expected.nbytes
            got = np.frombuffer(raw, dtype=NP_DTYPES[info.dtype].newbyteorder("<")).reshape(info.shape)
            assert info.shape == expected.shape
            assert got.dtype == expected.dtype
            np.testing.assert_array_equal(got, expected)


def test_library_written_file_gives_exact_ranges(tmp_path):
    d = model_dir(tmp_path)
    rng = np.random.default_rng(0)
    arrays = {
        "w.f32": rng.standard_normal((5, 7)).astype(np.float32),
        "w.f16": rng.standard_normal((3, 2, 4)).astype(np.float16),
        "b.i64": np.arange(9, dtype=np.int64),
        "c.u8": np.arange(13, dtype=np.uint8).reshape(13, 1),
        "scalar": np.array(3.5, dtype=np.float64),
        "empty": np.zeros((0, 4), dtype=np.float32),
    }
    safetensors.numpy.save_file(arrays, str(d / "model.safetensors"), metadata={"format": "np"})
    model = load(d)
    assert model.files == ["model.safetensors"]
    assert model.config == CONFIG
    assert set(model.tensors) == set(arrays)
    for key, info in model.tensors.items():
        assert info.key == key
        assert info.file == "model.safetensors"
    assert_ranges_match_safetensors(d / "model.safetensors", model.tensors)
    # Absolute offsets: independently, data starts at 8 + header length.
    header, start = read_header(d / "model.safetensors")
    for key, info in model.tensors.items():
        b, e = header[key]["data_offsets"]
        assert (info.offset, info.length) == (start + b, e - b)
    assert model.file_fingerprints["model.safetensors"]["size"] == (d / "model.safetensors").stat().st_size


def test_hand_written_file_with_bf16_and_metadata(tmp_path):
    d = model_dir(tmp_path)
    x = np.linspace(-3, 3, 24, dtype=np.float32).reshape(4, 6).astype(ml_dtypes.bfloat16)
    y = np.arange(6, dtype=np.int32)
    write_tensors(d / "model.safetensors", {"x": x, "y": y}, metadata={"format": "pt", "note": "hi"})
    model = load(d)
    hdr_len = struct.unpack("<Q", (d / "model.safetensors").read_bytes()[:8])[0]
    assert model.tensors["x"] == TensorInfo("x", "model.safetensors", "BF16", (4, 6), 8 + hdr_len, 48)
    assert model.tensors["y"] == TensorInfo("y", "model.safetensors", "I32", (6,), 8 + hdr_len + 48, 24)
    raw = read_bytes(d / "model.safetensors", model.tensors["x"].offset, 48)
    np.testing.assert_array_equal(np.frombuffer(raw, ml_dtypes.bfloat16).reshape(4, 6), x)


_DTYPES = st.sampled_from([np.float32, np.float16, np.float64, np.int8, np.int16, np.int32, np.int64, np.uint8])
_ARRAYS = st.builds(
    lambda shape, dt, seed: np.asarray(np.random.default_rng(seed).standard_normal(shape) * 50).astype(dt),
    st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple),
    _DTYPES,
    st.integers(0, 2**32 - 1),
)


@settings(max_examples=30, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(arrays=st.dictionaries(st.text("abcdefgh._", min_size=1, max_size=8), _ARRAYS, min_size=1, max_size=6))
def test_random_library_files_give_exact_ranges(tmp_path, arrays):
    path = tmp_path / "model.safetensors"
    safetensors.numpy.save_file(arrays, str(path))
    tensors = read_file_header(open_source(str(tmp_path)), "model.safetensors")
    assert_ranges_match_safetensors(path, tensors)


def test_sharded_fixture_follows_index():
    d = FIXTURES / "llama_f32_sharded"
    model = load(d)
    weight_map = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(model.tensors) == set(weight_map)
    assert model.files == sorted(set(weight_map.values()))
    for key, info in model.tensors.items():
        assert info.file == weight_map[key]
    for file in model.files:
        assert_ranges_match_safetensors(d / file, {k: v for k, v in model.tensors.items() if v.file == file})


def test_row_range_matches_numpy_rows(tmp_path):
    d = model_dir(tmp_path)
    a = np.arange(5 * 3, dtype=np.float32).reshape(5, 3)
    b = np.arange(4 * 2 * 3, dtype=np.int16).reshape(4, 2, 3)
    c = np.arange(7, dtype=np.float64)
    s = np.array(1.25, dtype=np.float32)
    write_tensors(d / "model.safetensors", {"s": s, "a": a, "b": b, "c": c})
    t = load(d).tensors
    path = d / "model.safetensors"
    # Independent expectations: a row of `a` is 3 * 4 bytes.
    assert t["a"].row_range(1, 4) == (t["a"].offset + 12, 36)
    assert t["a"].row_range(0, 5) == (t["a"].offset, t["a"].length)
    assert t["a"].row_range(2, 2)[1] == 0
    for key, arr in (("a", a), ("b", b), ("c", c)):
        n = arr.shape[0]
        for start in range(n + 1):
            for stop in range(start, n + 1):
                off, length = t[key].row_range(start, stop)
                assert read_bytes(path, off, length) == arr[start:stop].tobytes(), (key, start, stop)
    assert t["s"].row_range(0, 1) == (t["s"].offset, 4)


# --------------------------------------------------------------------------- malformed files


def write_model(tmp_path: Path, header, data: bytes = b"", header_len: int | None = None) -> tuple[Path, Path]:
    d = model_dir(tmp_path)
    path = write_raw(d / "model.safetensors", header, data, header_len)
    return d, path


def expect_source_error(d: Path, *fragments: str) -> str:
    with pytest.raises(SourceError) as exc:
        load(d)
    msg = str(exc.value)
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in {msg!r}"
    return msg


F32_2x3 = {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}


def test_header_length_beyond_file_size(tmp_path):
    d, path = write_model(tmp_path, {"a": F32_2x3}, bytes(24), header_len=10_000)
    size = path.stat().st_size
    expect_source_error(d, str(path), "10000", str(size))


def test_header_length_over_limit(tmp_path):
    d, path = write_model(tmp_path, {"a": F32_2x3}, bytes(24), header_len=MAX_HEADER_BYTES + 1)
    expect_source_error(d, str(path), str(MAX_HEADER_BYTES + 1))


@pytest.mark.parametrize("size", [0, 3, 7])
def test_file_shorter_than_length_field(tmp_path, size):
    d = model_dir(tmp_path)
    path = d / "model.safetensors"
    path.write_bytes(b"\x01" * size)
    expect_source_error(d, str(path), f"{size} bytes")


def test_truncated_data(tmp_path):
    d, path = write_model(tmp_path, {"a": F32_2x3}, bytes(10))
    header_len = len(json.dumps({"a": F32_2x3}, separators=(",", ":")))
    described = 8 + header_len + 24
    actual = 8 + header_len + 10
    assert path.stat().st_size == actual
    expect_source_error(d, str(path), str(described), str(actual))


def test_trailing_bytes(tmp_path):
    d, path = write_model(tmp_path, {"a": F32_2x3}, bytes(24 + 3))
    expect_source_error(d, str(path), str(path.stat().st_size - 3), str(path.stat().st_size))


def test_gap_between_tensors(tmp_path):
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]},
    }
    d, path = write_model(tmp_path, header, bytes(20))
    expect_source_error(d, str(path), "'b'", "12", "8", "gap or overlap")


def test_gap_before_first_tensor(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    d, path = write_model(tmp_path, header, bytes(12))
    expect_source_error(d, str(path), "'a'", "gap or overlap")


def test_overlapping_tensors(tmp_path):
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    d, path = write_model(tmp_path, header, bytes(12))
    expect_source_error(d, str(path), "'b'", "gap or overlap")


def test_duplicate_ranges_are_overlap(tmp_path):
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "I32", "shape": [2], "data_offsets": [0, 8]},
    }
    d, path = write_model(tmp_path, header, bytes(8))
    expect_source_error(d, str(path), "gap or overlap")


@pytest.mark.parametrize(
    "dtype, shape, offsets",
    [
        ("F32", [2, 3], [0, 20]),  # too short
        ("F32", [2, 3], [0, 28]),  # too long
        ("BF16", [2, 3], [0, 24]),  # right length for F32, wrong for BF16
        ("F64", [0], [0, 8]),  # empty tensor with bytes
        ("F32", [2, 3], [24, 0]),  # reversed
    ],
)
def test_wrong_byte_length_for_shape_and_dtype(tmp_path, dtype, shape, offsets):
    data_len = max(offsets)
    d, path = write_model(
        tmp_path, {"bad.weight": {"dtype": dtype, "shape": shape, "data_offsets": offsets}}, bytes(data_len)
    )
    expect_source_error(d, str(path), "'bad.weight'", dtype)


def test_negative_offsets(tmp_path):
    d, path = write_model(tmp_path, {"neg": {"dtype": "U8", "shape": [4], "data_offsets": [-4, 0]}}, b"")
    expect_source_error(d, str(path), "'neg'")


@pytest.mark.parametrize("dtype", ["F31", "float32", "", "f32"])
def test_unknown_dtype(tmp_path, dtype):
    d, path = write_model(tmp_path, {"x.weight": {"dtype": dtype, "shape": [2], "data_offsets": [0, 8]}}, bytes(8))
    expect_source_error(d, str(path), "'x.weight'", repr(dtype), "dtype")


def test_unhashable_dtype_is_a_source_error(tmp_path):
    d, path = write_model(tmp_path, {"x.weight": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}, bytes(8))
    expect_source_error(d, str(path), "'x.weight'")


@pytest.mark.parametrize(
    "shape",
    [[-1, 2], [2.0], "2", [[2]], None],
)
def test_invalid_shape(tmp_path, shape):
    d, path = write_model(tmp_path, {"x": {"dtype": "U8", "shape": shape, "data_offsets": [0, 2]}}, bytes(2))
    expect_source_error(d, str(path), "'x'", "shape")


@pytest.mark.parametrize("offsets", [[0], [0, 2, 4], "0,2", [0.0, 2.0], None])
def test_invalid_data_offsets(tmp_path, offsets):
    d, path = write_model(tmp_path, {"x": {"dtype": "U8", "shape": [2], "data_offsets": offsets}}, bytes(2))
    expect_source_error(d, str(path), "'x'", "data_offsets")


@pytest.mark.parametrize("missing", ["dtype", "shape", "data_offsets"])
def test_tensor_entry_missing_field(tmp_path, missing):
    entry = {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}
    del entry[missing]
    d, path = write_model(tmp_path, {"x": entry}, bytes(2))
    expect_source_error(d, str(path), "'x'")


@pytest.mark.parametrize(
    "raw",
    [b"{not json", b'{"a": {"dtype": "F32",', b"", b"\xff\xfe{}", b"  "],
)
def test_non_json_header(tmp_path, raw):
    d, path = write_model(tmp_path, raw, b"")
    expect_source_error(d, str(path), "JSON")


@pytest.mark.parametrize("header", [b"[1, 2]", b'"just a string"', b"3", b"null"])
def test_header_not_an_object(tmp_path, header):
    d, path = write_model(tmp_path, header, b"")
    expect_source_error(d, str(path), "JSON object")


@pytest.mark.parametrize("metadata", [{"format": 1}, {"format": "pt", "n": None}, {"x": ["a"]}, ["format"], "pt"])
def test_metadata_with_non_string_value(tmp_path, metadata):
    d, path = write_model(tmp_path, {"__metadata__": metadata, "a": F32_2x3}, bytes(24))
    expect_source_error(d, str(path), "__metadata__")


def test_metadata_strings_and_empty_file_are_fine(tmp_path):
    d, path = write_model(tmp_path, {"__metadata__": {"format": "pt"}}, b"")
    model = load(d)
    assert model.tensors == {}
    assert path.stat().st_size == len(encode_file({"__metadata__": {"format": "pt"}}))


def test_header_padded_with_spaces_is_fine(tmp_path):
    raw = json.dumps({"a": F32_2x3}).encode() + b"    "
    d, path = write_model(tmp_path, raw, bytes(24))
    info = load(d).tensors["a"]
    assert (info.offset, info.length) == (8 + len(raw), 24)


# --------------------------------------------------------------------------- directories and indexes


def write_index(d: Path, weight_map: dict) -> Path:
    path = d / "model.safetensors.index.json"
    path.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return path


@pytest.mark.parametrize(
    "shard",
    ["../x.safetensors", "/abs.safetensors", "a/../../b", "a/./b.safetensors", "a\\..\\b", "", "a//b"],
)
def test_index_shard_name_escapes_dir(tmp_path, shard):
    d = model_dir(tmp_path)
    write_tensors(d / "model-1.safetensors", {"ok": np.zeros(2, np.float32)})
    # Put a real file outside the model dir so only the name check can stop the read.
    write_tensors(tmp_path / "x.safetensors", {"evil": np.zeros(2, np.float32)})
    write_index(d, {"ok": "model-1.safetensors", "evil": shard})
    expect_source_error(d, "'evil'", repr(shard))


@pytest.mark.parametrize("shard", [5, None, ["a"]])
def test_index_shard_name_not_a_string(tmp_path, shard):
    d = model_dir(tmp_path)
    write_index(d, {"k": shard})
    expect_source_error(d, "'k'", repr(shard))


def test_index_shard_escape_names_index_file(tmp_path):
    d = model_dir(tmp_path)
    write_index(d, {"evil": "../x.safetensors"})
    expect_source_error(d, "model.safetensors.index.json")


def test_index_key_absent_from_its_shard(tmp_path):
    d = model_dir(tmp_path)
    write_tensors(d / "model-1.safetensors", {"a": np.zeros(2, np.float32)})
    write_tensors(d / "model-2.safetensors", {"b": np.zeros(3, np.float32)})
    index = write_index(d, {"a": "model-1.safetensors", "b": "model-2.safetensors", "ghost": "model-2.safetensors"})
    expect_source_error(d, str(index), "'ghost'", "model-2.safetensors")


def test_index_key_in_the_other_shard_is_absent(tmp_path):
    """The index places 'b' in shard 1, but shard 1 does not hold it (shard 2 does)."""
    d = model_dir(tmp_path)
    write_tensors(d / "model-1.safetensors", {"a": np.zeros(2, np.float32)})
    write_tensors(d / "model-2.safetensors", {"b": np.zeros(3, np.float32)})
    write_index(d, {"a": "model-1.safetensors", "b": "model-1.safetensors"})
    expect_source_error(d, "'b'", "model-1.safetensors")


def test_index_is_the_authority_for_duplicated_keys(tmp_path):
    d = model_dir(tmp_path)
    write_tensors(d / "model-1.safetensors", {"a": np.zeros(2, np.float32), "dup": np.zeros(1, np.float32)})
    write_tensors(d / "model-2.safetensors", {"dup": np.ones(5, np.float32)})
    write_index(d, {"a": "model-1.safetensors", "dup": "model-2.safetensors"})
    model = load(d)
    assert model.tensors["dup"].file == "model-2.safetensors"
    assert model.tensors["dup"].shape == (5,)


def test_index_shard_missing_on_disk(tmp_path):
    d = model_dir(tmp_path)
    write_index(d, {"a": "model-9.safetensors"})
    expect_source_error(d, "model-9.safetensors")


@pytest.mark.parametrize("weight_map", [{}, None, ["a"], "x"])
def test_index_without_weight_map(tmp_path, weight_map):
    d = model_dir(tmp_path)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    expect_source_error(d, "model.safetensors.index.json", "weight_map")


def test_index_not_json(tmp_path):
    d = model_dir(tmp_path)
    (d / "model.safetensors.index.json").write_text("{oops")
    expect_source_error(d, str(d / "model.safetensors.index.json"), "JSON")


def test_malformed_shard_error_names_shard(tmp_path):
    d = model_dir(tmp_path)
    write_tensors(d / "model-1.safetensors", {"a": np.zeros(2, np.float32)})
    write_raw(d / "model-2.safetensors", {"b": F32_2x3}, bytes(5))
    write_index(d, {"a": "model-1.safetensors", "b": "model-2.safetensors"})
    expect_source_error(d, str(d / "model-2.safetensors"))


def test_missing_config_json(tmp_path):
    d = model_dir(tmp_path, config=None)
    write_tensors(d / "model.safetensors", {"a": np.zeros(2, np.float32)})
    expect_source_error(d, str(d / "config.json"), "not found")


@pytest.mark.parametrize("text", ["{bad", "[1, 2]", "\xff"])
def test_bad_config_json(tmp_path, text):
    d = model_dir(tmp_path, config=None)
    (d / "config.json").write_bytes(text.encode("latin-1"))
    write_tensors(d / "model.safetensors", {"a": np.zeros(2, np.float32)})
    expect_source_error(d, str(d / "config.json"))


def test_directory_with_only_a_bin_file(tmp_path):
    d = model_dir(tmp_path)
    (d / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not really a zip")
    msg = expect_source_error(d, str(d), "model.safetensors", ".bin")
    assert "model.safetensors.index.json" in msg


def test_source_dir_does_not_exist(tmp_path):
    with pytest.raises(SourceError, match="nope"):
        open_source(str(tmp_path / "nope"))


def test_unsupported_scheme():
    with pytest.raises(SourceError, match="zz"):
        open_source("zz://bucket/model")


def test_fixture_headers_agree_with_independent_reader():
    for name in ("llama_bf16", "qwen2_f16_untied"):
        d = FIXTURES / name
        model = load(d)
        ref = fixture_tensors(name)
        assert set(model.tensors) == set(ref)
        for key, info in model.tensors.items():
            raw = read_bytes(d / info.file, info.offset, info.length)
            assert raw == ref[key].tobytes()
