"""The README's command-line tools on the built project: lineage, batch prediction, ONNX export."""

from __future__ import annotations

import csv
import json
import sys
import tarfile

import numpy as np
import pytest
import yaml

from conftest import readme_command, run
from imgclf.images import encode_png

pytestmark = pytest.mark.integration


def test_lineage_answers_which_data_and_code_made_the_champion(built_project):
    root, _ = built_project
    command = readme_command("python -m imgclf.lineage")
    text = run(command, root).stdout
    head = run(["git", "rev-parse", "HEAD"], root).stdout.strip()
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    raw = lock["stages"]["download"]["outs"][0]["md5"]
    assert f"git commit {head} (clean)" in text
    assert f"digits (digest {raw})" in text and f"dvc.raw.md5 = {raw}" in text
    info = json.loads(run(command + " --json", root).stdout)
    assert info["model"]["aliases"] == ["champion"] and info["code"]["git_commit"] == head
    assert info["data"]["dvc.prepared.md5"] == lock["stages"]["prepare"]["outs"][0]["md5"]
    weights = [o for o in lock["stages"]["train"]["outs"] if o["path"].endswith("model.safetensors")][0]
    assert info["data"]["dvc.model.md5"] == weights["md5"]
    assert info["params"]["train.model"] == "lenet"


@pytest.mark.parametrize("tool", ["lineage", "predict", "export"])
def test_an_unknown_model_is_a_clear_error(built_project, tmp_path, tool):
    root, _ = built_project
    args = {
        "lineage": [],
        "predict": [str(tmp_path), "--out", str(tmp_path / "p.csv")],
        "export": ["--out", str(tmp_path / "m.onnx")],
    }[tool]
    proc = run(["python", "-m", f"imgclf.{tool}", "models:/no-such-model@champion", *args], root, check=False)
    assert proc.returncode == 1 and proc.stderr.startswith("error:") and "Traceback" not in proc.stderr
    assert "no-such-model" in proc.stderr and list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def photos(built_project, tmp_path_factory):
    """A folder of the test images as PNG files, plus a file that is not an image and hidden files."""
    root, _ = built_project
    folder = tmp_path_factory.mktemp("photos") / "photos"
    folder.mkdir()
    images = np.load(root / "data/prepared/test_images.npy")[:40]
    for i, image in enumerate(images):
        (folder / f"{i:03d}.png").write_bytes(encode_png(image))
    (folder / "notes.txt").write_text("not an image")
    # Hidden files and macOS metadata are left out, not reported as failures.
    (folder / ".DS_Store").write_bytes(b"\0" * 16)
    (folder / "__MACOSX").mkdir()
    (folder / "__MACOSX" / "._000.png").write_bytes(b"\0" * 16)
    with open(root / "metrics/predictions.csv") as f:
        expected = [row["predicted"] for row in csv.DictReader(f)][:40]
    return folder, expected


@pytest.mark.parametrize("as_archive", [False, True])
def test_batch_prediction_matches_evaluation(built_project, photos, tmp_path, as_archive):
    root, _ = built_project
    folder, expected = photos
    source = folder
    if as_archive:
        source = tmp_path / "photos.tar.gz"
        with tarfile.open(source, "w:gz") as tar:
            tar.add(folder, arcname="photos")
    out = tmp_path / "predictions.csv"
    command = (
        readme_command("python -m imgclf.predict")
        .replace(" examples ", f" {source} ")
        .replace("--out predictions.csv", f"--out {out}")
    )
    proc = run(command, root)
    assert "40 images classified, 1 could not be" in proc.stdout
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "class", "probability", "top_k", "error"]
    good = [r for r in rows if not r["error"]]
    assert [r["class"] for r in good] == expected
    assert all(len(r["top_k"].split()) == 3 and r["top_k"].startswith(r["class"] + ":") for r in good)
    (bad,) = [r for r in rows if r["error"]]
    assert bad["path"].endswith("notes.txt") and "not an image file" in bad["error"]


def test_onnx_export_matches_pytorch(built_project, tmp_path):
    import onnxruntime

    root, _ = built_project
    out = tmp_path / "model.onnx"
    command = readme_command("python -m imgclf.export").replace("--out model.onnx", f"--out {out}")
    proc = run(command, root)
    difference = float(proc.stdout.rsplit(" ", 1)[1])
    assert difference < 1e-4
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    images = np.load(root / "data/prepared/test_images.npy")
    (probs,) = session.run(None, {"images": np.ascontiguousarray(images.transpose(0, 3, 1, 2))})
    with open(root / "metrics/predictions.csv") as f:
        rows = list(csv.DictReader(f))
    classes = json.loads((root / "models/model.json").read_text())["classes"]
    assert [classes[i] for i in probs.argmax(1)] == [row["predicted"] for row in rows]
    np.testing.assert_allclose(probs.max(1), [float(row["probability"]) for row in rows], atol=1e-4)
    metadata = session.get_modelmeta().custom_metadata_map
    assert json.loads(metadata["classes"]) == classes


def test_onnx_export_of_fastnet_keeps_its_test_time_augmentation(tmp_path):
    import onnx
    import torch

    from conftest import card_for
    from imgclf.export import export
    from imgclf.models import build

    torch.manual_seed(0)
    card = card_for("fastnet-s", tta_flip=True, tta_translate=1)
    model = build(card).eval()
    batch = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    out = tmp_path / "fastnet.onnx"
    assert export(model, card, out, batch) < 1e-4  # onnxruntime agrees with the 6-view PyTorch model
    metadata = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(metadata["tta_translate"]) == 1 and json.loads(metadata["tta_flip"]) is True


def test_readme_python_predict_takes_files_and_arrays(built_project):
    """The README's in-process example: the loaded model takes image files and pixel arrays alike."""
    from conftest import readme_block

    root, _ = built_project
    proc = run([sys.executable, "-c", readme_block("python", "mlflow.pyfunc.load_model")], root)
    assert "'class': '3'" in proc.stdout and proc.stdout.count("'top_k'") == 2
