"""Shared fixtures: fresh copies of the project, and one copy whose pipeline has run.

Integration tests never touch the checkout they run from: each works on a copy of the files git
tracks (plus untracked, unignored ones), made into a new git repository, as a fresh clone would be.

Tracked files come from git's index, not the working tree: `dvc exp run` leaves an experiment's params
(and its dvc.lock and metrics) applied to the workspace, and the tests must test the project's defaults
whatever the user ran. (Stage a change with `git add` to test it; new, untracked files are taken as
they are.) Tests that write a params file of their own start from `default_params()`, the same way.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from imgclf.card import CARD_VERSION, ModelCard
from imgclf.config import Params, load_params

REPO = Path(__file__).resolve().parents[1]
# Real image data for integration tests and benchmarks, beside the project (absent in a plain clone).
DATASETS = Path(os.environ.get("IMGCLF_DATASETS", REPO.parent / "shared" / "datasets"))
# Variables that would point the pipeline at another store, run or root than the copy's own.
_LEAKY = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_REGISTRY_URI",
    "MLFLOW_RUN_ID",
    "MLFLOW_EXPERIMENT_ID",
    "MLFLOW_EXPERIMENT_NAME",
    # A test acting as a server's admin must not lend its credentials to the pipeline it runs.
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "DVC_ROOT",
    "DVC_EXP_NAME",
)


@pytest.fixture(autouse=True)
def _mlflow_tracking_uri_reset():
    """MLflow's process-wide tracking URI (mlflow.set_tracking_uri, which imgclf's stages call when a test
    runs them in this process) outranks MLFLOW_TRACKING_URI: left set, it would send a later test's
    client, which names its store by that variable, to an earlier test's store."""
    yield
    import mlflow

    mlflow.set_tracking_uri(None)


