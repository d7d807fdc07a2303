"""Headers without weights: a SourceModel synthesized from config.json and a model map.

Planning only needs tensor names, shapes, dtypes and byte ranges; the map already derives names
and shapes from config.json, and its decode ops name the quantized dtypes. So a 671B plan (item
count, bytes, the largest item) can be made, checked and estimated before any weight exists.
Offsets are laid out as a writer would: contiguous tensors in shards of about 5 GB.

The same headers can also be written to disk as a *sparse* model directory (`write_sparse_source`):
real safetensors files and index whose data regions are holes (never written, so a 671B
checkpoint takes a few MB of disk), read by the real header reader; `fill_tensors` then gives a
few chosen tensors deterministic random values, so a subset of the model can really be converted.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import zlib
from collections.abc import Callable, Iterable

import numpy as np

from ckpt_transforms.planning.specs import ModelMap, expand_targets
from ckpt_transforms.safetensors_io.index import INDEX_FILE, SourceModel, TensorInfo
from ckpt_transforms.tensors.dtypes import SAFETENSORS_DTYPES, bits_per_element
from ckpt_transforms.tensors.ops import split_decode

SHARD_BYTES = 5 * 10**9
# Tensors official checkpoints keep in float32 whatever config.json's dtype says (DeepSeek-V3's
# router bias), so synthesized headers have their real size and dtype.
_FLOAT32_SOURCES = {"e_score_correction_bias": "F32"}
_CONFIG_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def config_dtype(config: dict) -> str:
    """Safetensors dtype of the unquantized tensors, from config.json (`dtype` or `torch_dtype`)."""
    name = config.get("dtype") or config.get("torch_dtype") or "bfloat16"
    return _CONFIG_DTYPES.get(str(name), "BF16")


def expected_tensors(
    config: dict, model_map: ModelMap, scan_layers: bool = False
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """HF key -> (dtype, shape) of every tensor the map reads."""
    plain = config_dtype(config)
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    for target in expand_targets(model_map, scan_layers):
        decoder, _ = split_decode(target.ops)
        main_dtype = decoder.input_dtypes[0][0] if decoder else plain
        for i, key in enumerate(target.hf_keys):
            tensors[key] = (_FLOAT32_SOURCES.get(key.rsplit(".", 1)[-1], main_dtype), target.source_shape)
            for j, aux in enumerate(target.aux):
                tensors[target.aux_keys[i][j]] = (decoder.input_dtypes[j + 1][0], aux.shape)
    return tensors


def synthetic_source(config: dict, model_map: ModelMap, uri: str, scan_layers: bool = True) -> SourceModel:
    """A SourceModel whose headers are what a checkpoint of this config would carry."""
    tensors: dict[str, TensorInfo] = {}
    shard, offset, files = 0, 0, []
    for key, (dtype, shape) in sorted(expected_tensors(config, model_map, scan_layers).items()):
        length = math.prod(shape) * bits_per_element(dtype) // 8
        if offset and offset + length > SHARD_BYTES:
            shard, offset = shard + 1, 0
        file = f"synthetic-{shard + 1:05d}.safetensors"
        if not files or files[-1] != file:
            files.append(file)
        tensors[key] = TensorInfo(key, file, dtype, tuple(shape), offset, length)
        offset += length
    return SourceModel(uri, config, tensors, files, {f: {"synthetic": True} for f in files})


# --------------------------------------------------------------------------- sparse model directories

HeaderTable = dict[str, tuple[str, tuple[int, ...]]]  # HF key -> (safetensors dtype, shape)
_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.")


def mtp_tensors(config: dict, build_map: Callable[[dict], ModelMap]) -> HeaderTable:
    """DeepSeek's multi-token-prediction layers as its official checkpoints store them.

    Layer `num_hidden_layers + i` is a whole decoder layer (the map's tensors for a config that
    many layers deeper, FP8 where the others are) plus its own embedding, norms, projection and
    head. ckptbeam never converts them (known extras), but a realistic source must carry them:
    they are ~12 GB of DeepSeek-V3 and must be validated and skipped.
    """
    n, extra = int(config["num_hidden_layers"]), int(config.get("num_nextn_predict_layers") or 0)
    if not extra:
        return {}
    deeper = {**config, "num_hidden_layers": n + extra}
    out = {
        key: spec
        for key, spec in expected_tensors(deeper, build_map(deeper)).items()
        if (m := _LAYER_KEY.match(key)) and int(m.group(1)) >= n
    }
    h, vocab, plain = int(config["hidden_size"]), int(config["vocab_size"]), config_dtype(config)
    for layer in range(n, n + extra):
        p = f"model.layers.{layer}."
        out |= {
            p + "enorm.weight": (plain, (h,)),
            p + "hnorm.weight": (plain, (h,)),
            p + "eh_proj.weight": (plain, (h, 2 * h)),
            p + "embed_tokens.weight": (plain, (vocab, h)),
            p + "shared_head.norm.weight": (plain, (h,)),
            p + "shared_head.head.weight": (plain, (vocab, h)),
        }
    return out


def _natural(key: str) -> list:
    # model.layers.2.* before model.layers.10.*, as real shards are ordered.
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def _header_bytes(entries: dict) -> bytes:
    """The JSON header, space-padded to a multiple of 8 as the safetensors writer does."""
    text = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
    return text + b" " * (-len(text) % 8)


def write_sparse_source(
    directory: str, config: dict, tensors: HeaderTable, shard_bytes: int = SHARD_BYTES
) -> dict[str, TensorInfo]:
    """Write a model directory (config.json, index, shards) whose tensor data is never written.

    Every shard gets a real safetensors header and is then extended to its full size with
    os.truncate, so its data region is a hole: the file reads as zeros and takes no disk. Returns
    every tensor's absolute byte range (what the header reader will find).
    """
    os.makedirs(directory, exist_ok=True)
    shards: list[list[tuple[str, str, tuple[int, ...], int]]] = [[]]
    size = 0
    for key in sorted(tensors, key=_natural):
        dtype, shape = tensors[key]
        length = math.prod(shape) * bits_per_element(dtype) // 8
        if shards[-1] and size + length > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((key, dtype, tuple(shape), length))
        size += length
    infos: dict[str, TensorInfo] = {}
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        entries, offset = {}, 0
        for key, dtype, shape, length in shard:
            entries[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + length]}
            offset += length
        header = _header_bytes(entries)
        data_start = 8 + len(header)
        path = os.path.join(directory, file)
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(header)) + header)
        os.truncate(path, data_start + offset)  # the hole: apparent size only
        for key, dtype, shape, length in shard:
            begin = entries[key]["data_offsets"][0]
            infos[key] = TensorInfo(key, file, dtype, shape, data_start + begin, length)
            weight_map[key] = file
        total += offset
    with open(os.path.join(directory, INDEX_FILE), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return infos


def write_sparse_model(
    directory: str, config: dict, build_map: Callable[[dict], ModelMap], shard_bytes: int = SHARD_BYTES
) -> dict[str, TensorInfo]:
    """A sparse model directory of `config`: every tensor the map reads, plus MTP layers."""
    tensors = expected_tensors(config, build_map(config)) | mtp_tensors(config, build_map)
    return write_sparse_source(directory, config, tensors, shard_bytes)


def supports_sparse_files(directory: str, probe_bytes: int = 2**30) -> bool:
    """Whether a file extended by os.truncate in `directory` stays a hole (takes no blocks).

    Check this before write_sparse_source: where holes are not supported, a 671B source would
    really allocate its ~700 GB."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, ".sparse-probe")
    try:
        with open(path, "wb"):
            pass
        os.truncate(path, probe_bytes)
        return os.stat(path).st_blocks * 512 < probe_bytes // 1024
    except OSError:
        return False
    finally:
        if os.path.exists(path):
            os.remove(path)


