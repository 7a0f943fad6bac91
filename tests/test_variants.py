"""Changing the pipeline: a param change, `dvc exp run`, queued experiments and `mlflow run`."""

from __future__ import annotations

import json
import re

import mlflow
import pytest

from conftest import fresh_copy, readme_command, run

pytestmark = pytest.mark.integration


def client_for(root):
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")


def set_param(root, section: str, key: str, value: str) -> None:
    """Edit one key of params.yaml in place, keeping its comments (as a user would)."""
    path = root / "params.yaml"
    text = path.read_text()
    block = re.search(rf"(?ms)^{section}:\n(.*?)(?=^\S|\Z)", text)
    line = re.compile(rf"(?m)^(  {key}:\s*)\S+")
    new_block = line.sub(lambda m: m.group(1) + value, block.group(0), count=1)
    assert new_block != block.group(0), f"{section}.{key} not found"
    path.write_text(text[: block.start()] + new_block + text[block.end() :])


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = fresh_copy(tmp_path_factory.mktemp("variants") / "project")
    run(["dvc", "repro"], root)
    return root


def runs_of(root) -> list:
    client = client_for(root)
    experiment = client.get_experiment_by_name("image-classifier")
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


def test_an_identical_rerun_registers_no_second_version(project):
    """Forced, every stage runs again with the same code, params and data: the weights come out the same,
    and register finds the version that already holds them instead of adding one."""
    before = json.loads((project / "models/registration.json").read_text())
    proc = run(["dvc", "repro", "-f"], project)
    assert "Running stage 'register'" in proc.stdout
    assert "it already held this model" in proc.stdout
    client = client_for(project)
    assert [v.version for v in client.search_model_versions("name='digits-lenet'")] == [1]
    after = json.loads((project / "models/registration.json").read_text())
    assert after["version"] == before["version"] == "1" and after["champion"]


def test_changing_lr_reruns_train_evaluate_register_only(project):
    before = json.loads((project / "models/registration.json").read_text())
    set_param(project, "train", "lr", "0.001")
    proc = run(["dvc", "repro"], project)
    for stage in ("download", "prepare"):
        assert f"Stage '{stage}' didn't change, skipping" in proc.stdout
    for stage in ("train", "evaluate", "register"):
        assert f"Running stage '{stage}'" in proc.stdout
    after = json.loads((project / "models/registration.json").read_text())
    assert after["version"] == "2" and after["run_id"] != before["run_id"]
    # The alias moves only to a version with strictly better test accuracy (evaluate's, of its weights).
    assert after["champion"] == (after["test_accuracy"] > before["test_accuracy"])
    champion = client_for(project).get_model_version_by_alias("digits-lenet", "champion")
    assert champion.version == (2 if after["champion"] else 1)
    assert len(runs_of(project)) == 2


def test_dvc_exp_run_lands_in_the_same_store(project):
    run(["git", "commit", "-qam", "lr 0.001"], project)
    proc = run(["dvc", "exp", "run", "-S", "train.epochs=2"], project)
    assert "Running stage 'train'" in proc.stdout
    runs = [r for r in runs_of(project) if r.data.params.get("train.epochs") == "2"]
    assert len(runs) == 1
    (exp_run,) = runs
    exp_name = exp_run.data.tags["dvc_exp_name"]
    assert exp_run.info.run_name == exp_name
    assert exp_name in run(["dvc", "exp", "show", "--no-pager"], project, COLUMNS="400").stdout
    # The README's narrower view: only what differs between the experiments shown.
    narrow = run(readme_command("dvc exp show --only-changed").split() + ["--no-pager"], project, COLUMNS="400").stdout
    assert exp_name in narrow and "train.epochs" in narrow and "f1_macro" in narrow
    assert "data.dataset" not in narrow and "src/imgclf" not in narrow
    assert "test/accuracy" in exp_run.data.metrics


def test_an_experiment_that_skips_train_logs_into_the_run_that_trained_the_weights(project):
    """`dvc exp run` of a change after train: DVC skips train, and evaluate finds the run that trained the
    weights although it belongs to no experiment of that name (it used to stop: no MLflow run)."""
    before = len(runs_of(project))
    proc = run(["dvc", "exp", "run", "-S", "evaluate.top_losses=4"], project)
    assert "Stage 'train' didn't change, skipping" in proc.stdout
    assert "Running stage 'evaluate'" in proc.stdout
    assert len(runs_of(project)) == before


def test_queued_experiment_lands_in_the_root_store(project):
    """Queued experiments run in temporary copies under .dvc/tmp/exps; DVC_ROOT brings them home."""
    run(["dvc", "exp", "run", "--queue", "-S", "train.epochs=1"], project)
    run(["dvc", "exp", "run", "--run-all"], project)
    runs = [r for r in runs_of(project) if r.data.params.get("train.epochs") == "1"]
    assert len(runs) == 1 and "test/accuracy" in runs[0].data.metrics
    assert not list((project / ".dvc/tmp/exps").glob("**/mlflow.db"))


def test_mlproject_runs_the_pipeline(tmp_path):
    root = fresh_copy(tmp_path / "project")
    proc = run(["mlflow", "run", ".", "--env-manager", "local", "--experiment-name", "image-classifier"], root)
    assert "Running stage 'register'" in proc.stdout + proc.stderr
    (only,) = runs_of(root)
    # The pipeline continued the run `mlflow run` opened, so there is one run holding everything.
    assert only.data.tags.get("mlflow.project.entryPoint") == "main"
    assert "test/accuracy" in only.data.metrics and "val/accuracy" in only.data.metrics
    assert json.loads((root / "models/registration.json").read_text())["run_id"] == only.info.run_id
