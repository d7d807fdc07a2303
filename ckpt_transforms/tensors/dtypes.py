"""The one dtype table: safetensors dtype names, numpy/ml_dtypes dtypes, zarr3 data types."""

from __future__ import annotations

import ml_dtypes
import numpy as np

# safetensors dtype name -> (numpy dtype, bits per element). Sub-byte types are decoded by ops.
SAFETENSORS_DTYPES: dict[str, tuple[np.dtype, int]] = {
    "BOOL": (np.dtype(np.bool_), 8),
    "U8": (np.dtype(np.uint8), 8),
    "I8": (np.dtype(np.int8), 8),
    "U16": (np.dtype(np.uint16), 16),
    "I16": (np.dtype(np.int16), 16),
    "U32": (np.dtype(np.uint32), 32),
    "I32": (np.dtype(np.int32), 32),
    "U64": (np.dtype(np.uint64), 64),
    "I64": (np.dtype(np.int64), 64),
    "F16": (np.dtype(np.float16), 16),
    "BF16": (np.dtype(ml_dtypes.bfloat16), 16),
    "F32": (np.dtype(np.float32), 32),
    "F64": (np.dtype(np.float64), 64),
    "F8_E4M3": (np.dtype(ml_dtypes.float8_e4m3fn), 8),
    "F8_E5M2": (np.dtype(ml_dtypes.float8_e5m2), 8),
    "F8_E4M3FNUZ": (np.dtype(ml_dtypes.float8_e4m3fnuz), 8),
    "F8_E5M2FNUZ": (np.dtype(ml_dtypes.float8_e5m2fnuz), 8),
    "F8_E8M0": (np.dtype(ml_dtypes.float8_e8m0fnu), 8),
    # 4- and 6-bit types: raw bytes; packed codes are unpacked by a dequantize op.
    "F4": (np.dtype(np.uint8), 4),
    "F6_E2M3": (np.dtype(np.uint8), 6),
    "F6_E3M2": (np.dtype(np.uint8), 6),
}

# Save dtypes a user may ask for (MaxText's `save_dtype` choices).
SAVE_DTYPES: dict[str, np.dtype] = {
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float32": np.dtype(np.float32),
}

# numpy dtype -> zarr3 `data_type` name (bfloat16 is spelled out in zarr3).
_ZARR3_NAMES = {
    np.dtype(ml_dtypes.bfloat16): "bfloat16",
    np.dtype(np.float16): "float16",
    np.dtype(np.float32): "float32",
    np.dtype(np.float64): "float64",
    np.dtype(np.int8): "int8",
    np.dtype(np.int16): "int16",
    np.dtype(np.int32): "int32",
    np.dtype(np.int64): "int64",
    np.dtype(np.uint8): "uint8",
    np.dtype(np.uint16): "uint16",
    np.dtype(np.uint32): "uint32",
    np.dtype(np.uint64): "uint64",
    np.dtype(np.bool_): "bool",
}


def numpy_dtype(safetensors_dtype: str) -> np.dtype:
    """numpy dtype that holds a safetensors dtype's raw elements."""
    try:
        return SAFETENSORS_DTYPES[safetensors_dtype][0]
    except KeyError:
        raise ValueError(f"unknown safetensors dtype {safetensors_dtype!r}") from None


def bits_per_element(safetensors_dtype: str) -> int:
    return SAFETENSORS_DTYPES[safetensors_dtype][1]


def save_dtype(name: str) -> np.dtype:
    try:
        return SAVE_DTYPES[name]
    except KeyError:
        raise ValueError(f"save_dtype must be one of {sorted(SAVE_DTYPES)}, got {name!r}") from None


def zarr3_name(dtype: np.dtype | str) -> str:
    return _ZARR3_NAMES[np.dtype(dtype)]


def dtype_name(dtype: np.dtype | str) -> str:
    """Stable, serializable name of a numpy/ml_dtypes dtype ('bfloat16', 'float32', ...)."""
    return np.dtype(dtype).name
