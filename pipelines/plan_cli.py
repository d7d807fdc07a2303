"""`ckptbeam plan`: the plan summary and a wall-time estimate, without converting anything.

--source may be a model directory with weights (real headers are read) or just a config.json
(or a directory holding only config.json): then the headers are synthesized from the model map,
so a 671B conversion can be sized before a single weight is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import model_maps
from ckpt_transforms.planning.convert_plan import DEFAULT_MAX_ITEM_BYTES, Plan, build_plan
from ckpt_transforms.safetensors_io.index import INDEX_FILE, SINGLE_FILE, load_source_model
from ckpt_transforms.safetensors_io.synthetic import synthetic_source
from ckpt_transforms.storage.sources import open_source
from ckpt_transforms.tensors.dtypes import SAVE_DTYPES
from pipelines.convert import emit_summary, format_selected, format_summary, human_bytes
from pipelines.options import (
    HelpFormatter,
    add_bool,
    add_json,
    check_argv,
    parse_bytes,
    parse_only,
    parse_shard_count,
    parse_vocab_size,
)

# Per-worker conversion rate measured on a 2-vCPU machine (README, Performance); override it with
# what `benchmarks/bench_convert.py` measures on your worker type.
DEFAULT_WORKER_MB_S = 100.0
STARTUP_SECONDS = 10.0


def _config_only(path: str) -> str | None:
    """The config.json to plan from when `path` holds no weights, else None."""
    if path.endswith(".json") and os.path.isfile(path):
        return path
    if "://" not in path and os.path.isdir(path):
        has_weights = any(os.path.exists(os.path.join(path, f)) for f in (INDEX_FILE, SINGLE_FILE))
        if not has_weights and os.path.isfile(os.path.join(path, "config.json")):
            return os.path.join(path, "config.json")
    return None


def make_plan(
    source: str,
    model: str | None,
    scan_layers: bool,
    save_dtype: str,
    budget: int,
    use_multimodal: bool = False,
    shard_count: int = 1,
    only: tuple[str, ...] = (),
    vocab_size: int | None = None,
    revision: str | None = None,
) -> tuple[Plan, bool]:
    """(plan, synthesized?) for a model directory/URI or a bare config.json."""
    config_path = _config_only(source)
    if config_path and revision:
        raise ValueError(f"--revision {revision} applies to hf:// sources, not to the local config {config_path}")
    if config_path:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
        family = model_maps.detect_family(config, model)
        model_map = family.build(config, use_multimodal=use_multimodal, vocab_size=vocab_size)
        model_source = synthetic_source(config, model_map, config_path, scan_layers)
    else:
        model_source = load_source_model(open_source(source, revision))
        family = model_maps.detect_family(model_source.config, model)
        model_map = family.build(model_source.config, use_multimodal=use_multimodal, vocab_size=vocab_size)
    plan = build_plan(model_source, model_map, scan_layers, save_dtype, budget, shard_count, only)
    plan.vocab = model_maps.vocab_summary(family, model, model_map)
    return plan, bool(config_path)


def estimate_seconds(plan: Plan, workers: int, worker_mb_s: float) -> float:
    """Bytes spread over the workers, but never faster than the largest single item."""
    written = sum(i.bytes_written for i in plan.items)
    largest = max((i.bytes_written for i in plan.items), default=0)
    rate = worker_mb_s * 1e6
    return STARTUP_SECONDS + max(written / (workers * rate), largest / rate)


def plan_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ckptbeam plan", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--source", required=True, help="model directory/URI, or a config.json alone")
    parser.add_argument("--revision", default=None, help="as for ckptbeam convert: revision of an hf:// source")
    parser.add_argument("--model", default=None, help="as for ckptbeam convert (None: detected from config.json)")
    add_bool(parser, "--scan_layers", True, "as for ckptbeam convert")
    parser.add_argument("--save_dtype", default="bfloat16", choices=sorted(SAVE_DTYPES), help="as for ckptbeam convert")
    parser.add_argument(
        "--max_item_bytes", type=parse_bytes, default=DEFAULT_MAX_ITEM_BYTES, help="as for ckptbeam convert"
    )
    add_bool(parser, "--use_multimodal", False, "as for ckptbeam convert")
    parser.add_argument("--shard_count", type=parse_shard_count, default=1, help="as for ckptbeam convert")
    parser.add_argument("--only", default=None, help="as for ckptbeam convert: plan and list only matching params")
    parser.add_argument(
        "--vocab_size", type=parse_vocab_size, default=None, help="as for ckptbeam convert: embedding rows (MaxText's)"
    )
    parser.add_argument("--workers", type=int, default=1, help="workers (one work item each at a time)")
    parser.add_argument(
        "--worker_mb_s", type=float, default=DEFAULT_WORKER_MB_S, help="MB/s (10^6 bytes/s) one worker converts"
    )
    add_json(parser)
    return parser


def plan_command(argv: list[str]) -> int:
    parser = plan_parser()
    args = parser.parse_args(check_argv("plan", argv, parser, with_beam=False))
    report = sys.stderr if args.json else sys.stdout
    plan, synthesized = make_plan(
        args.source,
        args.model,
        args.scan_layers,
        args.save_dtype,
        args.max_item_bytes,
        args.use_multimodal,
        args.shard_count,
        parse_only(args.only),
        args.vocab_size,
        args.revision,
    )
    summary = plan.summary()
    origin = "headers synthesized from config.json" if synthesized else "real safetensors headers"
    print(f"ckptbeam plan for {args.source} ({origin}):\n{format_summary(summary)}", file=report)
    if plan.only:
        print(format_selected([(a.name, a.shape, a.dtype) for a in plan.arrays], "params selected"), file=report)
    seconds = estimate_seconds(plan, args.workers, args.worker_mb_s)
    print(
        f"  estimate        {seconds / 60:.1f} min with {args.workers} worker(s) at "
        f"{human_bytes(args.worker_mb_s * 1e6)}/s each ({human_bytes(summary['bytes_written'])} to write)",
        file=report,
    )
    summary.update(estimate_seconds=round(seconds, 1), workers=args.workers, synthesized_headers=synthesized)
    emit_summary(summary, args.json, dry_run=True)
    return 0
