"""A tiny hand-written safetensors reader/writer for tests.

Deliberately independent of `ckpt_transforms`: the format is parsed and produced here from the
spec (u64 little-endian header length, JSON header, data buffer), so tests can compare the code
under test against it and can build malformed files byte by byte.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE_NAMES = (
    "llama_bf16",
    "llama_f32_sharded",
    "mistral_bf16",
    "qwen2_bf16_tied",
    "qwen2_f16_untied",
    "qwen3_bf16_tied",
    "qwen3_f32_untied",
)

NP_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16),
    "I16": np.dtype(np.int16),
    "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32),
    "U64": np.dtype(np.uint64),
    "I64": np.dtype(np.int64),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
}
ST_NAMES: dict[np.dtype, str] = {v: k for k, v in NP_DTYPES.items()}


def encode_file(header: dict | list | str | bytes, data: bytes = b"", header_len: int | None = None) -> bytes:
    """Bytes of a safetensors file: 8-byte LE header length, header, data.

    `header` may be a JSON-able object or raw bytes/str (for malformed headers); `header_len`
    overrides the length field (for lying headers).
    """
    if isinstance(header, bytes):
        raw = header
    elif isinstance(header, str):
        raw = header.encode("utf-8")
    else:
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    n = len(raw) if header_len is None else header_len
    return struct.pack("<Q", n) + raw + data


def write_raw(path: Path, header: dict | list | str | bytes, data: bytes = b"", header_len: int | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_file(header, data, header_len))
    return path


def layout(tensors: dict[str, np.ndarray], metadata: dict | None = None) -> tuple[dict, bytes]:
    """Header dict and data buffer with tensors laid out contiguously in dict order."""
    header: dict = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    chunks = []
    pos = 0
    for key, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        blob = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        header[key] = {"dtype": ST_NAMES[arr.dtype], "shape": list(arr.shape), "data_offsets": [pos, pos + len(blob)]}
        chunks.append(blob)
        pos += len(blob)
    return header, b"".join(chunks)


def write_tensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict | None = None) -> dict:
    """Write a valid safetensors file by hand; returns its header."""
    header, data = layout(tensors, metadata)
    write_raw(path, header, data)
    return header


def read_header(path: Path) -> tuple[dict, int]:
    """(header dict, absolute offset of the data buffer) of a safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return header, 8 + n


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file (BF16 included, which safetensors' numpy API lacks)."""
    header, start = read_header(path)
    blob = Path(path).read_bytes()
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        b, e = info["data_offsets"]
        dt = NP_DTYPES[info["dtype"]].newbyteorder("<")
        out[key] = np.frombuffer(blob[start + b : start + e], dtype=dt).reshape(info["shape"])
    return out


def fixture_tensors(name: str) -> dict[str, np.ndarray]:
    """Every tensor of a fixture directory, following the shard index when there is one."""
    d = FIXTURES / name
    index = d / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        per_file: dict[str, dict[str, np.ndarray]] = {}
        out = {}
        for key, file in weight_map.items():
            if file not in per_file:
                per_file[file] = read_tensors(d / file)
            out[key] = per_file[file][key]
        return out
    return read_tensors(d / "model.safetensors")


def fixture_config(name: str) -> dict:
    return json.loads((FIXTURES / name / "config.json").read_text())


def rewrite_fixture(
    name: str,
    dst: Path,
    drop: tuple[str, ...] = (),
    replace: dict[str, np.ndarray] | None = None,
    add: dict[str, np.ndarray] | None = None,
    config: dict | None = None,
) -> Path:
    """Copy a single-file fixture to `dst` as one model.safetensors, with tensors dropped/replaced/added."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    tensors = dict(fixture_tensors(name))
    for key in drop:
        del tensors[key]
    tensors.update(replace or {})
    tensors.update(add or {})
    write_tensors(dst / "model.safetensors", tensors, {"format": "pt"})
    if config is None:
        shutil.copy(FIXTURES / name / "config.json", dst / "config.json")
    else:
        (dst / "config.json").write_text(json.dumps(config))
    return dst
