"""Docs that must match the code."""

from __future__ import annotations

import argparse
import contextlib
import os
import re

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


COMMANDS = ("convert", "export", "plan", "inspect", "demo")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_]*(?:-[a-z0-9_]+)*")


def _readme() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def _help_flags(command: str, capsys) -> set[str]:
    from pipelines.cli import main

    with contextlib.suppress(SystemExit):
        assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: ckptbeam {command}"), text[:200]
    return set(FLAG.findall(text)) - {"--help"}


def _command_lines(readme: str) -> list[tuple[str, str]]:
    """(command, text) of each `ckptbeam COMMAND ...` invocation in a README code block,
    continuation lines joined, comments dropped."""
    found = []
    for block in readme.split("```")[1::2]:
        joined = re.sub(r"\\\n", " ", block)
        for line in joined.splitlines():
            line = line.split("#", 1)[0]
            for m in re.finditer(r"ckptbeam (convert|export|plan|inspect|demo)\b(.*)", line):
                found.append((m.group(1), m.group(2)))
    return found


def _accepted(command: str) -> set[str]:
    """Every flag `command` accepts: its own, Beam's (convert, export, demo) and MaxText's spellings."""
    from pipelines.maxtext_args import TABLES
    from pipelines.options import beam_parser, flag_kinds

    flags = set(flag_kinds(_parser(command)))
    if command in ("convert", "export", "demo"):
        flags |= set(flag_kinds(beam_parser()))
    flags |= {f"--{name}" for name in TABLES.get("convert" if command == "demo" else command, {})}
    return flags


def _parser(command: str):
    from pipelines.cli import demo_parser, inspect_parser
    from pipelines.options import convert_parser, export_parser
    from pipelines.plan_cli import plan_parser

    return {
        "convert": convert_parser, "export": export_parser, "plan": plan_parser,
        "inspect": inspect_parser, "demo": demo_parser,
    }[command]()  # fmt: skip


def test_every_help_flag_is_in_the_readme(capsys):
    readme = set(FLAG.findall(_readme()))
    for command in COMMANDS:
        missing = _help_flags(command, capsys) - readme
        assert not missing, f"`ckptbeam {command} --help` flags the README does not document: {sorted(missing)}"


def test_help_shows_every_default():
    for command in COMMANDS:
        parser = _parser(command)
        formatter = parser._get_formatter()
        for action in parser._actions:
            if action.option_strings and action.default not in (None, argparse.SUPPRESS):
                text = formatter._get_help_string(action) % {"default": action.default}
                assert "default" in text.lower(), (
                    f"ckptbeam {command} --help: {action.option_strings[0]} hides its default"
                )


def test_every_readme_flag_is_accepted_by_its_command():
    """The other way round: each `ckptbeam COMMAND` line and each option bullet of the command's
    section names only flags the command takes."""
    readme = _readme()
    lines = _command_lines(readme)
    assert {c for c, _ in lines} >= {"convert", "export", "plan", "demo"}
    for command, text in lines:
        unknown = set(FLAG.findall(text)) - _accepted(command)
        assert not unknown, f"README: `ckptbeam {command}{text}` uses flags it does not take: {sorted(unknown)}"
    for section, command in (("## Converting a model", "convert"), ("## Exporting", "export")):
        body = readme.split(section, 1)[1].split("\n## ", 1)[0]
        bullets = {m for m in re.findall(r"^- `(--[a-z_]+)", body, re.M)}
        assert bullets, section
        unknown = bullets - set(_parser(command)._option_string_actions)  # ours: in --help, not only Beam's
        assert not unknown, f"README {section}: documents options `ckptbeam {command} --help` lacks: {sorted(unknown)}"


def test_readme_plan_example_is_a_real_run(capsys):
    """The README's `ckptbeam plan` example is what the command prints today."""
    from pipelines.cli import main

    readme = _readme()
    command = "ckptbeam plan --source tests/golden/deepseek_v3_config.json --workers 32 --worker_mb_s 200"
    block = readme.split(command + "\n", 1)[1].split("```", 1)[0]
    shown = [line[2:] for line in block.splitlines()]
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        assert main(command.split()[1:]) == 0
    finally:
        os.chdir(cwd)
    assert capsys.readouterr().out.splitlines() == shown


def test_no_citation_of_a_notes_file_the_repo_does_not_have():
    """Docstrings state the fact or cite a public source; the team's private notes file is not
    shipped, so a reference to it tells a reader nothing."""
    notes = "FACTS" + ".md"
    if os.path.exists(os.path.join(ROOT, notes)):
        return
    cited = []
    for d, dirs, files in os.walk(ROOT):
        dirs[:] = [x for x in dirs if not x.startswith(".") and x not in ("__pycache__", "build")]
        for f in files:
            if f.endswith((".py", ".md", ".sh", ".txt", ".toml", ".cfg", ".json")):
                path = os.path.join(d, f)
                with open(path, encoding="utf-8", errors="replace") as fh:
                    text = fh.read()
                if notes in text or "FACTS" + " §" in text:
                    cited.append(os.path.relpath(path, ROOT))
    assert not cited, f"cite the public source or state the fact instead of {notes}: {cited}"
