"""Every stage's main() end to end, in process, in a temporary folder with its own MLflow store."""

from __future__ import annotations

import ast
import base64
import importlib.metadata
import importlib.util
import json
import os
import sys
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pytest

from conftest import default_params, write_params
from imgclf.images import encode_png
from imgclf.models import load_checkpoint_dir, predict_proba
from imgclf.register import SERVED_DISTRIBUTIONS


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
    from imgclf import compress, download, evaluate, prepare, register, train

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
    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    (run_id,) = [
        r.info.run_id for r in client.search_runs([client.get_experiment_by_name("image-classifier").experiment_id])
    ]
    history = (workdir / "metrics/train_history.csv").read_text().splitlines()
    assert history[0] == "epoch,train_loss,train_accuracy,val_loss,val_accuracy,lr" and len(history) == 4

    evaluate.main(argv)
    metrics = json.loads((workdir / "metrics/test.json").read_text())
    assert set(metrics) == {"accuracy", "recall_macro", "precision_macro", "f1_macro", "roc_auc_macro", "ece"}
    assert (workdir / "metrics/confusion.png").read_bytes().startswith(b"\x89PNG")
    figures = {p.name for p in (workdir / "metrics/plots").iterdir()}
    assert {"roc.png", "reliability.png", "top_losses.png", "gradcam_correct.png", "calibration.csv"} <= figures

    compress.main(argv)  # compress.method none: nothing compressed, nothing more registered
    assert json.loads((workdir / "metrics/compress.json").read_text()) == {"method": "none"}

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        register.main(argv)
    # MLflow reads the served model's signature from predict's type hints and warns where it cannot.
    assert not [str(w.message) for w in caught if "type hint" in str(w.message)]
    receipt = json.loads((workdir / "models/registration.json").read_text())
    assert receipt["run_id"] == run_id and receipt["version"] == "1" and receipt["champion"]
    run = client.get_run(run_id)
    assert {"val/accuracy", "test/accuracy", "test_per_class/recall/3"} <= set(run.data.metrics)
    assert "champion" not in run.data.tags  # the alias says which version is champion; a tag would go stale
    assert client.get_model_version_by_alias("digits-lenet", "champion").version == 1
    # The logged model loads and predicts like the checkpoint, and holds nothing pickled.
    model = mlflow.pyfunc.load_model("models:/digits-lenet@champion")
    images = np.load(workdir / "data/prepared/test_images.npy")[:4]
    predictions = model.predict([encode_png(image) for image in images])
    expected = predict_proba(load_checkpoint_dir(workdir / "models")[0], images).argmax(1)
    assert [p["index"] for p in predictions] == expected.tolist()
    # In Python, what the HTTP API takes: base64 text and uint8 pixels answer as the files do.
    texts = [base64.b64encode(encode_png(image)).decode() for image in images]
    assert [p["index"] for p in model.predict(texts)] == expected.tolist()
    assert [p["index"] for p in model.predict(list(images))] == expected.tolist()
    with pytest.raises(mlflow.exceptions.MlflowException, match="input 1: not valid base64"):
        model.predict([texts[0], "not base64!"])
    # The output has a schema: one prediction per image, its fields typed.
    outputs = model.metadata.signature.outputs.to_dict()
    assert list(outputs[0]["properties"]) == ["class", "index", "probability", "top_k"]
    model_files = Path(mlflow.artifacts.download_artifacts("models:/digits-lenet@champion"))
    assert (model_files / "artifacts" / "model.safetensors").is_file()
    assert not list(model_files.rglob("*.pkl")) and not list(model_files.rglob("*.pt"))
    # The requirements it declares are what its code imports (torchvision builds the torchvision models).
    requirements = (model_files / "requirements.txt").read_text().split()
    assert sorted(r.split("==")[0] for r in requirements) == sorted(SERVED_DISTRIBUTIONS)


def third_party_imports(module: str, seen: set[str] | None = None) -> set[str]:
    """The top-level third-party modules `module` imports, following the package's own modules."""
    seen = set() if seen is None else seen
    found: set[str] = set()
    if module in seen:
        return found
    seen.add(module)
    path = Path(importlib.util.find_spec(module).origin)
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name.split(".")[0] == "imgclf":
                if importlib.util.find_spec(name.rsplit(".", 1)[0] if "." in name else name) is not None:
                    found |= third_party_imports(_module_of(name), seen)
            elif name.split(".")[0] not in sys.stdlib_module_names and name != "__future__":
                found.add(name.split(".")[0])
    return found


def _module_of(name: str) -> str:
    """`imgclf.data.types.DataError` -> `imgclf.data.types`: the longest prefix that is a module."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        try:
            if importlib.util.find_spec(candidate) is not None:
                return candidate
        except ModuleNotFoundError:
            continue
    return name


def test_the_served_model_declares_exactly_the_distributions_its_code_imports():
    """Every model family is served by the same code (model_code.py and what it reaches: torchvision for
    resnet18 and torchvision:* models), so its imports decide the requirements register logs."""
    providers = importlib.metadata.packages_distributions()  # module -> the distributions that install it
    declared = {d.lower() for d in SERVED_DISTRIBUTIONS}
    imported = third_party_imports("imgclf.model_code")
    missing = sorted(m for m in imported if not declared & {d.lower() for d in providers[m]})
    assert not missing, f"imported by the served code but not declared: {missing}"
    unused = sorted(d for d in declared if not any(d in {p.lower() for p in providers[m]} for m in imported))
    assert not unused, f"declared but not imported: {unused}"


def test_champion_moves_only_on_strictly_better_accuracy():
    from imgclf.register import is_better

    assert is_better(0.5, None)
    assert is_better(0.91, 0.90)
    assert not is_better(0.90, 0.90)
    assert not is_better(0.89, 0.90)
