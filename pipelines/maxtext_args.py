"""MaxText's spellings of ckptbeam's options, so a MaxText command line can be pasted.

MaxText's converters take two kinds of arguments: `key=value` settings read by its pyconfig
(`model_name=llama3.1-8b scan_layers=false ...`) and a few argparse/absl flags
(`--hf_model_path`, `--save_dtype`, `--simulated_cpu_devices_count`, `--lazy_load_tensors`).
Users mix them up, so every MaxText name here is accepted in all three forms: `key=value`,
`--key=value` and `--key value`. `translate` rewrites them to ckptbeam's own flags before any
parser sees the command line; the tables below are the one place that says what means what
(README: "MaxText spellings" is generated from them by `equivalence_table`).

A MaxText setting that cannot change the result (`hardware=cpu`) is accepted and said to be
ignored; one that would (a token, a config file with other settings) is an error.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

from pipelines.options import BOOL_WORDS, str2bool


class UsageError(ValueError):
    """A command-line mistake: reported as one line, exit status 2, before any work."""


@dataclass(frozen=True)
class Equivalent:
    """MaxText `name` means ckptbeam's `ours`, after `value` translates the value (None: the
    setting is accepted and ignored, `why` says why; `check` validates its value all the same)."""

    ours: str | None
    why: str = ""
    value: Callable[[str], str] = str
    check: Callable[[str], object] | None = None
    is_bool: bool = False  # (ignored settings) a bare --name means true


@dataclass(frozen=True)
class Refused:
    """A MaxText setting ckptbeam cannot honour the way MaxText does: an error saying what to do."""

    why: str
    brief: str = ""  # for the README's table, when `why` is long


def hf_repo_or_path(text: str) -> str:
    """MaxText's hf_model_path: a Hub repo id (ORG/NAME) or a local directory. A local path
    that exists, or a URI, stays as it is; ORG/NAME otherwise means the Hub repo."""
    if "://" in text or os.path.exists(text) or not re.fullmatch(r"[\w.-]+/[\w.-]+", text):
        return text
    return f"hf://{text}"


def strip_instruct(text: str) -> str:
    """to_maxtext converts `llama3.1-8b-Instruct` with the base model's architecture."""
    return text[: -len("-Instruct")] if text.endswith("-Instruct") else text


def _bool(text: str) -> bool:
    try:
        return str2bool(text)
    except argparse.ArgumentTypeError as e:
        raise UsageError(str(e)) from None


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise UsageError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def _one_of(*choices: str) -> Callable[[str], str]:
    def check(text: str) -> str:
        if text.lower() not in choices:
            raise UsageError(f"expected one of {', '.join(choices)}, got {text!r}")
        return text

    return check


_HARDWARE = _one_of("cpu", "tpu", "gpu", "gpu_multiprocess", "cpu_multiprocess")
_TOKEN = Refused(
    "ckptbeam reads the Hub token from the environment (HF_TOKEN, or `hf auth login`), never from the "
    "command line, where it would end up in logs and job specs: drop it and set HF_TOKEN",
    "set HF_TOKEN instead",
)
_NO_JAX = "ckptbeam starts no JAX distributed system"
_CPU = "ckptbeam runs on CPUs (Beam workers) whatever the hardware setting"

