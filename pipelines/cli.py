"""`ckptbeam` command line: convert, inspect, demo."""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import signal
import sys
import tempfile
import traceback

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

run `ckptbeam convert --help` for conversion options.
--debug (any command): log every work item, show library logs and, on failure, the traceback."""


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
    if not os.path.isfile(os.path.join(DEMO_MODEL, "model.safetensors")):
        print(
            f"ckptbeam demo: error: the bundled demo model is missing from {DEMO_MODEL} (broken install?)",
            file=sys.stderr,
        )
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
DEBUG_FLAG = "--debug"
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a process stopped by Ctrl-C
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports a writer whose reader went away
# Loggers of libraries whose warnings are noise to a user of the CLI ("Discarding unparseable
# args", worker start-up chatter, and a second copy of every failure with its traceback); the
# failure itself is reported once, as one line. --debug shows them all.
QUIET_LOGGERS = {"apache_beam": logging.CRITICAL, "absl": logging.ERROR, "jax": logging.ERROR}


def configure_logging(debug: bool) -> None:
    """Our progress and notes at INFO (per-item lines only with --debug), libraries quiet. One
    handler of ours on the root logger, writing to the current `sys.stderr` (others are kept)."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "ckptbeam", False)]:
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.ckptbeam = True
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.WARNING:
        root.setLevel(logging.WARNING)
    logging.getLogger("ckptbeam").setLevel(logging.DEBUG if debug else logging.INFO)
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(logging.INFO if debug else level)


def split_debug(argv: list[str]) -> tuple[list[str], bool]:
    """`--debug` is a flag of every command, taken out before the command parses its arguments."""
    return [a for a in argv if a != DEBUG_FLAG], DEBUG_FLAG in argv


@contextlib.contextmanager
def worker_output_hidden(hide: bool):
    """Send what other processes and C++ libraries write straight to file descriptor 2 (Beam's
    workers print every failure's traceback there, and their own KeyboardInterrupt on Ctrl-C) to
    a temporary file, while Python's `sys.stderr` (our lines, the progress bar) keeps the terminal.

    Skipped when `sys.stderr` is not the process's own (a caller captures it) and with --debug."""
    if not hide or sys.stderr is not sys.__stderr__:
        yield
        return
    sys.stderr.flush()
    terminal = os.dup(2)
    original = sys.stderr
    with tempfile.TemporaryFile() as sink:
        sys.stderr = os.fdopen(os.dup(terminal), "w", buffering=1, errors="backslashreplace")
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(terminal, 2)
            os.close(terminal)
            sys.stderr.close()
            sys.stderr = original


_TERMINATED: list[int] = []


def _exit_on_sigterm(signum: int, frame: object) -> None:
    _TERMINATED.append(signum)
    raise SystemExit(128 + signum)  # Beam may wrap it in its own error on the way up: see run_command


def run_command(command: str, args: list[str], debug: bool) -> int:
    """Run one command; every failure becomes one line on stderr (with --debug, after its traceback)."""
    from pipelines.errors import WorkerDiedError, one_line, was_interrupted, watch_workers

    try:
        with worker_output_hidden(not debug):
            configure_logging(debug)
            try:
                with watch_workers(show_consequences=debug):
                    return COMMANDS[command](args)
            except (KeyboardInterrupt, WorkerDiedError, SystemExit, Exception) as e:  # noqa: BLE001 - reported below, once
                if isinstance(e, SystemExit) and not _TERMINATED:
                    raise  # argparse's exit codes (2 for usage errors, 0 for --help)
                if debug:
                    traceback.print_exc()
                failure = e
    finally:
        configure_logging(debug)  # the handlers of the hidden stream are gone with it
    if isinstance(failure, BrokenPipeError):  # `ckptbeam inspect OUT | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return EXIT_BROKEN_PIPE
    sys.stdout.flush()
    if _TERMINATED:  # Beam may have wrapped the SystemExit of _exit_on_sigterm in its own error
        cleaned = "; ".join(getattr(failure, "__notes__", ())) or "stopped before anything was written"
        print(f"ckptbeam {command}: stopped by SIGTERM; {cleaned}", file=sys.stderr)
        return 128 + _TERMINATED[0]
    if was_interrupted(failure):
        cleaned = "; ".join(getattr(failure, "__notes__", ())) or "stopped before anything was written"
        print(f"ckptbeam {command}: interrupted; {cleaned}", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"ckptbeam {command}: error: {one_line(failure)}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    argv, debug = split_debug(list(sys.argv[1:] if argv is None else argv))
    if argv[:1] == ["--version"]:
        print(version_line())
        return 0
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(USAGE, file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    # SIGTERM (a cancelled job, `kill`) unwinds like an error: the lease released, the run's
    # staging kept for a resume or removed, as for any failure.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    return run_command(argv[0], argv[1:], debug)


if __name__ == "__main__":
    sys.exit(main())
