"""evaluate stage: the trained classifier on the held-out test split, scored with scikit-learn.

    python -m imgclf.evaluate --params params.yaml

Reads `train.model_dir` and `prepare.out_dir`/test_*; writes to `evaluate.metrics_dir`:
  test.json        accuracy, recall_macro, precision_macro, f1_macro, and top5_accuracy when
                   there are more than 10 classes (`dvc metrics show`)
  per_class.json   recall and precision of every class
  predictions.csv  index, actual, predicted, probability per test image (`dvc plots show`, confusion)
  confusion.png    the confusion matrix
and logs all of it to the MLflow run the train stage started.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
from matplotlib.figure import Figure
from sklearn import metrics
from sklearn.metrics import ConfusionMatrixDisplay

from imgclf.allocator import keep_freed_memory
from imgclf.config import Params, stage_params
from imgclf.devices import resolve_device
from imgclf.files import write_bytes, write_json
from imgclf.models import WEIGHTS_FILE, load_checkpoint_dir, predict_proba
from imgclf.progress import Progress
from imgclf.tracking import resume_pipeline_run


@dataclass(frozen=True)
class Report:
    metrics: dict[str, float]  # the headline numbers
    per_class: dict[str, dict[str, float]]  # class name -> {"recall": r, "precision": p}
    confusion: np.ndarray  # (classes, classes), rows = actual, columns = predicted


def report(labels: np.ndarray, probs: np.ndarray, classes: list[str]) -> Report:
    """Scores from class probabilities (N, classes); top-5 accuracy joins when there are over 10 classes."""
    everything = list(range(len(classes)))
    predicted = probs.argmax(1)
    precision, recall, _, _ = metrics.precision_recall_fscore_support(
        labels, predicted, labels=everything, average=None, zero_division=0
    )
    headline = {
        "accuracy": metrics.accuracy_score(labels, predicted),
        "recall_macro": metrics.recall_score(labels, predicted, labels=everything, average="macro", zero_division=0),
        "precision_macro": metrics.precision_score(
            labels, predicted, labels=everything, average="macro", zero_division=0
        ),
        "f1_macro": metrics.f1_score(labels, predicted, labels=everything, average="macro", zero_division=0),
    }
    if len(classes) > 10:
        headline["top5_accuracy"] = metrics.top_k_accuracy_score(labels, probs, k=5, labels=everything)
    per_class = {
        name: {"recall": round(float(r), 6), "precision": round(float(p), 6)}
        for name, r, p in zip(classes, recall, precision)
    }
    return Report(
        {k: round(float(v), 6) for k, v in headline.items()},
        per_class,
        metrics.confusion_matrix(labels, predicted, labels=everything),
    )


def predictions_csv(labels: np.ndarray, probs: np.ndarray, classes: list[str]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["index", "actual", "predicted", "probability"])
    for i, (label, row) in enumerate(zip(labels, probs)):
        best = int(row.argmax())
        writer.writerow([i, classes[label], classes[best], f"{row[best]:.6f}"])
    return buffer.getvalue().encode()


def confusion_png(confusion: np.ndarray, classes: list[str]) -> bytes:
    side = max(4.0, 0.5 * len(classes) + 2)
    fig = Figure(figsize=(side, side))  # a Figure without pyplot draws to files only, with no display
    ax = fig.subplots()
    ConfusionMatrixDisplay(confusion, display_labels=classes).plot(ax=ax, colorbar=False, xticks_rotation="vertical")
    ax.set_title("Confusion matrix (test split)")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _metric_key(name: str) -> str:
    # MLflow metric names allow letters, digits, '_', '-', '.', ' ' and '/'.
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", name)


def main(argv: list[str] | None = None) -> None:
    params: Params = stage_params(argv, __doc__)
    prepared = Path(params.prepare.out_dir)
    model, card = load_checkpoint_dir(params.train.model_dir)
    images = np.load(prepared / "test_images.npy", mmap_mode="r")
    labels = np.load(prepared / "test_labels.npy")
    device = resolve_device(params.train.device)
    keep_freed_memory()  # as train does: no fresh pages for every batch
    with Progress("evaluate", len(images), "img") as progress:
        probs = predict_proba(model.to(device), images, params.evaluate.batch_size, device, on_batch=progress.update)
    classes = list(card.classes)
    result = report(labels, probs, classes)

    out = Path(params.evaluate.metrics_dir)
    write_json(out / "test.json", result.metrics)
    write_json(out / "per_class.json", result.per_class)
    write_bytes(out / "predictions.csv", predictions_csv(labels, probs, classes))
    write_bytes(out / "confusion.png", confusion_png(result.confusion, classes))

    with resume_pipeline_run(params.mlflow.experiment_name, Path(params.train.model_dir) / WEIGHTS_FILE):
        # Grouped by prefix in the MLflow UI: the headline numbers first, the per-class ones apart.
        mlflow.log_metrics({f"test/{k}": v for k, v in result.metrics.items()})
        mlflow.log_metrics(
            {
                f"test_per_class/{kind}/{_metric_key(name)}": values[kind]
                for name, values in result.per_class.items()
                for kind in ("recall", "precision")
            }
        )
        for name in ("test.json", "per_class.json", "predictions.csv", "confusion.png"):
            mlflow.log_artifact(str(out / name), artifact_path="evaluation")
    print("evaluate: " + ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items()))


if __name__ == "__main__":
    main()
