"""The compressed model (imgclf.compress) in the registry, beside the float one: the register stage's part
for it.

It is registered as its own model, `<name>-int8` or `<name>-pruned`, with its own `champion` alias, moved
by the same rule as the float model's (strictly better test accuracy, of the compressed model itself, as
the compress stage measured it). It is logged as the float model is, a "models from code" pyfunc served by the same code
(imgclf.serving) with the same limits, its ONNX graph in place of the safetensors weights: the same
requests, answers and errors.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import mlflow
import numpy as np

from imgclf.images import encode_png
from imgclf.models import CARD_FILE
from imgclf.onnx_model import COMPRESSED_FILE, GRAPH_FILE, SUFFIX
from imgclf.register import (
    ALIAS,
    CONTENT_TAG,
    PACKAGE_DIR,
    champion_accuracy,
    is_better,
    pip_requirements,
    same_model,
)
from imgclf.serving import LIMITS_ARTIFACT, quiet_union_hint_notice


def graph_key(graph: Path, card: Path, limits: dict) -> str:
    """register.content_key for a compressed model: its graph, the card, the limits and the code."""
    digest = hashlib.sha256()
    for path in [graph, card, *sorted(PACKAGE_DIR.rglob("*.py"))]:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    digest.update(json.dumps(limits, sort_keys=True).encode())
    return digest.hexdigest()


def log_compressed(graph: Path, card: Path, example: np.ndarray, limits: dict, method: str):
    quiet_union_hint_notice()
    with tempfile.TemporaryDirectory() as tmp:
        serving = Path(tmp) / LIMITS_ARTIFACT
        serving.write_text(json.dumps(limits))
        return mlflow.pyfunc.log_model(
            name=f"model-{SUFFIX[method]}",
            python_model=str(PACKAGE_DIR / "model_code.py"),
            artifacts={"onnx": str(graph), "card": str(card), "serving": str(serving)},
            code_paths=[str(PACKAGE_DIR)],
            input_example=[encode_png(image) for image in example],
            pip_requirements=pip_requirements(),
        )


def compressed_record(compressed_dir: Path) -> dict:
    """What the compress stage made (its COMPRESSED_FILE), read before register touches the store: a
    missing record stops the stage with nothing registered."""
    path = compressed_dir / COMPRESSED_FILE
    if not path.is_file():
        raise SystemExit(
            f"error: register: {path} is missing: the compress stage makes it (even with compress.method none);"
            " run `dvc repro` (or `dvc repro compress`) first; nothing was registered"
        )
    return json.loads(path.read_text())


def register_compressed(
    client, info: dict, compressed_dir: Path, model_dir: Path, float_name: str, example: np.ndarray, limits: dict
) -> dict | None:
    """Register the compress stage's model, if it made one (inside the pipeline's active run); `info` is
    its compressed_record. Returns what registered.json records of it, or None for compress.method none."""
    method = info["method"]
    if method == "none":
        return None
    name = f"{float_name}-{SUFFIX[method]}"
    graph, card = compressed_dir / GRAPH_FILE, model_dir / CARD_FILE
    key = graph_key(graph, card, limits)
    val_accuracy, test_accuracy = float(info["val_accuracy"]), float(info["test_accuracy"])
    version = same_model(client, name, key)
    if version is None:
        print(f"register: logging the {method} model ({GRAPH_FILE}, {CARD_FILE}, the serving limits, the code)")
        logged = log_compressed(graph, card, example, limits, method)
        tags = {
            "val_accuracy": str(val_accuracy),
            "test_accuracy": str(test_accuracy),
            CONTENT_TAG: key,
            "compress.method": method,
        }
        version = str(mlflow.register_model(logged.model_uri, name, tags=tags).version)
    previous, previous_accuracy = champion_accuracy(client, name)
    champion = previous == version or is_better(test_accuracy, previous_accuracy)
    if champion and previous != version:
        client.set_registered_model_alias(name, ALIAS, version)
    mlflow.set_tag(f"registered_model_{SUFFIX[method]}", f"{name}/{version}")
    verdict = "champion" if champion else f"champion stays version {previous}"
    print(f"register: {name} version {version} (test accuracy {test_accuracy:.4f}): {verdict}")
    return {"model_name": name, CONTENT_TAG: key}