def disk_usage(directory: str) -> tuple[int, int]:
    """(apparent bytes, bytes actually allocated) of the directory's files."""
    apparent = allocated = 0
    for entry in os.scandir(directory):
        if entry.is_file():
            st = entry.stat()
            apparent += st.st_size
            allocated += st.st_blocks * 512
    return apparent, allocated


# e4m3fn codes minus the two NaN patterns (S.1111.111); every other code is a finite value.
_E4M3_FINITE = np.array([c for c in range(256) if c & 0x7F != 0x7F], dtype=np.uint8)


def random_tensor_bytes(key: str, dtype: str, count: int, rng: np.random.Generator) -> bytes:
    """`count` elements of plausible values: finite FP8 codes, positive scales, small floats."""
    is_scale = key.endswith(("_scale_inv", ".scale", "_scales"))
    if is_scale and dtype in ("U8", "F8_E8M0"):
        return rng.integers(118, 136, count, dtype=np.uint8).tobytes()  # e8m0: 2**-9 .. 2**8
    if dtype in ("BF16", "F16", "F32", "F64"):
        # Scales are dequantization multipliers: positive, around max|w| / 448 as in real FP8
        # checkpoints; anything else small and signed.
        values = rng.uniform(2.0**-14, 2.0**-6, count) if is_scale else rng.standard_normal(count) * 0.05
        return values.astype(SAFETENSORS_DTYPES[dtype][0]).tobytes()
    if dtype == "F8_E4M3":
        return rng.choice(_E4M3_FINITE, count).tobytes()
    return rng.integers(0, 256, math.ceil(count * bits_per_element(dtype) / 8), dtype=np.uint8).tobytes()


def fill_tensors(
    directory: str, tensors: dict[str, TensorInfo], keys: Iterable[str], seed: int = 0, chunk_bytes: int = 64 * 2**20
) -> int:
    """Write deterministic random data into the byte ranges of `keys`; returns bytes written.

    Each tensor's values depend only on (seed, key), not on which others are filled or in what
    order, so a test and a benchmark filling different subsets agree on shared tensors.
    """
    written = 0
    for key in sorted(set(keys)):
        info = tensors[key]
        bits = bits_per_element(info.dtype)
        rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
        count = math.prod(info.shape)
        step = max(1, chunk_bytes * 8 // bits) if bits >= 8 else max(count, 1)  # sub-byte: one go
        fd = os.open(os.path.join(directory, info.file), os.O_WRONLY)
        try:
            pos = info.offset
            for start in range(0, count, step):
                data = random_tensor_bytes(key, info.dtype, min(step, count - start), rng)
                os.pwrite(fd, data, pos)
                pos += len(data)
            if pos != info.offset + info.length:
                raise AssertionError(f"{key}: wrote {pos - info.offset} bytes, expected {info.length}")
        finally:
            os.close(fd)
        written += info.length
    return written
