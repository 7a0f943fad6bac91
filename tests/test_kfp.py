"""The Kubeflow Pipelines form of the pipeline (python -m imgclf.kfp): its spec, its errors, a local run.

Needs the kfp extra (pip install -e ".[kfp]"; `make test` installs it); without it these tests skip,
except the one that checks the message a missing extra gives.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys

import mlflow
import pytest
import yaml

from conftest import REPO, default_params, default_text, fresh_copy, readme_block, readme_command, run

needs_kfp = pytest.mark.skipif(
    importlib.util.find_spec("kfp") is None, reason='the kfp extra is not installed (pip install -e ".[kfp]")'
)
DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> dict:
    """The spec compiled from the project's committed files, with the default options."""
    from imgclf.kfp.pipeline import compile_to, load_project

    root = fresh_copy(tmp_path_factory.mktemp("kfp") / "project")
    return yaml.safe_load(compile_to(load_project(root), root / "pipeline.yaml").read_text())


def upstream(spec: dict) -> dict[str, set[str]]:
    """Task -> the tasks whose outputs it reads, from the compiled spec."""
    graph = {}
    for name, task in spec["root"]["dag"]["tasks"].items():
        inputs = task.get("inputs", {})
        producers = [a["taskOutputArtifact"]["producerTask"] for a in inputs.get("artifacts", {}).values()]
        producers += [
            p["taskOutputParameter"]["producerTask"]
            for p in inputs.get("parameters", {}).values()
            if "taskOutputParameter" in p
        ]
        graph[name] = set(producers)
    return graph


def test_every_dvc_output_has_a_kfp_artifact():
    from imgclf.kfp.pipeline import ARTIFACTS

    for name, stage in DVC["stages"].items():
        for item in [*stage.get("outs", []), *stage.get("metrics", [])]:
            out = next(iter(item)) if isinstance(item, dict) else item
            assert out in ARTIFACTS, f"dvc.yaml stage {name}: {out} has no KFP artifact"


@needs_kfp
def test_the_task_graph_is_dvcs_graph(spec):
    """Tasks named as the stages; each reads the outputs of the stages DVC's own graph says it depends on."""
    from dvc.repo import Repo

    with Repo(str(REPO)) as repo:
        dvc_graph = {stage.addressing: set() for stage in repo.index.stages}
        for stage, dependency in repo.index.graph.edges():
            dvc_graph[stage.addressing].add(dependency.addressing)
    assert upstream(spec) == dvc_graph
    tasks = spec["root"]["dag"]["tasks"]
    assert list(tasks) == sorted(DVC["stages"])  # the spec lists tasks by name
    assert "evaluate" in tasks["register"]["dependentTasks"]  # registered only once evaluated, as dvc repro runs
    for name, task in tasks.items():
        assert task["componentRef"]["name"] == f"comp-{name}"


@needs_kfp
def test_every_params_key_is_a_pipeline_parameter_with_its_value_as_default(spec):
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    expected = {}
    for section, keys in default_params().items():
        for key, value in keys.items():
            # A null key (the preset decides it) is a string of YAML, "null" by default.
            expected[f"{section}_{key}"] = "null" if value is None else value
    assert {name: p["defaultValue"] for name, p in parameters.items()} == expected


@needs_kfp
def test_data_stages_take_only_the_keys_they_read_and_the_rest_the_data_version(spec):
    """A changed train key leaves download's and prepare's cached results valid, as it leaves DVC's."""
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks["download"]["inputs"]["parameters"]) == {
        "data_dataset",
        "data_path",
        "data_archive",
        "data_raw_dir",
        "spec",
    }
    assert "train_epochs" not in tasks["prepare"]["inputs"]["parameters"]
    for name in ("train", "evaluate", "register"):
        version = tasks[name]["inputs"]["parameters"]["data_version"]["taskOutputParameter"]
        assert version == {"producerTask": "prepare", "outputParameterKey": "data_version"}


@needs_kfp
def test_artifacts_are_typed_for_the_kfp_ui(spec):
    outputs = {
        name: {
            a: o["artifactType"]["schemaTitle"]
            for a, o in comp.get("outputDefinitions", {}).get("artifacts", {}).items()
        }
        for name, comp in spec["components"].items()
    }
    assert outputs["comp-prepare"]["prepared"] == "system.Dataset"
    assert outputs["comp-train"]["model"] == "system.Model"
    assert outputs["comp-evaluate"]["metrics"] == "system.Metrics"
    assert outputs["comp-evaluate"]["confusion"] == "system.ClassificationMetrics"


