"""Fuzzing the header and index reader: random mutations of a valid model directory.

For every mutation the reader either returns exactly the tensors the (mutated) files describe,
consistently, or raises one of our own errors; never another exception, and it never asks its
ByteSource for a byte outside a file (the source below asserts every range).
"""

from __future__ import annotations

import json
import math
import struct

import numpy as np
from helpers_safetensors import encode_file, layout
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckpt_transforms.planning.convert_plan import PlanError
from ckpt_transforms.safetensors_io.index import INDEX_FILE, MAX_HEADER_BYTES, load_source_model, read_file_header
from ckpt_transforms.storage.sources import SourceError, check_member_name
from ckpt_transforms.tensors.dtypes import SAFETENSORS_DTYPES
from model_maps.common import ConfigError

OUR_ERRORS = (SourceError, PlanError, ConfigError)
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class RangeCheckedSource:
    """An in-memory model directory that fails the test on any read outside a file."""

    def __init__(self, files: dict[str, bytes]):
        self.uri = "mem://model"
        self.files = files
        self.bytes_read = 0

    def exists(self, name: str) -> bool:
        return check_member_name(name) in self.files

    def size(self, name: str) -> int:
        if not self.exists(name):
            raise SourceError(f"{self.uri}/{name} not found")
        return len(self.files[name])

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        size = self.size(name)
        assert isinstance(offset, int) and isinstance(length, int)
        assert 0 <= offset and 0 <= length and offset + length <= size, (name, offset, length, size)
        self.bytes_read += length
        return self.files[name][offset : offset + length]

    def fingerprint(self, name: str) -> dict:
        return {"size": self.size(name)}


def valid_shard(seed: int, prefix: str) -> bytes:
    rng = np.random.default_rng(seed)
    header, data = layout(
        {
            f"{prefix}.w": rng.standard_normal((2, 3)).astype(np.float32),
            f"{prefix}.b": rng.integers(0, 9, (4,)).astype(np.int64),
            f"{prefix}.u": np.arange(3, dtype=np.uint8).reshape(3, 1),
            f"{prefix}.s": np.array(1.5, np.float16),
        },
        metadata={"format": "pt"},
    )
    return encode_file(header, data)


SHARD = valid_shard(0, "a")


