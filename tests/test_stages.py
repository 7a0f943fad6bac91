"""Every stage's main() end to end, in process, in a temporary folder with its own MLflow store."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pytest

from conftest import default_params, write_params
from imgclf.images import encode_png
from imgclf.models import load_checkpoint_dir, predict_proba


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    params = default_params()
    params["train"]["epochs"] = 3  # enough to check plumbing; accuracy is the integration tests' job
    write_params(tmp_path, params)
    monkeypatch.chdir(tmp_path)
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "DVC_ROOT", "DVC_EXP_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'store.db'}")
    yield tmp_path
    mlflow.set_tracking_uri(None)


def test_all_stages_in_process(workdir):
    from imgclf import download, evaluate, prepare, register, train

    argv = ["--params", "params.yaml"]
    download.main(argv)
    assert (workdir / "data/raw/digits.npz").is_file()
    assert not [p for p in (workdir / "data").iterdir() if p.name.startswith(".")]  # no staging left

    prepare.main(argv)
    meta = json.loads((workdir / "data/prepared/meta.json").read_text())
    sizes = {s: len(np.load(workdir / f"data/prepared/{s}_labels.npy")) for s in ("train", "val", "test")}
    assert sum(sizes.values()) == 1797
    assert meta["image_size"] == 32 and meta["channels"] == 1 and len(meta["classes"]) == 10
    assert np.load(workdir / "data/prepared/train_images.npy").shape == (sizes["train"], 32, 32, 1)

    train.main(argv)
    run_id = json.loads((workdir / "models/model.json").read_text())["mlflow_run_id"]
    history = (workdir / "metrics/train_history.csv").read_text().splitlines()
    assert history[0] == "epoch,train_loss,train_accuracy,val_loss,val_accuracy,lr" and len(history) == 4

    evaluate.main(argv)
    metrics = json.loads((workdir / "metrics/test.json").read_text())
    assert set(metrics) == {"accuracy", "recall_macro", "precision_macro", "f1_macro"}
    assert (workdir / "metrics/confusion.png").read_bytes().startswith(b"\x89PNG")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        register.main(argv)
    # MLflow reads the served model's signature from predict's type hints and warns where it cannot.
    assert not [str(w.message) for w in caught if "type hint" in str(w.message)]
    receipt = json.loads((workdir / "models/registration.json").read_text())
    assert receipt["run_id"] == run_id and receipt["version"] == "1" and receipt["champion"]
    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    run = client.get_run(run_id)
    assert {"val_accuracy", "test_accuracy"} <= set(run.data.metrics)
    assert client.get_model_version_by_alias("digits-lenet", "champion").version == 1
    # The logged model loads and predicts like the checkpoint, and holds nothing pickled.
    model = mlflow.pyfunc.load_model("models:/digits-lenet@champion")
    images = np.load(workdir / "data/prepared/test_images.npy")[:4]
    predictions = model.predict([encode_png(image) for image in images])
    expected = predict_proba(load_checkpoint_dir(workdir / "models")[0], images).argmax(1)
    assert [p["index"] for p in predictions] == expected.tolist()
    model_files = Path(mlflow.artifacts.download_artifacts("models:/digits-lenet@champion"))
    assert (model_files / "artifacts" / "model.safetensors").is_file()
    assert not list(model_files.rglob("*.pkl")) and not list(model_files.rglob("*.pt"))


def test_champion_moves_only_on_strictly_better_accuracy():
    from imgclf.register import is_better

    assert is_better(0.5, None)
    assert is_better(0.91, 0.90)
    assert not is_better(0.90, 0.90)
    assert not is_better(0.89, 0.90)
