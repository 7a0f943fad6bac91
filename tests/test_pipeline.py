"""`dvc repro` on a fresh copy of the project: every stage runs, results land in DVC and MLflow.

These tests share one built project (see conftest.built_project) and only read it.
"""

from __future__ import annotations

import json
import os
import re
import sys
import urllib.request
from pathlib import Path

import mlflow
import pytest
import yaml

from conftest import REPO, free_port, fresh_copy, readme_command, run, start_ui, stop
from imgclf.config import load_params

pytestmark = pytest.mark.integration

STAGES = ("download", "prepare", "train", "evaluate", "register")


def client_for(root):
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")


def test_first_repro_runs_every_stage(built_project):
    root, proc = built_project
    for stage in STAGES:
        assert f"Running stage '{stage}'" in proc.stdout
    for path in (
        "data/raw/digits.npz",
        "data/prepared/train_images.npy",
        "models/model.safetensors",
        "models/model.json",
        "metrics/test.json",
        "metrics/predictions.csv",
        "metrics/confusion.png",
        "metrics/plots/roc.png",
        "metrics/plots/calibration.csv",
        "metrics/plots/gradcam_wrong.png",
        "models/registration.json",
        "dvc.lock",
    ):
        assert (root / path).is_file(), path


def test_readme_make_run_runs_the_pipeline(tmp_path):
    """README: `make run` builds the environment and runs `dvc repro`; here with the environment the
    tests run in (made by `make`), so that nothing is installed twice."""
    venv = Path(sys.prefix)
    if not (venv / ".installed").is_file():
        pytest.skip(f"{venv} was not made by `make` (no .installed marker), so `make run` would rebuild it")
    root = fresh_copy(tmp_path / "project")
    # The copy's files are new, but they are those the venv was built from: make must not reinstall
    # (which would point the venv's editable install at this copy).
    installed = (venv / ".installed").stat().st_mtime
    for name in ("requirements.txt", "pyproject.toml"):
        os.utime(root / name, (installed - 1, installed - 1))
    command = readme_command("make run") + f" VENV={venv}"
    proc = run(command, root)
    assert "Running stage 'register'" in proc.stdout
    assert json.loads((root / "models/registration.json").read_text())["champion"] is True
    # Nothing the run writes is left for git to show, but the results DVC records: dvc.lock and the
    # metrics kept in git (the trained weights, and so these, can differ in their last bits between CPU
    # kinds). The data's hashes are the same on every machine.
    status = run(["git", "status", "--porcelain", "--untracked-files=all"], root).stdout.splitlines()
    figures = {f"metrics/plots/{p.name}" for p in (root / "metrics/plots").iterdir()}
    assert {line[3:] for line in status} <= figures | {
        "dvc.lock",
        "metrics/train.json",
        "metrics/test.json",
        "metrics/per_class.json",
        "metrics/train_history.csv",
        "metrics/predictions.csv",
        "metrics/confusion.png",
    }, status
    committed = yaml.safe_load(run(["git", "show", "HEAD:dvc.lock"], root).stdout)["stages"]
    now = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    for stage in ("download", "prepare"):
        assert now[stage] == committed[stage], stage


def test_every_stage_reports_progress_without_a_terminal(built_project):
    """Under a pipe (as here, in CI or under nohup) train prints a line per epoch, and evaluate and register
    say what they do, instead of bars that print nothing until they end."""
    _, proc = built_project
    out = proc.stdout + proc.stderr
    epochs = re.findall(
        r"train: epoch (\d+)/20, loss [\d.]+ / [\d.]+ \(train / val\), accuracy [\d.]+ / [\d.]+, "
        r"[\d,]+ img/s, \d+ (?:s|min \d+ s), ETA \d+ (?:s|min \d+ s)",
        out,
    )
    assert epochs == [str(e) for e in range(1, 21)]
    assert re.search(r"evaluate: 360/360 img \(100%\)", out)
    assert "register: logging the model" in out
    assert "Downloading artifacts" not in out and "Union type hint" not in out


def test_the_experiment_is_tagged_for_model_training_and_is_the_readmes_link(built_project):
    """The experiment's kind is recorded, and the README's model-training link names its id."""
    root, _ = built_project
    experiment = client_for(root).get_experiment_by_name("image-classifier")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    link = f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning"
    assert link in (REPO / "README.md").read_text()


def test_second_repro_runs_nothing(built_project):
    root, _ = built_project
    proc = run(["dvc", "repro"], root)
    assert "Running stage" not in proc.stdout
    assert "Data and pipelines are up to date." in proc.stdout


def test_default_pipeline_reaches_95_percent(built_project):
    root, _ = built_project
    metrics = json.loads((root / "metrics/test.json").read_text())
    assert set(metrics) == {"accuracy", "recall_macro", "precision_macro", "f1_macro", "roc_auc_macro", "ece"}
    assert metrics["accuracy"] >= 0.95, metrics


