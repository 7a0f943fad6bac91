"""Nothing broken becomes champion: a checkpoint damaged in place is not resumed, weights holding NaN or
scoring at chance are not registered, register decides on the evaluation of the weights it registers, and
a register killed before it moved the alias is finished by the next run. Each stage runs as a real
process on the digits data, against a real SQLite MLflow store (the tests marked integration)."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import prepare_once, project_env, stage
from imgclf import checkpoint
from imgclf.integrity import chance_accuracy, chance_bar, content_sha256, nonfinite
from imgclf.tracking import WEIGHTS_TAG, sha256_file
from test_reproducibility import set_params, sha

MODEL = "digits-lenet"


def client(root: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(f"sqlite:///{root / 'store.db'}")


def versions(root: Path) -> list[int]:
    return sorted(int(v.version) for v in client(root).search_model_versions(f"name = '{MODEL}'"))


def champion(root: Path) -> int | None:
    try:
        return int(client(root).get_model_version_by_alias(MODEL, "champion").version)
    except mlflow.exceptions.MlflowException:
        return None


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return prepare_once(tmp_path_factory)


@pytest.fixture
def trained(tmp_path, prepared) -> Path:
    """A project whose train (2 epochs), evaluate and compress (method none) stages ran, in its own store."""
    shutil.copytree(prepared, tmp_path / "data")
    set_params(tmp_path, epochs=2)
    for name in ("train", "evaluate", "compress"):
        ok(stage(tmp_path, name))
    return tmp_path


def damage_in_place(path: Path) -> None:
    """Overwrite the bytes of the checkpoint's largest tensor with NaN inside the zip, leaving its directory
    (and the CRC-32 it records) as it was."""
    with zipfile.ZipFile(path) as archive:
        entry = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(entry.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", f.read(4))
        f.seek(entry.header_offset + 30 + name_length + extra_length)
        f.write(np.full(entry.file_size // 4, np.nan, dtype=np.float32).tobytes())


@pytest.mark.integration
def test_a_checkpoint_damaged_in_place_is_not_resumed(trained):
    path = trained / "models/checkpoint/last.pt"
    weights = sha(trained / "models/model.safetensors")
    damage_in_place(path)
    damaged = torch.load(path, weights_only=True)  # torch still reads it, NaN and all
    assert nonfinite(damaged["model"]) or nonfinite(damaged["optimizer"]["state"][0])
    proc = ok(stage(trained, "train"))
    assert "ignoring checkpoint models/checkpoint/last.pt (its content does not match its checksum" in proc.stdout
    assert "resuming" not in proc.stdout
    # Trained afresh: the same weights as the first, uninterrupted run, and a sound checkpoint again.
    assert sha(trained / "models/model.safetensors") == weights
    assert checkpoint.load(trained / "models/checkpoint")["epoch"] == 2


def test_a_checkpoint_checksum_covers_every_tensor_and_value(tmp_path):
    state = {"model": {"w": torch.ones(3)}, "epoch": 2, "rng": {"torch": torch.zeros(4, dtype=torch.uint8)}}
    checkpoint.save(state, tmp_path)
    assert checkpoint.load(tmp_path)["epoch"] == 2
    for changed in ({**state, "epoch": 3}, {**state, "model": {"w": torch.tensor([1.0, 1.0, 1.0 + 1e-7])}}):
        assert content_sha256(changed) != content_sha256(state)
    raw = torch.load(tmp_path / checkpoint.FILE, weights_only=True)
    torch.save({**raw, "epoch": 3}, tmp_path / checkpoint.FILE)  # edited without a new checksum
    assert checkpoint.load(tmp_path) is None
    torch.save(state, tmp_path / checkpoint.FILE)  # no checksum at all
    assert checkpoint.load(tmp_path) is None
    checkpoint.save({**state, "model": {"w": torch.tensor([1.0, float("inf"), 0.0])}}, tmp_path)
    assert checkpoint.load(tmp_path) is None  # a sound file of non-finite weights


def test_train_saves_no_weights_that_are_not_finite():
    from imgclf.train import Diverged, refuse_nonfinite

    model = torch.nn.Linear(2, 2)
    refuse_nonfinite(model, "after epoch 1")
    with torch.no_grad():
        model.bias[1] = float("nan")
    with pytest.raises(Diverged, match=r"the weights hold NaN or infinite values \(in bias\) after epoch 1"):
        refuse_nonfinite(model, "after epoch 1")


def replace_weights(root: Path, change) -> None:
    """Rewrite the trained weights with `change` applied, and tag the run that trained them with their new
    hash, as train would have had it saved them."""
    path = root / "models/model.safetensors"
    tensors = load_file(path)
    save_file({name: change(name, tensor) for name, tensor in tensors.items()}, path)
    run_id = client(root).search_runs([client(root).get_experiment_by_name("image-classifier").experiment_id])[0]
    client(root).set_tag(run_id.info.run_id, WEIGHTS_TAG, sha256_file(path))


def claim_val_accuracy(root: Path, value: float) -> None:
    path = root / "metrics/train.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "val_accuracy": value}))


@pytest.mark.integration
def test_weights_holding_nan_are_never_registered(trained):
    replace_weights(trained, lambda name, t: torch.full_like(t, float("nan")) if name.endswith("fc3.weight") else t)
    claim_val_accuracy(trained, 0.99)
    evaluated = stage(trained, "evaluate")
    assert evaluated.returncode == 1
    assert "error: evaluate: the weights in models/model.safetensors hold NaN or infinite values" in evaluated.stderr
    proc = stage(trained, "register")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: register: refusing models/model.safetensors: the weights hold NaN or infinite values (in "
        "net.fc3.weight); nothing was registered (retrain: dvc repro -f train)"
    ]
    assert client(trained).search_registered_models() == []


@pytest.mark.integration
def test_register_decides_on_the_evaluation_of_the_weights_it_registers(trained):
    ok(stage(trained, "register"))
    assert versions(trained) == [1] and champion(trained) == 1
    # All-zero weights: finite, every image the same class. train.json still claims a high accuracy.
    replace_weights(trained, lambda name, t: torch.zeros_like(t) if ".fc" in name else t)
    claim_val_accuracy(trained, 0.99)
    proc = stage(trained, "register")  # evaluate has not scored these weights
    assert proc.returncode == 1
    assert "has no test accuracy of models/model.safetensors" in proc.stderr
    assert "it scored other weights" in proc.stderr
    ok(stage(trained, "evaluate"))
    test = json.loads((trained / "metrics/test.json").read_text())["accuracy"]
    labels = np.load(trained / "data/prepared/test_labels.npy")
    assert test <= chance_bar(labels)
    proc = stage(trained, "register")
    assert proc.returncode == 1
    assert f"its test accuracy {test:.4f} is not better than chance" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert versions(trained) == [1] and champion(trained) == 1


@pytest.mark.integration
def test_register_without_the_compress_stage_s_record_stops_before_the_store(trained):
    record = trained / "models/compressed/compressed.json"
    record.unlink()
    proc = stage(trained, "register")
    assert proc.returncode != 0
    assert f"{record.relative_to(trained)} is missing" in proc.stderr and "Traceback" not in proc.stderr
    assert "nothing was registered" in proc.stderr
    assert client(trained).search_registered_models() == []


def test_chance_is_the_most_common_class_plus_three_standard_errors():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    assert chance_accuracy(labels) == 0.5
    assert chance_bar(labels) == pytest.approx(0.5 + 3 * (0.5 * 0.5 / 100) ** 0.5)


KILLED_AT_THE_ALIAS = """
import os, signal, mlflow
from imgclf import register

def killed(*args, **kwargs):  # the process dies as SIGKILL would take it, after the version was created
    os.kill(os.getpid(), signal.SIGKILL)

mlflow.MlflowClient.set_registered_model_alias = killed
register.main(["--params", "params.yaml"])
"""


@pytest.mark.integration
def test_register_killed_before_moving_the_alias_is_finished_by_the_next_run(trained):
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_AT_THE_ALIAS],
        cwd=trained,
        env=project_env(MLFLOW_TRACKING_URI=f"sqlite:///{trained / 'store.db'}"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -9, killed.stderr
    assert versions(trained) == [1] and champion(trained) is None  # the orphan
    proc = ok(stage(trained, "register"))
    assert "it already held this model" in proc.stdout
    assert versions(trained) == [1] and champion(trained) == 1
    receipt = json.loads((trained / "models/registration.json").read_text())
    assert receipt["version"] == "1" and receipt["champion"]
