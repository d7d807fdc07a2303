"""Our own safetensors header and index reader: exact byte ranges per tensor, headers only.

Format: u64 little-endian header length N, N bytes of JSON, then the data buffer. Offsets in the
header are relative to the buffer. Validation follows the safetensors reference implementation
(contiguous, non-overlapping tensors covering the whole file), so a lying or truncated header is
refused before any work item is planned.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from dataclasses import dataclass

from ckpt_transforms.storage.sources import ByteSource, SourceError, check_member_name
from ckpt_transforms.tensors.dtypes import SAFETENSORS_DTYPES

MAX_HEADER_BYTES = 100_000_000
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live: `file`, absolute `offset`, `length`, dtype and shape.

    Also the unit of reading in a plan: a work item's slab names a TensorInfo (or a row range).
    """

    key: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    length: int

    def rows(self, start: int, stop: int) -> TensorInfo:
        """The same tensor narrowed to rows [start, stop) of axis 0: what a row-split item reads."""
        offset, length = self.row_range(start, stop)
        return dataclasses.replace(self, shape=(stop - start,) + self.shape[1:], offset=offset, length=length)

    def row_range(self, start: int, stop: int) -> tuple[int, int]:
        """(offset, length) of rows [start, stop) along axis 0 (rows are contiguous in C order)."""
        if not self.shape:
            return self.offset, self.length
        row_bytes = self.length // self.shape[0] if self.shape[0] else 0
        return self.offset + start * row_bytes, (stop - start) * row_bytes


def parse_header(header_bytes: bytes, file: str, file_size: int, where: str | None = None) -> dict[str, TensorInfo]:
    """Validate a safetensors JSON header and return its tensors with absolute byte ranges.

    `file` is the shard name inside the model directory; `where` its full URI for messages.
    """
    shown = where or file
    n = len(header_bytes)
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SourceError(f"{shown}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise SourceError(f"{shown}: safetensors header is not a JSON object")
    data_start = 8 + n
    entries = []
    for key, info in header.items():
        if key == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise SourceError(f"{shown}: __metadata__ must map strings to strings")
            continue
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise SourceError(f"{shown}: tensor {key!r} lacks dtype/shape/data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
            raise SourceError(f"{shown}: tensor {key!r} has unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise SourceError(f"{shown}: tensor {key!r} has invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise SourceError(f"{shown}: tensor {key!r} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        bits = math.prod(shape) * SAFETENSORS_DTYPES[dtype][1]
        if bits % 8 or end - begin != bits // 8 or begin < 0:
            raise SourceError(f"{shown}: tensor {key!r}: data_offsets {offsets} do not hold shape {shape} of {dtype}")
        entries.append((begin, end, key, dtype, tuple(shape)))
    entries.sort()
    expected = 0
    tensors: dict[str, TensorInfo] = {}
    for begin, end, key, dtype, shape in entries:
        if begin != expected:
            raise SourceError(
                f"{shown}: tensor {key!r} starts at byte {begin} of the data buffer, expected {expected} "
                "(gap or overlap between tensors)"
            )
        expected = end
        tensors[key] = TensorInfo(key, file, dtype, shape, data_start + begin, end - begin)
    if data_start + expected != file_size:
        raise SourceError(
            f"{shown}: header describes {data_start + expected} bytes but the file has {file_size} "
            "(truncated file or lying header)"
        )
    return tensors


def read_file_header(source: ByteSource, file: str) -> dict[str, TensorInfo]:
    """Read just the header of one safetensors file (two small range reads)."""
    size = source.size(file)
    where = f"{source.uri.rstrip('/')}/{file}"
    if size < 8:
        raise SourceError(f"{where}: {size} bytes is too short for a safetensors file")
    (n,) = struct.unpack("<Q", source.read_range(file, 0, 8))
    if n > MAX_HEADER_BYTES:
        raise SourceError(f"{where}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
    if 8 + n > size:
        raise SourceError(f"{where}: header length {n} runs past the end of the {size}-byte file")
    return parse_header(source.read_range(file, 8, n), file, size, where)


@dataclass
class SourceModel:
    """A Hugging Face model directory as seen from its headers: config + every tensor's range."""

    uri: str
    config: dict
    tensors: dict[str, TensorInfo]
    files: list[str]
    file_fingerprints: dict[str, dict]


def read_json(source: ByteSource, name: str) -> dict:
    where = f"{source.uri.rstrip('/')}/{name}"
    if not source.exists(name):
        raise SourceError(f"{where} not found")
    try:
        data = json.loads(source.read_range(name, 0, source.size(name)).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SourceError(f"{where} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise SourceError(f"{where} is not a JSON object")
    return data


def load_source_model(source: ByteSource) -> SourceModel:
    """config.json + the index (or the single file) + all shard headers; no tensor data is read."""
    config = read_json(source, "config.json")
    if source.exists(INDEX_FILE):
        index = read_json(source, INDEX_FILE)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise SourceError(f"{source.uri}/{INDEX_FILE} has no weight_map")
        for key, file in weight_map.items():
            check_member_name(file, f"{source.uri.rstrip('/')}/{INDEX_FILE}: shard of {key!r}")
        files = sorted(set(weight_map.values()))
    elif source.exists(SINGLE_FILE):
        weight_map = None
        files = [SINGLE_FILE]
    else:
        raise SourceError(
            f"{source.uri}: neither {INDEX_FILE} nor {SINGLE_FILE} found "
            "(only safetensors checkpoints are supported; .bin/pickle files are never read)"
        )
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        for key, info in read_file_header(source, file).items():
            if weight_map is not None and weight_map.get(key) != file:
                # The index is the authority; a tensor the index places elsewhere is ignored.
                continue
            tensors[key] = info
    if weight_map is not None:
        missing = sorted(k for k in weight_map if k not in tensors)
        if missing:
            raise SourceError(
                f"{source.uri}/{INDEX_FILE} lists {len(missing)} tensor(s) absent from their shard, "
                f"e.g. {missing[0]!r} in {weight_map[missing[0]]}"
            )
    fingerprints = {f: source.fingerprint(f) for f in files}
    return SourceModel(source.uri, config, tensors, files, fingerprints)
