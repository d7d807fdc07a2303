"""Block-scaled quantized weight formats, decoded (and re-encoded) with numpy.

Two layouts occur in official checkpoints MaxText converts:

- FP8 blocks (DeepSeek-V3/R1/V3.2): a float8_e4m3fn weight [M, N] and a `*_scale_inv` grid
  [ceil(M/bm), ceil(N/bn)]; value = f32(w) * f32(scale) per (bm, bn) block, edge blocks partial.
  The block size comes from `quantization_config.weight_block_size`, never assumed.
- MXFP4 (GPT-OSS): `*_blocks` uint8 [..., G, 16] (two e2m1 codes per byte, low nibble first)
  and `*_scales` uint8 [..., G] (e8m0); value = e2m1(code) * 2**(scale - 127), 32 values per group.

Dequantization computes in float32, as MaxText's `deepseek_dequantize.py` / `dequantize_mxfp4.py`
do; the caller rounds once to bf16. Decoding a slab needs only its own rows of the scale grid.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

FP8_MAX = 448.0  # largest finite float8_e4m3fn
MXFP4_GROUP = 32
E8M0_BIAS = 127
# e2m1 code -> value. Code 8 (negative zero) decodes to +0.0 as MaxText's dequantize_mxfp4.py
# does (`torch.where(is_zero, 0.0, ...)`), so zeros are bit-identical to its output.
E2M1_VALUES = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, 0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)
_E2M1_POSITIVE = E2M1_VALUES[:8]


def scale_grid_shape(shape: tuple[int, int], block: tuple[int, int]) -> tuple[int, int]:
    """Shape of the FP8 scale grid for a [M, N] weight: one entry per (possibly partial) block."""
    return (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))


def scales_to_float32(s: np.ndarray) -> np.ndarray:
    """Scale tensor -> float32. uint8 / e8m0 mean 2**(s - 127); float types are taken as is."""
    if s.dtype == np.uint8 or s.dtype == np.dtype(ml_dtypes.float8_e8m0fnu):
        exponent = s.view(np.uint8).astype(np.int32) - E8M0_BIAS
        return np.ldexp(np.float32(1), exponent).astype(np.float32)
    return s.astype(np.float32)


def dequantize_fp8(w: np.ndarray, scale: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """float32 values of a block-scaled FP8 weight (rows may be a block-aligned slab)."""
    if w.ndim != 2 or scale.ndim != 2:
        raise ValueError(f"FP8 weight and scale must be 2-D, got {list(w.shape)} and {list(scale.shape)}")
    if scale.shape != scale_grid_shape(w.shape, block):
        raise ValueError(
            f"FP8 scale grid {list(scale.shape)} does not match weight {list(w.shape)} "
            f"with blocks {list(block)} (expected {list(scale_grid_shape(w.shape, block))})"
        )
    bm, bn = block
    x = w.astype(np.float32)
    s = scales_to_float32(scale)
    for i in range(s.shape[0]):  # in place, one row block at a time: no expanded scale copy
        rows = x[i * bm : (i + 1) * bm]
        if rows.shape[1] % bn == 0:
            rows.reshape(rows.shape[0], -1, bn)[...] *= s[i][None, :, None]
        else:
            for j in range(s.shape[1]):
                rows[:, j * bn : (j + 1) * bn] *= s[i, j]
    return x


def quantize_fp8(x: np.ndarray, block: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(e4m3 weight, float32 scale_inv) with each block's max magnitude mapped to 448."""
    bm, bn = block
    m, n = x.shape
    x = x.astype(np.float32)
    grid = np.ones(scale_grid_shape((m, n), block), np.float32)
    q = np.empty((m, n), ml_dtypes.float8_e4m3fn)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            part = x[i * bm : (i + 1) * bm, j * bn : (j + 1) * bn]
            amax = float(np.abs(part).max(initial=0))
            grid[i, j] = np.float32(amax / FP8_MAX) if amax > 0 else np.float32(1)
            q[i * bm : (i + 1) * bm, j * bn : (j + 1) * bn] = (part / grid[i, j]).astype(ml_dtypes.float8_e4m3fn)
    return q, grid


def dequantize_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float32 [..., G*32] from packed e2m1 `blocks` [..., G, 16] and e8m0 `scales` [..., G]."""
    if blocks.shape[-1] != MXFP4_GROUP // 2 or scales.shape != blocks.shape[:-1]:
        raise ValueError(
            f"MXFP4 blocks {list(blocks.shape)} and scales {list(scales.shape)} do not match "
            f"(expected [..., G, {MXFP4_GROUP // 2}] and [..., G])"
        )
    packed = blocks.view(np.uint8)
    codes = np.empty(packed.shape[:-1] + (MXFP4_GROUP,), np.uint8)
    codes[..., 0::2] = packed & 0x0F
    codes[..., 1::2] = packed >> 4
    values = E2M1_VALUES[codes]
    values *= scales_to_float32(scales)[..., None]
    return values.reshape(packed.shape[:-2] + (-1,))


def quantize_mxfp4(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(blocks, scales) for x [..., K]: per group of 32, a power-of-two scale so that the
    largest magnitude is at most 6, then the nearest e2m1 value (ties to the smaller magnitude)."""
    if x.shape[-1] % MXFP4_GROUP:
        raise ValueError(f"MXFP4 needs the last axis to be a multiple of {MXFP4_GROUP}, got {x.shape[-1]}")
    groups = x.astype(np.float32).reshape(x.shape[:-1] + (-1, MXFP4_GROUP))
    amax = np.abs(groups).max(axis=-1)
    exponent = np.where(amax > 0, np.ceil(np.log2(np.where(amax > 0, amax, 1) / 6.0)), 0).astype(np.int32)
    exponent = np.clip(exponent, -E8M0_BIAS, 127)
    scaled = groups / np.ldexp(np.float32(1), exponent)[..., None]
    magnitude = np.abs(scaled)
    # Nearest of the 8 non-negative e2m1 values; argmin takes the smaller one on ties.
    nearest = np.argmin(np.abs(magnitude[..., None] - _E2M1_POSITIVE), axis=-1).astype(np.uint8)
    codes = nearest | np.where((scaled < 0) & (nearest > 0), 8, 0).astype(np.uint8)
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    return blocks, (exponent + E8M0_BIAS).astype(np.uint8)
