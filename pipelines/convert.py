"""HF safetensors -> MaxText Orbax on Beam: plan on the launcher, fan out, stitch, commit.

    Create(work items) -> Reshuffle -> ConvertWorkItem -> ToList -> StitchAndCommit

Run: `ckptbeam convert --source DIR --output OUT [Beam flags]` or `python -m pipelines.convert ...`.
"""

from __future__ import annotations

import json
import logging
import sys
import time

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions, TestOptions

import model_maps
from ckpt_transforms import faults
from ckpt_transforms.orbax_io import writer as orbax_writer
from ckpt_transforms.planning.convert_plan import Plan, build_plan, item_working_bytes
from ckpt_transforms.safetensors_io.index import SourceModel, load_source_model
from ckpt_transforms.storage import lease, outdir
from ckpt_transforms.storage.hf_side_files import CONFIG, keep_with_checkpoint, read_side_files
from ckpt_transforms.storage.provenance import PROVENANCE_FILE, differences, provenance_record
from ckpt_transforms.storage.sources import ByteSource, open_source
from pipelines.errors import add_cleanup_note
from pipelines.graph import METRICS_NAMESPACE, ConvertWorkItem, build_pipeline
from pipelines.options import BOOL_WORDS, ConvertOptions, check_argv, convert_parser, parse_only, str2bool
from pipelines.progress import ProgressMonitor, human_bytes
from pipelines.resume import Staging, convert_plan_id, keep_after_failure, prepare_convert

log = logging.getLogger("ckptbeam")


def make_plan(
    opts: ConvertOptions, byte_source: ByteSource | None = None, model: SourceModel | None = None
) -> tuple[Plan, dict]:
    """The plan and the provenance record of this conversion, from headers only (`model`: the
    source's headers, if already read)."""
    source = model or load_source_model(byte_source or open_source(opts.source, opts.revision))
    family = model_maps.detect_family(source.config, opts.model)
    model_map = family.build(source.config, use_multimodal=opts.use_multimodal, vocab_size=opts.vocab_size)
    plan = build_plan(
        source, model_map, opts.scan_layers, opts.save_dtype, opts.max_item_bytes, shard_count=opts.shard_count,
        only=parse_only(opts.only),
    )  # fmt: skip
    plan.vocab = model_maps.vocab_summary(family, opts.model, model_map)
    layout = {
        "scan_layers": opts.scan_layers,
        "save_dtype": opts.save_dtype,
        "max_item_bytes": opts.max_item_bytes,  # decides chunk shapes
    }
    if opts.use_multimodal:
        layout["use_multimodal"] = True  # only when set, so earlier provenance records stay equal
    for flag in ("use_ocdbt", "use_zarr3"):
        if not getattr(opts, flag):
            layout[flag] = False  # only when not MaxText's default, as above
    if opts.shard_count != 1:
        layout["shard_count"] = opts.shard_count  # decides chunk shapes; only when set, as above
    if plan.only:
        layout["only"] = list(plan.only)  # a partial checkpoint; only when set, as above
    if opts.vocab_size is not None:
        layout["vocab_size"] = opts.vocab_size  # decides the embedding's rows; only when set, as above
    return plan, provenance_record(source, family.name, model_maps.MAP_VERSION, layout)


def _existing_checkpoint(output: str, provenance: dict, force: bool) -> tuple[bool, list[str]]:
    """(replace, reasons) for OUTPUT/0; reasons == [] with replace False means up to date.

    A committed checkpoint made from the same inputs is kept (unless --force). One made from other
    inputs is replaced after the new one commits. One without a ckptbeam record is never touched
    unless --force. On GCS there is no atomic swap, so replacing needs --force there too.
    """
    if not orbax_writer.is_committed(output):
        return False, ["no committed checkpoint"]
    final = orbax_writer.final_step_dir(output)
    text = outdir.read_text(outdir.join(final, PROVENANCE_FILE))
    old = json.loads(text) if text else None
    reasons = differences(old, provenance)
    if not reasons and not force:
        return False, []
    if old is None and not force:
        raise FileExistsError(f"{final} exists and was not made by ckptbeam; use --force to replace it")
    if not force and provenance["options"].get("only") and not old.get("options", {}).get("only"):
        # A slice for a spot check must not silently replace a whole model's checkpoint.
        raise FileExistsError(
            f"{final} is a whole checkpoint; --only would replace it with a partial one: use another "
            "--output, or --force to replace it"
        )
    reasons = reasons or ["--force"]
    if outdir.is_gcs(output):
        if not force:
            raise FileExistsError(
                f"{final} was made from other inputs ({'; '.join(reasons)}); on gs:// it cannot be replaced "
                "atomically: rerun with --force to delete and rewrite it"
            )
        # Marked as our unfinished run first, so a run killed while deleting leaves a step the
        # next run clears; then the commit markers: from then on readers see no checkpoint, never
        # a half-deleted one.
        outdir.write_text(outdir.join(final, orbax_writer.IN_PROGRESS_MARK), "ckptbeam --force: replacing")
        for marker in (
            outdir.join(final, orbax_writer.COMMIT_FILE),
            outdir.join(final, "items", orbax_writer.COMMIT_FILE),
        ):
            outdir.remove_file(marker)
        faults.point("force_delete")
        outdir.remove_tree(final)
        return False, reasons
    return True, reasons


