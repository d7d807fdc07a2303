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
from ckpt_transforms.orbax_io import writer as orbax_writer
from ckpt_transforms.planning.convert_plan import Plan, build_plan, item_working_bytes
from ckpt_transforms.safetensors_io.index import SourceModel, load_source_model
from ckpt_transforms.storage import outdir
from ckpt_transforms.storage.hf_side_files import CONFIG, keep_with_checkpoint, read_side_files
from ckpt_transforms.storage.provenance import PROVENANCE_FILE, differences, provenance_record
from ckpt_transforms.storage.sources import ByteSource, open_source
from pipelines.graph import METRICS_NAMESPACE, ConvertWorkItem, build_pipeline
from pipelines.options import ConvertOptions, beam_option_names, parse_only, str2bool, unrecognized_argument
from pipelines.progress import ProgressMonitor

log = logging.getLogger("ckptbeam")
BOOL_WORDS = ("1", "0", "true", "false", "yes", "no", "y", "n", "t", "f")


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
        # Commit markers first: from then on readers see no checkpoint, never a half-deleted one.
        for marker in (
            outdir.join(final, orbax_writer.COMMIT_FILE),
            outdir.join(final, "items", orbax_writer.COMMIT_FILE),
        ):
            outdir.remove_file(marker)
        outdir.remove_tree(final)
        return False, reasons
    return True, reasons


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


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


def _maxtext_vocab_args(summary: dict) -> str:
    """' vocab_size=N override_model_config=true' when MaxText must be told the rows, else ''."""
    vocab = summary.get("vocab") or {}
    if not vocab.get("run_with_vocab_size"):
        return ""
    return f" vocab_size={vocab['vocab_size']} override_model_config=true"


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


def _prepare_output(output: str, replace: bool = False) -> str:
    """Refuse an existing checkpoint (unless replacing it), clear our own unfinished leftovers."""
    problem = None if replace else orbax_writer.existing_step_error(output)
    if problem:
        raise FileExistsError(problem)
    for stale in orbax_writer.stale_staging_dirs(output):
        log.info("removing leftovers of an earlier unfinished run: %s", stale)
        outdir.remove_tree(stale)
    staging = orbax_writer.new_staging_dir(output)
    outdir.make_dirs(outdir.join(staging, "items"))
    return staging


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
    argv = normalize_argv(list(sys.argv[1:] if argv is None else argv))
    problem = unrecognized_argument(argv, beam_option_names())
    if problem:
        # Beam would only warn and drop it: a typo or a MaxText-style scan_layers=false must not
        # silently give the default conversion.
        print(f"ckptbeam convert: error: {problem}", file=sys.stderr)
        raise SystemExit(2)
    options = PipelineOptions(argv)
    opts = options.view_as(ConvertOptions)
    if not opts.source or not opts.output:
        raise SystemExit("ckptbeam convert: --source and --output are required")
    output = outdir.normalize(opts.output)
    orbax_writer.reset_shared_context()
    started = time.time()
    source = open_source(opts.source, opts.revision)  # hf://: resolves the revision to one commit, here, once
    model = load_source_model(source)
    plan, provenance = make_plan(opts, source, model)
    summary = plan.summary()
    print(f"ckptbeam plan for {source.uri}:\n{format_summary(summary)}", flush=True)
    if plan.unused_source_keys:
        print(
            f"  known extras    {len(plan.unused_source_keys)} source tensor(s) not converted, e.g. {plan.unused_source_keys[0]}"
        )
    if str2bool(str(options.view_as(TestOptions).dry_run)):
        return summary
    replace, reasons = _existing_checkpoint(output, provenance, opts.force)
    if not reasons:
        print(f"ckptbeam: {orbax_writer.final_step_dir(output)} is up to date (same inputs and options); nothing to do")
        return {**summary, "up_to_date": True}
    if replace:
        print(f"ckptbeam: re-converting; {orbax_writer.final_step_dir(output)} is replaced after commit because: "
              + "; ".join(reasons))  # fmt: skip
    staging = _prepare_output(output, replace)
    runner = options.view_as(StandardOptions).runner or ""
    try:
        # config, generation config and tokenizer go with the checkpoint, so `export` can
        # rebuild a complete HF model directory from it alone.
        keep_with_checkpoint(staging, read_side_files(source, {CONFIG: model.config_bytes}))
        with ProgressMonitor(outdir.join(staging, "items"), len(plan.items), summary["bytes_written"]):
            p = beam.Pipeline(options=options)
            # Workers open the pinned URI (hf://org/repo@<commit>), so all read the same files.
            build_pipeline(
                p, plan, source.uri, staging, output, opts.item_attempts, convert_fn, provenance, replace,
                orbax_writer.Layout(use_ocdbt=opts.use_ocdbt, use_zarr3=opts.use_zarr3),
            )  # fmt: skip
            result = p.run()
            if runner.endswith("DataflowRunner"):
                # Flex Template launchers must return once the job is submitted; the stitch and the
                # commit run inside the job.
                print(f"ckptbeam: Dataflow job submitted; the checkpoint appears at {output}/0 when it commits")
                return {**summary, "submitted": True}
            result.wait_until_finish()
    except BaseException:
        if orbax_writer.discard_staging(staging):
            log.error("conversion failed; nothing was published at %s (staging %s removed)", output, staging)
        raise
    elapsed = time.time() - started
    counters = {
        m.key.metric.name: m.committed
        for m in result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE))["counters"]
    }
    summary.update(
        seconds=round(elapsed, 3),
        mb_per_s=round(summary["bytes_written"] / 1e6 / max(elapsed, 1e-9), 2),
        output=outdir.join(output, orbax_writer.STEP_DIR, "items"),
        runner=options.view_as(StandardOptions).runner,
        metrics=counters,
        largest_item_working_bytes=max((item_working_bytes(i) for i in plan.items), default=0),
    )
    print(
        f"ckptbeam: converted {_param_count(summary)} params ({summary['bytes_written'] / 1e6:.2f} MB) in "
        f"{elapsed:.2f} s, {summary['mb_per_s']:.1f} MB/s{_partial_note(summary, _PARTIAL_LINE)}\n"
        f"  output          {summary['output']}\n"
        f"  MaxText         load_parameters_path={summary['output']}{_maxtext_vocab_args(summary)}",
        flush=True,
    )
    return summary


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    summary = run()
    log.debug(json.dumps(summary, default=str))


if __name__ == "__main__":
    main()
