"""dvc.yaml agrees with the code and with params.yaml."""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib.util
import re
from pathlib import Path

import pytest
import yaml

from conftest import REPO, default_bytes, default_params, default_text

# As committed: `dvc exp run` leaves its params in the workspace, and these test the shipped defaults.
DVC = yaml.safe_load(default_text("dvc.yaml"))
PARAMS = default_params()
STAGES = DVC["stages"]
PACKAGE = REPO / "src" / "imgclf"


def lookup(dotted: str):
    value = PARAMS
    for part in dotted.split("."):
        assert isinstance(value, dict) and part in value, f"params.yaml has no {dotted}"
        value = value[part]
    return value


def module_file(module: str) -> Path | None:
    """The source file of one of the package's modules (`imgclf.data.cifar` -> src/imgclf/data/cifar.py)."""
    path = PACKAGE.parent.joinpath(*module.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def local_imports(module: str, seen: set[str] | None = None) -> set[str]:
    """The package's own modules that `module` imports, transitively (a package's __init__ included)."""
    seen = set() if seen is None else seen
    if module in seen:
        return seen
    seen.add(module)
    tree = ast.parse(module_file(module).read_text())
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            for end in range(2, len(parts) + 1):  # imgclf.data, then imgclf.data.cifar
                if parts[0] == "imgclf" and module_file(".".join(parts[:end])) is not None:
                    local_imports(".".join(parts[:end]), seen)
    return seen


def code_files(module: str) -> set[str]:
    return {module_file(m).relative_to(REPO).as_posix() for m in local_imports(module) if m != "imgclf"}


def test_stage_names_are_modules():
    assert list(STAGES) == ["download", "prepare", "train", "evaluate", "compress", "register"]


@pytest.mark.parametrize("name", list(STAGES))
def test_stage_command_runs_its_own_module(name):
    assert STAGES[name]["cmd"] == f"python -m imgclf.{name} --params params.yaml"
    spec = importlib.util.find_spec(f"imgclf.{name}")
    assert spec is not None
    assert "def main(" in Path(spec.origin).read_text()


@pytest.mark.parametrize("name", list(STAGES))
def test_stage_deps_include_all_its_code(name):
    deps = set(STAGES[name]["deps"])
    needed = code_files(f"imgclf.{name}")
    if name == "register":  # the model file MLflow loads imports serving, which imports more
        needed |= code_files("imgclf.model_code")
    assert needed <= deps, f"missing from deps: {sorted(needed - deps)}"
    # And no code it does not run: a change there would re-run the stage for nothing.
    code = {d for d in deps if d.startswith("src/")}
    assert code <= needed, f"deps the stage does not import: {sorted(code - needed)}"


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


def test_the_presets_are_a_dependency_of_the_train_stage():
    """train.preset names a file of presets/ (and its bases): editing any re-runs train."""
    assert "presets" in STAGES["train"]["deps"]
    assert (REPO / "presets" / "default.yaml").is_file()


def test_params_yaml_lists_every_train_key_and_leaves_recipe_keys_to_the_preset():
    """A complete train section (dvc exp run -S can only set keys that exist), with the recipe keys null so
    that train.preset decides them unless a run sets one."""
    from imgclf.config import RUN_KEYS, TrainConfig

    train = PARAMS["train"]
    assert list(train) == [f.name for f in dataclasses.fields(TrainConfig)]
    assert [k for k, v in train.items() if v is None and k not in RUN_KEYS] == [k for k in train if k not in RUN_KEYS]


def test_the_committed_lock_records_the_committed_code():
    """dvc.lock's hash of each file a stage depends on is that file's: a change to the code without a
    `dvc repro` would make a fresh clone's `dvc repro` redo every stage from the download, and leave
    dvc.lock changed after it. The code's files only: the data and models are the user's last run's.
    (DVC 3's md5 of a file is the md5 of its bytes.)"""
    lock = yaml.safe_load(default_text("dvc.lock"))["stages"]
    stale = [
        f"{stage}: {dep['path']}"
        for stage, entry in lock.items()
        for dep in entry.get("deps", [])
        if dep["path"].startswith("src/")
        and not dep["md5"].endswith(".dir")
        and hashlib.md5(default_bytes(dep["path"])).hexdigest() != dep["md5"]
    ]
    assert not stale, f"dvc.lock is older than these files; run `dvc repro` and commit dvc.lock: {stale}"
