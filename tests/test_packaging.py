"""What a user installs: Python versions, dependency ranges, the lock file, the wheel and its demo."""

from __future__ import annotations

import ast
import importlib.metadata as md
import os
import re
import subprocess
import sys
import tomllib
import zipfile

import pytest
from conftest import FIXTURES, ROOT
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    PROJECT = tomllib.load(f)["project"]
RUNTIME = [Requirement(r) for r in PROJECT["dependencies"]]
TEST = [Requirement(r) for r in PROJECT["optional-dependencies"]["test"]]
RUNTIME_PACKAGES = ("ckpt_transforms", "model_maps", "pipelines")


def _read(name: str) -> str:
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def locked() -> dict[str, Version]:
    """constraints.txt: canonical name -> exact version."""
    pins = {}
    for line in _read("constraints.txt").splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"constraints.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(req.name)] = Version(spec.version)
    return pins


def advertised_pythons() -> list[str]:
    """The versions the README's Quick start names ('with Python 3.11 or 3.12')."""
    quick_start = _read("README.md").split("## Quick start", 1)[1].split("\n## ", 1)[0]
    sentence = re.search(r"with Python ((?:3\.\d+(?:, | or )?)+)", quick_start).group(1)
    return re.findall(r"3\.\d+", sentence)


def test_python_versions_agree_across_readme_metadata_and_image():
    pythons = advertised_pythons()
    classifiers = re.findall(r"Programming Language :: Python :: (3\.\d+)$", "\n".join(PROJECT["classifiers"]), re.M)
    assert pythons == classifiers
    assert PROJECT["requires-python"] == f">={pythons[0]}"
    assert re.search(rf'^target-version = "py{pythons[0].replace(".", "")}"', _read("ruff.toml"), re.M)
    image = re.search(r"^FROM python:(3\.\d+)-slim", _read("Dockerfile"), re.M).group(1)
    assert image in pythons


def test_every_locked_package_supports_every_advertised_python():
    """What made Python 3.10 uninstallable: jax/numpy/tensorstore pins that need 3.11. Checked from the
    Requires-Python of the installed distributions that are at their locked version."""
    pins, checked, refused = locked(), [], []
    for dist in md.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        if name not in pins or Version(dist.version).public != str(pins[name]):
            continue
        checked.append(name)
        requires = SpecifierSet(dist.metadata.get("Requires-Python") or "")
        refused += [f"{name}=={pins[name]} needs Python {requires}" for p in advertised_pythons() if p not in requires]
    assert not refused
    assert {"apache-beam", "tensorstore", "numpy", "jax", "orbax-checkpoint"} <= set(checked)


def test_dependencies_are_compatible_ranges_that_admit_the_lock():
    pins = locked()
    for req in RUNTIME + TEST:
        name = canonicalize_name(req.name)
        assert not any(s.operator in ("==", "===") for s in req.specifier), f"{req}: an exact pin in pyproject.toml"
        assert req.specifier, f"{req}: no version range"
        assert name in pins, f"{req.name} is not in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req} does not admit the locked {pins[name]}"


def _imported_modules() -> set[str]:
    """Top-level names the runtime packages import, anywhere in a module (lazy imports too)."""
    names = set()
    for package in RUNTIME_PACKAGES:
        for dirpath, _, files in os.walk(os.path.join(ROOT, package)):
            for file in files:
                if file.endswith(".py"):
                    tree = ast.parse(_read(os.path.relpath(os.path.join(dirpath, file), ROOT)))
                    for node in ast.walk(tree):
                        if isinstance(node, ast.Import):
                            names |= {a.name.split(".")[0] for a in node.names}
                        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                            names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - set(RUNTIME_PACKAGES)


def installed_closure(requirements: list[Requirement]) -> set[str]:
    """Every distribution these requirements (with their extras) bring, as installed here."""
    seen: set[tuple[str, str]] = set()
    todo = [(r, extra) for r in requirements for extra in ["", *r.extras]]
    while todo:
        req, extra = todo.pop()
        name = canonicalize_name(req.name)
        if (name, extra) in seen:
            continue
        seen.add((name, extra))
        for line in md.requires(name) or []:
            sub = Requirement(line)
            if not sub.marker or sub.marker.evaluate({"extra": extra}):
                todo += [(sub, e) for e in ["", *sub.extras]]
    return {name for name, _ in seen}


def test_runtime_dependencies_are_what_the_conversion_code_imports():
    """No dead weight (jax, jaxlib, orbax and safetensors were installed but never imported by a
    conversion), and nothing imported that is not declared or brought by a declared package."""
    providers = md.packages_distributions()
    declared = {canonicalize_name(r.name) for r in RUNTIME}
    brought = installed_closure(RUNTIME)
    used = set()
    for module in _imported_modules():
        dists = {canonicalize_name(d) for d in providers.get(module, [])}
        assert dists & brought, f"runtime code imports {module!r}, which no declared dependency brings"
        used |= dists & declared
    assert declared == used


def test_tests_and_ci_and_image_install_the_locked_set():
    command = "pip install -c constraints.txt -e '.[test]' && python -m pytest -q"
    assert command in _read("README.md") and command in _read(".ci/run")
    assert "pip install -c constraints.txt -e . && ckptbeam demo" in _read("README.md")
    assert re.search(r"^RUN pip install --no-cache-dir -c constraints\.txt \.$", _read("Dockerfile"), re.M)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), ROOT]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (name,) = os.listdir(out)
    return str(out / name)


def test_wheel_ships_the_demo_model_and_the_version(wheel):
    from pipelines import __version__

    assert os.path.basename(wheel).startswith(f"ckptbeam-{__version__}-py3")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for file in os.listdir(os.path.join(FIXTURES, "llama_bf16")):
            with open(os.path.join(FIXTURES, "llama_bf16", file), "rb") as f:
                assert z.read(f"pipelines/demo_model/{file}") == f.read()
        meta = z.read(f"ckptbeam-{__version__}.dist-info/METADATA").decode()
    assert not [n for n in names if n.startswith("tests/")]
    assert "Requires-Python: >=3.11" in meta


def test_demo_runs_from_the_installed_wheel_alone(wheel, tmp_path):
    """Installed from the wheel, away from the checkout: the demo finds its model in the package."""
    target = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), wheel]
    assert subprocess.run(install, capture_output=True, timeout=300).returncode == 0
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = "import sys, pipelines.cli as c; print(c.__file__); sys.exit(c.main(sys.argv[1:]))"
    run = subprocess.run(
        [sys.executable, "-c", code, "demo", "--output", str(tmp_path / "demo")],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.splitlines()[0].startswith(str(target))
    assert os.path.isfile(tmp_path / "demo" / "0" / "items" / "_METADATA")
    assert "exported 30 tensors" in run.stdout


def test_version_names_ckptbeam_and_the_libraries_that_shape_its_output():
    from pipelines import __version__
    from pipelines.cli import main

    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "--version"], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout.count("\n") == 1
    line = proc.stdout.strip()
    assert line.startswith(f"ckptbeam {__version__} (apache-beam {md.version('apache-beam')}, ")
    assert f"tensorstore {md.version('tensorstore')}" in line and f"Python {sys.version.split()[0]}" in line
    assert main(["--version"]) == 0
