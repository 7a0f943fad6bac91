"""dvc.yaml + params.yaml -> a KFP v2 pipeline: one component per DVC stage, wired as dvc.yaml wires them.

Each stage's component runs the stage's own module (imgclf.kfp.step); nothing of a stage's logic is
repeated here. What comes from where:
  - the tasks and their names: dvc.yaml's stages;
  - which task feeds which: a stage's deps that are another stage's outs (ARTIFACTS names the KFP artifact
    that carries each out), so the task graph is dvc.yaml's graph;
  - the pipeline parameters: every key of params.yaml, its value the default, typed from config.py.
    Stages that log to MLflow (their dvc.yaml params name `mlflow`) take every key, as MLflow records
    them all; download and prepare take the keys their dvc.yaml params name, so that a changed train key
    leaves their cached results valid, as it leaves DVC's;
  - the data version: prepare's output's DVC hash, an input of the stages downstream, so KFP's cache
    keys name the data, not only the artifact's location.
register runs after evaluate (it depends on test.json: evaluate's test accuracy, which register reads from
the MLflow run, decides; a model whose evaluation fails is never registered) and is never cached:
registering is its effect.
"""

from __future__ import annotations

import inspect
import json
import linecache
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from imgclf.config import Params, read_yaml
from imgclf.tracking import git_state

PIPELINE_NAME = "imgclf"
# The image every component runs in (see the Dockerfile); a cluster needs it pushed to a registry.
DEFAULT_IMAGE = "imgclf:latest"
# Every output dvc.yaml declares (outs and metrics, spelled as there) -> the KFP artifact that carries it
# (name, type). Outputs under one name travel together: the model's weights with its card. An output missing
# here fails the build (and a test), so dvc.yaml and the pipeline cannot drift.
ARTIFACTS: dict[str, tuple[str, str] | None] = {
    "${data.raw_dir}": ("raw", "Dataset"),
    "${prepare.out_dir}": ("prepared", "Dataset"),
    "${train.model_dir}/model.safetensors": ("model", "Model"),
    "${train.model_dir}/model.json": ("model", "Model"),
    "${train.metrics_dir}/train_history.csv": ("history", "Artifact"),
    "${train.metrics_dir}/train.json": ("train_metrics", "Metrics"),
    "${evaluate.metrics_dir}/test.json": ("metrics", "Metrics"),
    "${evaluate.metrics_dir}/per_class.json": ("evaluation", "Artifact"),
    "${evaluate.metrics_dir}/predictions.csv": ("evaluation", "Artifact"),
    "${evaluate.metrics_dir}/confusion.png": ("evaluation", "Artifact"),
    "${evaluate.plots_dir}": ("figures", "Artifact"),
    "${compress.model_dir}": ("compressed", "Model"),
    "${compress.metrics_dir}/compress.json": ("compress_metrics", "Metrics"),
    # The resumable training state stays inside the train task (a retried task trains from scratch).
    "${train.checkpoint_dir}": None,
    # What register registered: DVC's sign that the stage ran; in KFP, register's receipt output says it.
    "${train.model_dir}/registered.json": None,
}
# evaluate's confusion matrix as KFP's ClassificationMetrics (the UI draws it), from predictions.csv.
CONFUSION = ("confusion", "ClassificationMetrics", "${evaluate.metrics_dir}/predictions.csv")
DATA = "prepared"  # the artifact whose DVC hash is the data version
# Which stage runs after which beyond the data it reads (see the module docstring).
AFTER = {"register": ("evaluate",)}
NOT_CACHED = ("register",)
RETRIED = {"train": 2}  # attempts after the first; a failed pod (evicted, preempted node) trains again
# Keys of a Kubernetes secret that become environment variables of every task (those the secret holds).
SECRET_KEYS = (
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "MLFLOW_S3_ENDPOINT_URL",
)
DATA_MOUNT = "/mnt/data"  # where --pvc mounts a volume in the download task (data.path can point into it)


@dataclass(frozen=True)
class Options:
    """How the tasks run on a cluster: none of it changes what a stage computes."""

    image: str = DEFAULT_IMAGE
    tracking_uri: str | None = None  # MLFLOW_TRACKING_URI of every task
    secret: str | None = None  # a Kubernetes secret with MLflow / object-store credentials (SECRET_KEYS)
    pvc: str | None = None  # a PersistentVolumeClaim holding the raw data, mounted at DATA_MOUNT in download
    gpus: int = 0  # nvidia.com/gpu for the train task (use the CUDA image)
    train_cpu: str = "4"
    train_memory: str = "16G"
    cpu: str = "1"  # every other task
    memory: str = "4G"


