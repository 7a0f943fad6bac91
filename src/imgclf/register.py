"""register stage: log the checkpoint as an MLflow pyfunc, register it, move `champion` if it is better.

    python -m imgclf.register --params params.yaml

Reads `train.model_dir` (checkpoint), `train.metrics_dir`/train.json (validation accuracy, recorded),
the test labels and one test image for the input example, and evaluate's test accuracy of exactly these
weights from the MLflow run (imgclf.admission); writes the receipt `register.receipt` (name, version, run
id, whether it became champion). The model is logged with MLflow's "models from code" (model_code.py) and
the package source, weights as safetensors, so loading it unpickles nothing.

Nothing is registered when the weights hold NaN or infinity, when the run holds no evaluation of these
weights, or (`register.refuse_chance`) when their test accuracy is not better than chance
(imgclf.integrity.chance_bar). The alias
`champion` moves to the new version only when its test accuracy beats the current champion's (the first
version always becomes champion). A model already registered (the same weights, card, limits and code:
an identical re-run, or a run killed before it moved the alias) is not registered again: the receipt
names that version, and the alias is moved as that run would have moved it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException

from imgclf import admission
from imgclf.config import Params, stage_params
from imgclf.failures import run_stage
from imgclf.files import write_json
from imgclf.images import encode_png
from imgclf.models import CARD_FILE, WEIGHTS_FILE
from imgclf.serving import LIMITS_ARTIFACT, quiet_union_hint_notice
from imgclf.tracking import log_dvc_hashes, resume_pipeline_run, sha256_file

ALIAS = "champion"
# A registered version's tag: the hash of what it serves (content_key).
CONTENT_TAG = "imgclf.content_sha256"
REGISTERED_FILE = "registered.json"
PACKAGE_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Receipt:
    model_name: str
    version: str
    run_id: str
    model_uri: str
    val_accuracy: float
    test_accuracy: float
    champion: bool
    previous_champion: str | None
    previous_champion_test_accuracy: float | None


def is_better(candidate: float, champion: float | None) -> bool:
    """Strictly better test accuracy wins; with no champion yet (or none with a test accuracy), the
    candidate wins."""
    return champion is None or candidate > champion


# What the served model's code imports (model_code.py and the package modules it reaches), as the
# distributions that provide them: torchvision builds resnet18 and torchvision:* models, PyYAML reads configs,
# pydantic types the output schema (tests/test_stages.py derives the list from the imports).
SERVED_DISTRIBUTIONS = (
    "mlflow",
    "torch",
    "torchvision",
    "numpy",
    "pillow",
    "safetensors",
    "pyyaml",
    "pydantic",
    "onnxruntime",  # runs the compressed models (imgclf.onnx_model)
)


def pip_requirements() -> list[str]:
    """What the served model imports, pinned to the versions it was logged with."""
    return [f"{name}=={version(name)}" for name in SERVED_DISTRIBUTIONS]


def content_key(model_dir: Path, limits: dict) -> str:
    """What makes two registered versions the same model: the weights, the card, the serving limits and
    the package's code. An identical re-run (the same code, params and data) gives the same key."""
    digest = hashlib.sha256()
    for path in [model_dir / WEIGHTS_FILE, model_dir / CARD_FILE, *sorted(PACKAGE_DIR.rglob("*.py"))]:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    digest.update(json.dumps(limits, sort_keys=True).encode())
    return digest.hexdigest()


def champion_accuracy(client, name: str) -> tuple[str | None, float | None]:
    """(version, test accuracy) of the current champion, or (None, None)."""
    try:
        current = client.get_model_version_by_alias(name, ALIAS)
    except MlflowException:
        return None, None
    if "test_accuracy" in current.tags:
        return str(current.version), float(current.tags["test_accuracy"])
    return str(current.version), client.get_run(current.run_id).data.metrics.get(admission.TEST_METRIC)


def same_model(client, name: str, key: str) -> str | None:
    """The version of `name` that already holds this model (see content_key), if any."""
    try:
        found = client.search_model_versions(f"name = '{name}' and tags.`{CONTENT_TAG}` = '{key}'")
    except MlflowException:  # no such registered model yet
        return None
    return str(min(int(v.version) for v in found)) if found else None


def log_model(model_dir: Path, example: np.ndarray, serving: dict):
    """Log the checkpoint as a "models from code" pyfunc with the package source beside it, and the
    serving limits."""
    files = [encode_png(image) for image in example]
    quiet_union_hint_notice()
    with tempfile.TemporaryDirectory() as tmp:
        limits = Path(tmp) / LIMITS_ARTIFACT
        limits.write_text(json.dumps(serving))
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PACKAGE_DIR / "model_code.py"),
            artifacts={
                "weights": str(model_dir / WEIGHTS_FILE),
                "card": str(model_dir / CARD_FILE),
                "serving": str(limits),
            },
            code_paths=[str(PACKAGE_DIR)],
            input_example=files,
            pip_requirements=pip_requirements(),
        )


