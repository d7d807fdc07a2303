"""MaxText's spellings of ckptbeam's options (pipelines/maxtext_args.py) and the one rule for booleans."""

from __future__ import annotations

import argparse
import os

import pytest
from conftest import FIXTURES, ROOT

from pipelines import maxtext_args
from pipelines.cli import demo_parser
from pipelines.maxtext_args import UsageError, equivalence_table
from pipelines.options import beam_parser, convert_parser, export_parser, flag_kinds, parse_scan_layers, str2bool
from pipelines.plan_cli import plan_parser

PARSERS = {"convert": convert_parser, "export": export_parser, "plan": plan_parser}


def translate(command: str, *argv: str) -> tuple[list[str], list[str]]:
    parser = PARSERS[command]()
    beam = flag_kinds(beam_parser()) if command != "plan" else {}
    return maxtext_args.translate(list(argv), command, parser._option_string_actions, beam)


@pytest.mark.parametrize(
    "command, maxtext, ours",
    [
        ("convert", ("model_name", "qwen3-4b"), "--model=qwen3-4b"),
        ("convert", ("model_name", "llama3.1-8b-Instruct"), "--model=llama3.1-8b"),  # as to_maxtext does
        ("convert", ("base_output_directory", "gs://b/out"), "--output=gs://b/out"),
        ("convert", ("hf_model_path", "Qwen/Qwen3-4B"), "--source=hf://Qwen/Qwen3-4B"),
        ("convert", ("hf_model_path", FIXTURES), f"--source={FIXTURES}"),  # a local directory stays one
        ("convert", ("scan_layers", "False"), "--scan_layers=False"),
        ("convert", ("save_dtype", "float32"), "--save_dtype=float32"),
        ("convert", ("use_multimodal", "true"), "--use_multimodal=true"),
        ("convert", ("checkpoint_storage_use_ocdbt", "0"), "--use_ocdbt=0"),
        ("convert", ("checkpoint_storage_use_zarr3", "0"), "--use_zarr3=0"),
        ("convert", ("simulated_cpu_devices_count", "16"), "--shard_count=16"),
        ("convert", ("vocab_size", "256128"), "--vocab_size=256128"),
        ("plan", ("model_name", "deepseek3-671b"), "--model=deepseek3-671b"),
        ("export", ("load_parameters_path", "gs://b/ck/0/items"), "--source=gs://b/ck/0/items"),
        ("export", ("base_output_directory", "/tmp/hf"), "--output=/tmp/hf"),
        ("export", ("model_name", "gemma3-4b"), "--model=gemma3-4b"),
        ("export", ("hf_model_path", "google/gemma-3-4b-it"), "--hf_config=hf://google/gemma-3-4b-it"),
        ("export", ("scan_layers", "true"), "--scan_layers=true"),
        ("export", ("weight_dtype", "bfloat16"), "--weight_dtype=bfloat16"),
        ("export", ("use_multimodal", "false"), "--use_multimodal=false"),
    ],
)
@pytest.mark.parametrize("form", ["key=value", "--key=value", "--key value"])
def test_every_maxtext_spelling_in_every_form(command, maxtext, ours, form):
    name, value = maxtext
    argv = {
        "key=value": [f"{name}={value}"],
        "--key=value": [f"--{name}={value}"],
        "--key value": [f"--{name}", value],
    }[form]
    assert translate(command, "--runner", "DirectRunner", *argv) == (["--runner", "DirectRunner", ours], [])


@pytest.mark.parametrize(
    "command, argv, why",
    [
        ("convert", ["lazy_load_tensors=false"], "always reads tensors lazily"),
        ("convert", ["--lazy_load_tensors"], "always reads tensors lazily"),  # a bare boolean is true
        ("convert", ["--eager_load_method=transformers"], "never through transformers"),
        ("convert", ["hardware=cpu"], "runs on CPUs"),
        ("export", ["hardware=tpu"], "runs on CPUs"),
        ("export", ["skip_jax_distributed_system=True"], "no JAX distributed system"),
        ("export", ["--parallel_threads", "8"], "does not change the files"),
        ("convert", ["src/maxtext/configs/base.yml"], "MaxText's default config file"),
    ],
)
def test_settings_without_effect_are_accepted_and_said_to_be_ignored(command, argv, why):
    out, notes = translate(command, "--force", *argv)
    assert out == ["--force"]
    assert len(notes) == 1 and why in notes[0] and notes[0].startswith(" ".join(argv))


