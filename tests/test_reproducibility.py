"""Same inputs, same weights; checkpoints resumed only when they belong; divergence and a dead store
stop training cleanly. Each stage runs as a real process on the digits data."""

from __future__ import annotations

import hashlib
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch

from conftest import default_params, prepare_once, stage, write_params
from imgclf import checkpoint


def set_params(root: Path, **train) -> None:
    params = default_params()
    params["train"].update(train)
    write_params(root, params)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return prepare_once(tmp_path_factory)


@pytest.fixture
def workdir(tmp_path, prepared) -> Path:
    shutil.copytree(prepared, tmp_path / "data")
    return tmp_path


@pytest.mark.parametrize(
    "train",
    [
        dict(model="lenet", epochs=3, flip=True, translate=2, cutout=4, ema_decay=0.9, label_smoothing=0.1),
        dict(
            model="fastnet-s",
            epochs=1,
            batch_size=128,
            optimizer="sgd",
            nesterov=True,
            lr=0.2,
            schedule="onecycle",
            warmup_fraction=0.2,
            flip=True,
            alternate_flip=True,
            translate=2,
            tta_flip=True,
            tta_translate=1,
            whiten_bias_epochs=1,
        ),
    ],
)
def test_training_twice_from_scratch_gives_identical_weights(tmp_path, prepared, train):
    hashes, metrics = [], []
    for attempt in ("a", "b"):
        root = tmp_path / attempt
        shutil.copytree(prepared, root / "data")
        set_params(root, **train)
        proc = stage(root, "train")
        assert proc.returncode == 0, proc.stderr
        hashes.append(sha(root / "models/model.safetensors"))
        metrics.append((root / "metrics/train_history.csv").read_text())
        state = torch.load(root / "models/checkpoint/last.pt", weights_only=True)
        assert state["epoch"] == train["epochs"] and len(state["history"]) == train["epochs"]
    assert hashes[0] == hashes[1]
    assert metrics[0] == metrics[1]


def test_checkpoint_of_other_params_is_not_resumed(workdir):
    set_params(workdir, epochs=2)
    assert stage(workdir, "train").returncode == 0
    set_params(workdir, epochs=2, lr=0.001)
    proc = stage(workdir, "train")
    assert proc.returncode == 0
    # The checkpoint is of a run that finished: there was nothing to resume, so nothing is said.
    assert "resuming" not in proc.stdout
    # One of a run that stopped half way (here: a 2-epoch checkpoint of a 5-epoch run) is worth a word.
    state = checkpoint.load(workdir / "models/checkpoint")
    checkpoint.save({**state, "epochs": 5}, workdir / "models/checkpoint")
    set_params(workdir, epochs=2, lr=0.003)
    proc = stage(workdir, "train")
    assert proc.returncode == 0
    assert "not resuming from models/checkpoint/last.pt: it was written for other params" in proc.stdout
    assert "resuming from the checkpoint" not in proc.stdout


def test_a_finished_checkpoint_is_resumed_without_training_again(workdir):
    set_params(workdir, epochs=2)
    first = stage(workdir, "train")
    weights = sha(workdir / "models/model.safetensors")
    (workdir / "models/model.safetensors").unlink()  # as DVC deletes outputs before re-running a stage
    again = stage(workdir, "train")
    assert again.returncode == 0 and "resuming from the checkpoint of epoch 2 of 2" in again.stdout
    assert sha(workdir / "models/model.safetensors") == weights
    assert first.stdout.split("MLflow run ")[-1] == again.stdout.split("MLflow run ")[-1]  # the same run


def test_divergence_names_epoch_and_step_and_keeps_the_last_good_checkpoint(workdir):
    set_params(workdir, epochs=2)
    assert stage(workdir, "train").returncode == 0
    kept = {p: sha(workdir / p) for p in ("models/checkpoint/last.pt", "models/model.safetensors")}
    set_params(workdir, epochs=2, optimizer="sgd", lr=1e30)
    proc = stage(workdir, "train")
    assert proc.returncode == 1
    assert "training diverged: the loss is not finite at epoch 1, step " in proc.stderr
    assert {p: sha(workdir / p) for p in kept} == kept  # nothing overwritten


def test_dead_tracking_server_fails_at_the_start(workdir):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    set_params(workdir, epochs=2)
    start = time.monotonic()
    proc = stage(workdir, "train", uri=f"http://127.0.0.1:{port}")
    assert proc.returncode == 1
    assert f"the MLflow tracking server at http://127.0.0.1:{port} (MLFLOW_TRACKING_URI) does not answer" in proc.stderr
    assert time.monotonic() - start < 60
    assert not (workdir / "models").exists()  # no checkpoint, no model: no training happened
