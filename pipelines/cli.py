"""`ckptbeam` command line: convert, inspect, demo."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import tempfile

# Package data, so a wheel install has it too (tests/fixtures/llama_bf16 links here).
DEMO_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_model")

USAGE = """ckptbeam COMMAND [options]     (ckptbeam --version: versions for a bug report)

commands:
  convert   HF safetensors -> MaxText Orbax checkpoint (Beam pipeline; Beam flags pass through)
  export    MaxText Orbax checkpoint -> HF safetensors model directory (Beam pipeline)
  inspect   list an Orbax checkpoint's params, shapes, dtypes, chunking and size
  plan      plan a conversion from headers only, or from config.json alone (no weights needed),
            and estimate its wall time for N workers
  demo      convert the bundled tiny Llama model, inspect it and export it back to HF

run `ckptbeam convert --help` for conversion options."""


def _inspect(argv: list[str]) -> int:
    from ckpt_transforms.orbax_io.inspect import format_leaves, inspect_checkpoint

    parser = argparse.ArgumentParser(prog="ckptbeam inspect", description="List an Orbax checkpoint's params.")
    parser.add_argument("path", help="OUT, OUT/0 or OUT/0/items")
    args = parser.parse_args(argv)
    print(format_leaves(*inspect_checkpoint(args.path)))
    return 0


def _convert(argv: list[str]) -> int:
    from pipelines.convert import run
    from pipelines.options import ConvertOptions

    if "-h" in argv or "--help" in argv:
        parser = argparse.ArgumentParser(
            prog="ckptbeam convert",
            description="Convert a Hugging Face safetensors checkpoint to a MaxText Orbax checkpoint. "
            "Any Apache Beam pipeline option (--runner, --direct_num_workers, --direct_running_mode, "
            "Dataflow options, ...) is accepted as well; --dry_run prints the plan and exits.",
        )
        ConvertOptions._add_argparse_args(parser)
        parser.print_help()
        return 0
    # A one-shot process: what the imports built (Beam, TensorStore, numpy: ~1M objects) lives to
    # the end, so the cyclic collector need not walk it again on every full collection.
    gc.freeze()
    run(argv)
    return 0


def _export(argv: list[str]) -> int:
    from pipelines.export import run
    from pipelines.options import add_export_args

    if "-h" in argv or "--help" in argv:
        parser = argparse.ArgumentParser(
            prog="ckptbeam export",
            description="Export a MaxText Orbax checkpoint as a Hugging Face safetensors model directory. "
            "Any Apache Beam pipeline option is accepted as well.",
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        add_export_args(parser)
        parser.print_help()
        return 0
    gc.freeze()
    run(argv)
    return 0


def _plan(argv: list[str]) -> int:
    from pipelines.plan_cli import plan_command

    return plan_command(argv)


def _demo(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="ckptbeam demo",
        description="Convert the bundled tiny Llama model to MaxText's Orbax format (OUTPUT/0/items), inspect it, "
        "and export it back to a Hugging Face model directory (OUTPUT/hf).",
    )
    parser.add_argument("--output", default=None, help="where to write (default: a fresh temporary directory)")
    parser.add_argument(
        "--force", action="store_true", help="replace an existing checkpoint or model at OUTPUT (never done without it)"
    )
    args, beam_args = parser.parse_known_args(argv)
    if not os.path.isfile(os.path.join(DEMO_MODEL, "model.safetensors")):
        print(
            f"ckptbeam demo: error: the bundled demo model is missing from {DEMO_MODEL} (broken install?)",
            file=sys.stderr,
        )
        return 2
    output = args.output or tempfile.mkdtemp(prefix="ckptbeam-demo-")
    force = ["--force"] if args.force else []
    _convert(["--source", DEMO_MODEL, "--output", output, *force, *beam_args])
    _inspect([output])
    return _export(["--source", output, "--output", os.path.join(output, "hf"), *force, *beam_args])


def version_line() -> str:
    """ckptbeam's version and those of the libraries that shape its output, for a bug report."""
    from importlib.metadata import PackageNotFoundError, version

    from pipelines import __version__

    parts = []
    for dist in ("apache-beam", "tensorstore", "huggingface_hub", "numpy"):
        try:
            parts.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            parts.append(f"{dist} not installed")
    return f"ckptbeam {__version__} ({', '.join(parts)}; Python {sys.version.split()[0]})"


COMMANDS = {"convert": _convert, "export": _export, "inspect": _inspect, "plan": _plan, "demo": _demo}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--version"]:
        print(version_line())
        return 0
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(USAGE, file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("apache_beam", "absl", "jax", "root"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return COMMANDS[argv[0]](argv[1:])
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"ckptbeam {argv[0]}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