@needs_kfp
@pytest.mark.integration
def test_the_readme_compile_command_sets_image_env_resources_secret_retries_and_caching(tmp_path):
    root = fresh_copy(tmp_path / "project")
    command = readme_command("python -m imgclf.kfp compile")
    run(command, root)
    docs = list(yaml.safe_load_all((root / "pipeline.yaml").read_text()))
    spec, platform = docs[0], docs[1]
    flags = command.split()
    image = flags[flags.index("--image") + 1]
    uri = flags[flags.index("--tracking-uri") + 1]
    secret = flags[flags.index("--secret") + 1]
    executors = spec["deploymentSpec"]["executors"]
    assert sorted(executors) == sorted(f"exec-{name}" for name in DVC["stages"])
    for executor in executors.values():
        container = executor["container"]
        assert container["image"] == image
        assert {"name": "MLFLOW_TRACKING_URI", "value": uri} in container["env"]
        assert "imgclf.kfp.step" in container["command"][-1]  # each component runs its stage's module
        assert "pip install" not in " ".join(container["command"])  # the image has everything
        resources = container["resources"]
        assert resources["resourceCpuLimit"] and resources["resourceMemoryLimit"]
    train = executors["exec-train"]["container"]["resources"]
    assert {"resourceType": "nvidia.com/gpu", "resourceCount": "1"}.items() <= train["accelerator"].items()
    tasks = spec["root"]["dag"]["tasks"]
    assert tasks["train"]["retryPolicy"]["maxRetryCount"] == 2
    assert tasks["register"]["cachingOptions"] == {}  # enableCache: false
    assert tasks["prepare"]["cachingOptions"] == {"enableCache": True}
    for name in DVC["stages"]:
        env = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"][f"exec-{name}"]["secretAsEnv"]
        assert env[0]["secretName"] == secret and env[0]["optional"] is True
        assert {k["envVar"] for k in env[0]["keyToEnv"]} >= {"AWS_ACCESS_KEY_ID", "MLFLOW_TRACKING_PASSWORD"}


