"""Real failures, real processes: a SIGKILL mid-training, a tracking server that goes away and comes
back, four queued DVC experiments on two workers, a diverging experiment."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import psutil
import pytest

from conftest import free_port, fresh_copy, project_env, run, start_server, stop, wait_for
from test_variants import set_param

pytestmark = pytest.mark.integration

# A model slow enough to interrupt mid-run, fast enough for CI: about a second per epoch on digits.
SLOW = {
    "model": "fastnet-s",
    "optimizer": "sgd",
    "nesterov": "true",
    "lr": "0.2",
    "schedule": "onecycle",
    "warmup_fraction": "0.2",
    "batch_size": "64",
    "epochs": "10",
    "flip": "true",
    "translate": "2",
}


def configure(root: Path, **train: str) -> None:
    for key, value in {**SLOW, **train}.items():
        set_param(root, "train", key, value)
    run(["git", "commit", "-qam", "test settings"], root)


def epochs_done(root: Path, since: float) -> int:
    """Epochs in the history this run's train stage wrote (the file in git is an older run's)."""
    path = root / "metrics/train_history.csv"
    try:
        if path.stat().st_mtime < since:
            return 0
        return len(path.read_text().splitlines()) - 1
    except FileNotFoundError:
        return 0


def repro_until_epoch(root: Path, epochs: int, timeout: float, *targets: str) -> subprocess.Popen:
    """`dvc repro [targets]` started in `root`, returned still running once its train stage has finished
    `epochs` epochs (or returned as soon as it ended)."""
    started = time.time()
    repro = subprocess.Popen(
        ["dvc", "repro", *targets],
        cwd=root,
        env=project_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    wait_for(lambda: epochs_done(root, started) >= epochs or repro.poll() is not None, timeout, f"{epochs} epochs")
    return repro


def trainers(repro: subprocess.Popen) -> list[psutil.Process]:
    """The processes under `repro` running the train stage's command."""
    return [p for p in psutil.Process(repro.pid).children(recursive=True) if "imgclf.train" in " ".join(p.cmdline())]


def sigkill(repro: subprocess.Popen, processes: list[psutil.Process]) -> str:
    """SIGKILL `processes` of `repro`'s train stage; `repro`'s output, once it has failed."""
    assert processes, "the train stage was not running"
    for p in processes:
        p.send_signal(signal.SIGKILL)
    output, _ = repro.communicate(timeout=120)
    assert repro.returncode != 0, output
    return output


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def history(uri: str, run_id: str) -> list[int]:
    return sorted(m.step for m in mlflow.MlflowClient(uri).get_metric_history(run_id, "val/accuracy"))


def test_sigkill_mid_training_then_dvc_repro_resumes_to_identical_weights(tmp_path):
    reference = fresh_copy(tmp_path / "reference")
    configure(reference)
    run(["dvc", "repro"], reference)

    root = fresh_copy(tmp_path / "killed")
    configure(root)
    repro = repro_until_epoch(root, 3, 300)
    sigkill(repro, trainers(repro))
    killed_at = torch_epoch(root)
    assert 3 <= killed_at < 10

    proc = run(["dvc", "repro"], root)
    assert f"resuming from the checkpoint of epoch {killed_at} of 10" in proc.stdout
    assert md5(root / "models/model.safetensors") == md5(reference / "models/model.safetensors")
    # One MLflow run, continued after the kill, holding every epoch exactly once.
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    (only,) = client.search_runs([client.get_experiment_by_name("image-classifier").experiment_id])
    assert history(uri, only.info.run_id) == list(range(1, 11))
    assert only.data.tags["imgclf.weights_sha256"] == sha256(root / "models/model.safetensors")
    assert "test/accuracy" in only.data.metrics  # evaluate found the run by those weights


def torch_epoch(root: Path) -> int:
    import torch

    return torch.load(root / "models/checkpoint/last.pt", weights_only=True)["epoch"]


def test_tracking_server_going_away_mid_training_loses_nothing(tmp_path):
    root = fresh_copy(tmp_path / "project")
    configure(root, epochs="14")
    port = free_port()
    store = tmp_path / "server"
    store.mkdir()
    server = start_server(store, port)
    uri = f"http://127.0.0.1:{port}"
    started = time.time()
    repro = subprocess.Popen(
        ["dvc", "repro"],
        cwd=root,
        env=project_env(MLFLOW_TRACKING_URI=uri),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(lambda: epochs_done(root, started) >= 2 or repro.poll() is not None, 300, "two epochs")
        stop(server)  # the store disappears while training goes on
        down_at = epochs_done(root, started)
        wait_for(
            lambda: epochs_done(root, started) >= down_at + 2 or repro.poll() is not None,
            300,
            "training without a store",
        )
        server = start_server(store, port)
        output, _ = repro.communicate(timeout=600)
    finally:
        stop(server)
        server = start_server(store, port)
    try:
        assert repro.returncode == 0, output
        assert "could not log epoch" in output  # it noticed, and carried on
        receipt = json.loads((root / "models/registration.json").read_text())
        assert history(uri, receipt["run_id"]) == list(range(1, 15))
        assert "test/accuracy" in mlflow.MlflowClient(uri).get_run(receipt["run_id"]).data.metrics
    finally:
        stop(server)


def test_four_queued_experiments_on_two_workers_land_in_one_store(tmp_path):
    root = fresh_copy(tmp_path / "project")
    for key, value in {"epochs": "3"}.items():
        set_param(root, "train", key, value)
    run(["git", "commit", "-qam", "short training"], root)
    run(["dvc", "repro"], root)  # the baseline; it also creates the store and the experiment
    for seed in (1, 2, 3, 4):
        run(["dvc", "exp", "run", "--queue", "-S", f"train.seed={seed}"], root)
    run(["dvc", "queue", "start", "-j", "2"], root)

    def finished() -> bool:
        status = run(["dvc", "queue", "status"], root).stdout
        return "Queued" not in status and "Running" not in status

    wait_for(finished, 900, "the queue")
    status = run(["dvc", "queue", "status"], root).stdout
    assert status.count("Success") == 4, status
    logs = "".join(
        run(["dvc", "queue", "logs", line.split()[0]], root, check=False).stdout
        for line in status.splitlines()
        if "Success" in line
    )
    assert "database is locked" not in logs
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("image-classifier").experiment_id])
    queued = [r for r in runs if r.data.params.get("train.seed") in {"1", "2", "3", "4"}]
    assert sorted(r.data.params["train.seed"] for r in queued) == ["1", "2", "3", "4"]
    assert all(r.info.status == "FINISHED" and "test/accuracy" in r.data.metrics for r in queued)
    assert len(client.search_model_versions("name='digits-lenet'")) == 5


def test_diverging_experiment_registers_nothing_and_keeps_the_checkpoint(tmp_path):
    root = fresh_copy(tmp_path / "project")
    set_param(root, "train", "epochs", "3")
    run(["git", "commit", "-qam", "short training"], root)
    run(["dvc", "repro"], root)
    kept = md5(root / "models/checkpoint/last.pt")
    proc = run(["dvc", "exp", "run", "-S", "train.optimizer=sgd", "-S", "train.lr=1e30"], root, check=False)
    assert proc.returncode != 0
    assert "training diverged: the loss is not finite at epoch 1" in proc.stdout + proc.stderr
    assert md5(root / "models/checkpoint/last.pt") == kept
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    assert [v.version for v in client.search_model_versions("name='digits-lenet'")] == [1]
    from imgclf.config import load_params

    assert load_params(root / "params.yaml").train.lr == 1e30  # (dvc exp run leaves its -S values in place)
