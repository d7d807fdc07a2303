"""Tensor ops between a Hugging Face tensor and a MaxText slab. Every op has an inverse.

An op chain is applied to one source tensor (one layer, one expert) after it has been cast to
the save dtype, exactly the order MaxText's converter uses, so results are bit-identical.
The same chain read backwards (`invert_chain`) serves MaxText -> Hugging Face.

A chain may start with a `Decode` op that combines several source tensors (a quantized weight
and its scales) into one array; it runs before the cast, like MaxText's standalone dequantize
scripts run before its converter.

Ops also say where a source axis lands (`map_axis`), so the planner can cut a huge source tensor
into contiguous row ranges and still know which target region each range fills.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from ckpt_transforms.tensors import quant

_BITS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def as_bits(x: np.ndarray) -> np.ndarray:
    """`x` viewed as unsigned integers of its item size (no copy, any strides).

    Moving elements without changing them (copies, permutations) is several times faster on
    these views: numpy moves ml_dtypes' bfloat16/float8 one element at a time through the
    dtype's own functions."""
    bits = _BITS.get(x.dtype.itemsize)
    return x if bits is None else x.view(bits)


COPY_BLOCK = 256


def copy_into(dst: np.ndarray, src: np.ndarray) -> None:
    """dst[...] = src, in blocks along src's outermost-in-memory axis.

    A transposed view copied in one go walks memory with a huge stride (cache misses on every
    element); copying 256 source rows at a time keeps both sides in cache (~4x faster here).
    Same-dtype copies move raw bits: numpy copies ml_dtypes' bfloat16 element by element
    through the dtype's own functions, several times slower than a plain uint16 copy.
    """
    if dst.dtype == src.dtype:
        dst, src = as_bits(dst), as_bits(src)
    if src.flags.c_contiguous or src.ndim < 2:
        dst[...] = src
        return
    axis = int(np.argmax(np.abs(src.strides)))
    for start in range(0, src.shape[axis], COPY_BLOCK):
        index = (slice(None),) * axis + (slice(start, start + COPY_BLOCK),)
        dst[index] = src[index]


