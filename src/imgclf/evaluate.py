"""evaluate stage: the trained classifier on the held-out test split, scored with scikit-learn, and
explained: where it errs, how well calibrated it is, and where in the images it looks (Grad-CAM).

    python -m imgclf.evaluate --params params.yaml

Reads `train.model_dir` and `prepare.out_dir`/test_*; writes to `evaluate.metrics_dir`:
  test.json        accuracy, recall_macro, precision_macro, f1_macro, roc_auc_macro (one class vs the
                   rest), ece (expected calibration error), and top5_accuracy when there are more than 10
                   classes (`dvc metrics show`)
  per_class.json   recall, precision, F1 and ROC AUC of every class
  predictions.csv  index, actual, predicted, probability per test image
  confusion.png    the confusion matrix (image counts)
and to `evaluate.plots_dir` (`dvc plots show` draws the CSV files and shows the pictures):
  confusion_normalized.png      the confusion matrix, each row divided by its class's images
  per_class.csv, per_class.png  precision, recall, F1 and support per class
  roc.png, pr.png               per-class ROC and precision-recall curves with their AUC (at most 10 classes:
                                those with the lowest ROC AUC when there are more)
  roc.csv, pr.csv               the micro-averaged ROC and precision-recall curves (all classes pooled)
  calibration.csv, reliability.png  accuracy per confidence bin, and the reliability diagram
  top_losses.png                the most confidently misclassified test images
  gradcam_correct.png, gradcam_wrong.png  Grad-CAM maps of a fixed, seeded sample of test images
and logs all of it to the MLflow run the train stage started (folders evaluation/, evaluation/curves/,
evaluation/errors/ and gradcam/; the per-class table also as an MLflow table), tagged with the hash of
the weights it scored (tracking.EVALUATED_TAG: register admits only weights evaluated so).
"""

from __future__ import annotations

import csv
import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from sklearn import metrics

from imgclf import plots
from imgclf.allocator import keep_freed_memory
from imgclf.config import EvaluateConfig, Params, stage_params
from imgclf.devices import resolve_device
from imgclf.failures import run_stage
from imgclf.files import write_bytes, write_json
from imgclf.gradcam import gradcam, seeded_sample
from imgclf.integrity import nonfinite, nonfinite_message
from imgclf.models import WEIGHTS_FILE, Classifier, load_checkpoint_dir, predict_proba
from imgclf.progress import Progress
from imgclf.tracking import EVALUATED_TAG, resume_pipeline_run, sha256_file

MAX_CURVES = 10  # classes drawn in the ROC and PR figures
CALIBRATION_BINS = 15  # equal-width confidence bins, as Guo et al. 2017 ("On Calibration of Modern Neural Networks")
CURVE_POINTS = 101  # points of the micro-averaged curves DVC draws (resampled on a fixed grid)


@dataclass(frozen=True)
class Report:
    metrics: dict[str, float]  # the headline numbers
    per_class: dict[str, dict[str, float]]  # class name -> {"recall", "precision", "f1", "roc_auc", "support"}
    confusion: np.ndarray  # (classes, classes), rows = actual, columns = predicted


def report(labels: np.ndarray, probs: np.ndarray, classes: list[str]) -> Report:
    """Scores from class probabilities (N, classes); top-5 accuracy joins when there are over 10 classes."""
    everything = list(range(len(classes)))
    predicted = probs.argmax(1)
    precision, recall, f1, support = metrics.precision_recall_fscore_support(
        labels, predicted, labels=everything, average=None, zero_division=0
    )
    auc = roc_auc_per_class(labels, probs)
    headline = {
        "accuracy": metrics.accuracy_score(labels, predicted),
        "recall_macro": metrics.recall_score(labels, predicted, labels=everything, average="macro", zero_division=0),
        "precision_macro": metrics.precision_score(
            labels, predicted, labels=everything, average="macro", zero_division=0
        ),
        "f1_macro": metrics.f1_score(labels, predicted, labels=everything, average="macro", zero_division=0),
        "roc_auc_macro": float(np.nanmean(auc)) if not np.isnan(auc).all() else float("nan"),
        "ece": calibration(labels, probs)[1],
    }
    if len(classes) > 10:
        headline["top5_accuracy"] = metrics.top_k_accuracy_score(labels, probs, k=5, labels=everything)
    per_class = {
        name: {
            "recall": round(float(r), 6),
            "precision": round(float(p), 6),
            "f1": round(float(f), 6),
            "roc_auc": None if np.isnan(a) else round(float(a), 6),
            "support": int(s),
        }
        for name, r, p, f, a, s in zip(classes, recall, precision, f1, auc, support)
    }
    return Report(
        {k: round(float(v), 6) for k, v in headline.items()},
        per_class,
        metrics.confusion_matrix(labels, predicted, labels=everything),
    )


