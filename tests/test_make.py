"""The Makefile's development targets the README shows: `make test-fast`, `make lint`, `make format`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import fresh_copy, run

pytestmark = pytest.mark.integration

VENV = Path(sys.prefix)


def project_with_this_venv(tmp_path: Path) -> Path:
    """A fresh copy whose Makefile finds this venv up to date (it was built from the same files), so that
    make installs nothing."""
    if not (VENV / ".dev-installed").is_file():
        pytest.skip(f"{VENV} was not made by `make test` (no .dev-installed marker): make would rebuild it")
    root = fresh_copy(tmp_path / "project")
    installed = min((VENV / m).stat().st_mtime for m in (".installed", ".dev-installed"))
    for name in ("requirements.txt", "requirements-dev.txt", "pyproject.toml"):
        os.utime(root / name, (installed - 1, installed - 1))
    return root


def collected(root: Path, *args: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", *args], cwd=root, capture_output=True, text=True
    ).stdout
    return {line for line in out.splitlines() if "::" in line}


def test_make_test_fast_runs_the_unit_tests_only(tmp_path):
    root = project_with_this_venv(tmp_path)
    proc = run(f"make test-fast VENV={VENV}", root, PYTEST_ADDOPTS="--collect-only -q")
    fast = {line for line in proc.stdout.splitlines() if "::" in line}
    integration = collected(root, "-m", "integration")
    assert fast and integration
    assert not fast & integration
    assert fast | integration == collected(root)  # every test is one or the other


def test_make_lint_passes_and_make_format_changes_nothing(tmp_path):
    root = project_with_this_venv(tmp_path)
    run(f"make lint VENV={VENV}", root)
    run(f"make format VENV={VENV}", root)
    assert run(["git", "status", "--porcelain"], root).stdout == ""
