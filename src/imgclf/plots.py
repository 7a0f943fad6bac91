"""The evaluation figures, drawn with matplotlib (no pyplot: nothing needs a display) into PNG bytes.

Each figure has a title, labelled axes and the class names, and stays readable at 100 classes (CIFAR-100):
the confusion matrix drops its cell numbers and shrinks its tick labels past 20 classes, curves are drawn
for at most 10 classes, and image grids keep a fixed size per picture.
"""

from __future__ import annotations

import io

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import ConfusionMatrixDisplay

# Past this many classes the confusion matrix shows colours only: numbers in 100 x 100 cells overlap.
MAX_ANNOTATED_CLASSES = 20


def png(fig: Figure, dpi: int = 100) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def _tick_size(n: int) -> float:
    return 10.0 if n <= MAX_ANNOTATED_CLASSES else 6.0


def confusion_figure(confusion: np.ndarray, classes: list[str], normalise: bool = False) -> Figure:
    """The confusion matrix, rows = actual; with `normalise`, each row divided by its class's test images
    (the diagonal is then the recall), as sklearn's `normalize="true"`."""
    n = len(classes)
    values = confusion.astype(float)
    if normalise:
        values = values / np.maximum(values.sum(1, keepdims=True), 1)
    # 0.5 in per class with numbers in the cells; 0.22 in per class (6 pt labels) without them.
    side = max(5.0, (0.5 if n <= MAX_ANNOTATED_CLASSES else 0.22) * n + 2.5)
    fig = Figure(figsize=(side, side), layout="constrained")
    ax = fig.subplots()
    display = ConfusionMatrixDisplay(values if normalise else confusion, display_labels=classes)
    display.plot(
        ax=ax,
        colorbar=True,
        xticks_rotation="vertical",
        include_values=n <= MAX_ANNOTATED_CLASSES,
        values_format=".2f" if normalise else "d",
        cmap="Blues",
        im_kw={"vmin": 0, "vmax": 1} if normalise else None,
    )
    ax.tick_params(labelsize=_tick_size(n))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("actual class")
    what = "normalised by actual class (rows sum to 1)" if normalise else "image counts"
    ax.set_title(f"Confusion matrix, test split: {what}")
    return fig


def per_class_figure(table: list[dict], max_rows: int = 100) -> Figure:
    """Precision, recall and F1 of each class as horizontal bars (one row per class), worst F1 at the top."""
    rows = sorted(table, key=lambda r: r["f1"])[:max_rows]
    n = len(rows)
    fig = Figure(figsize=(7.5, max(3.0, 0.16 * 3 * n / 2 + 1.5)), layout="constrained")
    ax = fig.subplots()
    y = np.arange(n)
    for i, (key, colour) in enumerate((("precision", "tab:blue"), ("recall", "tab:orange"), ("f1", "tab:green"))):
        ax.barh(y + (i - 1) * 0.27, [r[key] for r in rows], height=0.27, label=key, color=colour)
    ax.set_yticks(y, [r["class"] for r in rows], fontsize=_tick_size(n))
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("score on the test split")
    ax.set_ylabel("class (lowest F1 first)")
    ax.set_title("Precision, recall and F1 per class")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)  # beside the bars, never over them
    return fig


def curves_figure(curves: list[dict], kind: str, total_classes: int) -> Figure:
    """One-vs-rest ROC (`kind="roc"`: x fpr, y tpr) or precision-recall (`kind="pr"`: x recall, y precision)
    curves, each dict {"class", "x", "y", "auc"}; a subset when the classes are more than those drawn."""
    fig = Figure(figsize=(6.5, 5.5), layout="constrained")
    ax = fig.subplots()
    for curve in curves:
        ax.plot(curve["x"], curve["y"], linewidth=1.3, label=f"{curve['class']} (AUC {curve['auc']:.3f})")
    if kind == "roc":
        ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8, label="chance")
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate (recall)")
        name = "ROC curves"
    else:
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        name = "Precision-recall curves (AUC = average precision)"
    shown = f"the {len(curves)} of {total_classes} classes with the lowest AUC" if len(curves) < total_classes else ""
    ax.set_title(f"{name}, one class vs the rest" + (f"\n{shown}" if shown else ""))
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.legend(loc="lower right" if kind == "roc" else "lower left", fontsize=7)
    return fig


def reliability_figure(bins: dict[str, np.ndarray], ece: float) -> Figure:
    """The reliability diagram (Guo et al. 2017, fig. 1): accuracy per confidence bin against the
    diagonal of perfect calibration, and below it how many test images fall in each bin."""
    fig = Figure(figsize=(5.5, 6.5), layout="constrained")
    fig.get_layout_engine().set(h_pad=0.12)  # inches: the two panels' end ticks (1.0 and 0) apart
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    edges = bins["edges"]
    width = np.diff(edges)
    filled = bins["count"] > 0
    top.bar(
        edges[:-1][filled],
        bins["accuracy"][filled],
        width=width[filled],
        align="edge",
        edgecolor="black",
        color="tab:blue",
        label="accuracy",
    )
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    top.set_ylabel("accuracy in the bin")
    top.set_ylim(0, 1)
    top.set_title(f"Reliability diagram, test split (ECE {ece:.4f})")
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(edges[:-1], bins["count"], width=width, align="edge", edgecolor="black", color="tab:grey")
    bottom.set_xlabel("confidence (probability of the predicted class)")
    bottom.set_ylabel("images")
    bottom.set_xlim(0, 1)
    return fig


def image_grid(images: np.ndarray, captions: list[str], title: str, overlays: np.ndarray | None = None) -> Figure:
    """uint8 images (N, H, W, C) in a grid of at most 4 columns, each captioned; `overlays` (N, H, W) in 0..1
    are drawn over them as a heat map (Grad-CAM)."""
    n = len(images)
    cols = min(4, max(n, 1))
    rows = max(1, -(-n // cols))
    fig = Figure(figsize=(2.6 * cols, 2.9 * rows + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax in axes:
        ax.axis("off")
    for i, (image, caption) in enumerate(zip(images, captions)):
        gray = image.shape[-1] == 1
        axes[i].imshow(image[..., 0] if gray else image, cmap="gray" if gray else None, interpolation="nearest")
        if overlays is not None:
            axes[i].imshow(overlays[i], cmap="jet", alpha=0.45, vmin=0, vmax=1, interpolation="bilinear")
        axes[i].set_title(caption, fontsize=8)
    if n == 0:
        axes[0].text(0.5, 0.5, "none", ha="center", va="center")
    fig.suptitle(title)
    return fig


def overlay_figure(image: np.ndarray, cam: np.ndarray, caption: str) -> Figure:
    """One picture as the user gave it (uint8 (H, W, C), any size) with a Grad-CAM map (h, w) in 0..1,
    stretched over it, and the caption (class and probability) above."""
    height, width = image.shape[:2]
    scale = 4.0 / max(height, width)  # the longer side 4 in, whatever the image's size
    fig = Figure(figsize=(max(width * scale, 2.5), height * scale + 0.5), layout="constrained")
    ax = fig.subplots()
    gray = image.shape[-1] == 1
    ax.imshow(image[..., 0] if gray else image, cmap="gray" if gray else None)
    extent = (-0.5, width - 0.5, height - 0.5, -0.5)  # the map stretched over the whole picture
    ax.imshow(cam, cmap="jet", alpha=0.45, vmin=0, vmax=1, extent=extent, interpolation="bilinear")
    ax.axis("off")
    ax.set_title(caption, fontsize=11)
    return fig