def reference_tensors(data: bytes) -> dict[str, tuple]:
    """What the file describes, by an independent reading (stdlib json): key -> (dtype, shape, offset, length)."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    out = {}
    for key, info in header.items():
        if key != "__metadata__":
            begin, end = info["data_offsets"]
            out[key] = (info["dtype"], tuple(info["shape"]), 8 + n + begin, end - begin)
    return out


def assert_consistent(data: bytes, tensors: dict) -> None:
    """Accepted files are described exactly and their tensors tile the data buffer."""
    ref = reference_tensors(data)
    got = {k: (t.dtype, t.shape, t.offset, t.length) for k, t in tensors.items()}
    assert got == ref
    (n,) = struct.unpack("<Q", data[:8])
    pos = 8 + n
    for _, _shape, offset, length in sorted(ref.values(), key=lambda r: r[2]):
        assert offset == pos
        pos += length
    assert pos == len(data)
    for dtype, shape, _, length in ref.values():
        assert math.prod(shape) * SAFETENSORS_DTYPES[dtype][1] == 8 * length


def read_mutated(data: bytes) -> dict | None:
    source = RangeCheckedSource({"model.safetensors": data})
    try:
        tensors = read_file_header(source, "model.safetensors")
    except OUR_ERRORS:
        return None
    finally:
        assert source.bytes_read <= 8 + min(len(data), MAX_HEADER_BYTES)
    assert_consistent(data, tensors)
    return tensors


# --------------------------------------------------------------------------- byte mutations

byte_mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, len(SHARD) - 1), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, len(SHARD) - 1), st.just(0)),
    st.tuples(st.just("extend"), st.binary(min_size=1, max_size=16), st.just(0)),
    st.tuples(st.just("splice"), st.integers(0, len(SHARD)), st.binary(min_size=1, max_size=8)),
)


def mutate_bytes(data: bytes, mutations: list) -> bytes:
    b = bytearray(data)
    for kind, a, c in mutations:
        if kind == "flip" and a < len(b):
            b[a] ^= c
        elif kind == "truncate":
            del b[a:]
        elif kind == "extend":
            b += a
        elif kind == "splice":
            b[a:a] = c
    return bytes(b)


@FUZZ
@given(st.lists(byte_mutation, min_size=1, max_size=3))
def test_byte_mutations_give_the_described_tensors_or_our_error(mutations):
    data = mutate_bytes(SHARD, mutations)
    tensors = read_mutated(data)
    (n,) = struct.unpack("<Q", SHARD[:8])
    if tensors is not None and data[: 8 + n] == SHARD[: 8 + n]:
        # Only the data buffer changed (and kept its size): exactly the valid tensors.
        assert tensors == read_file_header(RangeCheckedSource({"model.safetensors": SHARD}), "model.safetensors")


# --------------------------------------------------------------------------- JSON field mutations

json_value = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
HEADER = json.loads(SHARD[8 : 8 + struct.unpack("<Q", SHARD[:8])[0]])
DATA = SHARD[8 + struct.unpack("<Q", SHARD[:8])[0] :]
KEYS = sorted(HEADER)
FIELDS = ("dtype", "shape", "data_offsets")


def near(value):
    """Small changes of a valid field: what a subtly lying header looks like."""
    if isinstance(value, list):
        return st.lists(st.integers(-2, 40) | st.booleans(), min_size=0, max_size=len(value) + 1)
    return st.sampled_from(sorted(SAFETENSORS_DTYPES) + ["F31", "", "bf16"])


field_mutation = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(KEYS), st.sampled_from(FIELDS), json_value),
    st.tuples(st.just("near"), st.sampled_from(KEYS), st.sampled_from(FIELDS), st.data()),
    st.tuples(st.just("drop"), st.sampled_from(KEYS), st.sampled_from(FIELDS), st.none()),
    st.tuples(st.just("replace_entry"), st.sampled_from(KEYS), st.none(), json_value),
    st.tuples(st.just("rename"), st.sampled_from(KEYS), st.none(), st.text(max_size=6)),
)


def mutate_header(header: dict, mutations: list) -> dict:
    h = json.loads(json.dumps(header))
    for kind, key, field, value in mutations:
        if key not in h:
            continue
        if kind == "replace_entry":
            h[key] = value
        elif kind == "rename":
            h[value] = h.pop(key)
        elif not isinstance(h[key], dict):
            continue
        elif kind == "set":
            h[key][field] = value
        elif kind == "near" and field in h[key]:
            h[key][field] = value.draw(near(h[key][field]))
        elif kind == "drop":
            h[key].pop(field, None)
    return h


@FUZZ
@given(st.lists(field_mutation, min_size=1, max_size=3), st.integers(0, 16))
def test_json_field_mutations_give_the_described_tensors_or_our_error(mutations, padding):
    header = mutate_header(HEADER, mutations)
    raw = json.dumps(header).encode() + b" " * padding
    read_mutated(struct.pack("<Q", len(raw)) + raw + DATA)


# --------------------------------------------------------------------------- index files

SHARDS = {
    "model-1.safetensors": valid_shard(1, "model.layers.0"),
    "model-2.safetensors": valid_shard(2, "model.layers.1"),
}
WEIGHT_MAP = {k: name for name, data in SHARDS.items() for k in reference_tensors(data)}
INDEX = {"metadata": {"total_size": 0}, "weight_map": WEIGHT_MAP}
CONFIG = json.dumps({"model_type": "llama", "num_hidden_layers": 2}).encode()


def valid_model() -> dict:
    source = RangeCheckedSource({"config.json": CONFIG, INDEX_FILE: json.dumps(INDEX).encode(), **SHARDS})
    return load_source_model(source).tensors


VALID = valid_model()

index_mutation = st.one_of(
    st.tuples(st.just("shard"), st.sampled_from(sorted(WEIGHT_MAP)), json_value),
    st.tuples(
        st.just("shard"),
        st.sampled_from(sorted(WEIGHT_MAP)),
        st.sampled_from(
            ["../model-1.safetensors", "/model-1.safetensors", "model-2.safetensors", "model-3.safetensors", ""]
        ),
    ),
    st.tuples(st.just("drop"), st.sampled_from(sorted(WEIGHT_MAP)), st.none()),
    st.tuples(st.just("add"), st.text(max_size=8), st.sampled_from(sorted(SHARDS))),
    st.tuples(st.just("weight_map"), st.none(), json_value),
)


def mutate_index(mutations: list) -> dict:
    index = json.loads(json.dumps(INDEX))
    for kind, key, value in mutations:
        wm = index["weight_map"]
        if kind == "weight_map":
            index["weight_map"] = value
        elif not isinstance(wm, dict):
            continue
        elif kind in ("shard", "add"):
            wm[key] = value
        elif kind == "drop":
            wm.pop(key, None)
    return index


def load_mutated(index_bytes: bytes) -> dict | None:
    source = RangeCheckedSource({"config.json": CONFIG, INDEX_FILE: index_bytes, **SHARDS})
    try:
        return load_source_model(source).tensors
    except OUR_ERRORS:
        return None


@FUZZ
@given(st.lists(index_mutation, min_size=1, max_size=3))
def test_index_mutations_give_the_indexed_tensors_or_our_error(mutations):
    index = mutate_index(mutations)
    tensors = load_mutated(json.dumps(index).encode())
    if tensors is not None:
        # The index is the authority: exactly its keys, each read from the valid shard it names.
        assert set(tensors) == set(index["weight_map"])
        assert all(tensors[k] == VALID[k] for k in tensors)


@FUZZ
@given(st.lists(byte_mutation, min_size=1, max_size=3))
def test_index_byte_mutations_give_the_indexed_tensors_or_our_error(mutations):
    raw = mutate_bytes(json.dumps(INDEX).encode(), mutations)
    tensors = load_mutated(raw)
    if tensors is not None:
        index = json.loads(raw)
        assert set(tensors) == set(index["weight_map"])
        assert all(tensors[k] == VALID[k] for k in tensors)
