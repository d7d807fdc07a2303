"""ckptbeam's own options as a Beam `PipelineOptions` subclass: Beam's flags pass straight through."""

from __future__ import annotations

import argparse
import re

from apache_beam.options.pipeline_options import PipelineOptions

from ckpt_transforms.planning.convert_plan import DEFAULT_MAX_ITEM_BYTES
from ckpt_transforms.tensors.dtypes import SAVE_DTYPES

_UNITS = {
    "": 1,
    "k": 2**10,
    "kb": 2**10,
    "kib": 2**10,
    "m": 2**20,
    "mb": 2**20,
    "mib": 2**20,
    "g": 2**30,
    "gb": 2**30,
    "gib": 2**30,
}


def parse_bytes(text: str) -> int:
    """'268435456', '256MiB', '1g' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (e.g. 268435456, 256MiB, 1GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_shard_count(text: str) -> int:
    """--shard_count: a whole number of devices, at least 1."""
    try:
        value = int(str(text).strip())
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of devices >= 1, got {text!r}")
    return value


def parse_vocab_size(text: str) -> int:
    """--vocab_size: MaxText's vocab_size, a whole number of embedding rows, at least 1."""
    try:
        value = int(str(text).strip())
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of vocabulary rows >= 1, got {text!r}")
    return value


def parse_only(text: str | None) -> tuple[str, ...]:
    """--only 'a*,b*' -> ('a*', 'b*'); unset or empty -> () (convert everything)."""
    return tuple(p.strip() for p in str(text or "").split(",") if p.strip())


def str2bool(text: str) -> bool:
    if str(text).lower() in ("1", "true", "yes", "y", "t"):
        return True
    if str(text).lower() in ("0", "false", "no", "n", "f"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class ConvertOptions(PipelineOptions):
    """HF safetensors -> MaxText Orbax options (names follow MaxText's where MaxText has one).

    `--dry_run` is Beam's own flag (TestOptions: run nothing, submit nothing); ckptbeam reads
    it too and prints the plan summary without writing anything.
    """

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--source", help="Hugging Face model directory (config.json + safetensors)")
        parser.add_argument("--output", help="Output base directory; the checkpoint lands in OUTPUT/0/items")
        parser.add_argument(
            "--model",
            default=None,
            help="Family (see README's support table: llama, qwen3, deepseek3, gemma3, ...) or MaxText model name "
            "(llama3.1-8b, qwen3-4b, deepseek3-671b, gemma2-9b, ...); "
            "default: detected from config.json",
        )
        parser.add_argument(
            "--scan_layers",
            type=str2bool,
            default=True,
            help="Stack decoder layers on MaxText's param_scan_axis (true, MaxText's default) or write layers_N (false)",
        )
        parser.add_argument(
            "--save_dtype", choices=sorted(SAVE_DTYPES), default="bfloat16", help="dtype of the saved weights"
        )
        parser.add_argument(
            "--use_multimodal",
            type=str2bool,
            nargs="?",
            const=True,
            default=False,
            help="Multimodal checkpoints (Gemma3): also convert the vision tower and projector (true), or only "
            "the text decoder (false, MaxText's default)",
        )
        parser.add_argument(
            "--use_ocdbt",
            type=str2bool,
            default=True,
            help="Store arrays in OCDBT databases (true, MaxText's checkpoint_storage_use_ocdbt default) or one "
            "directory of chunk files per param (false; with --use_zarr3=false: the layout MaxText's Pathways "
            "loaders expect)",
        )
        parser.add_argument(
            "--use_zarr3",
            type=str2bool,
            default=True,
            help="Array format: zarr3 (true, MaxText's checkpoint_storage_use_zarr3 default) or zarr2 (false)",
        )
        parser.add_argument(
            "--shard_count",
            type=parse_shard_count,
            default=1,
            help="Chunk each array as MaxText's converter saves it from N devices, so sharded restores read in "
            "parallel: split along axis 0 if N divides it, else axis 1 (MaxText's sharding), else the first later "
            "axis N divides (Orbax's replica-parallel save), else whole. 1 (default): one chunk per array (within "
            "--max_item_bytes); 16 reproduces the layout of MaxText's to_maxtext default "
            "(--simulated_cpu_devices_count=16)",
        )
        parser.add_argument(
            "--vocab_size",
            type=parse_vocab_size,
            default=None,
            help="MaxText's vocab_size: zero-pad or truncate the embedding (and an untied logits_dense) to N rows; "
            "MaxText must then be run with vocab_size=N (the summary says when). Default: MaxText's size for the "
            "official Gemma2/Gemma3 vocabularies (256128, 262144), else config.json's vocab_size",
        )
        parser.add_argument(
            "--max_item_bytes",
            type=parse_bytes,
            default=DEFAULT_MAX_ITEM_BYTES,
            help="Memory budget of a worker process's work items in flight (regions, slab scratch, encoded "
            "output); items are planned at up to half of it so two overlap; e.g. 256MiB",
        )
        parser.add_argument(
            "--force",
            type=str2bool,
            nargs="?",
            const=True,
            default=False,
            help="Re-convert even if OUTPUT/0 is up to date, and replace a checkpoint ckptbeam did not make",
        )
        parser.add_argument(
            "--item_attempts",
            type=int,
            default=3,
            help="Attempts per work item inside a worker (each into a fresh OCDBT database)",
        )
        parser.add_argument(
            "--only",
            default=None,
            help="Write a partial checkpoint: only the params matching these comma-separated fnmatch patterns "
            "over MaxText param names, full (params.params.decoder.moe_layers_0.self_attention.wq_a.kernel) or "
            "below params.params (decoder.moe_layers_0.*). The whole source is still validated",
        )