def _param_count(summary: dict) -> str:
    """'N', or 'N of M' when --only selected a subset of the model's M params."""
    if not summary.get("only"):
        return str(summary["params"])
    return f"{summary['params']} of {summary.get('params_total', summary['params'])}"


_PARTIAL_LINE = "\n  partial         {}"


def _partial_note(summary: dict, template: str) -> str:
    """'' for a whole checkpoint; else a loud note (MaxText cannot load it as a whole model)."""
    if not summary.get("only"):
        return ""
    return template.format(f"partial checkpoint: only params matching --only {','.join(summary['only'])}")


def _vocab_lines(vocab: dict) -> list[str]:
    """The embedding's rows when they are not config.json's, and the vocab_size MaxText must be
    run with when it is not MaxText's default (its model config's vocab_size must be overridden)."""
    if not vocab:
        return []
    rows, hf = vocab["vocab_size"], vocab["hf_vocab_size"]
    lines = []
    if rows > hf:
        lines.append(f"  vocab_size      {rows} (config.json: {hf}; rows {hf}..{rows - 1} zero-padded)")
    elif rows < hf:
        lines.append(
            f"  vocab_size      {rows} (config.json: {hf}; TRUNCATED: rows {rows}..{hf - 1} dropped, "
            f"token ids >= {rows} have no embedding)"
        )
    if vocab["run_with_vocab_size"]:
        default = vocab["maxtext_vocab_size"]
        why = f"{vocab['maxtext_vocab_of']} says {default}" if default else f"rows differ from config.json's {hf}"
        lines.append(f"  MaxText needs   vocab_size={rows} override_model_config=true ({why})")
    return lines


def maxtext_model_name(family: str, model: str | None) -> str | None:
    """The MaxText model_name to load the checkpoint with: --model when it is a MaxText name, the
    family's only MaxText name, else None (sizes come from config.json, MaxText names a size)."""
    fam = next(f for f in model_maps.FAMILIES if f.name == family)
    if model in fam.maxtext_names:
        return model
    return fam.maxtext_names[0] if len(fam.maxtext_names) == 1 else None


def maxtext_load_args(summary: dict, items_dir: str, model_name: str | None) -> str:
    """The MaxText arguments that load this checkpoint (`MODEL` when the name is not known)."""
    args = [
        f"model_name={model_name or 'MODEL'}",
        f"scan_layers={str(summary['scan_layers']).lower()}",
        f"load_parameters_path={items_dir}",
    ]
    vocab = summary.get("vocab") or {}
    if vocab.get("run_with_vocab_size"):
        args += [f"vocab_size={vocab['vocab_size']}", "override_model_config=true"]
    return " ".join(args)


def _maxtext_lines(summary: dict, family: str) -> str:
    lines = f"  MaxText         {summary['maxtext_args']}"
    if summary["maxtext_model_name"] is None:
        names = next(f for f in model_maps.FAMILIES if f.name == family).maxtext_names
        lines += f"\n  MODEL           the MaxText name of this {family} size ({', '.join(names[:4])}, ...; --model fills it in)"
    return lines


def format_selected(rows: list[tuple[str, tuple[int, ...], str]], what: str) -> str:
    """What --dry_run / --only select: one line per param (name, shape, dtype)."""
    width = max((len(name) for name, _, _ in rows), default=0)
    lines = [f"  {what} ({len(rows)}):"]
    lines += [f"    {name:<{width}}  {list(shape)} {dtype}" for name, shape, dtype in rows]
    return "\n".join(lines)