class Op:
    """Base class: `apply` maps an array forward, `inverse` returns the op that undoes it."""

    def apply(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def inverse(self) -> Op:
        raise NotImplementedError

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Planning calls this with shapes from config.json: every op overrides it with
        arithmetic (this fallback builds an array of that shape)."""
        return tuple(self.apply(np.empty(shape, np.uint8)).shape)

    def map_axis(self, axis: int, ndim: int) -> int | None:
        """Axis of the output that source `axis` becomes, or None if slicing it is not supported."""
        return axis

    def output_dtype(self, dtype: np.dtype) -> np.dtype:
        """dtype of `apply`'s result for an input of `dtype` (most ops keep it)."""
        return np.dtype(dtype)

    def map_range(self, axis: int, shape: tuple[int, ...], rng: tuple[int, int]) -> tuple[int, tuple[int, int]] | None:
        """Where entries [a, b) of input `axis` land: (output axis, output range), or None if a
        part of that axis does not map to one contiguous output range.

        Used when an op runs on a part of an array (an export work item holds some chunks of a
        leaf): the part's result is then exactly that range of the whole result. By default an
        axis maps through `map_axis`, scaled by how the op resizes it (a merge of [heads,
        head_dim] maps heads [a, b) to rows [a * head_dim, b * head_dim))."""
        out_axis = self.map_axis(axis, len(shape))
        if out_axis is None:
            return None
        out_shape = self.output_shape(tuple(shape))
        size, out_size = shape[axis], out_shape[out_axis]
        if size and out_size % size == 0:
            unit = out_size // size
            return out_axis, (rng[0] * unit, rng[1] * unit)
        # A split of the axis ([heads * head_dim] -> [heads, head_dim]): whole outer entries only.
        if out_size and size % out_size == 0 and rng[0] % (size // out_size) == 0 and rng[1] % (size // out_size) == 0:
            unit = size // out_size
            return out_axis, (rng[0] // unit, rng[1] // unit)
        return None

    def for_part(self, axis: int, shape: tuple[int, ...], rng: tuple[int, int]) -> Op:
        """The op to run on the part [a, b) of input `axis` (of the whole `shape`) so that its
        result is the `map_range` of the whole result. Most ops act the same on a part."""
        return self


@dataclass(frozen=True)
class Transpose(Op):
    """Permute axes; `perm=None` reverses them (HF [out, in] -> MaxText [in, out])."""

    perm: tuple[int, ...] | None = None

    def apply(self, x: np.ndarray) -> np.ndarray:
        return np.transpose(x, self.perm)

    def inverse(self) -> Op:
        return Transpose(None if self.perm is None else tuple(int(i) for i in np.argsort(self.perm)))

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        perm = self.perm if self.perm is not None else tuple(reversed(range(len(shape))))
        return tuple(shape[p] for p in perm)

    def map_axis(self, axis: int, ndim: int) -> int | None:
        perm = self.perm if self.perm is not None else tuple(reversed(range(ndim)))
        return list(perm).index(axis)


@dataclass(frozen=True)
class SplitAxis(Op):
    """Split one axis into several (e.g. heads*head_dim -> heads, head_dim); one size may be -1."""

    axis: int
    sizes: tuple[int, ...]

    def apply(self, x: np.ndarray) -> np.ndarray:
        ax = self.axis % x.ndim
        return x.reshape(x.shape[:ax] + tuple(self.sizes) + x.shape[ax + 1 :])

    def inverse(self) -> Op:
        return MergeAxes(self.axis, self.sizes)

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        ax = self.axis % len(shape)
        sizes = list(self.sizes)
        if -1 in sizes:
            known = math.prod(s for s in sizes if s != -1)
            sizes[sizes.index(-1)] = shape[ax] // known
        return shape[:ax] + tuple(sizes) + shape[ax + 1 :]

    def map_axis(self, axis: int, ndim: int) -> int | None:
        ax = self.axis % ndim
        if axis < ax:
            return axis
        if axis > ax:
            return axis + len(self.sizes) - 1
        # A slice of the split axis reshapes only if the outer size is inferred (-1 first).
        return ax if self.sizes[0] == -1 else None


@dataclass(frozen=True)
class MergeAxes(Op):
    """Merge `len(sizes)` consecutive axes starting at `axis` (inverse of SplitAxis)."""

    axis: int
    sizes: tuple[int, ...]

    def apply(self, x: np.ndarray) -> np.ndarray:
        n = len(self.sizes)
        ax = self.axis % (x.ndim - n + 1) if self.axis < 0 else self.axis
        return x.reshape(x.shape[:ax] + (-1,) + x.shape[ax + n :])

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        n = len(self.sizes)
        ax = self.axis % (len(shape) - n + 1) if self.axis < 0 else self.axis
        return tuple(shape[:ax]) + (math.prod(shape[ax : ax + n]),) + tuple(shape[ax + n :])

    def inverse(self) -> Op:
        return SplitAxis(self.axis, self.sizes)

    def map_axis(self, axis: int, ndim: int) -> int | None:
        n = len(self.sizes)
        ax = self.axis % (ndim - n + 1) if self.axis < 0 else self.axis
        if axis < ax:
            return axis
        if axis >= ax + n:
            return axis - n + 1
        return ax if axis == ax else None


def _same_layout(x: np.ndarray) -> np.ndarray:
    """An empty array laid out in memory like `x`. After a Transpose the rotary axis is the
    strided one; permuting it into a C-ordered array would walk memory against the grain (and
    np.stack + reshape costs two such copies), while this keeps one pass along `x`'s own order."""
    return np.empty_like(x, order="K")


@dataclass(frozen=True)
class RopeInterleave(Op):
    """HF rotary layout (two halves) -> MaxText interleaved pairs along the last axis."""

    def apply(self, x: np.ndarray) -> np.ndarray:
        half = x.shape[-1] // 2
        b = as_bits(x)
        out = _same_layout(b)
        out[..., 0::2], out[..., 1::2] = b[..., :half], b[..., half:]
        return out.view(x.dtype)

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(shape)  # without building an array: shapes come from untrusted config.json

    def inverse(self) -> Op:
        return RopeHalves()

    def map_axis(self, axis: int, ndim: int) -> int | None:
        return None if axis == ndim - 1 else axis


@dataclass(frozen=True)
class RopeHalves(Op):
    """MaxText interleaved pairs -> HF rotary halves along the last axis."""

    def apply(self, x: np.ndarray) -> np.ndarray:
        half = x.shape[-1] // 2
        b = as_bits(x)
        out = _same_layout(b)
        out[..., :half], out[..., half:] = b[..., 0::2], b[..., 1::2]
        return out.view(x.dtype)

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(shape)

    def inverse(self) -> Op:
        return RopeInterleave()

    def map_axis(self, axis: int, ndim: int) -> int | None:
        return None if axis == ndim - 1 else axis


def _scaled_in_float32(x: np.ndarray, factor: np.float32, divide: bool = False) -> np.ndarray:
    """`x * factor` (or `x / factor`) computed in float32, rounded once back to x's dtype; one
    float32 temporary, scaled in place (a slab-sized allocation less than `x.astype(...) * f`)."""
    y = x.astype(np.float32)
    # A true float32 division, as MaxText's export hooks write it and as its exporter computes it
    # with the JAX of the peer build (0.12). An older JAX compiled it into a multiplication by the
    # float32 reciprocal, 1 ulp away in 27-40% of float32 Gemma embedding values; after rounding
    # to bf16 (the usual export dtype) the two always agree.
    (np.divide if divide else np.multiply)(y, factor, out=y)
    return y.astype(x.dtype, copy=False)


@dataclass(frozen=True)
class ScaleBySqrt(Op):
    """Multiply by sqrt(n)**power, computed in float32 and rounded back to the input dtype.

    MaxText's query scaling: the factor is a float32 scalar (1/sqrt(head_dim) taken in float64,
    then rounded), the product is float32, and the result returns to the tensor's dtype.
    """

    n: float
    power: int = -1

    def factor(self) -> np.float32:
        # Taken in float64, rounded once to float32, as MaxText does for power -1 / +1.
        root = np.sqrt(self.n) ** abs(self.power)
        return np.float32(1 / root) if self.power < 0 else np.float32(root)

    def apply(self, x: np.ndarray) -> np.ndarray:
        return _scaled_in_float32(x, self.factor())

    def inverse(self) -> Op:
        return ScaleBySqrt(self.n, -self.power)

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(shape)


@dataclass(frozen=True)
class ScaleBy(Op):
    """Multiply by a constant in float32 and round back to the input dtype (divide if `divide`).

    `factor` is the exact value of the scalar MaxText multiplies by, already rounded the way its
    hook rounds it (Gemma2: `np.float32(hidden ** 0.5)`; Gemma3: a bfloat16 scalar). A product of
    a bf16 or float32 tensor with such a scalar is exact in float32 before the one final rounding,
    which is what numpy (with ml_dtypes) computes for `(x * s).astype(x.dtype)`.
    """

    factor: float
    divide: bool = False

    def apply(self, x: np.ndarray) -> np.ndarray:
        return _scaled_in_float32(x, np.float32(self.factor), self.divide)

    def inverse(self) -> Op:
        return ScaleBy(self.factor, not self.divide)

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(shape)


@dataclass(frozen=True)
class AddScalar(Op):
    """Add a constant, computed and returned in float32 (Gemma's RMSNorm `scale + 1`).

    MaxText's hook is `x + 1.0` on the bf16 numpy array its eager loader returns; numpy with
    ml_dtypes evaluates that in float32 and returns float32 (it does not keep bfloat16 as NEP 50
    would for a builtin dtype), so the saved leaf is float32 even when saving bf16. Exact: a bf16
    value plus 1.0 is rounded once, to float32.
    """

    value: float

    def apply(self, x: np.ndarray) -> np.ndarray:
        return x.astype(np.float32) + np.float32(self.value)

    def inverse(self) -> Op:
        return AddScalar(-self.value)

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(shape)

    def output_dtype(self, dtype: np.dtype) -> np.dtype:
        return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


@dataclass(frozen=True)
class PadAxis(Op):
    """Zero-pad `axis` up to `size` (vocab padding); the inverse truncates to `source_size`."""

    axis: int
    size: int
    source_size: int

    def apply(self, x: np.ndarray) -> np.ndarray:
        if x.shape[self.axis] == self.size:
            return x
        pad = [(0, 0)] * x.ndim
        pad[self.axis] = (0, self.size - x.shape[self.axis])
        return np.pad(x, pad)

    def inverse(self) -> Op:
        return TruncateAxis(self.axis, self.source_size, self.size)

    def map_range(self, axis, shape, rng):
        if axis != self.axis % len(shape):
            return super().map_range(axis, shape, rng)
        # The zero rows follow the last input row: they belong to the part that ends there.
        extra = self.size - shape[axis] if rng[1] == shape[axis] else 0
        return axis, (rng[0], rng[1] + extra)

    def for_part(self, axis, shape, rng):
        if axis != self.axis % len(shape):
            return self
        lo, hi = self.map_range(axis, shape, rng)[1]
        return PadAxis(self.axis, hi - lo, rng[1] - rng[0])

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        ax = self.axis % len(shape)
        return shape[:ax] + (self.size,) + shape[ax + 1 :]

    def map_axis(self, axis: int, ndim: int) -> int | None:
        return None if axis == self.axis % ndim else axis


@dataclass(frozen=True)
class TruncateAxis(Op):
    """Keep the first `size` entries of `axis` (inverse of PadAxis)."""

    axis: int
    size: int
    source_size: int

    def apply(self, x: np.ndarray) -> np.ndarray:
        index = [slice(None)] * x.ndim
        index[self.axis] = slice(0, self.size)
        return x[tuple(index)]

    def inverse(self) -> Op:
        return PadAxis(self.axis, self.source_size, self.size)

    def map_range(self, axis, shape, rng):
        if axis != self.axis % len(shape):
            return super().map_range(axis, shape, rng)
        return axis, (min(rng[0], self.size), min(rng[1], self.size))

    def for_part(self, axis, shape, rng):
        if axis != self.axis % len(shape):
            return self
        lo, hi = self.map_range(axis, shape, rng)[1]
        return TruncateAxis(self.axis, hi - lo, rng[1] - rng[0])

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        ax = self.axis % len(shape)
        return shape[:ax] + (min(self.size, shape[ax]),) + shape[ax + 1 :]

    def map_axis(self, axis: int, ndim: int) -> int | None:
        return None if axis == self.axis % ndim else axis


@dataclass(frozen=True)
class TakeEvery(Op):
    """Every `step`-th entry of `axis` from `start` (a fused tensor's even/odd half).

    MaxText splits GPT-OSS's fused gate_up_proj into wi_0 = [..., ::2] and wi_1 = [..., 1::2];
    each half is its own target, so the fused tensor is read once per half.
    """

    axis: int
    start: int
    step: int

    def apply(self, x: np.ndarray) -> np.ndarray:
        index = [slice(None)] * x.ndim
        index[self.axis] = slice(self.start, None, self.step)
        return x[tuple(index)]

    def inverse(self) -> Op:
        return PutEvery(self.axis, self.start, self.step)

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        ax = self.axis % len(shape)
        n = max(0, math.ceil((shape[ax] - self.start) / self.step))
        return shape[:ax] + (n,) + shape[ax + 1 :]

    def map_axis(self, axis: int, ndim: int) -> int | None:
        return None if axis == self.axis % ndim else axis


@dataclass(frozen=True)
class PutEvery(Op):
    """Spread `axis` to positions start, start+step, ... of a `step`-times longer zero array.

    Inverse of TakeEvery: the halves of a fused tensor, each put back, sum to the whole.
    """

    axis: int
    start: int
    step: int

    def apply(self, x: np.ndarray) -> np.ndarray:
        ax = self.axis % x.ndim
        out = np.zeros(x.shape[:ax] + (x.shape[ax] * self.step,) + x.shape[ax + 1 :], x.dtype)
        index = [slice(None)] * x.ndim
        index[ax] = slice(self.start, None, self.step)
        out[tuple(index)] = x
        return out

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        ax = self.axis % len(shape)
        return tuple(shape[:ax]) + (shape[ax] * self.step,) + tuple(shape[ax + 1 :])

    def inverse(self) -> Op:
        return TakeEvery(self.axis, self.start, self.step)

    def map_axis(self, axis: int, ndim: int) -> int | None:
        return None if axis == self.axis % ndim else axis


@dataclass(frozen=True)
class SliceAxis(Op):
    """Entries [start, stop) of `axis` (of length `size`): one contiguous part of a fused tensor
    (Gemma4's gate_up_proj is [experts, 2 * mlp, emb]: wi_0 is rows [0, mlp), wi_1 [mlp, 2 * mlp))."""

    axis: int
    start: int
    stop: int
    size: int

    def apply(self, x: np.ndarray) -> np.ndarray:
        index = [slice(None)] * x.ndim
        index[self.axis] = slice(self.start, self.stop)
        return x[tuple(index)]

    def inverse(self) -> Op:
        return PlaceInAxis(self.axis, self.start, self.stop, self.size)

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        ax = self.axis % len(shape)
        return shape[:ax] + (self.stop - self.start,) + shape[ax + 1 :]

    def map_axis(self, axis: int, ndim: int) -> int | None:
        return None if axis == self.axis % ndim else axis


@dataclass(frozen=True)
class PlaceInAxis(Op):
    """Inverse of SliceAxis: the part at [start, stop) of a zero axis of length `size`, so the
    placed parts of a fused tensor sum to the whole."""

    axis: int
    start: int
    stop: int
    size: int

    def apply(self, x: np.ndarray) -> np.ndarray:
        ax = self.axis % x.ndim
        out = np.zeros(x.shape[:ax] + (self.size,) + x.shape[ax + 1 :], x.dtype)
        index = [slice(None)] * x.ndim
        index[ax] = slice(self.start, self.stop)
        out[tuple(index)] = x
        return out

    def inverse(self) -> Op:
        return SliceAxis(self.axis, self.start, self.stop, self.size)

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        ax = self.axis % len(shape)
        return shape[:ax] + (self.size,) + shape[ax + 1 :]

    def map_axis(self, axis: int, ndim: int) -> int | None:
        return None if axis == self.axis % ndim else axis


class Decode(Op):
    """First op of a chain that reads several source tensors (weight + scales) and returns one
    array already rounded to `out_dtype`; the executor then casts to the save dtype.

    `input_dtypes[i]` lists the safetensors dtypes accepted for input i (the plan checks them).
    `scratch_bytes` is the decoder's own peak memory for `n` output elements (the plan's budget).
    """

    input_dtypes: tuple[tuple[str, ...], ...] = ()
    out_dtype: str = "bfloat16"

    def apply(self, x: np.ndarray) -> np.ndarray:
        raise TypeError(f"{type(self).__name__} combines {len(self.input_dtypes)} source tensors; use apply_inputs")

    def apply_inputs(self, *inputs: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def scratch_bytes(self, n: int) -> int:
        raise NotImplementedError

    def _out(self) -> np.dtype:
        return np.dtype(ml_dtypes.bfloat16) if self.out_dtype == "bfloat16" else np.dtype(self.out_dtype)

    def _round(self, x: np.ndarray) -> np.ndarray:
        return x.astype(self._out())


FLOAT_DTYPES = ("BF16", "F16", "F32", "F64")
FP8_SCALE_DTYPES = ("F32", "BF16", "F16", "F8_E8M0", "U8")


@dataclass(frozen=True)
class RoundOnce(Decode):
    """An unquantized tensor of a quantized checkpoint, rounded to `out_dtype` first.

    MaxText's dequantize scripts rewrite every tensor they do not dequantize in bf16
    (deepseek_dequantize.py: `tensor.to(torch.bfloat16)`; dequantize_mxfp4.py: to its target
    dtype), so e.g. DeepSeek's float32 router bias reaches the converter already rounded.
    """

    out_dtype: str = "bfloat16"
    input_dtypes = (FLOAT_DTYPES,)

    def apply_inputs(self, *inputs: np.ndarray) -> np.ndarray:
        (x,) = inputs
        return self._round(x)

    def scratch_bytes(self, n: int) -> int:
        return n * self._out().itemsize

    def inverse(self) -> Op:
        return self  # the other direction writes the rounded values as they are

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(shape)

    def map_axis(self, axis: int, ndim: int) -> int | None:
        return axis


@dataclass(frozen=True)
class DequantFP8(Decode):
    """(float8_e4m3fn weight [M, N], scale_inv [ceil(M/bm), ceil(N/bn)]) -> weight in out_dtype.

    float32 product rounded once (MaxText's deepseek_dequantize.py: `(x * s).to(bfloat16)`).
    """

    block: tuple[int, int]
    out_dtype: str = "bfloat16"
    input_dtypes = (("F8_E4M3",), FP8_SCALE_DTYPES)

    def apply_inputs(self, *inputs: np.ndarray) -> np.ndarray:
        w, scale = inputs
        return self._round(quant.dequantize_fp8(w, scale, self.block))

    def scratch_bytes(self, n: int) -> int:
        # float32 product, rounded copy
        return n * (4 + self._out().itemsize)

    def inverse(self) -> Op:
        return QuantizeFP8(self.block)

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(shape)

    def map_axis(self, axis: int, ndim: int) -> int | None:
        return axis


@dataclass(frozen=True)
class QuantizeFP8(Op):
    """Inverse of DequantFP8: a [M, N] array -> (e4m3 weight, float32 scale_inv grid)."""

    block: tuple[int, int]

    def apply(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[override]
        return quant.quantize_fp8(x, self.block)

    def inverse(self) -> Op:
        return DequantFP8(self.block)

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(shape)


@dataclass(frozen=True)
class DequantMXFP4(Decode):
    """(e2m1 blocks [..., G, 16] uint8, e8m0 scales [..., G] uint8) -> [..., G*32] in out_dtype.

    Every MXFP4 value is exact in float32 and in bf16 (MaxText's dequantize_mxfp4.py).
    """

    out_dtype: str = "bfloat16"
    input_dtypes = (("U8",), ("U8", "F8_E8M0"))

    def apply_inputs(self, *inputs: np.ndarray) -> np.ndarray:
        blocks, scales = inputs
        return self._round(quant.dequantize_mxfp4(blocks, scales))

    def scratch_bytes(self, n: int) -> int:
        # unpacked codes (1 B), float32 values (4 B), rounded copy
        return n * (1 + 4 + self._out().itemsize)

    def inverse(self) -> Op:
        return QuantizeMXFP4()

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(shape[:-2]) + (shape[-2] * shape[-1] * 2,)

    def map_axis(self, axis: int, ndim: int) -> int | None:
        return axis if axis < ndim - 2 else None


@dataclass(frozen=True)
class QuantizeMXFP4(Op):
    """Inverse of DequantMXFP4: [..., K] -> (blocks [..., K/32, 16], scales [..., K/32])."""

    def apply(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[override]
        return quant.quantize_mxfp4(x)

    def inverse(self) -> Op:
        return DequantMXFP4()

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(shape[:-1]) + (shape[-1] // quant.MXFP4_GROUP, quant.MXFP4_GROUP // 2)


def split_decode(ops: Sequence[Op]) -> tuple[Decode | None, tuple[Op, ...]]:
    """(the chain's leading Decode op or None, the ops that follow it)."""
    if ops and isinstance(ops[0], Decode):
        return ops[0], tuple(ops[1:])
    return None, tuple(ops)


def apply_chain(x: np.ndarray, ops: Sequence[Op]) -> np.ndarray:
    for op in ops:
        x = op.apply(x)
    return x


def invert_chain(ops: Sequence[Op]) -> tuple[Op, ...]:
    return tuple(op.inverse() for op in reversed(ops))


def chain_output_shape(shape: tuple[int, ...], ops: Sequence[Op]) -> tuple[int, ...]:
    for op in ops:
        shape = op.output_shape(tuple(shape))
    return tuple(shape)


def chain_map_axis(axis: int, ndim: int, ops: Sequence[Op], shape: tuple[int, ...]) -> int | None:
    """Output axis that source `axis` ends on after the whole chain (None: not sliceable)."""
    for op in ops:
        mapped = op.map_axis(axis, ndim)
        if mapped is None:
            return None
        shape_next = op.output_shape(shape)
        axis, ndim, shape = mapped, len(shape_next), shape_next
    return axis


def chain_output_dtype(dtype: np.dtype, ops: Sequence[Op]) -> np.dtype:
    """dtype of a slab after `ops`, for an input of `dtype` (the save dtype, after any Decode)."""
    dtype = np.dtype(dtype)
    for op in ops:
        dtype = op.output_dtype(dtype)
    return dtype