def test_dvc_metrics_and_plots_show(built_project):
    root, _ = built_project
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], root).stdout)
    (workspace,) = shown.values()
    test_metrics = workspace["data"]["metrics/test.json"]["data"]
    assert test_metrics == json.loads((root / "metrics/test.json").read_text())
    run(["dvc", "plots", "show"], root)
    html = (root / "dvc_plots/index.html").read_text()
    # Every declared plot, and nothing else (no stage output drawn by default, such as lr or probability).
    assert "Loss per epoch" in html and "Accuracy per epoch" in html and "confusion.png" in html
    # (DVC embeds every column of a plotted CSV file; what it draws is each datum's "field".)
    assert '"field": "train_loss"' in html
    assert '"field": "lr"' not in html and '"field": "probability"' not in html
    assert '"cross-entropy loss"' in html  # axes named, not "y"
    params = yaml.safe_load((root / "params.yaml").read_text())

    def resolved(path: str) -> str:
        return re.sub(r"\$\{(\w+)\.(\w+)\}", lambda m: str(params[m[1]][m[2]]), path)

    declared = yaml.safe_load((root / "dvc.yaml").read_text())["plots"]
    assert len(declared) >= 14
    for plot in declared:
        if isinstance(plot, str):  # a picture: copied beside the page and shown
            name = "workspace_" + resolved(plot).replace("/", "_")
            assert f'<img src="static/{name}">' in html and (root / "dvc_plots/static" / name).is_file(), plot
            continue
        ((title, spec),) = plot.items()
        assert title in html, title
        for fields in spec["y"].values():  # drawn from data that holds the fields, axes named
            for field in [fields] if isinstance(fields, str) else fields:
                assert re.search(rf'"{field}": "[^"]+"', html), (title, field)
        assert f'"title": "{spec["x_label"]}"' in html and f'"title": "{spec["y_label"]}"' in html, title


def test_one_mlflow_run_holds_train_evaluate_register(built_project):
    root, _ = built_project
    client = client_for(root)
    experiment = client.get_experiment_by_name("image-classifier")
    assert experiment is not None
    (run_info,) = client.search_runs([experiment.experiment_id])
    train = load_params(root / "params.yaml").train
    # every param (as resolved from the preset), per-epoch history, test metrics, artifacts, the code version
    assert run_info.data.params["train.lr"] == str(train.lr) and run_info.data.params["train.preset"] == "default"
    assert run_info.data.params["data.dataset"] == "digits"
    history = client.get_metric_history(run_info.info.run_id, "val/accuracy")
    assert [m.step for m in history] == list(range(1, train.epochs + 1))
    for key in (
        "train/loss",
        "train/accuracy",
        "val/loss",
        "train/images_per_s",
        "train/epoch_s",
        "test/accuracy",
        "test/recall_macro",
        "test/precision_macro",
        "test/f1_macro",
        "test_per_class/recall/0",
        "test_per_class/precision/9",
        "system/cpu_utilization_percentage",
    ):
        assert key in run_info.data.metrics, key
    # the data version: the DVC hash of the raw data, as a tag and as the dataset input's digest
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    raw_md5 = lock["stages"]["download"]["outs"][0]["md5"]
    assert run_info.data.tags["dvc.raw.md5"] == raw_md5
    assert run_info.data.tags["dvc.prepared.md5"] == lock["stages"]["prepare"]["outs"][0]["md5"]
    assert [i.dataset.digest for i in run_info.inputs.dataset_inputs] == [raw_md5]
    head = run(["git", "rev-parse", "HEAD"], root).stdout.strip()
    assert run_info.data.tags["mlflow.source.git.commit"] == head
    artifacts = {a.path for a in client.list_artifacts(run_info.info.run_id, "evaluation")}
    assert {"evaluation/confusion.png", "evaluation/test.json", "evaluation/predictions.csv"} <= artifacts
    # the registered model: version 1, champion, linked to the run
    receipt = json.loads((root / "models/registration.json").read_text())
    assert receipt["version"] == "1" and receipt["champion"] is True
    champion = client.get_model_version_by_alias("digits-lenet", "champion")
    assert champion.version == 1 and champion.run_id == run_info.info.run_id


def test_artifacts_live_beside_the_store(built_project):
    root, _ = built_project
    experiment = client_for(root).get_experiment_by_name("image-classifier")
    assert experiment.artifact_location == (root / "mlruns").resolve().as_uri()


def test_mlflow_ui_shows_the_experiment(built_project):
    """README: `mlflow ui` from the repository root finds the pipeline's store with no flags."""
    root, _ = built_project
    port = free_port()
    server = start_ui(root, port)
    try:
        url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name?experiment_name=image-classifier"
        with urllib.request.urlopen(url, timeout=30) as response:
            body = json.loads(response.read())
        assert body["experiment"]["name"] == "image-classifier"
    finally:
        stop(server)
