"""Shared fixtures: fresh copies of the project, and one copy whose pipeline has run.

Integration tests never touch the checkout they run from: each works on a copy of the files git
tracks (plus untracked, unignored ones), made into a new git repository, as a fresh clone would be.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Variables that would point the pipeline at another store, run or root than the copy's own.
_LEAKY = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID",
          "MLFLOW_EXPERIMENT_NAME", "DVC_ROOT", "DVC_EXP_NAME")


def project_env(**extra: str) -> dict[str, str]:
    """The environment for commands run in a project copy: this venv's tools first on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in _LEAKY}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run(cmd: list[str] | str, cwd: Path, check: bool = True, timeout: float = 900,
        **env: str) -> subprocess.CompletedProcess:
    """Run a command in `cwd`, capturing its output; on failure the assertion shows the output."""
    proc = subprocess.run(cmd, cwd=cwd, env=project_env(**env), capture_output=True, text=True,
                          timeout=timeout, shell=isinstance(cmd, str), stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n"
                             f"--- stderr\n{proc.stderr}")
    return proc


def project_files() -> list[str]:
    """The files a fresh clone would have (plus untracked, unignored ones under development)."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    return sorted({f for f in out.split("\0") if f and (REPO / f).is_file()})


def fresh_copy(dest: Path) -> Path:
    """A new git repository at `dest` holding the project's files, committed."""
    for name in project_files():
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target)
    git = ["git", "-c", "init.defaultBranch=main"]
    run([*git, "init", "-q"], dest)
    run(["git", "config", "user.name", "Pipeline Tests"], dest)
    run(["git", "config", "user.email", "tests@example.invalid"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-q", "-m", "fresh copy"], dest)
    return dest


def readme_command(prefix: str) -> str:
    """The README's command line starting with `prefix` (continuation lines joined)."""
    text = (REPO / "README.md").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith(prefix)]
    assert lines, f"README shows no command starting with {prefix!r}"
    return re.sub(r"\s+", " ", lines[0].split("  #")[0])


def readme_block(language: str, containing: str) -> str:
    """The README's fenced `language` code block that contains `containing`."""
    blocks = re.findall(rf"```{language}\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    found = [b for b in blocks if containing in b]
    assert found, f"README shows no {language} block containing {containing!r}"
    return found[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def built_project(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A fresh copy on which `dvc repro` has run once, with the default params. Read-only for tests."""
    root = fresh_copy(tmp_path_factory.mktemp("built") / "project")
    return root, run(["dvc", "repro"], root)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def start_server(root: Path, port: int) -> subprocess.Popen:
    """A real `mlflow server` on `port`, its SQLite store and artifacts under `root`, once it answers."""
    server = subprocess.Popen(
        ["mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'server.db'}", "--artifacts-destination", str(root / "artifacts")],
        cwd=root, env=project_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def up() -> bool:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return True
        except OSError:
            assert server.poll() is None, "mlflow server exited"
            return False
    wait_for(up, 120, "the MLflow server")
    return server


def stop(server: subprocess.Popen) -> None:
    """Kill the server and its workers at once, as a crash would."""
    os.killpg(server.pid, signal.SIGKILL)
    server.wait(timeout=30)
