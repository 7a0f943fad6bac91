"""The project's files as shipped, for the benchmarks that build a project of their own.

A benchmark reads params.yaml and the presets as git's index holds them (as the tests do), not as the
workspace does: `dvc exp run` leaves an experiment's params applied there, and a benchmark run after one
would otherwise measure that experiment instead of the shipped recipe.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def shipped_text(name: str) -> str:
    """A tracked file as git's index holds it; the file itself outside a checkout."""
    shown = subprocess.run(["git", "show", f":{name}"], cwd=REPO, capture_output=True, text=True)
    return shown.stdout if shown.returncode == 0 else (REPO / name).read_text()


def committed_params() -> dict:
    return yaml.safe_load(shipped_text("params.yaml"))


def copy_presets(dest: Path) -> None:
    """presets/*.yaml as shipped into `dest` (params.yaml's train.preset names one of them)."""
    dest.mkdir(parents=True, exist_ok=True)
    for path in sorted((REPO / "presets").glob("*.yaml")):
        (dest / path.name).write_text(shipped_text(f"presets/{path.name}"))