def format_summary(summary: dict) -> str:
    hb = human_bytes
    return "\n".join(
        [
            f"  family          {summary['family']} (scan_layers={summary['scan_layers']}, save_dtype={summary['save_dtype']})",
            f"  params          {_param_count(summary)}{_partial_note(summary, ' ({})')}",
            f"  work items      {summary['work_items']} (largest {hb(summary['largest_item_bytes'])}: "
            f"{summary['largest_item']}; budget {hb(summary['max_item_bytes'])})",
            f"  bytes read      {hb(summary['bytes_read'])}",
            f"  bytes written   {hb(summary['bytes_written'])} (before compression)",
            *_vocab_lines(summary.get("vocab") or {}),
        ]
    )


def _prepare_output(
    output: str, replace: bool, plan: Plan, provenance: dict, layout: orbax_writer.Layout, adopt: bool
) -> Staging:
    """Refuse an existing checkpoint (unless replacing it); resume the unfinished run of the same
    plan (`adopt`), clear every other unfinished run of ours."""
    problem = None if replace else orbax_writer.existing_step_error(output)
    if problem:
        raise FileExistsError(problem)
    stage = prepare_convert(output, plan, convert_plan_id(plan, provenance, layout), layout, adopt)
    if stage.resumed:
        log.info("resuming the unfinished run at %s: %s", stage.path, stage.line(len(plan.items)))  # stderr: --json
    return stage


def normalize_argv(argv: list[str]) -> list[str]:
    """Beam's own `--dry_run` takes a value; accept the bare flag too. Default the runner.

    Without --runner, run on Beam's FnApiRunner directly (what DirectRunner falls back to offline).
    On Dataflow, default to one bundle thread per SDK process: the in-flight budget and the buffer
    pool belong to one DoFn instance, so a process running several bundle threads at once would
    hold that many budgets. Dataflow still runs one SDK process per vCPU, and TensorStore's own
    threads encode in parallel with the one Python thread.
    """
    out = []
    for i, a in enumerate(argv):
        bare = a == "--dry_run" and (i + 1 == len(argv) or argv[i + 1].lower() not in BOOL_WORDS)
        out.append("--dry_run=true" if bare else a)
    runner = _flag_value(out, "--runner")
    if runner is None:
        out.append("--runner=FnApiRunner")
    elif runner.endswith("DataflowRunner") and _flag_value(out, "--number_of_worker_harness_threads") is None:
        out.append("--number_of_worker_harness_threads=1")
    return out


def _flag_value(argv: list[str], flag: str) -> str | None:
    """The value of the last `flag` in argv (`--flag=v` or `--flag v`), or None if absent."""
    value = None
    for i, a in enumerate(argv):
        if a.startswith(flag + "="):
            value = a.split("=", 1)[1]
        elif a == flag:
            value = argv[i + 1] if i + 1 < len(argv) else ""
    return value


def run(argv: list[str] | None = None, convert_fn: type[ConvertWorkItem] = ConvertWorkItem) -> dict:
    """Plan, run and commit one conversion; returns the summary (also printed)."""
    argv = normalize_argv(check_argv("convert", list(sys.argv[1:] if argv is None else argv), convert_parser()))
    options = PipelineOptions(argv)
    opts = options.view_as(ConvertOptions)
    if not opts.source or not opts.output:
        raise SystemExit(
            "ckptbeam convert: --source and --output are required (MaxText: hf_model_path, base_output_directory)"
        )
    output = outdir.normalize(opts.output)
    report = report_stream(opts)
    orbax_writer.reset_shared_context()
    started = time.time()
    source = open_source(opts.source, opts.revision)  # hf://: resolves the revision to one commit, here, once
    model = load_source_model(source)
    plan, provenance = make_plan(opts, source, model)
    summary = plan.summary()
    items_dir = outdir.join(output, orbax_writer.STEP_DIR, "items")
    name = maxtext_model_name(plan.family, opts.model)
    summary.update(
        output=items_dir, provenance=provenance, maxtext_model_name=name,
        maxtext_args=maxtext_load_args(summary, items_dir, name),
    )  # fmt: skip
    print(f"ckptbeam plan for {source.uri}:\n{format_summary(summary)}", file=report, flush=True)
    if plan.unused_source_keys:
        print(
            f"  known extras    {len(plan.unused_source_keys)} source tensor(s) not converted, e.g. "
            f"{plan.unused_source_keys[0]}",
            file=report,
        )
    faults.point("plan")
    dry_run = str2bool(str(options.view_as(TestOptions).dry_run))
    if dry_run or plan.only:
        selected = [(a.name, a.shape, a.dtype) for a in plan.arrays]
        print(format_selected(selected, "params selected" if plan.only else "params"), file=report)
    if dry_run:
        return emit_summary(summary, opts.json, dry_run=True)
    with lease.hold(output, "convert"):  # one run per output, from here to the end
        return _convert_locked(options, opts, output, source, model, plan, provenance, summary, started, convert_fn)


