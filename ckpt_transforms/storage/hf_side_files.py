"""The small files of a Hugging Face model directory besides its weights: config, generation
config, tokenizer. `convert` keeps them with the checkpoint, so `export` can write a complete
model directory without being told where the model came from.
"""

from __future__ import annotations

import json
import os

from ckpt_transforms.storage import outdir
from ckpt_transforms.storage.sources import ByteSource, SourceError, open_source

CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
SIDE_FILES = (
    CONFIG,
    GENERATION_CONFIG,
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
)
KEPT_DIR = "ckptbeam_hf"  # inside the checkpoint's step directory, next to the provenance record
MAX_SIDE_FILE_BYTES = 64 * 2**20  # tokenizer.json of large vocabularies is ~30 MB


def read_side_files(source: ByteSource, known: dict[str, bytes] | None = None) -> dict[str, bytes]:
    """Those of SIDE_FILES the model directory has (config.json must be there); `known`: files
    already read (not fetched again)."""
    files = dict(known or {})
    for name in SIDE_FILES:
        if name in files or not source.exists(name):
            continue
        size = source.size(name)
        if size > MAX_SIDE_FILE_BYTES:
            raise SourceError(
                f"{source.uri.rstrip('/')}/{name} is {size} bytes, over the {MAX_SIDE_FILE_BYTES}-byte limit"
            )
        files[name] = source.read_range(name, 0, size)
    if CONFIG not in files:
        raise SourceError(f"{source.uri}: no {CONFIG}")
    return files


def keep_with_checkpoint(step_dir: str, files: dict[str, bytes]) -> None:
    directory = outdir.join(step_dir, KEPT_DIR)
    outdir.make_dirs(directory)
    for name, data in files.items():
        outdir.write_bytes(outdir.join(directory, name), data)


def kept_files(step_dir: str) -> dict[str, bytes]:
    """The side files `convert` kept with a checkpoint ({} if it kept none)."""
    directory = outdir.join(step_dir, KEPT_DIR)
    files = {}
    for name in SIDE_FILES:
        data = outdir.read_bytes(outdir.join(directory, name))
        if data is not None:
            files[name] = data
    return files


def load_side_files(where: str, revision: str | None = None) -> dict[str, bytes]:
    """--hf_config: a config.json file, or a model directory / gs:// / hf:// repo (then also its
    generation config and tokenizer files; `revision`: --revision, for hf:// only). Weights are never read."""
    if where.endswith(".json") and "://" not in where:
        if revision:
            raise SourceError(f"--revision {revision} applies to --hf_config hf://ORG/REPO, not to the file {where}")
        if not os.path.isfile(where):
            raise SourceError(f"--hf_config {where}: no such file")
        with open(where, "rb") as f:
            data = f.read(MAX_SIDE_FILE_BYTES + 1)
        if len(data) > MAX_SIDE_FILE_BYTES:
            raise SourceError(f"--hf_config {where} is over the {MAX_SIDE_FILE_BYTES}-byte limit")
        return {CONFIG: data}
    return read_side_files(open_source(where, revision))


def parse_config(data: bytes, where: str) -> dict:
    try:
        config = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SourceError(f"{where}: config.json is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise SourceError(f"{where}: config.json is not a JSON object")
    return config
