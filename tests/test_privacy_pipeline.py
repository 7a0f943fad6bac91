"""DP-SGD through the real pipeline on the digits: `dvc exp run -S train.dp_epsilon=8` trains privately,
logs the accountant's epsilon per epoch to MLflow, writes epsilon and delta to metrics/train.json and
onto the registered version; a run SIGKILLed mid-training and resumed by `dvc repro` spends exactly the
epsilon of an uninterrupted run and ends with its weights."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest

from conftest import fresh_copy, readme_command, run
from test_robustness import md5, repro_until_epoch, sigkill, torch_epoch, trainers
from test_variants import set_param

pytestmark = pytest.mark.integration


def store(root: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")


def only_run(client: mlflow.MlflowClient):
    (found,) = client.search_runs([client.get_experiment_by_name("image-classifier").experiment_id])
    return found


def epsilon_history(client: mlflow.MlflowClient, run_id: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, "dp/epsilon"))


def test_dvc_exp_run_with_dp_epsilon_trains_privately_and_registers_its_budget(tmp_path):
    root = fresh_copy(tmp_path / "project")
    # The README's command, for 3 epochs on one thread (the CI machine's cores are shared).
    command = readme_command("dvc exp run -S train.dp_epsilon=").split()
    proc = run([*command, "-S", "train.epochs=3", "-S", "train.threads=1"], root)
    assert "train: DP-SGD for epsilon 8 at delta " in proc.stdout
    trained = json.loads((root / "metrics/train.json").read_text())
    num_train = len(np.load(root / "data/prepared/train_labels.npy"))
    assert trained["dp_delta"] == 1 / num_train
    assert 8 - 0.05 <= trained["dp_epsilon"] <= 8
    assert trained["val_accuracy"] > 0.3  # it learned something, privately

    client = store(root)
    found = only_run(client)
    assert found.data.params["train.dp_epsilon"] == "8.0"
    assert float(found.data.params["dp_noise_multiplier"]) > 0
    history = epsilon_history(client, found.info.run_id)
    assert [step for step, _ in history] == [1, 2, 3]
    assert [value for _, value in history] == sorted(value for _, value in history)
    assert history[-1][1] == pytest.approx(trained["dp_epsilon"], abs=1e-6)

    registered = json.loads((root / "models/registered.json").read_text())["model_name"]
    (version,) = client.search_model_versions(f"name = '{registered}'")
    assert float(version.tags["dp_epsilon"]) == trained["dp_epsilon"]
    assert float(version.tags["dp_delta"]) == trained["dp_delta"]


# Slow enough to interrupt mid-run on the digits (DP-SGD's per-sample gradients), BatchNorm replaced.
PRIVATE = {"dp_epsilon": "3", "model": "lenet-bn", "epochs": "6", "threads": "1"}


def configure(root: Path) -> None:
    for key, value in PRIVATE.items():
        set_param(root, "train", key, value)
    run(["git", "commit", "-qam", "private training"], root)


def test_sigkill_mid_dp_training_then_dvc_repro_spends_the_uninterrupted_epsilon(tmp_path):
    reference = fresh_copy(tmp_path / "reference")
    configure(reference)
    run(["dvc", "repro"], reference, timeout=1800)

    root = fresh_copy(tmp_path / "killed")
    configure(root)
    repro = repro_until_epoch(root, 2, 900)
    sigkill(repro, trainers(repro))
    killed_at = torch_epoch(root)
    assert 2 <= killed_at < 6

    proc = run(["dvc", "repro"], root, timeout=1800)
    assert f"resuming from the checkpoint of epoch {killed_at} of 6" in proc.stdout
    assert md5(root / "models/model.safetensors") == md5(reference / "models/model.safetensors")
    spent = [json.loads((r / "metrics/train.json").read_text()) for r in (reference, root)]
    assert spent[0]["dp_epsilon"] == spent[1]["dp_epsilon"] and spent[0]["dp_delta"] == spent[1]["dp_delta"]
    histories = [epsilon_history(store(r), only_run(store(r)).info.run_id) for r in (reference, root)]
    assert histories[0] == histories[1] and len(histories[0]) == 6