def project_env(**extra: str) -> dict[str, str]:
    """The environment for commands run in a project copy: this venv's tools first on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in _LEAKY}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run(
    cmd: list[str] | str, cwd: Path, check: bool = True, timeout: float = 900, **env: str
) -> subprocess.CompletedProcess:
    """Run a command in `cwd`, capturing its output; on failure the assertion shows the output."""
    proc = subprocess.run(
        cmd,
        cwd=cwd,
        env=project_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
        shell=isinstance(cmd, str),
        stdin=subprocess.DEVNULL,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return proc


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, check=False)


def in_git() -> bool:
    return _git("rev-parse", "--is-inside-work-tree").returncode == 0


def untracked_files() -> list[str]:
    """Files under development that git does not track yet (and does not ignore)."""
    out = _git("ls-files", "-z", "--others", "--exclude-standard").stdout.decode()
    return sorted(f for f in out.split("\0") if f and (REPO / f).is_file())


def export_project(dest: Path) -> None:
    """The project's files at `dest`: tracked files as git's index holds them, then the untracked ones."""
    dest.mkdir(parents=True, exist_ok=True)
    if not in_git():  # not a checkout (a source archive): the files as they are
        shutil.copytree(REPO, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".venv", "__pycache__"))
        return
    subprocess.run(["git", "checkout-index", "--all", "--force", f"--prefix={dest}/"], cwd=REPO, check=True)
    for name in untracked_files():
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target)


def default_bytes(name: str) -> bytes:
    """A tracked file's bytes as git's index holds it (the working tree's outside a checkout)."""
    shown = _git("show", f":{name}")
    return shown.stdout if shown.returncode == 0 else (REPO / name).read_bytes()


def default_text(name: str) -> str:
    """A tracked file's text as git's index holds it (the working tree's outside a checkout)."""
    return default_bytes(name).decode()


def default_params() -> dict:
    """params.yaml as the project ships it (see the module docstring), as a mapping to edit."""
    return yaml.safe_load(default_text("params.yaml"))


def write_params(root: Path, params: dict | None = None) -> Path:
    """`params` (default: default_params()) as root/params.yaml, with the project's presets beside it."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(default_params() if params is None else params))
    names = (
        _git("ls-files", "presets").stdout.decode().split()
        if in_git()
        else [f"presets/{p.name}" for p in (REPO / "presets").iterdir()]
    )
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(default_text(name))
    return path


def default_config(**train) -> Params:
    """The shipped params, loaded and validated, with these train keys given explicitly."""
    params = default_params()
    params["train"].update(train)
    with tempfile.TemporaryDirectory() as tmp:
        return load_params(write_params(Path(tmp), params))


def card_for(model: str = "lenet", channels: int = 3, size: int = 32, classes: int = 10, **fields) -> ModelCard:
    """A model card for tests that build a model without training data (normalisation 0.5 / 0.25)."""
    values = dict(
        card_version=CARD_VERSION,
        model=model,
        classes=tuple(str(i) for i in range(classes)),
        image_size=size,
        channels=channels,
        mean=(0.5,) * channels,
        std=(0.25,) * channels,
        tta_flip=False,
        tta_translate=0,
        train={},
    )
    return ModelCard(**{**values, **fields})


def fresh_copy(dest: Path) -> Path:
    """A new git repository at `dest` holding the project's files, committed."""
    export_project(dest)
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


@pytest.fixture(scope="session")
def built_int8_project(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A fresh copy on which `dvc repro` has run once with compress.method int8 (and 5 epochs of training,
    not 20). Read-only for tests."""
    root = fresh_copy(tmp_path_factory.mktemp("built-int8") / "project")
    params = default_params()
    params["compress"]["method"] = "int8"
    params["train"]["epochs"] = 5
    write_params(root, params)
    return root, run(["dvc", "repro"], root)


def stage(root: Path, name: str, uri: str | None = None) -> subprocess.CompletedProcess:
    """`python -m imgclf.<name> --params params.yaml` in `root`, tracking to its own SQLite store (or `uri`)."""
    env = project_env(MLFLOW_TRACKING_URI=uri or f"sqlite:///{root / 'store.db'}")
    return subprocess.run(
        [sys.executable, "-m", f"imgclf.{name}", "--params", "params.yaml"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def prepare_once(tmp_path_factory) -> Path:
    """The digits downloaded and prepared under the committed params, for a module's tests to copy: the
    `data/` folder."""
    root = tmp_path_factory.mktemp("prepared")
    write_params(root, default_params())
    for name in ("download", "prepare"):
        proc = stage(root, name)
        assert proc.returncode == 0, f"{name}:\n{proc.stderr}"
    return root / "data"


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def start_model_server(command: str, cwd: Path, port: int, env: dict, log: Path) -> subprocess.Popen:
    """A README `mlflow models serve` line run through the shell in `cwd`, in its own process group
    (see stop_model_server), once /ping answers on `port`. Its output goes to the file `log` (a pipe
    that nobody reads would block the server once it fills), which a failed start prints."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            command, shell=True, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )

    def up() -> bool:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5)
            return True
        except OSError:
            if proc.poll() is not None:
                raise AssertionError(f"the model server exited with code {proc.returncode}") from None
            return False

    try:
        wait_for(up, 180, f"the model server on port {port}")
    except AssertionError as error:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        raise AssertionError(f"{error}\n{log.read_text(errors='replace')}") from None
    return proc


def stop_model_server(proc: subprocess.Popen) -> None:
    """Stop a model server as Ctrl-C would its process group (SIGTERM), and wait for it."""
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


def start_server(root: Path, port: int) -> subprocess.Popen:
    """A real `mlflow server` on `port`, its SQLite store and artifacts under `root`, once it answers."""
    store = [
        "--backend-store-uri",
        f"sqlite:///{root / 'server.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
    ]
    return start_mlflow(["server", "--host", "127.0.0.1", "--port", str(port), *store], root, port)


def start_ui(root: Path, port: int) -> subprocess.Popen:
    """`mlflow ui` as the README starts it (from the root, no store flags) on `port`, once it answers."""
    return start_mlflow(["ui", "--port", str(port)], root, port)


def start_mlflow(args: list[str], root: Path, port: int, **env: str) -> subprocess.Popen:
    """`mlflow *args` run in `root` (with these environment variables), in its own process group (see
    stop), once /health answers."""
    server = subprocess.Popen(
        ["mlflow", *args],
        cwd=root,
        env=project_env(**env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )

    def up() -> bool:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return True
        except OSError:
            assert server.poll() is None, f"mlflow {args[0]} exited"
            return False

    try:
        wait_for(up, 300, f"mlflow {args[0]}")  # minutes, on a busy machine
    except AssertionError:
        if server.poll() is None:  # not left running after a start that timed out
            stop(server)
        raise
    return server


def stop(server: subprocess.Popen) -> None:
    """Kill the server and its workers at once, as a crash would."""
    os.killpg(server.pid, signal.SIGKILL)
    server.wait(timeout=30)
