"""MaxText Orbax -> HF safetensors on Beam: plan on the launcher, fan out, finalize, publish.

    Create(work items) -> Reshuffle -> ExportWorkItem -> ToList -> FinalizeExport

Run: `ckptbeam export --source CKPT --output DIR [options] [Beam flags]`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

import model_maps
from ckpt_transforms import faults
from ckpt_transforms.orbax_io.reader import Checkpoint, load_checkpoint, step_dir_of
from ckpt_transforms.planning.convert_plan import PlanError
from ckpt_transforms.planning.export_plan import ExportPlan, build_export_plan
from ckpt_transforms.planning.specs import expand_targets
from ckpt_transforms.storage import lease, outdir
from ckpt_transforms.storage.hf_side_files import (
    CONFIG,
    kept_files,
    load_side_files,
    parse_config,
)
from pipelines.convert import emit_summary, format_selected, human_bytes, normalize_argv, report_stream
from pipelines.errors import add_cleanup_note
from pipelines.export_graph import (
    EXPORT_PROVENANCE_FILE,
    METRICS_NAMESPACE,
    OLD_INFIX,
    PUBLISHING_MARK,
    build_export_pipeline,
    count_done,
    published_names,
)
from pipelines.options import parse_only, split_export_argv
from pipelines.progress import ProgressMonitor
from pipelines.resume import Staging, export_plan_id, keep_after_failure, prepare_export

log = logging.getLogger("ckptbeam")
STAGING_INFIX = ".ckptbeam-tmp-"
EMBEDDING = "params.params.token_embedder.embedding"


def export_config(config: dict, weight_dtype: str) -> dict:
    """The config.json the exported model gets: the source's, unquantized (the weights are
    written dequantized, as MaxText does), with the dtype of the written tensors."""
    out = {k: v for k, v in config.items() if k != "quantization_config"}
    for key in ("torch_dtype", "dtype"):
        if key in out:
            out[key] = weight_dtype
    if "torch_dtype" not in out and "dtype" not in out:
        out["torch_dtype"] = weight_dtype
    for sub in ("text_config",):
        if isinstance(out.get(sub), dict) and "quantization_config" in out[sub]:
            out[sub] = {k: v for k, v in out[sub].items() if k != "quantization_config"}
    return out


def config_bytes(source: bytes, config: dict, exported: dict) -> bytes:
    """The source's bytes when nothing changed, else the config written as transformers does."""
    if exported == config:
        return source
    return (json.dumps(exported, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _has_vision(checkpoint: Checkpoint) -> bool:
    return any(".vision_encoder." in name for name in checkpoint.leaves)


def _embedding_rows(checkpoint: Checkpoint) -> int | None:
    """MaxText's vocabulary as the checkpoint holds it (it may be padded or cut relative to the
    HF config's; the map's inverse then resizes back to the config's vocab_size)."""
    leaf = checkpoint.leaves.get(EMBEDDING)
    return leaf.shape[0] if leaf is not None and leaf.shape else None


def resolve_scan_layers(requested: bool | None, checkpoint: Checkpoint, model_map) -> bool:
    """The checkpoint's layout: as recorded in its custom metadata, else the one whose param
    names it has. An explicit --scan_layers that disagrees is an error naming both."""
    recorded = checkpoint.scan_layers
    if recorded is None:
        matches = []
        for scan in (True, False):
            try:
                names = {t.name for t in expand_targets(model_map, scan)}
            except ValueError:
                continue
            if names and names <= set(checkpoint.leaves):
                matches.append(scan)
        recorded = matches[0] if len(matches) == 1 else None
    if requested is not None and recorded is not None and requested != recorded:
        raise PlanError(
            f"--scan_layers={str(requested).lower()} but the checkpoint {checkpoint.items_dir} is "
            f"scan_layers={str(recorded).lower()}"
        )
    if requested is None and recorded is None:
        raise PlanError(
            f"{checkpoint.items_dir}: cannot tell whether layers are scanned (no scan_layers in its custom "
            "metadata, and its param names fit neither layout); pass --scan_layers"
        )
    return recorded if requested is None else requested


def hf_side_files(hf_config: str | None, checkpoint: Checkpoint, revision: str | None = None) -> dict[str, bytes]:
    if hf_config:
        return load_side_files(hf_config, revision)
    if revision:
        raise PlanError(f"--revision {revision} applies to --hf_config hf://ORG/REPO, and no --hf_config was given")
    kept = kept_files(step_dir_of(checkpoint.items_dir))
    if CONFIG not in kept:
        raise PlanError(
            f"{checkpoint.items_dir}: the checkpoint carries no HF config.json (it was not made by ckptbeam "
            "convert); pass --hf_config (a config.json, a model directory or hf://ORG/REPO)"
        )
    return kept


def make_export_plan(args) -> tuple[ExportPlan, Checkpoint, dict[str, bytes], dict]:
    """The plan, the checkpoint, the side files to write and the provenance record."""
    checkpoint = load_checkpoint(args.source)
    side = hf_side_files(args.hf_config, checkpoint, args.revision)
    config = parse_config(side[CONFIG], args.hf_config or checkpoint.items_dir)
    family = model_maps.detect_family(config, args.model)
    unquantized = {k: v for k, v in config.items() if k != "quantization_config"}
    has_vision = _has_vision(checkpoint)
    multimodal = has_vision if args.use_multimodal is None else args.use_multimodal
    if has_vision and not multimodal:
        # MaxText's use_multimodal=false: the text decoder only; the vision leaves are not read.
        text_only = {n: leaf for n, leaf in checkpoint.leaves.items() if ".vision_encoder." not in n}
        checkpoint = dataclasses.replace(checkpoint, leaves=text_only)
    model_map = family.build(unquantized, use_multimodal=multimodal or None, vocab_size=_embedding_rows(checkpoint))
    scan = resolve_scan_layers(args.scan_layers, checkpoint, model_map)
    plan = build_export_plan(
        checkpoint, model_map, scan, args.weight_dtype, args.max_item_bytes, args.max_shard_size,
        only=parse_only(args.only),
    )  # fmt: skip
    exported = export_config(config, plan.weight_dtype)
    side = {**side, CONFIG: config_bytes(side[CONFIG], config, exported)}
    provenance = {
        "source": checkpoint.items_dir,
        "checkpoint": checkpoint.fingerprint,
        "family": family.name,
        "map_version": model_maps.MAP_VERSION,
        "side_files": {name: len(data) for name, data in sorted(side.items())},
        "config_sha256": hashlib.sha256(side[CONFIG]).hexdigest(),
        "options": {
            "scan_layers": scan,
            "weight_dtype": plan.weight_dtype,
            "max_shard_size": args.max_shard_size,
            **({"only": list(plan.only)} if plan.only else {}),
            **({"use_multimodal": False} if has_vision and not multimodal else {}),  # only when set
        },
    }
    return plan, checkpoint, side, provenance


def format_export_summary(s: dict) -> str:
    hb = human_bytes
    lines = [
        f"  family          {s['family']} (scan_layers={s['scan_layers']}, weight_dtype={s['weight_dtype']})",
        f"  params          {s['params']} MaxText params -> {s['hf_tensors']} HF tensors in {s['shards']} shard(s)"
        + (f" (partial: --only {','.join(s['only'])})" if s["only"] else ""),
        f"  work items      {s['work_items']} (largest {hb(s['largest_item_bytes'])}: {s['largest_item']}; "
        f"budget {hb(s['max_item_bytes'])})",
        f"  bytes read      {hb(s['bytes_read'])} (decoded chunks)",
        f"  bytes written   {hb(s['bytes_written'])}",
    ]
    if s["oversized_chunks"]:
        lines.append(
            f"  note            {s['oversized_chunks']} param(s) have a chunk larger than the budget; "
            "their items hold one whole decoded chunk"
        )
    return "\n".join(lines)


def _existing_output(output: str, provenance: dict, force: bool) -> tuple[bool, bool]:
    """(up to date, replace) for an existing output directory (on gs://: objects under OUT/)."""
    if outdir.is_gcs(output):
        if not outdir.dir_exists(output):
            return False, False
    else:
        if not os.path.exists(output) or (os.path.isdir(output) and not os.listdir(output)):
            return False, False
        if not os.path.isdir(output):
            raise FileExistsError(f"{output} exists and is not a directory")
    text = outdir.read_text(outdir.join(output, EXPORT_PROVENANCE_FILE))
    old = json.loads(text) if text is not None else None
    if old == json.loads(json.dumps(provenance)) and not force:
        return True, False
    if old is None and not force:
        raise FileExistsError(f"{output} exists and was not written by ckptbeam export; use --force to replace it")
    if outdir.is_gcs(output) and not force:
        # Locally the new export is renamed into place in one step; GCS has no rename.
        raise FileExistsError(
            f"{output} holds an export of another checkpoint or options, and gs:// output cannot be replaced "
            "atomically: rerun with --force"
        )
    return False, True


def _stale_staging(output: str, infix: str = STAGING_INFIX) -> list[str]:
    if outdir.is_gcs(output):
        parent, name = output.rstrip("/").rsplit("/", 1)
        return [outdir.join(parent, c) for c in outdir.list_children(parent, prefix=name + infix)]
    parent, name = os.path.split(output.rstrip("/"))
    prefix = name + infix
    return (
        [os.path.join(parent, e) for e in os.listdir(parent or ".") if e.startswith(prefix)]
        if os.path.isdir(parent or ".")
        else []
    )


def run(argv: list[str]) -> dict:
    """Plan, run and publish one export; returns the summary (also printed)."""
    args, beam_argv = split_export_argv(argv)
    if not args.source or not args.output:
        raise SystemExit(
            "ckptbeam export: --source and --output are required (MaxText: load_parameters_path, base_output_directory)"
        )
    output = outdir.normalize(args.output)  # an absolute local path or gs://BUCKET/PATH
    if outdir.is_gcs(output) and not outdir.split_gcs(output)[1]:
        raise ValueError(f"--output {args.output}: name a path inside the bucket (gs://BUCKET/PATH)")
    report = report_stream(args)
    started = time.time()
    plan, checkpoint, side, provenance = make_export_plan(args)
    summary = {**plan.summary(), "output": output, "provenance": provenance}
    print(
        f"ckptbeam export plan for {checkpoint.items_dir}:\n{format_export_summary(summary)}", file=report, flush=True
    )
    faults.point("plan")
    if args.dry_run or plan.only:
        tensors = [(t.key, t.shape, t.dtype) for shard in plan.shards for t in shard.tensors]
        print(format_selected(tensors, "HF tensors selected" if plan.only else "HF tensors"), file=report)
    if args.dry_run:
        return emit_summary(summary, args.json, dry_run=True)
    with lease.hold(output, "export"):  # one run per output, from here to the end
        return _export_locked(args, beam_argv, output, plan, checkpoint, side, provenance, summary, started)


def _export_locked(args, beam_argv, output, plan, checkpoint, side, provenance, summary, started) -> dict:
    """The part of `run` that reads and writes at OUTPUT, under its lease."""
    report = report_stream(args)
    if not outdir.is_gcs(output):  # a crash between the two renames of a swap: the old model back first
        outdir.restore_aside(output, _stale_staging(output, OLD_INFIX))
    up_to_date, replace = _existing_output(output, provenance, args.force)
    if up_to_date:
        print(f"ckptbeam: {output} is up to date (same checkpoint and options); nothing to do", file=report)
        return emit_summary({**summary, "up_to_date": True}, args.json)
    if not outdir.is_gcs(output):
        os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
    stage = _prepare_staging(output, plan, provenance, adopt=not args.no_resume)
    staging = stage.path
    options = PipelineOptions(normalize_argv(beam_argv))
    try:
        with ProgressMonitor(staging, len(plan.items), summary["bytes_written"], counter=lambda: count_done(staging)):
            p = beam.Pipeline(options=options)
            build_export_pipeline(
                p, plan, checkpoint, staging, output, side, provenance, replace, args.item_attempts,
                resume_plan=stage.plan_id, adopted=stage.adopted,
            )  # fmt: skip
            result = p.run()
            result.wait_until_finish()
    except BaseException as e:
        kept = keep_after_failure(staging, output, not args.no_resume)
        if outdir.is_gcs(staging):
            add_cleanup_note(e, _remove_failed_gcs_export(staging, output, published_names(plan.shards, side), kept))
        elif kept:
            add_cleanup_note(e, kept)
        elif os.path.isdir(staging):
            shutil.rmtree(staging, ignore_errors=True)
            add_cleanup_note(e, f"nothing was published at {output} (staging {staging} removed)")
        raise
    elapsed = time.time() - started
    counters = {
        m.key.metric.name: m.committed
        for m in result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE))["counters"]
    }
    summary.update(seconds=round(elapsed, 3), metrics=counters, resumed_items=len(stage.adopted))
    resumed = f"\n  {stage.line(len(plan.items))}" if stage.resumed else ""
    print(
        f"ckptbeam: exported {summary['hf_tensors']} tensors ({human_bytes(summary['bytes_written'])}) in "
        f"{elapsed:.2f} s, {human_bytes(summary['bytes_written'] / max(elapsed, 1e-9))}/s{resumed}\n"
        f"  output          {output}",
        file=report,
        flush=True,
    )
    return emit_summary(summary, args.json)


