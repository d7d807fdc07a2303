"""`ckptbeam` command line: convert, inspect, demo."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
import tempfile

DEMO_MODEL = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "llama_bf16"
)

USAGE = """ckptbeam COMMAND [options]

commands:
  convert   HF safetensors -> MaxText Orbax checkpoint (Beam pipeline; Beam flags pass through)
  export    MaxText Orbax checkpoint -> HF safetensors model directory (Beam pipeline)
  inspect   list an Orbax checkpoint's params, shapes, dtypes, chunking and size
  plan      plan a conversion from headers only, or from config.json alone (no weights needed),
            and estimate its wall time for N workers
  demo      convert the bundled tiny Llama model, inspect it and export it back to HF

run `ckptbeam convert --help` for conversion options."""


def inspect_parser() -> argparse.ArgumentParser:
    from pipelines.options import HelpFormatter

    parser = argparse.ArgumentParser(
        prog="ckptbeam inspect",
        description="List an Orbax checkpoint's params, shapes, dtypes, chunking and size (local or gs://).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("path", help="OUT, OUT/0 or OUT/0/items")
    return parser


def _inspect(argv: list[str]) -> int:
    from ckpt_transforms.orbax_io.inspect import format_leaves, inspect_checkpoint

    args = inspect_parser().parse_args(argv)
    print(format_leaves(*inspect_checkpoint(args.path)))
    return 0


def _convert(argv: list[str]) -> int:
    from pipelines.convert import run
    from pipelines.options import convert_parser

    if "-h" in argv or "--help" in argv:
        convert_parser().print_help()
        return 0
    # A one-shot process: what the imports built (Beam, TensorStore, numpy: ~1M objects) lives to
    # the end, so the cyclic collector need not walk it again on every full collection.
    gc.freeze()
    run(argv)
    return 0


def _export(argv: list[str]) -> int:
    from pipelines.export import run
    from pipelines.options import export_parser

    if "-h" in argv or "--help" in argv:
        export_parser().print_help()
        return 0
    gc.freeze()
    run(argv)
    return 0


def _plan(argv: list[str]) -> int:
    from pipelines.plan_cli import plan_command

    return plan_command(argv)


def demo_parser() -> argparse.ArgumentParser:
    from pipelines.options import HelpFormatter, add_bool

    parser = argparse.ArgumentParser(
        prog="ckptbeam demo",
        description="Convert the bundled tiny Llama model to MaxText's Orbax format (OUTPUT/0/items), inspect it, "
        "and export it back to a Hugging Face model directory (OUTPUT/hf). Other arguments go to convert and "
        "export (Beam options).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--output", default=None, help="where to write (None: a fresh temporary directory)")
    add_bool(parser, "--force", False, "write into an OUTPUT that is not empty, replacing what is there")
    return parser


def _demo(argv: list[str]) -> int:
    args, beam_args = demo_parser().parse_known_args(argv)
    if not os.path.isdir(DEMO_MODEL):
        print(f"demo model not found at {DEMO_MODEL}; run the demo from a source checkout", file=sys.stderr)
        return 2
    occupied = args.output and os.path.exists(args.output)
    if occupied and (not os.path.isdir(args.output) or os.listdir(args.output)) and not args.force:
        # A checkpoint there may be one ckptbeam convert would replace as made from other inputs:
        # the demo's own run must never be the thing that replaces it.
        raise FileExistsError(f"{args.output} is not empty; the demo writes into a new or empty directory (or --force)")
    output = args.output or tempfile.mkdtemp(prefix="ckptbeam-demo-")
    force = ["--force"] if args.force else []
    _convert(["--source", DEMO_MODEL, "--output", output, *force, *beam_args])
    _inspect([output])
    return _export(["--source", output, "--output", os.path.join(output, "hf"), *force, *beam_args])


COMMANDS = {"convert": _convert, "export": _export, "inspect": _inspect, "plan": _plan, "demo": _demo}


_TERMINATED: list[int] = []


def _exit_on_sigterm(signum: int, frame: object) -> None:
    _TERMINATED.append(signum)
    raise SystemExit(128 + signum)  # Beam may wrap it in its own error on the way up: see main


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(USAGE, file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # SIGTERM (a cancelled job, `kill`) unwinds like an error: staging removed, lease released.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    for noisy in ("apache_beam", "absl", "jax", "root"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return COMMANDS[argv[0]](argv[1:])
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"ckptbeam {argv[0]}: error: {e}", file=sys.stderr)
        return 1
    except BaseException:
        if not _TERMINATED:
            raise
        print(f"ckptbeam {argv[0]}: stopped by SIGTERM; its unfinished output was removed", file=sys.stderr)
        return 128 + _TERMINATED[0]


if __name__ == "__main__":
    sys.exit(main())