@pytest.mark.parametrize(
    "command, argv, message",
    [
        # refused: they would change the result, or where a secret goes
        ("convert", ["hf_access_token=hf_abc"], "hf_access_token=hf_abc: ckptbeam reads the Hub token"),
        ("export", ["--hf_access_token", "hf_abc"], "--hf_access_token hf_abc: ckptbeam reads the Hub token"),
        ("convert", ["weight_dtype=float32"], "use save_dtype= or --save_dtype"),
        ("export", ["save_dtype=float32"], "use weight_dtype= or --weight_dtype"),
        ("convert", ["configs/my_run.yml"], "reads no MaxText config file"),
        ("plan", ["base_output_directory=/x"], "means --output, which ckptbeam plan does not take"),
        # values are checked as ours are, and the error names them as typed
        ("convert", ["scan_layers=maybe"], "scan_layers=maybe: expected true or false"),
        ("convert", ["--simulated_cpu_devices_count", "0"], "--simulated_cpu_devices_count 0: expected a whole"),
        ("convert", ["save_dtype=int8"], "save_dtype=int8: invalid choice 'int8' (choose from bfloat16, float32)"),
        ("export", ["weight_dtype=fp8"], "weight_dtype=fp8: invalid choice"),
        ("convert", ["hardware=quantum"], "hardware=quantum: expected one of cpu"),
        ("convert", ["lazy_load_tensors=sometimes"], "expected true or false"),
        ("convert", ["--model_name"], "--model_name: expected a value"),
        # two spellings of one option, different values
        ("convert", ["scan_layers=false", "--scan_layers", "true"], "scan_layers=false and --scan_layers true set"),
        ("convert", ["--scan_layers", "scan_layers=false"], "--scan_layers and scan_layers=false set"),
        ("convert", ["--shard_count=4", "simulated_cpu_devices_count=16"], "--shard_count=4 and simulated_cpu"),
        ("export", ["load_parameters_path=/a", "--source", "/b"], "load_parameters_path=/a and --source /b"),
    ],
)
def test_refused_settings_bad_values_and_conflicts_are_usage_errors(command, argv, message):
    with pytest.raises(UsageError) as info:
        translate(command, *argv)
    assert message in str(info.value)


def test_one_value_given_twice_the_same_is_fine():
    out, _ = translate(
        "convert", "scan_layers=false", "--scan_layers", "0", "--use_ocdbt", "checkpoint_storage_use_ocdbt=1"
    )
    assert out == ["--scan_layers=false", "--scan_layers=0", "--use_ocdbt", "--use_ocdbt=1"]


def test_a_beam_flag_value_that_looks_like_a_setting_is_left_to_its_flag():
    out, notes = translate("convert", "--experiments", "hardware=cpu", "--save_main_session", "hardware=cpu")
    assert out == ["--experiments", "hardware=cpu", "--save_main_session"] and len(notes) == 1


def test_readme_lists_the_equivalence_table():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    block = readme.split("<!-- MAXTEXT:BEGIN")[1].split("<!-- MAXTEXT:END -->")[0]
    assert block.split("-->", 1)[1].strip() == equivalence_table(), (
        "README's MaxText spellings table is stale: paste `python -m pipelines.maxtext_args` output"
    )


# One rule for every boolean: bare --flag is true, --flag true|false and --flag=... set it.


def _boolean_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [
        a
        for a in parser._actions
        if a.type in (str2bool, parse_scan_layers)
        or isinstance(a, argparse._StoreTrueAction | argparse._StoreFalseAction)
    ]


@pytest.mark.parametrize("command", ["convert", "export", "plan", "demo"])
def test_every_boolean_flag_follows_one_rule(command):
    parser = demo_parser() if command == "demo" else PARSERS[command]()
    actions = _boolean_actions(parser)
    assert actions, command
    required = ["--source", "x"] if command == "plan" else []
    for action in actions:
        flag = action.option_strings[0]
        assert action.nargs == "?" and action.const is True, f"{command} {flag}: not the one boolean rule"
        assert getattr(parser.parse_args([*required, flag]), action.dest) is True
        assert getattr(parser.parse_args([*required, flag, "false"]), action.dest) is False
        assert getattr(parser.parse_args([*required, f"{flag}=true"]), action.dest) is True


def test_beam_parses_our_booleans_by_the_same_rule():
    """Convert's options are parsed by Beam, not by our parser: the rule must hold there too."""
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines.options import ConvertOptions

    opts = PipelineOptions(["--use_ocdbt", "--use_zarr3", "false", "--force", "--scan_layers=0"]).view_as(
        ConvertOptions
    )
    assert (opts.use_ocdbt, opts.use_zarr3, opts.force, opts.scan_layers) == (True, False, True, False)
