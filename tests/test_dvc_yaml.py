"""dvc.yaml agrees with the code and with params.yaml."""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

import pytest
import yaml

from conftest import REPO

DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())
PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())
STAGES = DVC["stages"]
PACKAGE = REPO / "src" / "imgclf"


def lookup(dotted: str):
    value = PARAMS
    for part in dotted.split("."):
        assert isinstance(value, dict) and part in value, f"params.yaml has no {dotted}"
        value = value[part]
    return value


def local_imports(module: str, seen: set[str] | None = None) -> set[str]:
    """The package's own modules that `module` imports, transitively."""
    seen = set() if seen is None else seen
    if module in seen:
        return seen
    seen.add(module)
    tree = ast.parse((PACKAGE / f"{module.split('.')[-1]}.py").read_text())
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            if name.startswith("imgclf.") and (PACKAGE / f"{name.split('.')[1]}.py").exists():
                local_imports(".".join(name.split(".")[:2]), seen)
    return seen


def test_stage_names_are_modules():
    assert list(STAGES) == ["download", "prepare", "train", "evaluate", "register"]


@pytest.mark.parametrize("name", list(STAGES))
def test_stage_command_runs_its_own_module(name):
    assert STAGES[name]["cmd"] == f"python -m imgclf.{name} --params params.yaml"
    spec = importlib.util.find_spec(f"imgclf.{name}")
    assert spec is not None
    assert "def main(" in Path(spec.origin).read_text()


@pytest.mark.parametrize("name", list(STAGES))
def test_stage_deps_include_all_its_code(name):
    deps = set(STAGES[name]["deps"])
    needed = {f"src/imgclf/{m.split('.')[1]}.py" for m in local_imports(f"imgclf.{name}")}
    if name == "register":  # the model file MLflow loads imports serving, which imports more
        needed |= {f"src/imgclf/{m.split('.')[1]}.py" for m in local_imports("imgclf.model_code")}
    assert needed <= deps, f"missing from deps: {sorted(needed - deps)}"


def test_every_templated_key_and_param_exists():
    text = (REPO / "dvc.yaml").read_text()
    keys = re.findall(r"\$\{([^}]+)\}", text)
    assert keys
    for key in keys:
        lookup(key.strip())
    for stage in STAGES.values():
        for param in stage.get("params", []):
            if isinstance(param, dict):  # a whole params file: {path: null}
                (path,) = param
                assert (REPO / path).is_file(), path
            else:
                lookup(param)


def test_every_preset_is_a_param_of_the_train_stage():
    files = {next(iter(p)) for p in STAGES["train"]["params"] if isinstance(p, dict)}
    assert files == {f"presets/{p.name}" for p in (REPO / "presets").glob("*.yaml")}
