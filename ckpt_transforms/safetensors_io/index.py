"""Our own safetensors header and index reader: exact byte ranges per tensor, headers only.

Format: u64 little-endian header length N, N bytes of JSON, then the data buffer. Offsets in the
header are relative to the buffer. Validation follows the safetensors reference implementation
(contiguous, non-overlapping tensors covering the whole file), so a lying or truncated header is
refused before any work item is planned.

Everything in these files is untrusted: sizes are checked against caps and against each other
before anything proportional to them is read or built (the caps are in the README's Safety section).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import struct
from dataclasses import dataclass
from typing import Any

from ckpt_transforms.storage.sources import ByteSource, SourceError, check_member_name
from ckpt_transforms.tensors.dtypes import SAFETENSORS_DTYPES

MAX_HEADER_BYTES = 100_000_000  # the safetensors reference implementation's limit
MAX_CONFIG_BYTES = 16 * 2**20  # config.json
MAX_INDEX_BYTES = 64 * 2**20  # model.safetensors.index.json
MAX_JSON_DEPTH = 32  # nesting of objects/arrays in any JSON we read (real files: under 8)
MAX_TENSOR_NDIM = 16
MAX_TENSOR_ELEMENTS = 2**36  # 16x the largest tensor of any released LLM (~4.3e9 elements)
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


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _DuplicateKey(dup)
    return out


def json_depth(value: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0), without recursion."""
    depth, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        children = v.values() if isinstance(v, dict) else v if isinstance(v, list) else None
        if children is None:
            continue
        depth = max(depth, d)
        if d > MAX_JSON_DEPTH:
            break
        stack.extend((c, d + 1) for c in children if isinstance(c, dict | list))
    return depth


def parse_json(raw: bytes, where: str, what: str = "JSON") -> Any:
    """Strict JSON from untrusted bytes: UTF-8, no duplicate keys, at most MAX_JSON_DEPTH deep.

    Every failure is a SourceError naming `where` (never a RecursionError or a bare ValueError)."""
    try:
        value = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except _DuplicateKey as e:
        raise SourceError(f"{where}: {what} has the key {str(e)!r} twice (ambiguous; expected unique keys)") from None
    except RecursionError:
        raise SourceError(f"{where}: {what} is nested too deeply (limit {MAX_JSON_DEPTH} levels)") from None
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError, and ints over Python's digit limit
        raise SourceError(f"{where}: {what} is not valid JSON ({e})") from None
    if json_depth(value) > MAX_JSON_DEPTH:
        raise SourceError(f"{where}: {what} is nested too deeply (limit {MAX_JSON_DEPTH} levels)")
    return value


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_shape(shape: Any, key: str, shown: str) -> tuple[int, ...]:
    if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)):
        raise SourceError(f"{shown}: tensor {key!r} has invalid shape {shape!r} (expected a list of integers >= 0)")
    if len(shape) > MAX_TENSOR_NDIM:
        raise SourceError(f"{shown}: tensor {key!r} has {len(shape)} dimensions (limit {MAX_TENSOR_NDIM})")
    if any(d > MAX_TENSOR_ELEMENTS for d in shape) or math.prod(shape) > MAX_TENSOR_ELEMENTS:
        raise SourceError(
            f"{shown}: tensor {key!r} has shape {shape}, over the {MAX_TENSOR_ELEMENTS}-element limit per tensor"
        )
    return tuple(shape)


def _check_offsets(offsets: Any, tensor: str, shown: str, data_start: int, file_size: int) -> tuple[int, int]:
    """[begin, end] within the data buffer; `tensor` describes the tensor for messages."""
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise SourceError(f"{shown}: {tensor} has invalid data_offsets {offsets!r} (expected [begin, end] integers)")
    begin, end = offsets
    if begin < 0 or begin > end:
        raise SourceError(f"{shown}: {tensor} has data_offsets {offsets} (expected 0 <= begin <= end)")
    if data_start + end > file_size:
        raise SourceError(
            f"{shown}: {tensor} has data_offsets {offsets}, ending at byte {data_start + end}, but the file has "
            f"{file_size} bytes (truncated file or lying header)"
        )
    return begin, end


def parse_header(header_bytes: bytes, file: str, file_size: int, where: str | None = None) -> dict[str, TensorInfo]:
    """Validate a safetensors JSON header and return its tensors with absolute byte ranges.

    `file` is the shard name inside the model directory; `where` its full URI for messages.
    """
    shown = where or file
    n = len(header_bytes)
    header = parse_json(header_bytes, shown, "safetensors header")
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
        dtype = info["dtype"]
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
            raise SourceError(
                f"{shown}: tensor {key!r} has unknown dtype {dtype!r} (expected one of {', '.join(SAFETENSORS_DTYPES)})"
            )
        shape = _check_shape(info["shape"], key, shown)
        tensor = f"tensor {key!r} ({dtype} {list(shape)})"
        begin, end = _check_offsets(info["data_offsets"], tensor, shown, data_start, file_size)
        bits = math.prod(shape) * SAFETENSORS_DTYPES[dtype][1]
        if bits % 8 or end - begin != bits // 8:
            raise SourceError(
                f"{shown}: {tensor}: data_offsets {[begin, end]} hold {end - begin} bytes, expected "
                f"{bits / 8:g} for shape {list(shape)} of {dtype}"
            )
        entries.append((begin, end, key, dtype, shape))
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


