"""compress stage: a smaller, faster copy of the trained classifier, measured side by side with it.

    python -m imgclf.compress --params params.yaml

Reads `train.model_dir` (checkpoint) and `prepare.out_dir`; writes `compress.model_dir` (COMPRESSED_FILE,
and the compressed model as an ONNX graph, GRAPH_FILE) and `compress.metrics_dir`/compress.json; logs the
figures to the MLflow run the train stage started. `compress.method`:
  none   nothing is done (the stage writes two small files and loads no model);
  int8   static post-training quantization by onnxruntime (QDQ format, int8 weights per output channel,
         uint8 activations) of the project's ONNX export, calibrated on `compress.calibration_images`
         training images drawn with `compress.seed`;
  prune  structured channel pruning (imgclf.prune): the `compress.prune_amount` share of the inner
         channels with the smallest L1 norm are cut out, so the network itself shrinks, then
         `compress.finetune_epochs` epochs of fine-tuning; exported to ONNX as it is (float).
For the float model and the compressed one, compress.json holds the test accuracy, the size on disk
(bytes), and the CPU latency: median ms per image at batch 1, and images/s at batch 64 (median of
batches), timed in this one process on the same test images, the two models taking turns.
The register stage registers the compressed model as `<name>-int8` (or `<name>-pruned`), served by the
same code (imgclf.serving) with onnxruntime in place of PyTorch.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import mlflow
import numpy as np
import onnx
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)

from imgclf.card import ModelCard
from imgclf.config import CompressConfig, Params, stage_params
from imgclf.export import METADATA, add_metadata, nchw, to_onnx
from imgclf.files import write_bytes, write_json
from imgclf.models import WEIGHTS_FILE, Classifier, load_checkpoint_dir, predict_proba
from imgclf.onnx_model import COMPRESSED_FILE, GRAPH_FILE, OnnxClassifier
from imgclf.prune import PruneError, prune_and_finetune
from imgclf.tracking import resume_pipeline_run

METRICS_FILE = "compress.json"
# The layers whose weights int8 quantization is for: onnxruntime leaves the others (pooling, GELU,
# normalisation) in float between a DequantizeLinear and a QuantizeLinear, or fuses them.
WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")
CALIBRATION_BATCH = 32
TIMED_SINGLE = 200  # batch-1 calls per model
TIMED_BATCHES = 20  # batch-64 calls per model
BATCH = 64


class CompressError(ValueError):
    """A model this method cannot compress; the message names the layer or the setting."""


class _Batches(CalibrationDataReader):
    def __init__(self, images: np.ndarray) -> None:
        self.batches = iter(
            [nchw(images[i : i + CALIBRATION_BATCH]).numpy() for i in range(0, len(images), CALIBRATION_BATCH)]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {"images": batch}


def calibration_sample(images: np.ndarray, count: int, seed: int) -> np.ndarray:
    """`count` training images drawn without replacement with `seed` (all of them when fewer)."""
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(len(images), size=min(count, len(images)), replace=False))
    return np.asarray(images[chosen])


def quantize_int8(model: Classifier, card: ModelCard, calibration: np.ndarray) -> bytes:
    """The classifier's ONNX graph, statically quantized to int8 by onnxruntime, calibrated on uint8
    (N, H, W, C) images. CompressError names a layer whose weights stayed in float."""
    graph = to_onnx(model, card, nchw(calibration[:2]))
    with tempfile.TemporaryDirectory() as tmp:
        source, prepared, out = (Path(tmp) / name for name in ("float.onnx", "prepared.onnx", "int8.onnx"))
        source.write_bytes(graph)
        # onnxruntime's tools leave temporary files in the working directory: keep them in tmp.
        with contextlib.chdir(tmp):
            # Shape inference and graph fusions first, as onnxruntime's quantization guide asks. Its symbolic
            # shape inference gives up on some graphs (test-time shifts: a reflect pad, then slices); ONNX's
            # own shape inference is enough for those.
            try:
                quant_pre_process(str(source), str(prepared))
            except Exception:
                quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
            # The probabilities stay in float: quantized, they would come in steps of 1/255.
            softmax = [n.name for n in onnx.load(str(prepared)).graph.node if n.op_type == "Softmax"]
            try:
                quantize_static(
                    str(prepared),
                    str(out),
                    _Batches(calibration),
                    quant_format=QuantFormat.QDQ,
                    per_channel=True,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax,
                    nodes_to_exclude=softmax,
                )
            except Exception as exc:  # the quantizer's own errors name the node
                raise CompressError(f"onnxruntime's quantizer failed: {type(exc).__name__}: {exc}") from None
        quantized = onnx.load(str(out))
    float_layers = unquantized_layers(quantized)
    if float_layers:
        raise CompressError(
            f"onnxruntime's quantizer left the weights of {', '.join(float_layers[:5])} in float: this "
            "model cannot be quantized to int8 (set compress.method to none or prune)"
        )
    if {p.key for p in quantized.metadata_props} != set(METADATA):
        del quantized.metadata_props[:]
        add_metadata(quantized, card)
    return quantized.SerializeToString()


def unquantized_layers(graph: onnx.ModelProto) -> list[str]:
    """Nodes of WEIGHTED_OPS whose weight (second input) does not come out of a DequantizeLinear."""
    dequantized = {out for node in graph.graph.node if node.op_type == "DequantizeLinear" for out in node.output}
    return [
        f"{node.name or node.output[0]} ({node.op_type})"
        for node in graph.graph.node
        if node.op_type in WEIGHTED_OPS and len(node.input) > 1 and node.input[1] not in dequantized
    ]


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float((probs.argmax(1) == labels).mean()) if len(labels) else float("nan")


def timings(
    runners: dict[str, Callable[[np.ndarray], object]],
    images: np.ndarray,
    single: int = TIMED_SINGLE,
    batches: int = TIMED_BATCHES,
) -> dict[str, dict[str, float]]:
    """Median ms per image at batch 1 (`single` calls) and images/s at batch BATCH (median of `batches`
    calls) for each runner, the runners taking turns call by call (a machine that slows down slows them
    all alike)."""
    for run in runners.values():  # warm up: first calls allocate and pick kernels
        run(images[:1])
        run(images[:BATCH])
    one_image = {name: [] for name in runners}
    per_image = {name: [] for name in runners}
    for i in range(single):
        one = images[i % len(images) :][:1]
        for name, run in runners.items():
            start = time.perf_counter()
            run(one)
            one_image[name].append(time.perf_counter() - start)
    for i in range(batches):
        start_index = (i * BATCH) % max(1, len(images) - BATCH + 1)
        batch = images[start_index : start_index + BATCH]
        for name, run in runners.items():
            start = time.perf_counter()
            run(batch)
            per_image[name].append((time.perf_counter() - start) / len(batch))
    return {
        name: {
            "latency_ms_batch1": float(np.median(one_image[name]) * 1000),
            "latency_ms_batch1_p90": float(np.percentile(one_image[name], 90) * 1000),
            f"images_per_s_batch{BATCH}": float(1 / np.median(per_image[name])),
        }
        for name in runners
    }


def compare(
    model: Classifier, weights_bytes: int, compressed: OnnxClassifier, graph_bytes: int, test: tuple, method: str
) -> dict:
    """compress.json: the float model (PyTorch, as served) and the compressed one (onnxruntime) on the
    same test images, in this process."""
    images, labels = test
    images = np.asarray(images)
    float_probs = predict_proba(model, images)
    compressed_probs = compressed.predict_proba(images)
    clock = timings({"float": lambda x: predict_proba(model, x), method: compressed.predict_proba}, images)
    rows = {
        "float": {"accuracy": accuracy(float_probs, labels), "size_bytes": weights_bytes, **clock["float"]},
        method: {"accuracy": accuracy(compressed_probs, labels), "size_bytes": graph_bytes, **clock[method]},
    }
    return {
        "method": method,
        **rows,
        "size_ratio": graph_bytes / weights_bytes,
        "accuracy_drop_points": 100 * (rows["float"]["accuracy"] - rows[method]["accuracy"]),
        "speedup_batch1": rows["float"]["latency_ms_batch1"] / rows[method]["latency_ms_batch1"],
        "agreement": float((float_probs.argmax(1) == compressed_probs.argmax(1)).mean()) if len(labels) else 1.0,
        "test_images": len(labels),
        "threads": torch.get_num_threads(),
    }


def compress(model: Classifier, card: ModelCard, cfg: CompressConfig, train: tuple, val: tuple) -> bytes:
    """The compressed model as an ONNX graph (int8, or the pruned network in float)."""
    if cfg.method == "int8":
        return quantize_int8(model, card, calibration_sample(train[0], cfg.calibration_images, cfg.seed))
    try:
        pruned = prune_and_finetune(model, card, cfg, train)
    except PruneError as exc:
        raise CompressError(str(exc)) from None
    return to_onnx(pruned, card, nchw(np.asarray(val[0][:2])))


def load(prepared: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    return np.load(prepared / f"{split}_images.npy", mmap_mode="r"), np.load(prepared / f"{split}_labels.npy")


def main(argv: list[str] | None = None) -> None:
    params: Params = stage_params(argv, __doc__)
    cfg = params.compress
    out = Path(cfg.model_dir)
    metrics_file = Path(cfg.metrics_dir) / METRICS_FILE
    shutil.rmtree(out, ignore_errors=True)
    if cfg.method == "none":
        write_json(out / COMPRESSED_FILE, {"method": "none"})
        write_json(metrics_file, {"method": "none"})
        print("compress: method none, nothing to do")
        return
    model, card = load_checkpoint_dir(params.train.model_dir)
    prepared = Path(params.prepare.out_dir)
    train, val, test = (load(prepared, split) for split in ("train", "val", "test"))
    print(f"compress: {cfg.method} of {card.model} ({params.train.model_dir})")
    try:
        graph = compress(model, card, cfg, train, val)
    except CompressError as exc:
        print(f"error: compress.method={cfg.method}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    compressed = OnnxClassifier(graph, card.num_classes, threads=torch.get_num_threads())
    val_accuracy = accuracy(compressed.predict_proba(np.asarray(val[0])), val[1])
    weights = Path(params.train.model_dir) / WEIGHTS_FILE
    print("compress: measuring both models on the test images")
    result = compare(model, weights.stat().st_size, compressed, len(graph), test, cfg.method)
    write_bytes(out / GRAPH_FILE, graph)
    # register's record: the champion rule compares test accuracy, as for the float model (evaluate's).
    record = {"method": cfg.method, "val_accuracy": val_accuracy, "test_accuracy": result[cfg.method]["accuracy"]}
    write_json(out / COMPRESSED_FILE, record)
    write_json(metrics_file, result)
    with resume_pipeline_run(params.mlflow.experiment_name, weights):
        mlflow.log_metrics(
            {f"compress/{row}/{key}": value for row in ("float", cfg.method) for key, value in result[row].items()}
            | {f"compress/{key}": result[key] for key in ("size_ratio", "accuracy_drop_points", "speedup_batch1")}
            | {f"compress/{cfg.method}/val_accuracy": val_accuracy}
        )
        mlflow.log_artifact(str(metrics_file), artifact_path="compress")
    f, c = result["float"], result[cfg.method]
    print(
        f"compress: {cfg.method}: accuracy {c['accuracy']:.4f} (float {f['accuracy']:.4f}), size "
        f"{c['size_bytes']:,} B ({result['size_ratio']:.2f}x), batch 1 {c['latency_ms_batch1']:.3f} ms "
        f"(float {f['latency_ms_batch1']:.3f}), batch {BATCH} {c[f'images_per_s_batch{BATCH}']:,.0f} images/s "
        f"(float {f[f'images_per_s_batch{BATCH}']:,.0f})"
    )


if __name__ == "__main__":
    main()
