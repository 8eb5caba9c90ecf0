"""Packaging: the wheel carries py.typed, LICENSE and the recipes; a type checker sees concrete types through
the public API; the declared dependencies are exactly what the code imports."""
from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

tomllib = pytest.importorskip("tomllib")  # Python 3.11+


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_wheel_has_py_typed_license_and_recipes(tmp_path):
    # Built from a copy, so the check does not write build/ or *.egg-info into the working tree.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "LICENSE", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for name in ("augment_gan", "cli", "recipes"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("augment_gan-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "augment_gan/py.typed" in names
    assert any(re.fullmatch(r"augment_gan-[^/]+\.dist-info/licenses/LICENSE", n) for n in names), names
    assert {f"augment_gan/recipe_files/{r}.yaml" for r in ("heavy", "light", "none", "standard")} <= set(names)
    assert "augment_gan/cli/__init__.py" in names and not any(n.startswith(("cli/", "tests/")) for n in names)
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: MIT" in metadata


def test_project_metadata():
    project = _pyproject()["project"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    assert (REPO / "LICENSE").read_text().startswith("MIT License")
    assert (REPO / "CHANGELOG.md").is_file()
    assert "urls" not in project or all(u.startswith("https://") for u in project["urls"].values())
    assert project["keywords"] and "Typing :: Typed" in project["classifiers"]
    extras = project["optional-dependencies"]
    assert any(d.startswith("torch-fidelity") for d in extras["inception"])
    assert "tensorboard" in extras["all"][0] and "inception" in extras["all"][0]
    assert any(d.startswith("mypy") for d in extras["dev"])


# Import name -> distribution name, where they differ.
_DISTRIBUTION = {"PIL": "pillow", "yaml": "pyyaml", "torch_fidelity": "torch-fidelity",
                 "imblearn": "imbalanced-learn"}


def _imports(folder: Path) -> set[str]:
    """Top-level modules imported anywhere under `folder`, outside the standard library and this package."""
    found = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    scripts = {script.stem for script in (REPO / "benchmarks").glob("*.py")}  # benchmarks import each other
    local = {"augment_gan", "__future__", *scripts}
    return {name for name in found - local if name not in sys.stdlib_module_names}


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_dependencies_are_what_the_code_imports():
    project = _pyproject()["project"]
    core = _names(project["dependencies"])
    optional = set().union(*(_names(v) for v in project["optional-dependencies"].values()))
    library = {_DISTRIBUTION.get(m, m).lower() for m in _imports(REPO / "augment_gan") | _imports(REPO / "cli")}
    benchmarks = {_DISTRIBUTION.get(m, m).lower() for m in _imports(REPO / "benchmarks")}
    # Every import is declared (optional ones in an extra), and every core dependency is imported somewhere.
    assert library <= core | optional, library - core - optional
    assert benchmarks <= core | optional, benchmarks - core - optional
    assert core <= library | benchmarks, f"declared but never imported: {core - library - benchmarks}"


# ---------------------------------------------------------------------------------------------------------
# Types through the public API, as a user's type checker sees them.

_USER_SCRIPT = '''
import augment_gan as ag
from augment_gan import SyntheticImageFolder, load_recipe

recipe = load_recipe("standard")
reveal_type(recipe)
data = SyntheticImageFolder("synthetic/digits", transform=recipe)
reveal_type(data)
reveal_type(data.classes)
checkpoint = ag.fit("examples/digits", ag.TrainConfig(minutes=2), "runs/digits")
reveal_type(checkpoint)
reveal_type(ag.synth(checkpoint, "synthetic/digits", n=1000))
wrong: int = load_recipe("light")
'''


def test_mypy_sees_concrete_types_through_the_api(tmp_path):
    script = tmp_path / "user.py"
    script.write_text(_USER_SCRIPT)
    # MYPYPATH: an editable install is found through an import hook, which mypy cannot follow.
    env = {**os.environ, "MYPYPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(REPO / "pyproject.toml"),
                           "--cache-dir", str(tmp_path / "cache"), "--no-error-summary", str(script)],
                          capture_output=True, text=True, env=env, timeout=300)
    # Only the user's file counts here: mypy also reports what it finds inside the package.
    mine = [line.split(": ", 1)[1] for line in proc.stdout.splitlines() if line.startswith(str(script))]
    revealed = [line.removeprefix("note: Revealed type is ").strip('"').replace("builtins.", "")
                for line in mine if line.startswith("note: Revealed")]
    assert revealed == ["augment_gan.recipes.Recipe", "augment_gan.datasets.SyntheticImageFolder", "list[str]",
                        "pathlib.Path", "augment_gan.synth.SynthSummary"], proc.stdout[-3000:] + proc.stderr[-2000:]
    errors = [line for line in mine if line.startswith("error:")]
    # A concrete type is one a mistake shows up against (Any would accept it silently).
    assert len(errors) == 1 and '"Recipe", variable has type "int"' in errors[0], errors
