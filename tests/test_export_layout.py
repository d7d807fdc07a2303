"""The safetensors layout of an export, and the ops on parts of an array, against independent oracles."""

from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from ckpt_transforms.safetensors_io.layout import (
    TensorSpec,
    contiguous_runs,
    index_json,
    parse_shard_size,
    plan_shards,
    shard_layout,
)
from ckpt_transforms.tensors.ops import MergeAxes, PadAxis, RopeHalves, SplitAxis, Transpose, TruncateAxis

NP = {"BF16": ml_dtypes.bfloat16, "F32": np.float32, "F16": np.float16, "I64": np.int64, "U8": np.uint8}

names = st.text(alphabet="abcxyz._0123456789", min_size=1, max_size=12).filter(lambda s: s != "__metadata__")
tensor_sets = st.dictionaries(
    names,
    st.tuples(st.sampled_from(sorted(NP)), st.lists(st.integers(0, 4), max_size=3)),
    min_size=1,
    max_size=6,
)


@settings(max_examples=60, deadline=None)
@given(tensor_sets)
def test_header_and_offsets_are_what_the_official_writer_produces(tmp_path_factory, tensors):
    arrays = {k: np.arange(int(np.prod(s)), dtype=np.float32).astype(NP[d]).reshape(s) for k, (d, s) in tensors.items()}
    path = tmp_path_factory.mktemp("st") / "ref.safetensors"
    save_file(arrays, str(path), metadata={"format": "pt"})
    reference = path.read_bytes()
    layout = shard_layout("model.safetensors", [TensorSpec(k, d, tuple(s)) for k, (d, s) in tensors.items()])
    assert reference[: len(layout.header)] == layout.header
    assert layout.size == len(reference)
    for key, array in arrays.items():
        start = layout.offsets[key]
        assert reference[start : start + array.nbytes] == array.tobytes()


def test_shards_follow_sorted_keys_and_the_size_limit():
    specs = [TensorSpec(f"model.layers.{i}.w", "BF16", (10,)) for i in (0, 1, 10, 2)]  # 20 bytes each
    shards = plan_shards(specs, max_shard_size=45)
    assert [s.file for s in shards] == [f"model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    assert [t.key for t in shards[0].tensors] == ["model.layers.0.w", "model.layers.1.w"]
    assert [t.key for t in shards[1].tensors] == ["model.layers.10.w", "model.layers.2.w"]
    index = json.loads(index_json(shards))
    assert index["metadata"]["total_size"] == 80
    assert index["weight_map"]["model.layers.2.w"] == "model-00002-of-00002.safetensors"
    one = plan_shards(specs)
    assert [s.file for s in one] == ["model.safetensors"] and index_json(one) is None
    (n,) = struct.unpack("<Q", one[0].header[:8])
    assert (8 + n) % 8 == 0


@pytest.mark.parametrize(
    "text,expected",
    [("5GB", 5 * 10**9), ("3GiB", 3 * 2**30), ("500MB", 5 * 10**8), ("1000", 1000), ("1.5GB", 15 * 10**8)],
)
def test_shard_sizes_use_huggingface_units(text, expected):
    assert parse_shard_size(text) == expected


@pytest.mark.parametrize("bad", ["", "5 parsecs", "-1GB", "0"])
def test_bad_shard_sizes_are_refused(bad):
    with pytest.raises(ValueError):
        parse_shard_size(bad)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=1, max_size=4), st.data())
def test_a_box_is_written_by_its_runs(shape, data):
    """Writing a box's C-ordered bytes run by run gives what numpy's box assignment gives."""
    box = []
    for n in shape:
        a = data.draw(st.integers(0, n - 1))
        box.append((a, data.draw(st.integers(a + 1, n))))
    values = np.arange(int(np.prod([b - a for a, b in box])), dtype=np.int32) + 1
    expected = np.zeros(shape, np.int32)
    expected[tuple(slice(a, b) for a, b in box)] = values.reshape([b - a for a, b in box])
    flat = bytearray(expected.size * 4)
    starts, run = contiguous_runs(tuple(shape), tuple(box), 4)
    raw = values.tobytes()
    assert len(starts) * run == len(raw)
    for i, s in enumerate(starts):
        flat[s : s + run] = raw[i * run : (i + 1) * run]
    assert bytes(flat) == expected.tobytes()


PART_CASES = [
    (Transpose(), (4, 6), 0, (1, 3)),
    (Transpose(), (4, 6), 1, (2, 6)),
    (Transpose((1, 2, 0)), (3, 4, 5), 2, (0, 2)),
    (MergeAxes(1, (-1, 3)), (2, 4, 3), 1, (1, 3)),
    (SplitAxis(0, (-1, 3)), (12, 2), 0, (3, 9)),
    (RopeHalves(), (5, 8), 0, (1, 4)),
    (TruncateAxis(0, 5, 8), (8, 2), 0, (2, 7)),
    (TruncateAxis(0, 5, 8), (8, 2), 0, (6, 8)),
    (PadAxis(0, 9, 6), (6, 2), 0, (2, 6)),
    (PadAxis(0, 9, 6), (6, 2), 0, (0, 3)),
]


@pytest.mark.parametrize("op,shape,axis,rng", PART_CASES)
def test_an_op_on_a_part_gives_that_part_of_the_whole_result(op, shape, axis, rng):
    x = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
    whole = op.apply(x)
    index = [slice(None)] * len(shape)
    index[axis] = slice(*rng)
    out_axis, (a, b) = op.map_range(axis, shape, rng)
    part = op.for_part(axis, shape, rng).apply(x[tuple(index)])
    out_index = [slice(None)] * whole.ndim
    out_index[out_axis] = slice(a, b)
    np.testing.assert_array_equal(part, whole[tuple(out_index)])


def test_parts_that_cannot_map_to_one_range_are_refused():
    assert RopeHalves().map_range(1, (5, 8), (0, 4)) is None  # the rotary axis is permuted
    assert MergeAxes(0, (-1, 3)).map_range(1, (4, 3), (0, 2)) is None  # part of the inner axis
