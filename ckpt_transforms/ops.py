"""Tensor ops between a Hugging Face tensor and a MaxText slab. Every op has an inverse.

An op chain is applied to one source tensor (one layer, one expert) after it has been cast to
the save dtype, exactly the order MaxText's converter uses, so results are bit-identical.
The same chain read backwards (`invert_chain`) serves MaxText -> Hugging Face.

Ops also say where a source axis lands (`map_axis`), so the planner can cut a huge source tensor
into contiguous row ranges and still know which target region each range fills.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


class Op:
    """Base class: `apply` maps an array forward, `inverse` returns the op that undoes it."""

    def apply(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def inverse(self) -> Op:
        raise NotImplementedError

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(self.apply(np.empty(shape, np.uint8)).shape)

    def map_axis(self, axis: int, ndim: int) -> int | None:
        """Axis of the output that source `axis` becomes, or None if slicing it is not supported."""
        return axis


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


@dataclass(frozen=True)
class RopeInterleave(Op):
    """HF rotary layout (two halves) -> MaxText interleaved pairs along the last axis."""

    def apply(self, x: np.ndarray) -> np.ndarray:
        half = x.shape[-1] // 2
        return np.stack([x[..., :half], x[..., half:]], axis=-1).reshape(x.shape)

    def inverse(self) -> Op:
        return RopeHalves()

    def map_axis(self, axis: int, ndim: int) -> int | None:
        return None if axis == ndim - 1 else axis


@dataclass(frozen=True)
class RopeHalves(Op):
    """MaxText interleaved pairs -> HF rotary halves along the last axis."""

    def apply(self, x: np.ndarray) -> np.ndarray:
        return np.concatenate([x[..., ::2], x[..., 1::2]], axis=-1)

    def inverse(self) -> Op:
        return RopeInterleave()

    def map_axis(self, axis: int, ndim: int) -> int | None:
        return None if axis == ndim - 1 else axis


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
        return (x.astype(np.float32) * self.factor()).astype(x.dtype)

    def inverse(self) -> Op:
        return ScaleBySqrt(self.n, -self.power)


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

    def map_axis(self, axis: int, ndim: int) -> int | None:
        return None if axis == self.axis % ndim else axis


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
