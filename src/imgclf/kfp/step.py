"""What a KFP task runs: one DVC stage's own module, `python -m imgclf.<stage> --params params.yaml`.

The task gets its stage's parameters and artifacts (see imgclf.kfp.pipeline); here they become what the
module reads under `dvc repro`, in a folder of the task's own:
  params.yaml  the pipeline's parameters, with each path key that dvc.yaml templates pointing at the
               artifact that carries it (presets/ beside it, as compiled);
  dvc.lock     the DVC hash of every upstream output, so the stage tags its MLflow run with the data and
               model versions exactly as under `dvc repro` (tracking.log_dvc_hashes);
then the stage's outputs are copied into the task's output artifacts, with their DVC hash as metadata.
`DVC_ROOT` names the folder the task started in, as DVC names the root for a queued experiment run in
a copy, so the default MLflow store is the one `dvc repro` uses.
"""

from __future__ import annotations

import csv
import importlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from imgclf.config import parse_value, read_yaml
from imgclf.kfp.pipeline import parameter_type

LOCK_KEY = "dvc_lock"  # artifact metadata: the DVC outputs upstream of it, as dvc.lock entries


def dvc_hash(path: Path) -> dict[str, Any]:
    """The hash DVC records in dvc.lock for a file or a folder ({md5, size, nfiles}), computed by DVC's
    own library."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem
    from dvc_objects.fs.memory import MemoryFileSystem

    fs = LocalFileSystem()
    _, meta, obj = build(HashFileDB(MemoryFileSystem(), "/staging"), str(Path(path).resolve()), fs, "md5")
    entry = {"md5": obj.hash_info.value, "size": meta.size}
    if meta.nfiles is not None:
        entry["nfiles"] = meta.nfiles
    return entry


def _key(out: str) -> tuple[str, str]:
    """ "${train.model_dir}/model.json" -> ("train.model_dir", "model.json"); "${data.raw_dir}" -> (..., "")."""
    match = re.fullmatch(r"\$\{([^}]+)\}(?:/(.+))?", out)
    if not match:
        raise ValueError(f"dvc.yaml output {out!r} is not ${{key}} or ${{key}}/file")
    return match.group(1), match.group(2) or ""


def _set(params: dict, key: str, value: Any) -> None:
    section, name = key.split(".", 1)
    params[section][name] = value


def _get(params: dict, key: str) -> Any:
    section, name = key.split(".", 1)
    return params[section][name]


def _place(params: dict, outs: list[str], path: str, work: Path) -> dict[str, Path]:
    """Point the params at where `outs` live: a whole-folder output (${key}) is the artifact itself;
    files under a key (${key}/file) live in the task's folder. Returns out -> local path."""
    where = {}
    for out in outs:
        key, name = _key(out)
        if not name:
            _set(params, key, path)
            where[out] = Path(path)
        else:
            folder = work / "files" / key
            folder.mkdir(parents=True, exist_ok=True)
            _set(params, key, str(folder))
            where[out] = folder / name
    return where


def run_stage(values: dict[str, Any]) -> None:
    """Run spec["stage"] with the task's inputs (`values`: the component's arguments by name)."""
    spec = values["spec"]
    root = Path.cwd()
    with tempfile.TemporaryDirectory(prefix=f"imgclf-{spec['stage']}-") as tmp:
        work = Path(tmp)
        for name, text in spec["files"].items():
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            (work / name).write_text(text)
        params = read_yaml(work / "params.yaml", "params file")
        for parameter, key in spec["parameters"].items():
            value = parse_value(values[parameter]) if parameter in spec["yaml"] else values[parameter]
            if parameter_type(key) is int and isinstance(value, float) and value.is_integer():
                value = int(value)  # KFP carries every number as a float
            _set(params, key, value)
        lock = _inputs(values, spec, params, work)
        outputs = {a: _place(params, outs, values[a].path, work) for a, outs in spec["outputs"].items()}
        for artifact in outputs:
            Path(values[artifact].path).parent.mkdir(parents=True, exist_ok=True)
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        entries = [{**entry, "hash": "md5"} for entry in lock.values()]
        (work / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {"upstream": {"outs": entries}}}))

        os.environ["DVC_ROOT"] = str(root)
        os.chdir(work)
        try:
            importlib.import_module(f"imgclf.{spec['stage']}").main(["--params", str(work / "params.yaml")])
        finally:
            os.chdir(root)

        _outputs(values, outputs, lock)
        if spec["stage"] == "train":
            _tag_code(params, spec["code"])
        _finish(values, params, outputs, work)


