"""ckptbeam's own options as a Beam `PipelineOptions` subclass: Beam's flags pass straight through."""

from __future__ import annotations

import argparse
import re
import sys

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


BOOL_WORDS = ("1", "0", "true", "false", "yes", "no", "y", "n", "t", "f")


def str2bool(text: str) -> bool:
    if str(text).lower() in ("1", "true", "yes", "y", "t"):
        return True
    if str(text).lower() in ("0", "false", "no", "n", "f"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class HelpFormatter(argparse.HelpFormatter):
    """--help shows each option's default, unless it is None or the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, argparse.SUPPRESS) or "default" in text.lower() or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def add_bool(parser: argparse.ArgumentParser, flag: str, default: bool | None, help: str, **kw) -> None:
    """Every boolean flag the same way: bare `--flag` is true; `--flag true|false` (or
    `--flag=...`, also 1/0, yes/no) sets it. No `--no_flag` forms: one spelling per option."""
    kw.setdefault("type", str2bool)
    kw.setdefault("metavar", "true|false")
    parser.add_argument(flag, nargs="?", const=True, default=default, help=help, **kw)


def flag_kinds(parser: argparse.ArgumentParser) -> dict[str, bool]:
    """Each `--flag` of `parser` -> whether it takes a value (boolean flags: optionally)."""
    return {o: a.nargs != 0 for o, a in parser._option_string_actions.items() if o.startswith("--")}


class ConvertOptions(PipelineOptions):
    """HF safetensors -> MaxText Orbax options (names follow MaxText's where MaxText has one).

    `--dry_run` is Beam's own flag (TestOptions: run nothing, submit nothing); ckptbeam reads
    it too and prints the plan summary without writing anything.
    """

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--source",
            help="Hugging Face model directory (config.json + safetensors): a local path, gs://BUCKET/PATH or "
            "hf://ORG/REPO[@REVISION][/SUBFOLDER]",
        )
        parser.add_argument("--output", help="Output base directory; the checkpoint lands in OUTPUT/0/items")
        parser.add_argument(
            "--revision",
            default=None,
            help="Hugging Face revision (branch, tag or commit) of an hf://ORG/REPO or ORG/REPO --source; the same as @REVISION in the URI (giving both, different, is an error)",
        )
        parser.add_argument(
            "--model",
            default=None,
            help="Family (see README's support table: llama, qwen3, deepseek3, gemma3, ...) or MaxText model name "
            "(llama3.1-8b, qwen3-4b, deepseek3-671b, gemma2-9b, ...); "
            "default: detected from config.json",
        )
        add_bool(
            parser,
            "--scan_layers",
            True,
            "Stack decoder layers on MaxText's param_scan_axis (true, MaxText's default) or write layers_N (false)",
        )
        parser.add_argument(
            "--save_dtype", choices=sorted(SAVE_DTYPES), default="bfloat16", help="dtype of the saved weights"
        )
        add_bool(
            parser,
            "--use_multimodal",
            False,
            "Multimodal checkpoints (Gemma3): also convert the vision tower and projector (true), or only "
            "the text decoder (false, MaxText's default)",
        )
        add_bool(
            parser,
            "--use_ocdbt",
            True,
            "Store arrays in OCDBT databases (true, MaxText's checkpoint_storage_use_ocdbt default) or one "
            "directory of chunk files per param (false; with --use_zarr3=false: the layout MaxText's Pathways "
            "loaders expect)",
        )
        add_bool(
            parser,
            "--use_zarr3",
            True,
            "Array format: zarr3 (true, MaxText's checkpoint_storage_use_zarr3 default) or zarr2 (false)",
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
        add_bool(
            parser,
            "--force",
            False,
            "Re-convert even if OUTPUT/0 is up to date, and replace a checkpoint ckptbeam did not make",
        )
        parser.add_argument(
            "--item_attempts",
            type=int,
            default=3,
            help="Attempts per work item inside a worker (each into a fresh OCDBT database)",
        )
        add_bool(
            parser,
            "--no_resume",
            False,
            "Start clean: remove an unfinished run's committed work items instead of reusing them (by "
            "default a rerun with the same plan reuses them and converts only the rest)",
        )
        parser.add_argument(
            "--only",
            default=None,
            help="Write a partial checkpoint: only the params matching these comma-separated fnmatch patterns "
            "over MaxText param names, full (params.params.decoder.moe_layers_0.self_attention.wq_a.kernel) or "
            "below params.params (decoder.moe_layers_0.*). The whole source is still validated",
        )
        add_json(parser)


def parse_scan_layers(text: str) -> bool | None:
    """Export's --scan_layers / --use_multimodal: auto (None: as the checkpoint has it), true or false."""
    if str(text).lower() == "auto":
        return None
    return str2bool(text)


def add_export_args(parser: argparse.ArgumentParser) -> None:
    """MaxText Orbax -> HF safetensors options (MaxText's `to_huggingface` names where it has one).

    A plain argparse parser, not a PipelineOptions subclass: Beam merges every subclass's flags
    into one parser, and `--scan_layers auto` or `--source` mean other things for convert."""
    from ckpt_transforms.safetensors_io.layout import parse_shard_size

    def shard_size(text: str) -> int:
        try:
            return parse_shard_size(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parser.add_argument(
        "--source", help="MaxText/Orbax checkpoint: BASE, BASE/<step> or BASE/<step>/items (local or gs://)"
    )
    parser.add_argument("--output", help="Hugging Face model directory to write (must not exist, or --force)")
    parser.add_argument(
        "--hf_config",
        default=None,
        help="The target config.json: a file, a model directory, or hf://ORG/REPO[@REV][/SUBFOLDER] (config.json, "
        "generation_config.json and tokenizer files are taken from there). Default: the one ckptbeam convert "
        "kept with the checkpoint",
    )
    parser.add_argument(
        "--revision",
        default=None,
        help="Hugging Face revision (branch, tag or commit) of an hf://ORG/REPO or ORG/REPO --hf_config; the same as @REVISION in the URI (giving both, different, is an error)",
    )
    parser.add_argument(
        "--model", default=None, help="Family or MaxText model name when config.json is ambiguous (as for convert)"
    )
    add_bool(
        parser,
        "--scan_layers",
        None,
        "auto (None: as the checkpoint records it, else from its param names), true or false; an explicit "
        "value that disagrees with the checkpoint is an error",
        type=parse_scan_layers,
        metavar="auto|true|false",
    )
    add_bool(
        parser,
        "--use_multimodal",
        None,
        "auto (None: the vision tower and projector too when the checkpoint has them), true (they must be "
        "there) or false (the text decoder only, as MaxText's use_multimodal=false)",
        type=parse_scan_layers,
        metavar="auto|true|false",
    )
    parser.add_argument(
        "--weight_dtype",
        choices=sorted(SAVE_DTYPES),
        default=None,
        help="dtype of the written tensors, as MaxText's weight_dtype (leaves are cast to it on reading and "
        "the hooks' results again); default: the checkpoint's own dtype (MaxText's default is float32)",
    )
    parser.add_argument(
        "--max_shard_size",
        type=shard_size,
        default="5GB",
        help="Largest safetensors shard before a new one starts (5GB = 5*10^9 bytes, as huggingface_hub; "
        "GiB units are binary); one shard is written as model.safetensors",
    )
    parser.add_argument(
        "--max_item_bytes",
        type=parse_bytes,
        default=DEFAULT_MAX_ITEM_BYTES,
        help="Memory budget of one export work item (decoded chunks, their cast copy, output boxes); a chunk "
        "larger than the budget is still read whole (--dry_run lists such params)",
    )
    parser.add_argument(
        "--only",
        default=None,
        help="Export only the HF tensors of MaxText params matching these comma-separated fnmatch patterns "
        "(as convert's --only): a partial model, for spot checks",
    )
    add_bool(
        parser,
        "--force",
        False,
        "Re-export even if OUTPUT is up to date, and replace an OUTPUT ckptbeam did not write",
    )
    parser.add_argument("--item_attempts", type=int, default=3, help="Attempts per work item inside a worker")
    add_bool(
        parser,
        "--no_resume",
        False,
        "Start clean: remove an unfinished export's written items instead of reusing them (by default a "
        "rerun with the same plan reuses them and exports only the rest)",
    )
    add_bool(
        parser,
        "--dry_run",
        False,
        "Print the export plan (tensors, shards, work items, bytes, largest item) and the MaxText params "
        "it selects, and exit",
    )
    add_json(parser)


def add_json(parser: argparse.ArgumentParser) -> None:
    add_bool(
        parser,
        "--json",
        False,
        "Print the run summary as one JSON object on stdout (the human-readable lines go to stderr, as logs do)",
    )


def beam_parser() -> argparse.ArgumentParser:
    """A parser holding every flag some Beam PipelineOptions class (ours included) defines."""
    from apache_beam.options.pipeline_options import _BeamArgumentParser

    parser = _BeamArgumentParser(allow_abbrev=False)
    for cls in PipelineOptions.__subclasses__() + [PipelineOptions]:
        stack = [cls]
        while stack:
            c = stack.pop()
            stack.extend(c.__subclasses__())
            if "_add_argparse_args" in c.__dict__:
                try:
                    c._add_argparse_args(parser)
                except argparse.ArgumentError:
                    pass  # a flag two classes define: known either way
    return parser


def unrecognized_argument(argv: list[str], known: dict[str, bool], names: list[str] = ()) -> str | None:
    """Why some argument in `argv` is neither one of the `known` flags (flag -> takes a value)
    nor the value of one (None if all are fine): Beam would only warn and drop it, so a typo
    would silently give the default conversion. `names`: more spellings to suggest."""
    import difflib

    for i, a in enumerate(argv):
        name = a.split("=", 1)[0]
        if a.startswith("--") and name not in known:
            close = difflib.get_close_matches(name, sorted(known) + [f"--{n}" for n in names], n=1)
            return f"unrecognized argument {a!r}" + (f" (did you mean {close[0]}?)" if close else "")
        prev = argv[i - 1] if i else ""
        if not a.startswith("--") and not (prev.startswith("--") and "=" not in prev and known.get(prev)):
            close = difflib.get_close_matches(a.split("=", 1)[0], [*names, *(k[2:] for k in known)], n=1)
            hint = (
                f"did you mean {close[0]}?"
                if close and "=" in a
                else "options are spelled --name value or --name=value"
            )
            return f"unrecognized argument {a!r} ({hint})"
    return None


def check_argv(command: str, argv: list[str], ours: argparse.ArgumentParser, with_beam: bool = True) -> list[str]:
    """`argv` with MaxText's spellings translated to ckptbeam's flags; every other argument must
    be one of `ours` or (`with_beam`) a real Beam option. Exit 2 with one line otherwise, before any work."""
    from pipelines import maxtext_args

    beam = flag_kinds(beam_parser()) if with_beam else {}
    known = {**beam, **flag_kinds(ours)}
    try:
        argv, notes = maxtext_args.translate(argv, command, ours._option_string_actions, beam)
    except maxtext_args.UsageError as e:
        ours.error(str(e))
    problem = unrecognized_argument(argv, known, sorted(maxtext_args.TABLES[command]))
    if problem:
        ours.error(problem)
    ours.parse_known_args(argv)  # our values checked here, under our name, whoever parses them next
    for note in notes:
        print(f"{ours.prog}: {note}", file=sys.stderr)
    return argv


def convert_parser() -> argparse.ArgumentParser:
    """ckptbeam's own convert flags (for --help and the argument check; Beam parses them)."""
    parser = argparse.ArgumentParser(
        prog="ckptbeam convert",
        description="Convert a Hugging Face safetensors checkpoint to a MaxText Orbax checkpoint. "
        "Any Apache Beam pipeline option (--runner, --direct_num_workers, --direct_running_mode, "
        "Dataflow options, ...) is accepted as well, and MaxText's to_maxtext spellings "
        "(README: MaxText spellings).",
        formatter_class=HelpFormatter,
        allow_abbrev=False,
    )
    ConvertOptions._add_argparse_args(parser)
    add_bool(
        parser,
        "--dry_run",
        False,
        "Print the plan and the params it selects, write nothing and exit (Beam's own flag: it also makes "
        "Beam submit nothing)",
    )
    return parser


def export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ckptbeam export",
        description="Export a MaxText Orbax checkpoint as a Hugging Face safetensors model directory. "
        "Any Apache Beam pipeline option is accepted as well, and MaxText's to_huggingface spellings "
        "(README: MaxText spellings).",
        formatter_class=HelpFormatter,
        allow_abbrev=False,
    )
    add_export_args(parser)
    return parser


def split_export_argv(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(our export options, the Beam pipeline flags); any other argument is an error (exit 2)."""
    parser = export_parser()
    args, rest = parser.parse_known_args(check_argv("export", argv, parser))
    return args, rest