def roc_auc_per_class(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """ROC AUC of each class against the rest; NaN for a class with no test image (or only those)."""
    out = np.full(probs.shape[1], np.nan)
    for k in range(probs.shape[1]):
        positive = labels == k
        if 0 < positive.sum() < len(labels):
            out[k] = metrics.roc_auc_score(positive, probs[:, k])
    return out


def calibration(labels: np.ndarray, probs: np.ndarray, bins: int = CALIBRATION_BINS) -> tuple[dict, float]:
    """Per equal-width bin of confidence (the predicted class's probability): edges, mean confidence,
    accuracy and count; and the expected calibration error, sum over bins of count/N * |accuracy - confidence|."""
    confidence = probs.max(1)
    correct = probs.argmax(1) == labels
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.bincount(which, weights=correct, minlength=bins) / count
        mean_confidence = np.bincount(which, weights=confidence, minlength=bins) / count
    filled = count > 0
    ece = float(np.sum(count[filled] / max(len(labels), 1) * np.abs(accuracy[filled] - mean_confidence[filled])))
    table = {
        "edges": edges,
        "confidence": np.where(filled, mean_confidence, 0),
        "accuracy": np.where(filled, accuracy, 0),
        "count": count,
    }
    return table, ece


def curves(labels: np.ndarray, probs: np.ndarray, classes: list[str], kind: str, limit: int = MAX_CURVES) -> list:
    """One-vs-rest ROC (`kind="roc"`) or precision-recall curves, for every class up to `limit` classes,
    else for the `limit` with the lowest ROC AUC."""
    order = list(range(len(classes)))
    if len(classes) > limit:
        order = list(np.argsort(np.nan_to_num(roc_auc_per_class(labels, probs), nan=-1.0))[:limit])
    out = []
    for k in order:
        positive = labels == k
        if not 0 < positive.sum() < len(labels):
            continue
        if kind == "roc":
            x, y, _ = metrics.roc_curve(positive, probs[:, k])
            auc = metrics.auc(x, y)
        else:
            y, x, _ = metrics.precision_recall_curve(positive, probs[:, k])
            auc = metrics.average_precision_score(positive, probs[:, k])
        out.append({"class": classes[k], "x": x, "y": y, "auc": float(auc)})
    return out


def micro_curve_csv(labels: np.ndarray, probs: np.ndarray, kind: str, points: int = CURVE_POINTS) -> bytes:
    """The micro-averaged curve (every image and class as one binary decision), resampled at `points`
    evenly spaced false positive rates (ROC) or recalls (PR), so that the file stays small at 100 classes."""
    truth = (labels[:, None] == np.arange(probs.shape[1])).ravel()
    grid = np.linspace(0, 1, points)
    if kind == "roc":
        fpr, tpr, _ = metrics.roc_curve(truth, probs.ravel())
        rows, header = zip(grid, np.interp(grid, fpr, tpr)), ["fpr", "tpr"]
    else:
        precision, recall, _ = metrics.precision_recall_curve(truth, probs.ravel())
        # recall falls along sklearn's arrays; the best precision at a recall at least as high (interpolated)
        best = np.maximum.accumulate(precision[::-1])[::-1]
        rows, header = zip(grid, np.interp(grid, recall[::-1], best[::-1])), ["recall", "precision"]
    return _csv(header, ([f"{a:.4f}", f"{b:.6f}"] for a, b in rows))


def _csv(header: list[str], rows) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue().encode()


def predictions_csv(labels: np.ndarray, probs: np.ndarray, classes: list[str]) -> bytes:
    rows = []
    for i, (label, row) in enumerate(zip(labels, probs)):
        best = int(row.argmax())
        rows.append([i, classes[label], classes[best], f"{row[best]:.6f}"])
    return _csv(["index", "actual", "predicted", "probability"], rows)


def per_class_rows(result: Report) -> list[dict]:
    return [{"class": name, **values} for name, values in result.per_class.items()]


def top_losses(labels: np.ndarray, probs: np.ndarray, count: int) -> np.ndarray:
    """Indices of the misclassified images with the highest loss (-log p(actual class)), highest first:
    fastai's "top losses", the errors the model was surest of."""
    wrong = np.flatnonzero(probs.argmax(1) != labels)
    loss = -np.log(np.clip(probs[wrong, labels[wrong]], 1e-12, None))
    return wrong[np.argsort(-loss, kind="stable")[:count]]


def _caption(i: int, labels: np.ndarray, probs: np.ndarray, classes: list[str]) -> str:
    best = int(probs[i].argmax())
    actual = classes[labels[i]]
    return f"#{i} actual {actual} ({probs[i, labels[i]]:.2f})\npredicted {classes[best]} ({probs[i, best]:.2f})"


def figures(
    model: Classifier,
    images: np.ndarray,
    labels: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    result: Report,
    cfg: EvaluateConfig,
) -> dict[str, bytes]:
    """Every picture and plot file of `evaluate.plots_dir`, by file name."""
    table, ece = calibration(labels, probs)
    rows = per_class_rows(result)
    out = {
        "confusion_normalized.png": plots.png(plots.confusion_figure(result.confusion, classes, normalise=True)),
        "per_class.csv": _csv(
            ["class", "precision", "recall", "f1", "roc_auc", "support"],
            ([r["class"], r["precision"], r["recall"], r["f1"], r["roc_auc"], r["support"]] for r in rows),
        ),
        "per_class.png": plots.png(plots.per_class_figure(rows)),
        "roc.png": plots.png(plots.curves_figure(curves(labels, probs, classes, "roc"), "roc", len(classes))),
        "pr.png": plots.png(plots.curves_figure(curves(labels, probs, classes, "pr"), "pr", len(classes))),
        "roc.csv": micro_curve_csv(labels, probs, "roc"),
        "pr.csv": micro_curve_csv(labels, probs, "pr"),
        "calibration.csv": _csv(
            ["bin_low", "bin_high", "confidence", "accuracy", "count"],
            (
                [f"{lo:.4f}", f"{hi:.4f}", f"{c:.6f}", f"{a:.6f}", int(n)]
                for lo, hi, c, a, n in zip(
                    table["edges"][:-1], table["edges"][1:], table["confidence"], table["accuracy"], table["count"]
                )
            ),
        ),
        "reliability.png": plots.png(plots.reliability_figure(table, ece)),
    }
    worst = top_losses(labels, probs, cfg.top_losses)
    out["top_losses.png"] = plots.png(
        plots.image_grid(
            np.asarray(images[worst]),
            [_caption(i, labels, probs, classes) for i in worst],
            f"Top losses: the {len(worst)} most confidently misclassified test images (probabilities in brackets)",
        )
    )
    right, wrong = seeded_sample(probs.argmax(1) == labels, cfg.gradcam_images, cfg.seed)
    for name, picked in (("correct", right), ("wrong", wrong)):
        sample = np.asarray(images[picked])
        # The map of the predicted class: what made the model say what it said.
        maps = gradcam(model, sample, probs[picked].argmax(1))
        out[f"gradcam_{name}.png"] = plots.png(
            plots.image_grid(
                sample,
                [_caption(i, labels, probs, classes) for i in picked],
                f"Grad-CAM of the predicted class: {len(picked)} {name}ly classified test images (seed {cfg.seed})",
                overlays=maps,
            )
        )
    return out


METRIC_FILES = ("test.json", "per_class.json", "predictions.csv", "confusion.png")  # in evaluate.metrics_dir
# The MLflow artifact folder of each file.
ARTIFACT_FOLDERS = {
    "evaluation": (
        "test.json",
        "per_class.json",
        "predictions.csv",
        "confusion.png",
        "confusion_normalized.png",
        "per_class.csv",
        "per_class.png",
    ),
    "evaluation/curves": ("roc.png", "pr.png", "roc.csv", "pr.csv", "calibration.csv", "reliability.png"),
    "evaluation/errors": ("top_losses.png",),
    "gradcam": ("gradcam_correct.png", "gradcam_wrong.png"),
}


def _metric_key(name: str) -> str:
    # MLflow metric names allow letters, digits, '_', '-', '.', ' ' and '/'.
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", name)


def main(argv: list[str] | None = None) -> None:
    params: Params = stage_params(argv, __doc__)
    cfg = params.evaluate
    prepared = Path(params.prepare.out_dir)
    scored = sha256_file(Path(params.train.model_dir) / WEIGHTS_FILE)  # (hashed before loading them)
    model, card = load_checkpoint_dir(params.train.model_dir)
    if bad := nonfinite(model.state_dict()):  # NaN scores would only fail later, in scikit-learn
        raise SystemExit(
            f"error: evaluate: {nonfinite_message(bad, f'the weights in {Path(params.train.model_dir) / WEIGHTS_FILE}')}"
            ": retrain (dvc repro -f train)"
        )
    images = np.load(prepared / "test_images.npy", mmap_mode="r")
    labels = np.load(prepared / "test_labels.npy")
    device = resolve_device(params.train.device)
    keep_freed_memory()  # as train does: no fresh pages for every batch
    model = model.to(device)
    with Progress("evaluate", len(images), "img") as progress:
        probs = predict_proba(model, images, cfg.batch_size, device, on_batch=progress.update)
    classes = list(card.classes)
    result = report(labels, probs, classes)

    out, plot_dir = Path(cfg.metrics_dir), Path(cfg.plots_dir)
    write_json(out / "test.json", result.metrics)
    write_json(out / "per_class.json", result.per_class)
    write_bytes(out / "predictions.csv", predictions_csv(labels, probs, classes))
    write_bytes(out / "confusion.png", plots.png(plots.confusion_figure(result.confusion, classes)))
    print("evaluate: drawing the figures and Grad-CAM maps")
    for name, data in figures(model, images, labels, probs, classes, result, cfg).items():
        write_bytes(plot_dir / name, data)

    with resume_pipeline_run(params.mlflow.experiment_name, Path(params.train.model_dir) / WEIGHTS_FILE):
        # Grouped by prefix in the MLflow UI: the headline numbers first, the per-class ones apart.
        mlflow.log_metrics({f"test/{k}": v for k, v in result.metrics.items()})
        mlflow.log_metrics(
            {
                f"test_per_class/{kind}/{_metric_key(name)}": values[kind]
                for name, values in result.per_class.items()
                for kind in ("recall", "precision", "f1", "roc_auc")
                if values[kind] is not None
            }
        )
        mlflow.set_tag(EVALUATED_TAG, scored)  # after the metrics: a kill between leaves the old hash
        for folder, names in ARTIFACT_FOLDERS.items():
            for name in names:
                source = (out if name in METRIC_FILES else plot_dir) / name
                mlflow.log_artifact(str(source), artifact_path=folder)
        with warnings.catch_warnings():  # MLflow's own pandas call, deprecated in pandas 3
            warnings.filterwarnings("ignore", message="For backward compatibility, 'str' dtypes")
            mlflow.log_table(pd.DataFrame(per_class_rows(result)), artifact_file="evaluation/per_class_table.json")
    print("evaluate: " + ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items()))


if __name__ == "__main__":
    run_stage(main)  # a failing store or disk: one line, not a traceback (IMGCLF_DEBUG=1 shows it)
