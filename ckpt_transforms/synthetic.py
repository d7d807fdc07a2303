"""Headers without weights: a SourceModel synthesized from config.json and a model map.

Planning only needs tensor names, shapes, dtypes and byte ranges; the map already derives names
and shapes from config.json, and its decode ops name the quantized dtypes. So a 671B plan (item
count, bytes, the largest item) can be made, checked and estimated before any weight exists.
Offsets are laid out as a writer would: contiguous tensors in shards of about 5 GB.
"""

from __future__ import annotations

import math

from ckpt_transforms.dtypes import bits_per_element
from ckpt_transforms.ops import split_decode
from ckpt_transforms.safetensors_index import SourceModel, TensorInfo
from ckpt_transforms.specs import ModelMap, expand_targets

SHARD_BYTES = 5 * 10**9
_CONFIG_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def config_dtype(config: dict) -> str:
    """Safetensors dtype of the unquantized tensors, from config.json (`dtype` or `torch_dtype`)."""
    name = config.get("dtype") or config.get("torch_dtype") or "bfloat16"
    return _CONFIG_DTYPES.get(str(name), "BF16")


def _expected_tensors(config: dict, model_map: ModelMap, scan_layers: bool) -> dict[str, tuple[str, tuple[int, ...]]]:
    """HF key -> (dtype, shape) of every tensor the map reads."""
    plain = config_dtype(config)
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    for target in expand_targets(model_map, scan_layers):
        decoder, _ = split_decode(target.ops)
        main_dtype = decoder.input_dtypes[0][0] if decoder else plain
        for i, key in enumerate(target.hf_keys):
            tensors[key] = (main_dtype, target.source_shape)
            for j, aux in enumerate(target.aux):
                tensors[target.aux_keys[i][j]] = (decoder.input_dtypes[j + 1][0], aux.shape)
    return tensors


def synthetic_source(config: dict, model_map: ModelMap, uri: str, scan_layers: bool = True) -> SourceModel:
    """A SourceModel whose headers are what a checkpoint of this config would carry."""
    tensors: dict[str, TensorInfo] = {}
    shard, offset, files = 0, 0, []
    for key, (dtype, shape) in sorted(_expected_tensors(config, model_map, scan_layers).items()):
        length = math.prod(shape) * bits_per_element(dtype) // 8
        if offset and offset + length > SHARD_BYTES:
            shard, offset = shard + 1, 0
        file = f"synthetic-{shard + 1:05d}.safetensors"
        if not files or files[-1] != file:
            files.append(file)
        tensors[key] = TensorInfo(key, file, dtype, tuple(shape), offset, length)
        offset += length
    return SourceModel(uri, config, tensors, files, {f: {"synthetic": True} for f in files})