CONVERT: dict[str, Equivalent | Refused] = {
    "model_name": Equivalent("--model", value=strip_instruct),
    "hf_model_path": Equivalent("--source", value=hf_repo_or_path),
    "base_output_directory": Equivalent("--output"),
    "scan_layers": Equivalent("--scan_layers"),
    "save_dtype": Equivalent("--save_dtype"),
    "use_multimodal": Equivalent("--use_multimodal"),
    "checkpoint_storage_use_ocdbt": Equivalent("--use_ocdbt"),
    "checkpoint_storage_use_zarr3": Equivalent("--use_zarr3"),
    "simulated_cpu_devices_count": Equivalent("--shard_count"),
    "vocab_size": Equivalent("--vocab_size"),
    "lazy_load_tensors": Equivalent(
        None,
        "ckptbeam always reads tensors lazily (only the byte ranges each work item needs)",
        check=_bool,
        is_bool=True,
    ),
    "eager_load_method": Equivalent(
        None,
        "ckptbeam reads safetensors itself, never through transformers",
        check=_one_of("safetensors", "transformers"),
    ),
    "hardware": Equivalent(None, _CPU, check=_HARDWARE),
    "skip_jax_distributed_system": Equivalent(None, _NO_JAX, check=_bool, is_bool=True),
    "hf_access_token": _TOKEN,
    "weight_dtype": Refused(
        "to_maxtext saves in save_dtype (weight_dtype is MaxText's training dtype and does not change the "
        "checkpoint): use save_dtype= or --save_dtype",
        "use `save_dtype` (to_maxtext does not read weight_dtype)",
    ),
}

EXPORT: dict[str, Equivalent | Refused] = {
    "model_name": Equivalent("--model"),
    "load_parameters_path": Equivalent("--source"),
    "base_output_directory": Equivalent("--output"),
    "hf_model_path": Equivalent("--hf_config", value=hf_repo_or_path),
    "scan_layers": Equivalent("--scan_layers"),
    "weight_dtype": Equivalent("--weight_dtype"),
    "use_multimodal": Equivalent("--use_multimodal"),
    "hardware": Equivalent(None, _CPU, check=_HARDWARE),
    "skip_jax_distributed_system": Equivalent(None, _NO_JAX, check=_bool, is_bool=True),
    "parallel_threads": Equivalent(
        None,
        "each Beam worker writes its own shards; the thread count does not change the files",
        check=_positive,
    ),
    "hf_access_token": _TOKEN,
    "save_dtype": Refused(
        "to_huggingface writes in weight_dtype: use weight_dtype= or --weight_dtype", "use `weight_dtype`"
    ),
}

TABLES = {"convert": CONVERT, "plan": CONVERT, "export": EXPORT}


def _is_config_file(arg: str) -> bool:
    return arg.endswith((".yml", ".yaml")) and "=" not in arg and not arg.startswith("-")


def _split(argv: list[str], i: int, is_bool: bool) -> tuple[str, str | None, int]:
    """(name, value, tokens used) of the argument at `i`: `key=value`, `--key=value`,
    `--key value`, or a bare `--key` (value None)."""
    name, eq, value = argv[i].lstrip("-").partition("=")
    if eq:
        return name, value, 1
    nxt = argv[i + 1] if i + 1 < len(argv) else None
    if nxt is None or nxt.startswith("--") or (is_bool and nxt.lower() not in BOOL_WORDS):
        return name, None, 1
    return name, nxt, 2