def model_name(params: Params) -> str:
    """`register.model_name`, where `auto` means <data>-<model> (digits-lenet, cifar10-jpg-lenet):
    models trained on different data must not compete for one champion alias."""
    if params.register.model_name != "auto":
        return params.register.model_name
    return re.sub(r"[^A-Za-z0-9_.\-]", "-", f"{params.data.name}-{params.train.model}")


def main(argv: list[str] | None = None) -> None:
    params: Params = stage_params(argv, __doc__)
    # MLflow draws a progress bar for every artifact it downloads or uploads: three for one model here.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    model_dir = Path(params.train.model_dir)
    weights = model_dir / WEIGHTS_FILE
    admission.finite_weights(weights)  # before the store is touched
    from imgclf.compressed import compressed_record, register_compressed  # (it imports this module)

    compressed_dir = Path(params.compress.model_dir)
    compressed_info = compressed_record(compressed_dir)
    digest = sha256_file(weights)
    trained = json.loads((Path(params.train.metrics_dir) / "train.json").read_text())
    val_accuracy = float(trained["val_accuracy"])
    # A DP-SGD model's privacy: the epsilon spent and its delta (imgclf.privacy).
    privacy_tags = {key: str(trained[key]) for key in ("dp_epsilon", "dp_delta") if key in trained}
    example = np.load(Path(params.prepare.out_dir) / "test_images.npy", mmap_mode="r")[:2]
    labels = np.load(Path(params.prepare.out_dir) / "test_labels.npy")
    limits = asdict(params.serve)
    name = model_name(params)
    key = content_key(model_dir, limits)
    with resume_pipeline_run(params.mlflow.experiment_name, weights) as run:
        client = mlflow.MlflowClient()
        test_accuracy = admission.evaluated_accuracy(client.get_run(run.info.run_id), digest, weights)
        if params.register.refuse_chance:
            admission.better_than_chance(test_accuracy, labels, weights)
        version = same_model(client, name, key)
        if version is None:
            print(f"register: logging the model ({WEIGHTS_FILE}, {CARD_FILE}, the serving limits, the code)")
            info = log_model(model_dir, example, limits)
            tags = {
                "val_accuracy": str(val_accuracy),
                "test_accuracy": str(test_accuracy),
                CONTENT_TAG: key,
                **privacy_tags,
            }
            version = str(mlflow.register_model(info.model_uri, name, tags=tags).version)
            note = ""
        else:  # an identical re-run, or a run killed before it moved the alias: finish that version
            note = " (it already held this model: same weights, card, limits and code; nothing added)"
        previous, previous_accuracy = champion_accuracy(client, name)
        champion = previous == version or is_better(test_accuracy, previous_accuracy)
        if champion and previous != version:
            client.set_registered_model_alias(name, ALIAS, version)
        if previous == version:  # already champion: the comparison is with the one before it
            previous, previous_accuracy = None, None
        # No run tag says "champion": the alias moves on, and a tag would go stale. The alias is the truth.
        mlflow.set_tag("registered_model", f"{name}/{version}")
        log_dvc_hashes({"model": str(model_dir / WEIGHTS_FILE)})  # dvc.lock has train's outputs by now
        compressed = register_compressed(client, compressed_info, compressed_dir, model_dir, name, example, limits)
        receipt = Receipt(
            name,
            version,
            run.info.run_id,
            f"models:/{name}/{version}",
            val_accuracy,
            test_accuracy,
            champion,
            previous,
            previous_accuracy,
        )
    write_json(params.register.receipt, asdict(receipt))
    # The stage's DVC output: what was registered, the same for the same code, params and data (the
    # receipt names a version and a run, which differ from store to store). A fresh clone lacks it, so
    # its first `dvc repro` registers the model in its own store even when train's outputs match dvc.lock.
    registered = {"model_name": name, CONTENT_TAG: key} | ({"compressed": compressed} if compressed else {})
    write_json(model_dir / REGISTERED_FILE, registered)
    verdict = "champion" if champion else f"champion stays version {previous}"
    print(f"register: {name} version {version}{note} (test accuracy {test_accuracy:.4f}): {verdict}")


if __name__ == "__main__":
    run_stage(main)  # a failing store or disk: one line, not a traceback (IMGCLF_DEBUG=1 shows it)