@dataclass(frozen=True)
class Stage:
    name: str
    keys: tuple[str, ...]  # the params keys (train.epochs) it takes
    inputs: dict[str, tuple[str, ...]]  # artifact -> the dvc.yaml outs it carries, from upstream stages
    outputs: dict[str, tuple[str, ...]]  # artifact -> the dvc.yaml outs of this stage it carries
    kinds: dict[str, str] = field(default_factory=dict)  # artifact -> KFP type


@dataclass(frozen=True)
class Project:
    root: Path
    dvc: dict
    params: dict  # params.yaml as written (null keys left null)
    files: dict[str, str]  # params.yaml and presets/*.yaml: what a task writes to resolve the params


def load_project(root: Path) -> Project:
    root = Path(root)
    files = {"params.yaml": (root / "params.yaml").read_text()}
    for preset in sorted((root / "presets").glob("*.yaml")):
        files[f"presets/{preset.name}"] = preset.read_text()
    return Project(
        root, read_yaml(root / "dvc.yaml", "pipeline"), read_yaml(root / "params.yaml", "params file"), files
    )


def flat(params: dict) -> dict[str, Any]:
    """{"train.epochs": None, ...}: every key of params.yaml, in its order."""
    return {f"{section}.{key}": value for section, keys in params.items() for key, value in keys.items()}


def parameter_name(key: str) -> str:
    """train.epochs -> train_epochs (KFP names are identifiers; no section name holds a '_')."""
    return key.replace(".", "_")