def translate(
    argv: list[str], command: str, ours: dict[str, argparse.Action], others: dict[str, bool]
) -> tuple[list[str], list[str]]:
    """(argv with MaxText spellings rewritten to ckptbeam's flags, notes to print once).

    `ours`: the command's own flags and their argparse actions (a boolean's bare `--flag` means
    true; a translated value is checked by the action's type and choices); `others`: Beam's flags, each mapped to whether it takes a value (so a value that looks
    like `key=value` is left to its flag). Raises UsageError for a refused setting, a MaxText
    config file, an invalid value of an ignored setting, or one option given twice (in any
    spellings) with different values."""
    table = TABLES[command]
    out: list[str] = []
    notes: list[str] = []
    seen: dict[str, tuple[str, object]] = {}  # our flag -> (as typed, normalized value)
    i = 0
    while i < len(argv):
        arg = argv[i]
        dashed = arg.startswith("--")
        key = arg.lstrip("-").partition("=")[0]
        entry = table.get(key) if dashed or "=" in arg else None
        if not dashed and _is_config_file(arg):
            if os.path.basename(arg) != "base.yml":
                raise UsageError(
                    f"{arg}: ckptbeam reads no MaxText config file; pass the settings it holds as arguments"
                )
            notes.append(f"{arg}: MaxText's default config file: ignored (ckptbeam needs none)")
            i += 1
            continue
        if entry is None and not (dashed and f"--{key}" in ours):
            out.append(arg)  # Beam's flag or something unknown: the unknown-argument check decides
            takes_value = dashed and "=" not in arg and others.get(arg, False)
            if takes_value and i + 1 < len(argv):
                out.append(argv[i + 1])  # its value, whatever it looks like
                i += 1
            i += 1
            continue
        flag = entry.ours if isinstance(entry, Equivalent) else f"--{key}" if entry is None else None
        action = ours.get(flag)
        if flag and action is None:
            raise UsageError(f"{arg}: means {flag}, which ckptbeam {command} does not take")
        is_bool = action.nargs in (0, "?") if action else isinstance(entry, Equivalent) and entry.is_bool
        _, value, used = _split(argv, i, is_bool)
        typed = " ".join(argv[i : i + used])
        i += used
        if isinstance(entry, Refused):
            raise UsageError(f"{typed}: {entry.why}")
        if value is None and not is_bool:
            if entry is None:
                out.append(arg)  # the parser says what is missing
                continue
            raise UsageError(f"{typed}: expected a value")
        if entry is not None and entry.ours is None:
            try:
                entry.check(value if value is not None else "true")
            except UsageError as e:
                raise UsageError(f"{typed}: {e}") from None
            notes.append(f"{typed}: accepted and ignored: {entry.why}")
            continue
        translated = value if entry is None or value is None else entry.value(value)
        if entry is not None and translated is not None:
            _check_value(action, typed, translated)
        normalized = _normalize(translated, is_bool)
        if flag in seen and seen[flag][1] != normalized:
            raise UsageError(f"{seen[flag][0]} and {typed} set {flag} to different values; give it once")
        seen.setdefault(flag, (typed, normalized))
        out.append(flag if translated is None else f"{flag}={translated}")
    return out, notes


def _check_value(action: argparse.Action, typed: str, value: str) -> None:
    """A MaxText spelling's value is checked as ours would be, and the error names it as typed."""
    try:
        parsed = action.type(value) if action.type else value
    except (argparse.ArgumentTypeError, ValueError) as e:
        raise UsageError(f"{typed}: {e}") from None
    if action.choices and parsed not in action.choices:
        raise UsageError(f"{typed}: invalid choice {value!r} (choose from {', '.join(map(str, action.choices))})")


def _normalize(value: str | None, is_bool: bool) -> object:
    if not is_bool:
        return value
    if value is None:
        return True
    try:
        return str2bool(value)
    except Exception:
        return value  # the parser reports the bad value


def equivalence_table() -> str:
    """The README's table of MaxText spellings (both directions), generated from the tables."""
    rows = ["| MaxText | `convert` | `export` |", "| --- | --- | --- |"]
    for name in sorted(set(CONVERT) | set(EXPORT)):
        rows.append(f"| `{name}` | {_cell(CONVERT.get(name))} | {_cell(EXPORT.get(name))} |")
    return "\n".join(rows)


def _cell(entry: Equivalent | Refused | None) -> str:
    if entry is None:
        return "—"
    if isinstance(entry, Refused):
        return f"error: {entry.brief or entry.why}"
    if entry.ours is None:
        return f"accepted, ignored: {entry.why}"
    extra = {
        hf_repo_or_path: " (`ORG/NAME` → `hf://ORG/NAME`)",
        strip_instruct: " (a `-Instruct` suffix dropped, as MaxText does)",
    }.get(entry.value, "")
    return f"`{entry.ours}`{extra}"


if __name__ == "__main__":
    print(equivalence_table())