@needs_kfp
@pytest.mark.integration
@pytest.mark.parametrize(
    ("flag", "named"),
    [
        ("train.epoch=3", "params.yaml has no key 'train.epoch'"),
        ("train.epochs=many", "train.epochs: expected an integer"),
        ("train.epochs", "expected key=value"),
        ("data.dataset=null", "data.dataset cannot be null"),
    ],
)
def test_a_bad_set_names_the_problem_and_exits_2(tmp_path, flag, named):
    root = fresh_copy(tmp_path / "project")
    proc = run([sys.executable, "-m", "imgclf.kfp", "run", "--set", flag], root, check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert named in proc.stderr
    assert not (root / ".kfp").exists()  # refused before anything ran


def test_without_the_kfp_extra_the_command_says_how_to_install_it_and_exits_2(tmp_path):
    # As if kfp were not installed: an entry of None in sys.modules makes `import kfp` fail.
    code = (
        "import sys, runpy; sys.modules['kfp'] = None; sys.argv = ['imgclf.kfp', 'compile'];"
        "runpy.run_module('imgclf.kfp', run_name='__main__')"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "the kfp extra is not installed" in proc.stderr and 'pip install -e ".[kfp]"' in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_tasks_own_copy_of_an_input_is_what_its_dvc_lock_names(tmp_path):
    """register takes in train's model and compress's model; compress's artifact also carries, in its lock,
    train's model where compress's task had it. register's lock must name register's copy (its run's
    dvc.model.md5 tag comes from it)."""
    from types import SimpleNamespace

    from imgclf.kfp.step import LOCK_KEY, _inputs

    weights_out, compressed_out = "${train.model_dir}/model.safetensors", "${compress.model_dir}"
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "compressed").mkdir()
    entry = {"md5": "0" * 32, "size": 7}
    values = {
        "model": SimpleNamespace(
            path=str(tmp_path / "train"), metadata={LOCK_KEY: {weights_out: {**entry, "path": "/gone"}}}
        ),
        "compressed": SimpleNamespace(
            path=str(tmp_path / "compressed"),
            metadata={LOCK_KEY: {weights_out: {**entry, "path": "/elsewhere/model.safetensors"}}},
        ),
    }
    for order in (["model", "compressed"], ["compressed", "model"]):
        spec = {"inputs": {name: {"model": [weights_out], "compressed": [compressed_out]}[name] for name in order}}
        params = {"train": {"model_dir": "models"}, "compress": {"model_dir": "models/compressed"}}
        work = tmp_path / "-".join(order)
        lock = _inputs(values, spec, params, work)
        local = work / "files" / "train.model_dir" / "model.safetensors"
        assert lock[weights_out]["path"] == str(local) and local.read_bytes() == b"weights", order
        assert lock[weights_out]["md5"] == entry["md5"]
        assert params["compress"]["model_dir"] == str(tmp_path / "compressed")


def test_the_pytorchjob_manifest_runs_the_train_stage_with_torchrun():
    manifest = yaml.safe_load((REPO / "kubeflow" / "pytorchjob.yaml").read_text())
    assert manifest["apiVersion"] == "kubeflow.org/v1" and manifest["kind"] == "PyTorchJob"
    replicas = manifest["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"}
    for spec in replicas.values():
        (container,) = spec["template"]["spec"]["containers"]
        assert container["name"] == "pytorch"  # the name the training operator looks for
        command = " ".join(container["command"] + container.get("args", []))
        assert "torchrun" in command and "-m imgclf.train --params params.yaml" in command
        assert any(e["name"] == "MLFLOW_TRACKING_URI" for e in container["env"])
    # The README shows the same manifest file it ships.
    assert "kubeflow/pytorchjob.yaml" in readme_block("bash", "kubectl apply")


@needs_kfp
@pytest.mark.integration
def test_a_local_run_registers_a_model_with_the_lineage_of_a_dvc_run(tmp_path):
    root = fresh_copy(tmp_path / "project")
    proc = run(readme_command("python -m imgclf.kfp run"), root, timeout=1200)
    assert "kfp run: digits-lenet version 1" in proc.stdout and "champion" in proc.stdout

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    version = client.get_model_version_by_alias("digits-lenet", "champion")
    assert str(version.version) == "1" and float(version.tags["val_accuracy"]) > 0.5
    record = client.get_run(version.run_id)
    tags = record.data.tags
    # The data versions are those `dvc repro` records for the same params and data (the committed dvc.lock).
    lock = {
        out["path"]: out["md5"]
        for stage in yaml.safe_load(default_text("dvc.lock"))["stages"].values()
        for out in stage.get("outs", [])
    }
    params = default_params()
    assert tags["dvc.raw.md5"] == lock[params["data"]["raw_dir"]]
    assert tags["dvc.prepared.md5"] == lock[params["prepare"]["out_dir"]]
    assert tags["dvc.data_version_known"] == "true"
    assert [i.dataset.digest for i in record.inputs.dataset_inputs] == [tags["dvc.raw.md5"]]
    head = run(["git", "rev-parse", "HEAD"], root).stdout.strip()
    assert tags["mlflow.source.git.commit"] == head and tags["git_dirty"] == "false"
    assert tags["registered_model"] == "digits-lenet/1"
    assert record.data.params["train.epochs"] == "2"  # the --set reached the train task
    assert 0 < record.data.metrics["test/accuracy"] <= 1

    # The artifacts the KFP UI shows: the model (its DVC hash is the run's), metrics, the confusion matrix.
    (outputs,) = (root / ".kfp").glob("imgclf-*")
    weights = outputs / "train" / "model" / "model.safetensors"
    assert tags["dvc.model.md5"] == hashlib.md5(weights.read_bytes()).hexdigest()  # DVC's md5 of a file
    evaluate = json.loads((outputs / "evaluate" / "executor_output.json").read_text())["artifacts"]
    (metrics,) = evaluate["metrics"]["artifacts"]
    assert metrics["metadata"]["accuracy"] == record.data.metrics["test/accuracy"]
    (confusion,) = evaluate["confusion"]["artifacts"]
    rows = [row["row"] for row in confusion["metadata"]["confusionMatrix"]["rows"]]
    assert len(rows) == 10 and sum(map(sum, rows)) == 360  # digits' test split: 20% of 1,797

    # A worse model (one epoch instead of two) is registered as version 2, and the champion stays.
    again = run([sys.executable, "-m", "imgclf.kfp", "run", "--set", "train.epochs=1"], root, timeout=1200)
    assert "digits-lenet version 2" in again.stdout and "champion stays version 1" in again.stdout
    assert str(client.get_model_version_by_alias("digits-lenet", "champion").version) == "1"


@needs_kfp
def test_the_readme_submission_snippet_calls_the_kfp_client_as_it_takes_arguments():
    """The cluster half cannot run here: check at least that the call matches kfp.Client's signature and
    that its arguments are pipeline parameters."""
    import ast
    import inspect

    import kfp

    block = readme_block("python", "create_run_from_pipeline_package")
    (call,) = [
        node
        for node in ast.walk(ast.parse(block))
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "create_run_from_pipeline_package"
    ]
    accepted = inspect.signature(kfp.Client.create_run_from_pipeline_package).parameters
    assert {k.arg for k in call.keywords} <= set(accepted)
    arguments = ast.literal_eval(next(k.value for k in call.keywords if k.arg == "arguments"))
    names = {f"{section}_{key}" for section, keys in default_params().items() for key in keys}
    assert set(arguments) <= names


def test_the_image_installs_the_project_with_the_kfp_extra():
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "FROM ${BASE}" in dockerfile and "ARG BASE=python:3.11-slim" in dockerfile
    assert 'pip install -r requirements.txt -e ".[kfp]"' in dockerfile
    assert "ARG TORCH=cpu" in dockerfile  # the CUDA build of torch by --build-arg TORCH=cuda
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv", "mlflow.db", "mlruns", ".kfp"} <= set(ignored)
