"""The compress stage: int8 quantization and channel pruning on tiny nets, and the pipeline with
compress.method int8 through register (the -int8 model served: tests/test_serving.py)."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import onnx
import pytest
import torch

from conftest import card_for, default_params, readme_command, run, write_params
from imgclf.compress import calibration_sample, main, quantize_int8, unquantized_layers
from imgclf.export import nchw, to_onnx
from imgclf.models import build, predict_proba, save_checkpoint
from imgclf.onnx_model import OnnxClassifier
from imgclf.prune import PruneError, prune


def images(n: int, size: int = 32, channels: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, channels), dtype=np.uint8)


def test_calibration_sample_is_seeded_and_capped():
    pool = images(50)
    assert np.array_equal(calibration_sample(pool, 10, 0), calibration_sample(pool, 10, 0))
    assert not np.array_equal(calibration_sample(pool, 10, 0), calibration_sample(pool, 10, 1))
    assert len(calibration_sample(pool, 500, 0)) == 50


@pytest.mark.parametrize("model", ["lenet", "fastnet-s"])
def test_int8_quantizes_every_weighted_layer_and_keeps_the_predictions(model):
    torch.manual_seed(0)
    card = card_for(model)
    net = build(card).eval()
    float_graph = onnx.load_from_string(to_onnx(net, card, nchw(images(2))))
    assert unquantized_layers(float_graph)  # the float graph: every Conv/Gemm named as float
    graph = quantize_int8(net, card, images(64, seed=1))
    quantized = onnx.load_from_string(graph)
    assert unquantized_layers(quantized) == []
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in quantized.graph.node}
    assert {p.key for p in quantized.metadata_props} >= {"classes", "mean", "std"}
    assert len(graph) < 0.35 * float_graph.ByteSize()
    test = images(32, seed=2)
    expected = predict_proba(net, test)
    got = OnnxClassifier(graph, card.num_classes).predict_proba(test)
    assert got.shape == expected.shape and np.allclose(got.sum(1), 1, atol=1e-4)
    assert np.abs(got - expected).max() < 0.05


def _zero_weakest_half(layer: torch.nn.Module) -> None:
    with torch.no_grad():
        layer.weight[1::2] = 0
        layer.bias[1::2] = 0


def test_pruning_a_lenet_whose_weakest_channels_are_zero_keeps_its_outputs():
    torch.manual_seed(0)
    card = card_for("lenet")
    model = build(card).eval()
    for layer in (model.net.conv1, model.net.conv2, model.net.fc1, model.net.fc2):
        _zero_weakest_half(layer)
    pruned = prune(model, card, 0.5)
    assert pruned.net.conv1.out_channels == 3 and pruned.net.conv2.weight.shape[:2] == (8, 3)
    assert pruned.net.fc1.weight.shape == (60, 8 * 5 * 5) and pruned.net.fc3.in_features == 42
    test = torch.from_numpy(images(8)).permute(0, 3, 1, 2)
    with torch.no_grad():
        assert torch.allclose(pruned(test), model(test), atol=1e-5)
    assert model.net.conv1.out_channels == 6  # the original is untouched


@pytest.mark.parametrize("model", ["lenet-bn", "fastnet-s"])
def test_pruning_shrinks_the_network(model):
    card = card_for(model)
    net = build(card).eval()
    pruned = prune(net, card, 0.5)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(pruned) < 0.45 * count(net)
    graph = to_onnx(pruned, card, nchw(images(2)))
    probs = OnnxClassifier(graph, card.num_classes).predict_proba(images(4))
    assert probs.shape == (4, 10)


def test_pruning_an_unknown_architecture_names_it():
    card = card_for("resnet18")
    with pytest.raises(PruneError, match="model 'resnet18'.*lenet, lenet-bn, fastnet"):
        prune(build(card), card, 0.5)


def test_method_none_costs_nothing(tmp_path, monkeypatch):
    """No checkpoint, no data, no MLflow store: method none needs none of them."""
    monkeypatch.chdir(tmp_path)
    main(["--params", str(write_params(tmp_path))])
    assert json.loads((tmp_path / "models/compressed/compressed.json").read_text()) == {"method": "none"}
    assert json.loads((tmp_path / "metrics/compress.json").read_text()) == {"method": "none"}
    assert not (tmp_path / "mlflow.db").exists()


def test_an_unknown_method_exits_2_naming_the_key(tmp_path, capsys):
    params = default_params()
    params["compress"]["method"] = "int4"
    with pytest.raises(SystemExit) as exit_info:
        main(["--params", str(write_params(tmp_path, params))])
    assert exit_info.value.code == 2
    assert "compress.method: must be one of 'none', 'int8', 'prune', got 'int4'" in capsys.readouterr().err


def test_a_model_the_method_cannot_handle_exits_2_naming_it_before_any_output(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    params = default_params()
    params["compress"]["method"] = "prune"
    path = write_params(tmp_path, params)
    card = card_for("resnet18")
    save_checkpoint(build(card), card, tmp_path / "models")
    for split in ("train", "val", "test"):
        (tmp_path / "data/prepared").mkdir(parents=True, exist_ok=True)
        np.save(tmp_path / f"data/prepared/{split}_images.npy", images(4))
        np.save(tmp_path / f"data/prepared/{split}_labels.npy", np.arange(4))
    with pytest.raises(SystemExit) as exit_info:
        main(["--params", str(path)])
    assert exit_info.value.code == 2
    assert "compress.method=prune: model 'resnet18'" in capsys.readouterr().err
    assert not (tmp_path / "models/compressed").exists() and not (tmp_path / "metrics").exists()


@pytest.mark.integration
def test_int8_pipeline_measures_registers_and_exports(built_int8_project, tmp_path):
    root, repro = built_int8_project
    assert "Running stage 'compress'" in repro.stdout
    report = json.loads((root / "metrics/compress.json").read_text())
    assert report["method"] == "int8" and report["test_images"] == len(np.load(root / "data/prepared/test_labels.npy"))
    for row in ("float", "int8"):
        assert set(report[row]) >= {"accuracy", "size_bytes", "latency_ms_batch1", "images_per_s_batch64"}
    assert report["int8"]["size_bytes"] == (root / "models/compressed/model.onnx").stat().st_size
    assert report["float"]["size_bytes"] == (root / "models/model.safetensors").stat().st_size
    test = json.loads((root / "metrics/test.json").read_text())
    assert report["float"]["accuracy"] == pytest.approx(test["accuracy"])
    assert report["accuracy_drop_points"] < 5  # digits: a few dozen test images per class

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    float_version = client.get_model_version_by_alias("digits-lenet", "champion")
    int8_version = client.get_model_version_by_alias("digits-lenet-int8", "champion")
    assert int8_version.tags["compress.method"] == "int8"
    # Its champion rule is the float model's: test accuracy, here the int8 model's own.
    assert float(int8_version.tags["test_accuracy"]) == pytest.approx(report["int8"]["accuracy"])
    assert int8_version.run_id == float_version.run_id  # one pipeline run holds both
    logged = client.get_run(int8_version.run_id).data.metrics
    assert logged["compress/int8/accuracy"] == pytest.approx(report["int8"]["accuracy"])
    registered = json.loads((root / "models/registered.json").read_text())
    assert registered["compressed"]["model_name"] == "digits-lenet-int8"

    export = readme_command('python -m imgclf.export "models:/digits-lenet-int8@champion"')
    printed = run(export, root).stdout
    assert "its ONNX graph as registered" in printed
    assert (root / "model-int8.onnx").read_bytes() == (root / "models/compressed/model.onnx").read_bytes()

    # A re-run changes nothing: no new version of either model.
    again = run(["dvc", "repro", "--force", "--single-item", "register"], root)
    assert "already held this model" in again.stdout
    assert client.get_model_version_by_alias("digits-lenet-int8", "champion").version == int8_version.version
    assert len(client.search_model_versions("name = 'digits-lenet-int8'")) == 1