def _convert_locked(options, opts, output, source, model, plan, provenance, summary, started, convert_fn) -> dict:
    """The part of `run` that reads and writes at OUTPUT, under its lease."""
    report = report_stream(opts)
    orbax_writer.restore_interrupted_swap(output)
    replace, reasons = _existing_checkpoint(output, provenance, opts.force)
    if not reasons:
        print(
            f"ckptbeam: {orbax_writer.final_step_dir(output)} is up to date (same inputs and options); nothing to do\n"
            f"{_maxtext_lines(summary, plan.family)}",
            file=report,
        )
        return emit_summary({**summary, "up_to_date": True}, opts.json)
    if replace:
        print(f"ckptbeam: re-converting; {orbax_writer.final_step_dir(output)} is replaced after commit because: "
              + "; ".join(reasons), file=report)  # fmt: skip
    layout = orbax_writer.Layout(use_ocdbt=opts.use_ocdbt, use_zarr3=opts.use_zarr3)
    stage = _prepare_output(output, replace, plan, provenance, layout, adopt=not opts.no_resume)
    staging = stage.path
    runner = options.view_as(StandardOptions).runner or ""
    try:
        # config, generation config and tokenizer go with the checkpoint, so `export` can
        # rebuild a complete HF model directory from it alone.
        keep_with_checkpoint(staging, read_side_files(source, {CONFIG: model.config_bytes}))
        with ProgressMonitor(outdir.join(staging, "items"), len(plan.items), summary["bytes_written"]):
            p = beam.Pipeline(options=options)
            # Workers open the pinned URI (hf://org/repo@<commit>), so all read the same files.
            build_pipeline(
                p, plan, source.uri, staging, output, opts.item_attempts, convert_fn, provenance, replace, layout,
                resume_plan=stage.plan_id, adopted=stage.adopted,
            )  # fmt: skip
            result = p.run()
            if runner.endswith("DataflowRunner"):
                # Flex Template launchers must return once the job is submitted; the stitch and the
                # commit run inside the job.
                print(
                    f"ckptbeam: Dataflow job submitted; the checkpoint appears at {output}/0 when it commits",
                    file=report,
                )
                return emit_summary({**summary, "submitted": True}, opts.json)
            result.wait_until_finish()
    except BaseException as e:
        # A lost lease (gs://: taken over after missed heartbeats): OUT/0 is the other run's now.
        if not lease.lost(output):
            kept = keep_after_failure(staging, output, not opts.no_resume)
            if kept:
                add_cleanup_note(e, kept)
            elif orbax_writer.discard_staging(staging):
                add_cleanup_note(e, f"nothing was published at {output} (staging {staging} removed)")
        raise
    elapsed = time.time() - started
    counters = {
        m.key.metric.name: m.committed
        for m in result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE))["counters"]
    }
    summary.update(
        seconds=round(elapsed, 3),
        mb_per_s=round(summary["bytes_written"] / 1e6 / max(elapsed, 1e-9), 2),
        runner=options.view_as(StandardOptions).runner,
        metrics=counters,
        largest_item_working_bytes=max((item_working_bytes(i) for i in plan.items), default=0),
        resumed_items=len(stage.adopted),
    )
    resumed = f"\n  {stage.line(len(plan.items))}" if stage.resumed else ""
    print(
        f"ckptbeam: converted {_param_count(summary)} params ({human_bytes(summary['bytes_written'])}) in "
        f"{elapsed:.2f} s, {human_bytes(summary['bytes_written'] / max(elapsed, 1e-9))}/s"
        f"{_partial_note(summary, _PARTIAL_LINE)}{resumed}\n"
        f"  output          {summary['output']}\n"
        f"{_maxtext_lines(summary, plan.family)}",
        file=report,
        flush=True,
    )
    return emit_summary(summary, opts.json)


def report_stream(opts) -> object:
    """Where the human-readable lines go: with --json, stdout holds the JSON object only."""
    return sys.stderr if opts.json else sys.stdout


def emit_summary(summary: dict, as_json: bool, dry_run: bool = False) -> dict:
    """The run's summary, as returned; with --json also printed as one JSON object on stdout
    (which says `up_to_date` and `dry_run` either way)."""
    if as_json:
        record = {"up_to_date": False, **summary, "dry_run": dry_run}
        print(json.dumps(record, default=str, sort_keys=True), flush=True)
    return summary


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    summary = run()
    log.debug(json.dumps(summary, default=str))


if __name__ == "__main__":
    main()