def parameter_type(key: str) -> type:
    """str, int, float or bool: the type config.py gives the key (Literal choices by their values' type)."""
    section, name = key.split(".", 1)
    hint = typing.get_type_hints(typing.get_type_hints(Params)[section])[name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is Literal:
        hint = type(typing.get_args(hint)[0])
    return hint


def parameter(key: str, default: Any) -> tuple[type, Any]:
    """The KFP type and default of `key`'s pipeline parameter. A key params.yaml leaves null (the preset
    decides it) is a string of YAML, "null" by default, as a KFP parameter cannot default to null (and a
    run cannot pass one): `--set train.epochs=3` passes "3"."""
    if default is None:
        return str, "null"
    kind = parameter_type(key)
    return kind, float(default) if kind is float else default


def argument(key: str, value: Any, default: Any) -> Any:
    """`value` for `key` as the pipeline parameter takes it (see parameter)."""
    if default is None:
        return json.dumps(value)  # JSON is YAML
    return float(value) if parameter_type(key) is float else value


def _outs(stage: dict) -> list[str]:
    items = [*stage.get("outs", []), *stage.get("metrics", [])]
    return [next(iter(item)) if isinstance(item, dict) else item for item in items]


def stages(project: Project) -> list[Stage]:
    """dvc.yaml's stages, in order, with the artifacts each reads and writes."""
    keys = flat(project.params)
    result, made = [], {}  # made: dvc out -> artifact
    for name, spec in project.dvc["stages"].items():
        outputs: dict[str, list[str]] = {}
        kinds = {}
        for out in _outs(spec):
            if out not in ARTIFACTS:
                raise ValueError(f"dvc.yaml: stage {name} output {out!r} has no KFP artifact in ARTIFACTS")
            if ARTIFACTS[out] is not None:
                artifact, kind = ARTIFACTS[out]
                outputs.setdefault(artifact, []).append(out)
                kinds[artifact] = kind
        if CONFUSION[2] in _outs(spec):
            kinds[CONFUSION[0]] = CONFUSION[1]
        inputs: dict[str, list[str]] = {}
        for dep in spec.get("deps", []):
            if dep in made:
                inputs.setdefault(made[dep], []).append(dep)
                kinds[made[dep]] = ARTIFACTS[dep][1]
        read = spec.get("params", [])
        if "mlflow" in read:  # MLflow records every param: give the stage all of them
            taken = list(keys)
        else:
            taken = [k for k in keys if k in read or k.split(".")[0] in read]
        result.append(
            Stage(
                name,
                tuple(taken),
                {a: tuple(o) for a, o in inputs.items()},
                {a: tuple(o) for a, o in outputs.items()},
                kinds,
            )
        )
        for artifact, outs in outputs.items():
            made.update({out: artifact for out in outs})
    return result


# ---- components: source generated per stage, since KFP reads a lightweight component's inputs from its
# function's signature, and the signature here is dvc.yaml's and params.yaml's, not a copy of them.

_COMPONENT = '''def {name}(
{arguments}
):
    """The {name} stage: python -m imgclf.{name}, in the task's own folder (see imgclf.kfp.step)."""
    from imgclf.kfp.step import run_stage

    run_stage(dict(locals()))
'''


def component_source(stage: Stage, project: Project) -> str:
    defaults = flat(project.params)
    required = []
    for artifact in stage.inputs:
        required.append(f"{artifact}: Input[{stage.kinds[artifact]}]")
    for artifact in [*stage.outputs, *([CONFUSION[0]] if CONFUSION[0] in stage.kinds else [])]:
        required.append(f"{artifact}: Output[{stage.kinds[artifact]}]")
    required.append("spec: dict")
    if DATA in stage.inputs:
        required.append("data_version: str")
    if DATA in stage.outputs:
        required.append("data_version: OutputPath(str)")
    if stage.name == "register":
        required.append("receipt: OutputPath(str)")
    for key in stage.keys:
        required.append(f"{parameter_name(key)}: {parameter(key, defaults[key])[0].__name__}")
    arguments = "\n".join(f"    {a}," for a in required)
    return _COMPONENT.format(name=stage.name, arguments=arguments)


def _function(source: str, name: str):
    """The function `source` defines, its source findable by inspect (which KFP ships to the task)."""
    from kfp import dsl

    filename = f"<imgclf.kfp component {name}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = {name: getattr(dsl, name) for name in dsl.__all__}
    namespace["__name__"] = __name__
    exec(compile(source, filename, "exec", dont_inherit=True), namespace)  # no postponed annotations
    return namespace[name]


def task_spec(stage: Stage, project: Project) -> dict:
    """What the step needs besides the parameters: where each artifact's outs go, the files that resolve
    the params, and the code version (a task's image has no git history)."""
    return {
        "stage": stage.name,
        "parameters": {parameter_name(k): k for k in stage.keys},
        "yaml": [parameter_name(k) for k in stage.keys if flat(project.params)[k] is None],
        "inputs": {a: list(outs) for a, outs in stage.inputs.items()},
        "outputs": {a: list(outs) for a, outs in stage.outputs.items()},
        "files": project.files,
        "code": git_state(project.root),
    }


def build(project: Project, options: Options = Options()):
    """The pipeline (a kfp GraphComponent): compile it, or call it under kfp.local."""
    from kfp import dsl, kubernetes

    all_stages = stages(project)
    defaults = flat(project.params)
    components = {
        s.name: dsl.component(
            _function(component_source(s, project), s.name), base_image=options.image, install_kfp_package=False
        )
        for s in all_stages
    }
    names = [parameter_name(k) for k in defaults]
    if len(set(names)) != len(names):
        raise ValueError("params.yaml: two keys map to one pipeline parameter name")

    def body(*args):
        values = dict(zip(names, args))
        tasks = {}
        for stage in all_stages:
            kwargs = {parameter_name(k): values[parameter_name(k)] for k in stage.keys}
            producers = {a: t for t in tasks.values() for a in t.outputs}
            kwargs.update({a: producers[a].outputs[a] for a in stage.inputs})
            if DATA in stage.inputs:
                kwargs["data_version"] = producers[DATA].outputs["data_version"]
            task = components[stage.name](spec=task_spec(stage, project), **kwargs)
            _configure(task, stage.name, options, kubernetes)
            tasks[stage.name] = task
        for name, before in AFTER.items():
            tasks[name].after(*[tasks[b] for b in before])
        return tasks["register"].outputs["receipt"]

    body.__name__ = PIPELINE_NAME
    body.__signature__ = inspect.Signature(
        [
            inspect.Parameter(
                parameter_name(key),
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
                default=parameter(key, value)[1],
                annotation=parameter(key, value)[0],
            )
            for key, value in defaults.items()
        ],
        return_annotation=str,
    )
    return dsl.pipeline(
        name=PIPELINE_NAME,
        description="dvc.yaml's stages (download, prepare, train, evaluate, compress, register); MLflow tracks and registers",
    )(body)


def _configure(task, stage: str, options: Options, kubernetes) -> None:
    task.set_caching_options(stage not in NOT_CACHED)
    if stage == "train":
        task.set_cpu_limit(options.train_cpu).set_memory_limit(options.train_memory)
        if options.gpus:
            task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(options.gpus)
    else:
        task.set_cpu_limit(options.cpu).set_memory_limit(options.memory)
    if stage in RETRIED:
        task.set_retry(num_retries=RETRIED[stage], backoff_duration="30s", backoff_factor=2.0)
    if options.tracking_uri:
        task.set_env_variable("MLFLOW_TRACKING_URI", options.tracking_uri)
    if options.secret:
        kubernetes.use_secret_as_env(task, options.secret, {k: k for k in SECRET_KEYS}, optional=True)
    if options.pvc and stage == "download":
        kubernetes.mount_pvc(task, pvc_name=options.pvc, mount_path=DATA_MOUNT)


def compile_to(project: Project, out: Path, options: Options = Options()) -> Path:
    from kfp import compiler

    Path(out).parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build(project, options), str(out))
    return Path(out)


def pipeline_yaml(path: Path) -> dict:
    """The compiled spec; with platform config (secrets, volumes) it is two YAML documents."""
    docs = list(yaml.safe_load_all(Path(path).read_text()))
    return {"spec": docs[0], "platform": docs[1] if len(docs) > 1 else {}}
