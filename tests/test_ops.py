"""Ops: exact inverses, shapes, independent formulas, and axis mapping vs. slicing."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckpt_transforms.tensors.ops import (
    MergeAxes,
    PadAxis,
    RopeHalves,
    RopeInterleave,
    ScaleBySqrt,
    SplitAxis,
    Transpose,
    TruncateAxis,
    apply_chain,
    chain_map_axis,
    chain_output_shape,
    invert_chain,
)
from model_maps.common import KERNEL, heads_bias, heads_kernel, out_kernel

BF16 = np.dtype(ml_dtypes.bfloat16)
SETTINGS = settings(max_examples=60, deadline=None, database=None)


def shapes(min_dims: int = 1, max_dims: int = 4, max_side: int = 5):
    return st.lists(st.integers(1, max_side), min_size=min_dims, max_size=max_dims).map(tuple)


def distinct(shape: tuple[int, ...], dtype=np.int32) -> np.ndarray:
    """Array whose every element is different, so any misplacement shows."""
    return (np.arange(math.prod(shape), dtype=np.int64) + 1).astype(dtype).reshape(shape)


def random_floats(shape, seed: int, dtype=np.float32) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return np.asarray(x).astype(dtype)


def assert_identical(a: np.ndarray, b: np.ndarray) -> None:
    """Same shape, dtype and bits."""
    assert a.shape == b.shape
    assert a.dtype == b.dtype
    if a.dtype.kind == "V" or a.dtype == BF16:
        np.testing.assert_array_equal(a.view(np.uint16), b.view(np.uint16))
    else:
        np.testing.assert_array_equal(a, b)


def take(x: np.ndarray, axis: int, start: int, stop: int) -> np.ndarray:
    index = [slice(None)] * x.ndim
    index[axis] = slice(start, stop)
    return x[tuple(index)]


# --------------------------------------------------------------------------- Transpose


@SETTINGS
@given(data=st.data())
def test_transpose_matches_index_formula_and_inverts(data):
    shape = data.draw(shapes(1, 5, 4))
    perm = data.draw(st.none() | st.permutations(range(len(shape))).map(tuple))
    x = distinct(shape)
    op = Transpose(perm)
    y = op.apply(x)
    p = tuple(reversed(range(len(shape)))) if perm is None else perm
    # Independent: output axis j is input axis p[j].
    assert y.shape == tuple(shape[a] for a in p)
    for out_index in np.ndindex(*y.shape):
        in_index = [0] * len(shape)
        for j, a in enumerate(p):
            in_index[a] = out_index[j]
        assert y[out_index] == x[tuple(in_index)]
    assert op.output_shape(shape) == y.shape
    inv = op.inverse()
    assert_identical(inv.apply(y), x)
    assert_identical(op.apply(inv.apply(y)), y)
    assert inv.output_shape(y.shape) == shape


# --------------------------------------------------------------------------- SplitAxis / MergeAxes


@st.composite
def split_cases(draw):
    sizes = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
    before = draw(shapes(0, 2, 3))
    after = draw(shapes(0, 2, 3))
    shape = before + (math.prod(sizes),) + after
    axis = len(before) if draw(st.booleans()) else len(before) - len(shape)
    op_sizes = sizes
    if draw(st.booleans()):
        i = draw(st.integers(0, len(sizes) - 1))
        op_sizes = sizes[:i] + (-1,) + sizes[i + 1 :]
    return shape, axis, sizes, op_sizes, before, after


@SETTINGS
@given(case=split_cases(), seed=st.integers(0, 2**32 - 1))
def test_split_then_merge_is_identity(case, seed):
    shape, axis, sizes, op_sizes, before, after = case
    x = random_floats(shape, seed, BF16)
    op = SplitAxis(axis, op_sizes)
    y = op.apply(x)
    assert y.shape == before + sizes + after
    # C-order reshape: the flat sequence of elements is unchanged.
    assert_identical(y.reshape(-1), x.reshape(-1))
    assert op.output_shape(shape) == y.shape
    inv = op.inverse()
    assert isinstance(inv, MergeAxes)
    assert_identical(inv.apply(y), x)
    assert inv.output_shape(y.shape) == shape
    assert inv.inverse().apply(inv.apply(y)).shape == y.shape


@SETTINGS
@given(case=split_cases())
def test_merge_then_split_is_identity(case):
    shape, axis, sizes, op_sizes, before, after = case
    y = distinct(before + sizes + after)
    merge = MergeAxes(axis, op_sizes)
    x = merge.apply(y)
    assert x.shape == shape
    assert merge.output_shape(y.shape) == shape
    assert_identical(merge.inverse().apply(x), y)


# --------------------------------------------------------------------------- RoPE layouts


@SETTINGS
@given(lead=shapes(0, 3, 4), half=st.integers(1, 8), seed=st.integers(0, 2**32 - 1), transposed=st.booleans())
def test_rope_interleave_formula_and_inverse(lead, half, seed, transposed):
    shape = lead + (2 * half,)
    # After a Transpose (HF [out, in] -> [in, heads, head_dim]) the rotary axis is the strided one.
    x = random_floats(shape[::-1], seed, BF16).T if transposed else random_floats(shape, seed, BF16)
    out = RopeInterleave().apply(x)
    expected = np.empty_like(x)
    for i in range(half):
        expected[..., 2 * i] = x[..., i]
        expected[..., 2 * i + 1] = x[..., half + i]
    assert_identical(out, expected)
    assert RopeInterleave().output_shape(x.shape) == x.shape
    assert isinstance(RopeInterleave().inverse(), RopeHalves)
    assert_identical(RopeInterleave().inverse().apply(out), x)
    # And the other way round.
    halves = RopeHalves().apply(x)
    for i in range(half):
        assert_identical(halves[..., i], x[..., 2 * i])
        assert_identical(halves[..., half + i], x[..., 2 * i + 1])
    assert_identical(RopeHalves().inverse().apply(halves), x)


# --------------------------------------------------------------------------- Pad / Truncate


@SETTINGS
@given(shape=shapes(1, 4), data=st.data())
def test_pad_then_truncate_is_identity(shape, data):
    ndim = len(shape)
    axis = data.draw(st.integers(-ndim, ndim - 1))
    extra = data.draw(st.integers(0, 4))
    x = distinct(shape)
    src = shape[axis]
    op = PadAxis(axis, src + extra, src)
    y = op.apply(x)
    expected_shape = list(shape)
    expected_shape[axis] = src + extra
    assert y.shape == tuple(expected_shape)
    assert op.output_shape(shape) == y.shape
    assert_identical(take(y, axis % ndim, 0, src), x)
    assert not take(y, axis % ndim, src, src + extra).any()
    inv = op.inverse()
    assert isinstance(inv, TruncateAxis)
    assert_identical(inv.apply(y), x)
    assert inv.output_shape(y.shape) == shape
    assert inv.inverse() == op
    # Truncating and re-padding restores y because what was cut is zeros.
    assert_identical(inv.inverse().apply(inv.apply(y)), y)


# --------------------------------------------------------------------------- ScaleBySqrt

_NS = st.sampled_from([1, 2, 3, 24, 64, 80, 96, 128, 256]) | st.integers(1, 10_000)


@SETTINGS
@given(n=_NS, shape=shapes(1, 3, 8), seed=st.integers(0, 2**32 - 1), scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_scale_matches_float32_formula_for_bf16(n, shape, seed, scale):
    x = (random_floats(shape, seed) * np.float32(scale)).astype(BF16)
    got = ScaleBySqrt(n).apply(x)
    expected = (x.astype(np.float32) * np.float32(1 / np.sqrt(n))).astype(x.dtype)
    assert_identical(got, expected)
    up = ScaleBySqrt(n, 1).apply(x)
    assert_identical(up, (x.astype(np.float32) * np.float32(np.sqrt(n))).astype(BF16))
    assert ScaleBySqrt(n).output_shape(shape) == shape


def test_scale_rounds_once_in_float32_not_in_bf16():
    """head_dim 24: the factor is float32(1/sqrt(24)), not a bf16-rounded factor."""
    x = np.array([1.0, 3.0, -7.5, 100.0], np.float32).astype(BF16)
    got = ScaleBySqrt(24).apply(x)
    f = np.float32(0.2041241452319315)  # 1/sqrt(24) to double precision
    assert_identical(got, (x.astype(np.float32) * f).astype(BF16))
    assert got.dtype == BF16


_FINITE = st.floats(min_value=2.0**-100, max_value=2.0**100, allow_nan=False, allow_infinity=False, width=32)


@SETTINGS
@given(
    k=st.integers(0, 10),
    values=st.lists(_FINITE.map(float) | st.just(0.0), min_size=1, max_size=16),
    signs=st.lists(st.booleans(), min_size=16, max_size=16),
)
def test_scale_by_power_of_four_is_exactly_invertible(k, values, signs):
    x = np.array([-v if s else v for v, s in zip(values, signs, strict=False)], np.float32).astype(BF16)
    op = ScaleBySqrt(4**k)
    y = op.apply(x)
    # Factor is 2**-k exactly: an exponent shift.
    assert_identical(y, np.ldexp(x.astype(np.float32), -k).astype(BF16))
    assert_identical(op.inverse().apply(y), x)
    assert op.inverse() == ScaleBySqrt(4**k, 1)


@pytest.mark.parametrize("power, factor", [(-2, 1 / 16), (2, 16.0), (0, 1.0)])
def test_scale_power_other_than_one(power, factor):
    x = np.array([1.0, 2.0, -3.0], np.float32)
    np.testing.assert_array_equal(ScaleBySqrt(16, power).apply(x), x * np.float32(factor))


# --------------------------------------------------------------------------- chains used by model maps


@st.composite
def attention_dims(draw):
    heads = draw(st.integers(1, 5))
    head_dim = 2 * draw(st.integers(1, 4))
    hidden = draw(st.integers(1, 7))
    return heads, head_dim, hidden


@SETTINGS
@given(dims=attention_dims(), seed=st.integers(0, 2**32 - 1))
def test_query_chain_matches_independent_formula_and_inverts(dims, seed):
    heads, hd, hidden = dims
    x = random_floats((heads * hd, hidden), seed, BF16)
    ops = heads_kernel(hd) + (RopeInterleave(), ScaleBySqrt(16))
    y = apply_chain(x, ops)
    # Independent: [out, in] -> [in, heads, head_dim], pairs re-interleaved, times 1/4.
    t = x.T.reshape(hidden, heads, hd)
    half = hd // 2
    inter = np.empty_like(t)
    inter[..., 0::2] = t[..., :half]
    inter[..., 1::2] = t[..., half:]
    assert_identical(y, (inter.astype(np.float32) * np.float32(0.25)).astype(BF16))
    assert chain_output_shape(x.shape, ops) == y.shape == (hidden, heads, hd)
    assert_identical(apply_chain(y, invert_chain(ops)), x)


@SETTINGS
@given(dims=attention_dims(), seed=st.integers(0, 2**32 - 1))
def test_out_and_kernel_chains_invert(dims, seed):
    heads, hd, hidden = dims
    o = random_floats((hidden, heads * hd), seed, BF16)
    ops = out_kernel(hd)
    y = apply_chain(o, ops)
    assert y.shape == chain_output_shape(o.shape, ops) == (heads, hd, hidden)
    for h in range(heads):
        assert_identical(y[h], o[:, h * hd : (h + 1) * hd].T)
    assert_identical(apply_chain(y, invert_chain(ops)), o)
    k = apply_chain(o, KERNEL)
    assert_identical(k, np.ascontiguousarray(o.T))
    assert_identical(apply_chain(k, invert_chain(KERNEL)), o)


# --------------------------------------------------------------------------- map_axis vs. slicing


def check_slicing(x: np.ndarray, ops, axis: int, start: int, stop: int, unit: int = 1) -> None:
    """Chain of a source slice == target slice of the chain, along the mapped axis, in whole units."""
    target_axis = chain_map_axis(axis, x.ndim, ops, x.shape)
    assert target_axis is not None
    full = apply_chain(x, ops)
    part = apply_chain(take(x, axis, start * unit, stop * unit), ops)
    assert_identical(part, take(full, target_axis, start, stop))


@SETTINGS
@given(data=st.data())
def test_transpose_map_axis_agrees_with_slicing(data):
    shape = data.draw(shapes(1, 4, 5))
    perm = data.draw(st.none() | st.permutations(range(len(shape))).map(tuple))
    axis = data.draw(st.integers(0, len(shape) - 1))
    start = data.draw(st.integers(0, shape[axis] - 1))
    stop = data.draw(st.integers(start + 1, shape[axis]))
    check_slicing(distinct(shape), (Transpose(perm),), axis, start, stop)


@SETTINGS
@given(dims=attention_dims(), data=st.data())
def test_model_chains_map_unsplit_axis_agrees_with_slicing(dims, data):
    heads, hd, hidden = dims
    start = data.draw(st.integers(0, hidden - 1))
    stop = data.draw(st.integers(start + 1, hidden))
    q = distinct((heads * hd, hidden))
    # Query/key/value: cut the hidden (input) axis, source axis 1.
    for ops in (heads_kernel(hd), heads_kernel(hd) + (RopeInterleave(), ScaleBySqrt(4))):
        check_slicing(q, ops, 1, start, stop)
    # Attention output and plain kernels: cut source rows (axis 0).
    o = distinct((hidden, heads * hd))
    check_slicing(o, out_kernel(hd), 0, start, stop)
    check_slicing(o, KERNEL, 0, start, stop)
    assert chain_map_axis(0, 2, out_kernel(hd), o.shape) == 2
    assert chain_map_axis(0, 2, KERNEL, o.shape) == 1


@SETTINGS
@given(dims=attention_dims(), data=st.data())
def test_model_chains_map_split_axis_agrees_with_slicing(dims, data):
    """Planner row splits of q/k/v (and biases): a range of whole heads of source rows."""
    heads, hd, hidden = dims
    start = data.draw(st.integers(0, heads - 1))
    stop = data.draw(st.integers(start + 1, heads))
    q = distinct((heads * hd, hidden))
    for ops in (heads_kernel(hd), heads_kernel(hd) + (RopeInterleave(), ScaleBySqrt(hd))):
        assert chain_map_axis(0, 2, ops, q.shape) == 1
        check_slicing(q, ops, 0, start, stop, unit=hd)
    b = distinct((heads * hd,))
    assert chain_map_axis(0, 1, heads_bias(hd), b.shape) == 0
    check_slicing(b, heads_bias(hd), 0, start, stop, unit=hd)
    # Cutting the attention output's head axis (source axis 1) lands on target axis 0.
    o = distinct((hidden, heads * hd))
    assert chain_map_axis(1, 2, out_kernel(hd), o.shape) == 0
    check_slicing(o, out_kernel(hd), 1, start, stop, unit=hd)


@pytest.mark.parametrize("sizes", [(4, 6), (2, 2, 6)])
def test_fixed_size_split_axis_is_not_sliceable(sizes):
    # A slice cannot be reshaped to a fixed outer size, so the planner must not cut that axis.
    assert chain_map_axis(0, 2, (SplitAxis(0, sizes),), (math.prod(sizes), 3)) is None
    b = distinct((math.prod(sizes), 3))
    check_slicing(b, (SplitAxis(0, (-1,) + sizes[1:]),), 0, 1, 2, unit=math.prod(sizes[1:]))


def test_unsliceable_axes_map_to_none():
    assert chain_map_axis(1, 2, (RopeInterleave(),), (3, 4)) is None
    assert chain_map_axis(2, 3, (RopeHalves(),), (3, 4, 6)) is None
    assert chain_map_axis(0, 2, (PadAxis(0, 8, 5),), (5, 3)) is None
    assert chain_map_axis(1, 2, (PadAxis(-1, 8, 5),), (3, 5)) is None
    assert chain_map_axis(0, 2, (TruncateAxis(0, 5, 8),), (8, 3)) is None
    # Inner merged axes cannot be cut; the outer one maps onto the merged axis.
    assert chain_map_axis(2, 3, (MergeAxes(1, (4, 6)),), (3, 4, 6)) is None
    assert chain_map_axis(1, 3, (MergeAxes(1, (4, 6)),), (3, 4, 6)) == 1
    # Axes away from the padded/rotated one pass through.
    x = distinct((5, 4))
    check_slicing(x, (RopeInterleave(),), 0, 1, 4)
    check_slicing(x, (PadAxis(1, 7, 4),), 0, 2, 5)


@pytest.mark.parametrize("heads, hd, hidden", [(4, 24, 64), (2, 24, 64), (4, 16, 64)])
def test_model_chain_output_shapes(heads, hd, hidden):
    q_ops = heads_kernel(hd) + (RopeInterleave(), ScaleBySqrt(hd))
    assert chain_output_shape((heads * hd, hidden), q_ops) == (hidden, heads, hd)
    assert apply_chain(np.zeros((heads * hd, hidden), BF16), q_ops).shape == (hidden, heads, hd)
    assert chain_output_shape((hidden, heads * hd), out_kernel(hd)) == (heads, hd, hidden)
    assert apply_chain(np.zeros((hidden, heads * hd), BF16), out_kernel(hd)).shape == (heads, hd, hidden)
