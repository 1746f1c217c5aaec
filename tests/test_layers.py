"""Imports only go down (docs/architecture.md): every module's imports of our own packages, read with
``ast``, follow the layers, and nothing imports an entry point.

    common                           imports nothing of ours
    models, datamodules              import common (and themselves), not each other
    evaluation                       imports datamodules and common
    run                              the entry points' shared helpers: any of the above
    train.py, eval.py, predict.py,   anything but an entry point
    demo.py, bench, tests
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = {"train", "eval", "predict", "demo"}
LIBRARY = {"common", "models", "datamodules", "evaluation"}
# What each layer may import of ours, besides itself.
MAY_IMPORT = {
    "common": set(),
    "models": {"common"},
    "datamodules": {"common"},
    "evaluation": {"common", "datamodules"},
    "run": LIBRARY,
    "entry point": LIBRARY | {"run"},
    "bench": LIBRARY | {"run"},
    "tests": LIBRARY | {"run", "bench"},
}
OURS = LIBRARY | ENTRY_POINTS | {"run", "bench", "tests"}


def python_files() -> list[Path]:
    """The repository's Python files: tracked or not ignored by git (so no virtualenv, run output or cache
    counts, whatever its name); without git, every file outside the usual ignored folders."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"], cwd=ROOT,
                            capture_output=True, text=True)
    if listed.returncode == 0:
        return sorted(ROOT / name for name in listed.stdout.splitlines() if (ROOT / name).is_file())
    return sorted(path for path in ROOT.rglob("*.py")
                  if not {".venv", "outputs", ".cache", "build"} & set(path.relative_to(ROOT).parts))


def layer(path: Path) -> str:
    """The layer of a file: its top-level package, or ``entry point`` for a top-level script (``ENTRY_POINTS``)."""
    parts = path.relative_to(ROOT).parts
    if len(parts) == 1:
        if path.stem in ENTRY_POINTS:
            return "entry point"
        raise AssertionError(f"{path.relative_to(ROOT)} is a top-level module that is no entry point: put it in a "
                             "package of its layer (docs/architecture.md)")
    if parts[0] not in MAY_IMPORT:
        raise AssertionError(f"{path.relative_to(ROOT)} is in {parts[0]}/, which is no layer: add it to "
                             "docs/architecture.md and to this test's MAY_IMPORT")
    return parts[0]


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every import in a file, at any depth (imports inside functions count);
    a relative import is resolved against the file's package."""
    package = list(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.append((node.lineno, module))
    return found


def broken_rules(path: Path) -> list[str]:
    own = layer(path)
    problems = []
    for line, module in imported_modules(path):
        top = module.split(".")[0]
        if top not in OURS or top == own:
            continue
        where = f"{path.relative_to(ROOT)}:{line}: import of {module}"
        if top in ENTRY_POINTS:
            problems.append(f"{where}: nothing imports an entry point; move what it needs into run/")
        elif top not in MAY_IMPORT[own]:
            allowed = ", ".join(sorted(MAY_IMPORT[own])) or "nothing of ours"
            problems.append(f"{where}: the {own} layer may import {allowed}")
    return problems


@pytest.mark.parametrize("path", python_files(), ids=lambda path: str(path.relative_to(ROOT)))
def test_imports_go_down_the_layers(path):
    problems = broken_rules(path)
    assert not problems, "\n".join(problems)


def test_the_rules_name_the_file_the_line_and_the_import(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "models").mkdir()
    upward = tmp_path / "models" / "upward.py"
    upward.write_text("import torch\nfrom models.lumen import LumenModel\n\ndef f():\n    from datamodules.collate import x\n")
    assert broken_rules(upward) == [
        "models/upward.py:5: import of datamodules.collate: the models layer may import common"]
    (tmp_path / "bench").mkdir()
    helper = tmp_path / "bench" / "helper.py"
    helper.write_text("from train import train\n")
    assert broken_rules(helper) == [
        "bench/helper.py:1: import of train: nothing imports an entry point; move what it needs into run/"]


def config_targets() -> list[tuple[str, str]]:
    """(config file, ``_target_``) of every Hydra config node that names one of our objects."""
    targets = []

    def walk(node, where: str) -> None:
        if isinstance(node, dict):
            target = node.get("_target_")
            if isinstance(target, str) and target.split(".")[0] in OURS:
                targets.append((where, target))
            for value in node.values():
                walk(value, where)
        elif isinstance(node, list):
            for value in node:
                walk(value, where)

    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        walk(OmegaConf.to_container(OmegaConf.load(path), resolve=False), str(path.relative_to(ROOT)))
    return targets


@pytest.mark.parametrize(("config", "target"), config_targets())
def test_every_config_target_names_an_object_that_exists(config, target):
    module, _, name = target.rpartition(".")
    path = ROOT / Path(*module.split("."))
    source = path.with_suffix(".py") if path.with_suffix(".py").is_file() else path / "__init__.py"
    assert source.is_file(), f"{config}: _target_ {target}: there is no module {module}"
    defined = set()
    for node in ast.parse(source.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.ImportFrom):  # a package exporting what its modules define
            defined |= {alias.asname or alias.name for alias in node.names}
    assert name in defined, f"{config}: _target_ {target}: {source.relative_to(ROOT)} defines no {name}"