def _remove_failed_gcs_export(staging: str, output: str, names: list[str], kept: str | None = None) -> str:
    """Remove what a failed gs:// run wrote: the final objects if it had started publishing
    (provenance first), then its staging prefix (parts, intermediates, markers) unless it is
    `kept` for a resuming rerun; says what it did."""
    try:
        mark = outdir.join(staging, PUBLISHING_MARK)
        if outdir.file_exists(mark):
            for name in names:
                outdir.remove_file(outdir.join(output, name))
            outdir.remove_file(mark)
        if kept:
            return kept
        outdir.remove_tree(staging)
    except Exception as e:  # the original error matters more; the next run clears the staging prefix
        return f"cleaning up failed too ({e}); leftovers under {staging} are removed by the next run"
    return kept or f"nothing was published at {output} (staging {staging} removed)"


def _prepare_staging(output: str, plan: ExportPlan, provenance: dict, adopt: bool) -> Staging:
    """Resume the unfinished export of the same plan (`adopt`), or start a fresh staging."""
    fresh = f"{output}{STAGING_INFIX}{int(time.time() * 1000)}"
    stage = prepare_export(_stale_staging(output), fresh, plan, export_plan_id(plan, provenance, output), adopt)
    if stage.resumed:
        log.info("resuming the unfinished export at %s: %s", stage.path, stage.line(len(plan.items)))  # stderr: --json
    return stage