def checked_size(source: ByteSource, name: str, where: str) -> int:
    """The file's size as the source reports it (a server may lie): a non-negative integer."""
    size = source.size(name)
    if not _is_int(size) or size < 0:
        raise SourceError(f"{where}: the source reports size {size!r} (expected a non-negative integer)")
    return size


def read_file_header(source: ByteSource, file: str) -> dict[str, TensorInfo]:
    """Read just the header of one safetensors file (two small range reads)."""
    where = f"{source.uri.rstrip('/')}/{file}"
    size = checked_size(source, file, where)
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
    config_bytes: bytes = b""  # config.json as read (kept with the checkpoint byte for byte)


def read_json(source: ByteSource, name: str, max_bytes: int = MAX_CONFIG_BYTES) -> dict:
    """A small JSON object file (config.json, the index): size-capped before it is read."""
    return read_json_with_bytes(source, name, max_bytes)[0]


def read_json_with_bytes(source: ByteSource, name: str, max_bytes: int = MAX_CONFIG_BYTES) -> tuple[dict, bytes]:
    """`read_json`, and the file's bytes."""
    where = f"{source.uri.rstrip('/')}/{name}"
    if not source.exists(name):
        raise SourceError(f"{where} not found")
    size = checked_size(source, name, where)
    if size > max_bytes:
        raise SourceError(f"{where} is {size} bytes, over the {max_bytes}-byte limit for this file")
    raw = source.read_range(name, 0, size)
    data = parse_json(raw, where)
    if not isinstance(data, dict):
        raise SourceError(f"{where} is not a JSON object")
    return data, raw


_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_EXPERT_INDEX = re.compile(r"(?:^|\.)experts\.(\d+)\.")
LAYER_FIELDS = ("num_hidden_layers",)
EXPERT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts")


def _indices_present(keys: list[str], pattern: re.Pattern) -> int | None:
    """1 + the largest index `pattern` finds in the tensor names; None if it finds none."""
    found = [int(m.group(1)) for k in keys if (m := pattern.search(k))]
    return max(found) + 1 if found else None


def check_config_against_headers(config: dict, tensors: dict[str, TensorInfo], where: str) -> None:
    """config.json's layer and expert counts must not exceed what the tensor names show.

    Maps build per-layer (and per-expert) tables from these counts, so a lying count is refused
    here, from the headers, before anything proportional to it exists. Counts below what the
    names show are left to the planner (it names the missing tensor)."""
    keys = list(tensors)
    scopes = [("", config)]
    scopes += [
        (f"{sub}.", config[sub]) for sub in ("text_config", "vision_config") if isinstance(config.get(sub), dict)
    ]
    for fields, pattern, what in ((LAYER_FIELDS, _LAYER_INDEX, "layers"), (EXPERT_FIELDS, _EXPERT_INDEX, "experts")):
        present = _indices_present(keys, pattern)
        for prefix, scope in scopes:
            for field in fields:
                value = scope.get(field)
                if not _is_int(value):
                    continue  # type and range errors are the model map's (ConfigError)
                if what == "layers" and value > (present or 0):
                    raise SourceError(
                        f"{where}/config.json: {prefix}{field} is {value}, but the tensors hold "
                        f"{present or 0} layers ('...layers.N...' names); expected at most {present or 0}"
                    )
                if what == "experts" and present is not None and value > present:
                    raise SourceError(
                        f"{where}/config.json: {prefix}{field} is {value}, but the tensors hold {present} "
                        f"experts ('...experts.N...' names); expected at most {present}"
                    )


def load_source_model(source: ByteSource) -> SourceModel:
    """config.json + the index (or the single file) + all shard headers; no tensor data is read."""
    uri = source.uri.rstrip("/")
    config, config_bytes = read_json_with_bytes(source, "config.json", MAX_CONFIG_BYTES)
    if source.exists(INDEX_FILE):
        index = read_json(source, INDEX_FILE, MAX_INDEX_BYTES)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise SourceError(f"{uri}/{INDEX_FILE} has no weight_map (expected an object of tensor -> shard file)")
        for key, file in weight_map.items():
            check_member_name(file, f"{uri}/{INDEX_FILE}: shard of {key!r}")
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
                f"{uri}/{INDEX_FILE} lists {len(missing)} tensor(s) absent from their shard, "
                f"e.g. {missing[0]!r} in {weight_map[missing[0]]}"
            )
    check_config_against_headers(config, tensors, uri)
    fingerprints = {f: source.fingerprint(f) for f in files}
    return SourceModel(source.uri, config, tensors, files, fingerprints, config_bytes)
