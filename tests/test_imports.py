"""Importing the package does nothing: no files, no tracking URI, no logging set up."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO, project_env

PACKAGE = REPO / "src" / "imgclf"

MODULES = sorted(
    ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
    for path in PACKAGE.rglob("*.py")
    if path.name != "model_code.py"  # MLflow's entry file: it calls set_model, which only MLflow should run
)


def test_importing_every_module_writes_nothing(tmp_path):
    code = (
        "import importlib, mlflow, logging\n"
        f"for m in {MODULES!r}: importlib.import_module(m)\n"
        "assert not mlflow.tracking._tracking_service.utils.is_tracking_uri_set()\n"
        "assert not logging.getLogger().handlers\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=project_env(), check=True)
    assert list(tmp_path.iterdir()) == []
