"""Importing the package does nothing: no files, no tracking URI, no logging set up."""

from __future__ import annotations

import subprocess
import sys

from conftest import project_env

MODULES = ["imgclf", "imgclf.config", "imgclf.datasets", "imgclf.download", "imgclf.prepare", "imgclf.train",
           "imgclf.evaluate", "imgclf.register", "imgclf.serving", "imgclf.models", "imgclf.images",
           "imgclf.files", "imgclf.tracking"]


def test_importing_every_module_writes_nothing(tmp_path):
    code = ("import importlib, mlflow, logging\n"
            f"for m in {MODULES!r}: importlib.import_module(m)\n"
            "assert not mlflow.tracking._tracking_service.utils.is_tracking_uri_set()\n"
            "assert not logging.getLogger().handlers\n")
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=project_env(), check=True)
    assert list(tmp_path.iterdir()) == []
