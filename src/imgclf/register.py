"""register stage: log the checkpoint as an MLflow pyfunc, register it, move `champion` if it is better.

    python -m imgclf.register --params params.yaml

Reads `train.model_dir` (checkpoint), `train.metrics_dir`/train.json (validation accuracy) and one test
image for the input example; writes the receipt `register.receipt` (name, version, run id, whether it
became champion). The model is logged with MLflow's "models from code" (model_code.py) and the package
source, weights as safetensors, so loading it unpickles nothing.

The alias `champion` moves to the new version only when its validation accuracy beats the current
champion's (the first version always becomes champion).
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException

from imgclf.card import ModelCard
from imgclf.config import Params, stage_params
from imgclf.files import write_json
from imgclf.images import encode_png
from imgclf.models import CARD_FILE, WEIGHTS_FILE
from imgclf.serving import LIMITS_ARTIFACT
from imgclf.tracking import log_dvc_hashes, resume_pipeline_run

ALIAS = "champion"
PACKAGE_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Receipt:
    model_name: str
    version: str
    run_id: str
    model_uri: str
    val_accuracy: float
    champion: bool
    previous_champion: str | None
    previous_champion_val_accuracy: float | None


def is_better(candidate: float, champion: float | None) -> bool:
    """Strictly better validation accuracy wins; with no champion yet, the candidate wins."""
    return champion is None or candidate > champion


def pip_requirements() -> list[str]:
    """What the served model imports, pinned to the versions it was logged with."""
    return [f"{name}=={version(name)}" for name in ("mlflow", "torch", "numpy", "pillow", "safetensors")]


def champion_accuracy(client, name: str) -> tuple[str | None, float | None]:
    """(version, validation accuracy) of the current champion, or (None, None)."""
    try:
        current = client.get_model_version_by_alias(name, ALIAS)
    except MlflowException:
        return None, None
    if "val_accuracy" in current.tags:
        return str(current.version), float(current.tags["val_accuracy"])
    metrics = client.get_run(current.run_id).data.metrics
    return str(current.version), metrics.get("val_accuracy")


def log_model(model_dir: Path, example: np.ndarray, serving: dict):
    """Log the checkpoint as a "models from code" pyfunc with the package source beside it, and the
    serving limits."""
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
            input_example=[encode_png(image) for image in example],
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
    model_dir = Path(params.train.model_dir)
    card = ModelCard.read(model_dir / CARD_FILE)
    val_accuracy = float(json.loads((Path(params.train.metrics_dir) / "train.json").read_text())["val_accuracy"])
    example = np.load(Path(params.prepare.out_dir) / "test_images.npy", mmap_mode="r")[:2]

    name = model_name(params)
    with resume_pipeline_run(params.mlflow.experiment_name, card.mlflow_run_id) as run:
        info = log_model(model_dir, example, asdict(params.serve))
        client = mlflow.MlflowClient()
        previous, previous_accuracy = champion_accuracy(client, name)
        version = mlflow.register_model(info.model_uri, name, tags={"val_accuracy": str(val_accuracy)}).version
        champion = is_better(val_accuracy, previous_accuracy)
        if champion:
            client.set_registered_model_alias(name, ALIAS, version)
        receipt = Receipt(
            name,
            str(version),
            run.info.run_id,
            f"models:/{name}/{version}",
            val_accuracy,
            champion,
            previous,
            previous_accuracy,
        )
        mlflow.set_tags({"registered_model": f"{name}/{version}", "champion": str(champion).lower()})
        log_dvc_hashes({"model": str(model_dir / WEIGHTS_FILE)})  # dvc.lock has train's outputs by now
    write_json(params.register.receipt, asdict(receipt))
    verdict = "now champion" if champion else f"champion stays version {previous}"
    print(f"register: {name} version {version} (val_accuracy {val_accuracy:.4f}): {verdict}")


if __name__ == "__main__":
    main()
