"""Docs that must match the code."""

from __future__ import annotations

import os

from conftest import ROOT

from model_maps import support_table


def test_readme_support_table_is_generated_from_the_registry():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    block = readme.split("<!-- SUPPORT:BEGIN")[1].split("<!-- SUPPORT:END -->")[0]
    table = block.split("-->", 1)[1].strip()
    assert table == support_table(), "README support table is stale: paste `python -m model_maps` output"


def test_ci_runs_the_readme_test_command():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        ci = f.read()
    command = "pip install -c constraints.txt -e '.[test]' && python -m pytest -q"
    assert command in readme and command in ci