def _inputs(values: dict, spec: dict, params: dict, work: Path) -> dict[str, dict]:
    """Lay out the input artifacts; returns the dvc.lock entries (path, md5, size, nfiles) of every output
    upstream of them, by dvc.yaml out."""
    lock: dict[str, dict] = {}
    given = [out for outs in spec["inputs"].values() for out in outs]
    # Every upstream lock first: an artifact's lock also names the outputs its own task took in (compress's
    # names train's model, where compress's task had it), which this task's copies must override.
    for artifact in spec["inputs"]:
        lock.update(values[artifact].metadata.get(LOCK_KEY, {}))
    for artifact, outs in spec["inputs"].items():
        for out, local in _place(params, outs, values[artifact].path, work).items():
            source = Path(values[artifact].path)
            if local != source:  # a file the artifact carries, into the stage's folder
                shutil.copy2(source / local.name if source.is_dir() else source, local)
            lock[out] = {**lock.get(out, {}), "path": str(local)}
    for out, entry in lock.items():
        key, name = _key(out)
        if not name and out not in given:  # upstream, not this stage's input: where its producer left it
            _set(params, key, entry["path"])
    # (KFP carries numbers as floats; dvc.lock has integers.)
    return {out: {k: int(v) if isinstance(v, float) else v for k, v in e.items()} for out, e in lock.items()}


def _outputs(values: dict, outputs: dict[str, dict[str, Path]], lock: dict[str, dict]) -> None:
    """The stage's outputs into their artifacts, each with its DVC hash and the dvc.lock upstream of it."""
    for artifact, where in outputs.items():
        target = Path(values[artifact].path)
        own = {}
        for out, local in where.items():
            if local != target:  # a file of the stage's folder: into the artifact (a folder when it holds several)
                if len(where) == 1:
                    shutil.copy2(local, target)
                else:
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(local, target / local.name)
            own[out] = {**dvc_hash(local), "path": str(target if len(where) == 1 else target / local.name)}
        values[artifact].metadata.update({LOCK_KEY: {**lock, **own}, "dvc_md5": dvc_hash(target)["md5"]})


def _tag_code(params: dict, code: dict[str, str]) -> None:
    """The code version, as compiled, on the run train started: the task's folder (and a cluster's image)
    has no git history for train to read it from."""
    import mlflow

    from imgclf.models import WEIGHTS_FILE
    from imgclf.tracking import resume_pipeline_run

    weights = Path(_get(params, "train.model_dir")) / WEIGHTS_FILE
    with resume_pipeline_run(_get(params, "mlflow.experiment_name"), weights) as run:
        if code and "mlflow.source.git.commit" not in run.data.tags:
            mlflow.set_tags(code)


def _finish(values: dict, params: dict, outputs: dict, work: Path) -> None:
    """What KFP shows beyond files: metrics, the confusion matrix, the data version, the receipt."""
    for artifact, where in outputs.items():
        for local in where.values():
            if values[artifact].schema_title == "system.Metrics" and local.suffix == ".json":
                for name, value in json.loads(local.read_text()).items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        values[artifact].log_metric(name, value)
    if "confusion" in values and "evaluation" in outputs:
        predictions = next(p for p in outputs["evaluation"].values() if p.name == "predictions.csv")
        card = json.loads((Path(_get(params, "train.model_dir")) / "model.json").read_text())
        classes = [str(c) for c in card["classes"]]
        matrix = [[0] * len(classes) for _ in classes]
        with predictions.open() as f:
            for row in csv.DictReader(f):
                matrix[classes.index(row["actual"])][classes.index(row["predicted"])] += 1
        values["confusion"].log_confusion_matrix(classes, matrix)
    if "data_version" in values and isinstance(values["data_version"], str) and "prepared" in outputs:
        Path(values["data_version"]).write_text(values["prepared"].metadata["dvc_md5"])
    if "receipt" in values:
        Path(values["receipt"]).write_text((work / _get(params, "register.receipt")).read_text())
