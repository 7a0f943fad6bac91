"""The MLflow store under attack: emptied, truncated or overwritten, deleted, locked, read-only, and on a
full disk. A store that existed is never silently re-created, and each failure ends the stage with one
line naming the file and the cause (IMGCLF_DEBUG=1 brings the traceback back). Stages run as real
processes against a real SQLite store; the read-only and full file systems are small tmpfs mounts
(skipped where this process may not mount one)."""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

import test_integrity
from conftest import stage
from imgclf.store import marker
from test_integrity import ok
from test_reproducibility import set_params

pytestmark = pytest.mark.integration
prepared, trained = test_integrity.prepared, test_integrity.trained  # the fixtures


def one_line(proc: subprocess.CompletedProcess) -> str:
    """The one error line of a failed stage (its progress lines aside), with no traceback."""
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def overwrite_header(path: Path) -> None:
    with open(path, "r+b") as f:
        f.write(b"\0" * 100)


DAMAGE = {"empty": lambda p: p.write_bytes(b""), "truncated": truncate, "overwritten": overwrite_header}


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_store_stops_the_stage_and_is_left_as_it_was(trained, how):
    store = trained / "store.db"
    DAMAGE[how](store)
    damaged = store.read_bytes()
    stages = ("train", "evaluate", "register") if how == "empty" else ("train",)
    for name in stages:
        line = one_line(stage(trained, name))
        assert line.startswith(f"error: the MLflow store {store} ") or line.startswith(
            f"error: {name}: the MLflow store {store} "
        ), line
        assert "Restore it from a backup" in line
        assert store.read_bytes() == damaged, name


def test_a_missing_store_is_created_on_the_first_run_only(prepared, tmp_path):
    shutil.copytree(prepared, tmp_path / "data")
    set_params(tmp_path, epochs=1)
    store = tmp_path / "store.db"
    first = ok(stage(tmp_path, "train"))
    assert f"creating the MLflow store {store} (the first run here)" in first.stdout
    assert marker(store).is_file()
    again = ok(stage(tmp_path, "train"))
    assert "creating the MLflow store" not in again.stdout
    store.unlink()
    line = one_line(stage(tmp_path, "train"))
    assert f"the MLflow store {store} is missing, but it existed" in line
    assert not store.exists()
    marker(store).unlink()  # how to start a new store on purpose
    # (A checkpoint names its MLflow run, which a new store lacks: resuming from it is not this test's case.)
    shutil.rmtree(tmp_path / "models/checkpoint")
    assert "creating the MLflow store" in ok(stage(tmp_path, "train")).stdout


def test_a_locked_store_is_said_in_one_line(trained):
    holder = sqlite3.connect(trained / "store.db")
    holder.execute("BEGIN EXCLUSIVE")  # another process writing, for longer than MLflow's 20 s wait
    try:
        line = one_line(stage(trained, "register"))
    finally:
        holder.rollback()
        holder.close()
    assert line.startswith(f"error: register: the MLflow store {trained / 'store.db'}: it is locked by another")
    assert line.endswith("(set IMGCLF_DEBUG=1 for the traceback)")


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(folder: Path) -> None:
    """Use up every free byte of the file system holding `folder`."""
    with contextlib.suppress(OSError), open(folder / "filler", "wb") as f:  # (closing it fails too)
        while True:
            f.write(b"\0" * 4096)
            f.flush()


def test_a_read_only_store_and_full_disks_are_said_in_one_line(trained, tmp_path):
    with tmpfs(tmp_path / "ro", "8m") as folder:
        shutil.copy2(trained / "store.db", folder / "store.db")
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        proc = stage(trained, "evaluate", uri=f"sqlite:///{folder / 'store.db'}")
        line = one_line(proc)
        assert line == (
            f"error: evaluate: the MLflow store {folder / 'store.db'}: it is read-only (its file, its folder or "
            "the file system) (set IMGCLF_DEBUG=1 for the traceback)"
        )
        debug = subprocess.run(
            proc.args, cwd=trained, env={**proc_env(folder), "IMGCLF_DEBUG": "1"}, capture_output=True, text=True
        )
        assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    with tmpfs(tmp_path / "full", "8m") as folder:
        shutil.copy2(trained / "store.db", folder / "store.db")
        fill(folder)
        line = one_line(stage(trained, "evaluate", uri=f"sqlite:///{folder / 'store.db'}"))
        assert line.startswith(f"error: evaluate: the MLflow store {folder / 'store.db'}: ") and "full" in line, line
    with tmpfs(trained / "metrics", "64k") as folder:  # where evaluate writes test.json
        fill(folder)
        line = one_line(stage(trained, "evaluate"))
        assert line.startswith("error: evaluate: cannot write metrics/test.json: the disk is full"), line


def proc_env(folder: Path) -> dict[str, str]:
    from conftest import project_env

    return project_env(MLFLOW_TRACKING_URI=f"sqlite:///{folder / 'store.db'}")
