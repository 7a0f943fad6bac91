"""What evaluate and `python -m imgclf.explain` show: Grad-CAM for every model, the error-analysis numbers,
and figures whose text never overlaps, at 10 classes and at 100."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.text import Text
from PIL import Image
from torch import nn

from conftest import REPO, card_for, project_env, readme_command, run
from imgclf import evaluate, plots
from imgclf.architectures import list_models
from imgclf.gradcam import gradcam, last_conv, seeded_sample
from imgclf.models import Classifier, build

ALL_MODELS = list_models() + ["torchvision:mobilenet_v3_small", "torchvision:resnet18"]


@pytest.mark.parametrize("name", ALL_MODELS)
def test_gradcam_works_for_every_model_in_the_registry(name):
    torch.manual_seed(0)
    model = build(card_for(name, channels=3, size=32)).eval()
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    maps = gradcam(model, images, np.array([0, 1, 2]))
    assert maps.shape == (3, 32, 32) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1 + 1e-6


def test_the_last_convolution_is_found_in_ours_and_torchvisions():
    lenet = build(card_for("lenet")).net
    assert last_conv(lenet) is lenet.conv2
    resnet = build(card_for("torchvision:resnet18")).net
    assert last_conv(resnet) is resnet.layer4[1].conv2
    fastnet = build(card_for("fastnet")).net
    assert last_conv(fastnet) is fastnet.layers[2].conv2
    with pytest.raises(ValueError, match="no convolution"):
        last_conv(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))


class Brightness(nn.Module):
    """Class 0's logit is the mean brightness of the (normalised) image, class 1's its negative: the
    evidence for class 0 is wherever the image is bright."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1, bias=False)
        nn.init.ones_(self.conv.weight)

    def forward(self, x):
        mean = self.conv(x).mean(dim=(1, 2, 3))
        return torch.stack([mean, -mean], 1)


def test_gradcam_points_where_the_evidence_is():
    model = Classifier(Brightness(), [0.5], [0.25], 2).eval()
    image = np.zeros((1, 32, 32, 1), np.uint8)
    image[0, 2:10, 20:30] = 255  # a bright patch, top right
    (cam,) = gradcam(model, image, np.array([0]))
    peak = np.unravel_index(cam.argmax(), cam.shape)
    assert 2 <= peak[0] < 10 and 20 <= peak[1] < 30
    assert cam[20:, :10].max() == 0  # nothing where the image is dark
    # Class 1 is the darkness: its map is zero on the patch.
    (other,) = gradcam(model, image, np.array([1]))
    assert other[3:9, 21:29].max() == 0 and other[20:, :10].min() > 0.9


def test_the_gradcam_sample_is_seeded_and_split_into_right_and_wrong():
    correct = np.arange(100) % 3 != 0
    right, wrong = seeded_sample(correct, 8, seed=0)
    assert correct[right].all() and not correct[wrong].any() and len(right) == len(wrong) == 8
    again = seeded_sample(correct, 8, seed=0)
    assert (again[0] == right).all() and (again[1] == wrong).all()
    assert not (seeded_sample(correct, 8, seed=1)[0] == right).all()
    assert len(seeded_sample(np.ones(5, bool), 8, seed=0)[1]) == 0  # no errors: no wrong ones


def test_expected_calibration_error():
    # Every image predicted with confidence 0.9: ECE = |accuracy - 0.9| in the one bin used.
    probs = np.tile([0.9, 0.1], (10, 1))
    labels = np.array([0] * 6 + [1] * 4)  # 60% right
    table, ece = evaluate.calibration(labels, probs)
    assert ece == pytest.approx(0.3)
    assert table["count"].sum() == 10 and table["count"].max() == 10
    perfect = np.eye(3)[[0, 1, 2, 0]]
    assert evaluate.calibration(np.array([0, 1, 2, 0]), perfect)[1] == pytest.approx(0)


def test_top_losses_are_the_confident_errors_first():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.45, 0.55], [0.01, 0.99], [0.6, 0.4]])
    labels = np.array([0, 0, 0, 0, 1])
    assert evaluate.top_losses(labels, probs, 3).tolist() == [3, 1, 4]
    assert evaluate.top_losses(labels, probs, 10).tolist() == [3, 1, 4, 2]


def test_report_has_per_class_f1_auc_and_the_roc_curves_pick_the_hardest_classes():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(12), 20)
    logits = rng.normal(size=(240, 12))
    logits[np.arange(240), labels] += np.linspace(0.2, 4, 12)[labels]  # class 0 the hardest, 11 the easiest
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    classes = [f"c{i}" for i in range(12)]
    result = evaluate.report(labels, probs, classes)
    assert set(result.per_class["c0"]) == {"recall", "precision", "f1", "roc_auc", "support"}
    assert result.per_class["c0"]["roc_auc"] < result.per_class["c11"]["roc_auc"]
    assert 0 < result.metrics["ece"] < 1 and 0.5 < result.metrics["roc_auc_macro"] <= 1
    drawn = evaluate.curves(labels, probs, classes, "roc")
    assert len(drawn) == evaluate.MAX_CURVES
    assert "c0" in {c["class"] for c in drawn} and "c11" not in {c["class"] for c in drawn}
    roc = evaluate.micro_curve_csv(labels, probs, "roc").decode().splitlines()
    assert roc[0] == "fpr,tpr" and len(roc) == evaluate.CURVE_POINTS + 1
    pr = evaluate.micro_curve_csv(labels, probs, "pr").decode().splitlines()
    assert pr[0] == "recall,precision" and float(pr[1].split(",")[1]) >= float(pr[-1].split(",")[1])


def drawn_texts(fig) -> list[Text]:
    """Every text the figure draws: its titles, and per axes its titles, texts, legend and (when the axes is
    shown) its tick labels and axis labels."""
    texts = list(fig.texts)  # the suptitle among them
    for ax in fig.axes:
        texts += [ax.title, ax._left_title, ax._right_title, *ax.texts]
        if ax.get_legend():
            texts += ax.get_legend().get_texts()
        if ax.axison:
            texts += [*ax.get_xticklabels(), *ax.get_yticklabels(), ax.xaxis.label, ax.yaxis.label]
    return [t for t in texts if t.get_visible() and t.get_text().strip()]


def overlapping_texts(fig) -> list[tuple[str, str]]:
    """Pairs of drawn texts whose boxes overlap (each box shrunk by 2% across, 10% up and down: the
    empty margins of a font's line height)."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    boxes = [(t.get_text(), t.get_window_extent(renderer).shrunk(0.98, 0.9)) for t in drawn_texts(fig)]
    return [(a, b) for (a, box_a), (b, box_b) in itertools.combinations(boxes, 2) if box_a.overlaps(box_b)]


@pytest.mark.parametrize("n", [10, 100])
def test_figures_have_no_overlapping_text(n):
    rng = np.random.default_rng(0)
    classes = [f"class_{i:03d}" for i in range(n)]  # as long as CIFAR-100's longest names (sweet_pepper)
    labels = np.repeat(np.arange(n), 5)
    logits = rng.normal(size=(len(labels), n))
    logits[np.arange(len(labels)), labels] += 2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    result = evaluate.report(labels, probs, classes)
    table, ece = evaluate.calibration(labels, probs)
    images = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    captions = [evaluate._caption(i, labels, probs, classes) for i in range(16)]
    figures = {
        "confusion": plots.confusion_figure(result.confusion, classes),
        "confusion normalised": plots.confusion_figure(result.confusion, classes, normalise=True),
        "per class": plots.per_class_figure(evaluate.per_class_rows(result)),
        "roc": plots.curves_figure(evaluate.curves(labels, probs, classes, "roc"), "roc", n),
        "pr": plots.curves_figure(evaluate.curves(labels, probs, classes, "pr"), "pr", n),
        "reliability": plots.reliability_figure(table, ece),
        "grid": plots.image_grid(images, captions, "Top losses", overlays=rng.random((16, 32, 32))),
    }
    for name, fig in figures.items():
        assert fig.axes[0].get_title(), name
        assert not overlapping_texts(fig), (name, overlapping_texts(fig)[:5])
    ticks = [t.get_text() for t in figures["confusion"].axes[0].get_yticklabels()]
    assert ticks == classes  # every class named
    assert figures["confusion"].axes[0].get_xlabel() == "predicted class"


def test_overlapping_texts_is_not_blind():
    """The check above finds overlaps where there are some (a test that cannot fail is a defect)."""
    fig = plots.curves_figure([], "roc", 1)
    fig.axes[0].text(0.5, 0.5, "one label", transform=fig.axes[0].transAxes)
    fig.axes[0].text(0.51, 0.5, "another label", transform=fig.axes[0].transAxes)
    assert overlapping_texts(fig)


@pytest.mark.integration
def test_readme_explain_writes_an_overlay_per_image(built_project, tmp_path):
    root, _ = built_project
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    for i, side in enumerate((8, 64, 300)):  # smaller, larger and much larger than the model's 32 pixels
        Image.open(REPO / "examples/digit-3.png").resize((side, side)).save(photos / f"three-{i}.png")
    Image.open(REPO / "examples/digit-3.png").convert("RGB").save(photos / "sub" / "three.jpg")
    out = tmp_path / "explained"
    command = readme_command("python -m imgclf.explain").replace("--out explained/", f"--out {out}")
    proc = run(command, root)  # the README's own image
    assert proc.stdout.count("explain: digit-3.png: 3 (") == 1, proc.stdout
    assert Image.open(out / "digit-3.png.png").format == "PNG"

    command = [sys.executable, "-m", "imgclf.explain", "models:/digits-lenet@champion", str(photos), "--out", str(out)]
    proc = run(command, root)
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert written == ["digit-3.png.png", "sub/three.jpg.png", "three-0.png.png", "three-1.png.png", "three-2.png.png"]
    assert "4 of 4 files explained" in proc.stdout
    assert Image.open(out / "three-2.png.png").size[0] > Image.open(out / "three-0.png.png").size[0] / 2


@pytest.mark.integration
@pytest.mark.parametrize(
    "uri, source, message",
    [
        ("models:/digits-lenet@champion", "notes.txt", "notes.txt: not an image file Pillow can read"),
        ("models:/digits-lenet@champion", "nowhere", "nowhere: no such file or folder"),
        ("models:/no-such-model@champion", "digit-3.png", "cannot load models:/no-such-model@champion"),
        ("models:/digits-lenet/99", "digit-3.png", "cannot load models:/digits-lenet/99"),
    ],
)
def test_explain_says_what_is_wrong(built_project, tmp_path, uri, source, message):
    root, _ = built_project
    (tmp_path / "notes.txt").write_text("not a picture")
    (tmp_path / "digit-3.png").write_bytes((REPO / "examples/digit-3.png").read_bytes())
    proc = subprocess.run(
        [sys.executable, "-m", "imgclf.explain", uri, str(tmp_path / source), "--out", str(tmp_path / "out")],
        cwd=root,
        capture_output=True,
        text=True,
        env=project_env(),
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: ") and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_the_stage_writes_what_dvc_yaml_declares():
    """evaluate's figures folder holds every picture and CSV file the plots section names."""
    import yaml

    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    declared = json.dumps(dvc["plots"])
    for names in evaluate.ARTIFACT_FOLDERS.values():
        for name in names:
            if name.endswith(".png") and name not in evaluate.METRIC_FILES:
                assert f"${{evaluate.plots_dir}}/{name}" in declared, name


@pytest.mark.integration
def test_readme_figures_script_makes_the_readmes_small_pictures(built_project, tmp_path):
    root, _ = built_project
    out = tmp_path / "figures"
    command = readme_command("python docs/figures.py").replace("--out docs/figures", f"--out {out}")
    run(command, root)
    made = sorted(p.name for p in out.iterdir())
    committed = sorted(p.name for p in (REPO / "docs/figures").iterdir())
    assert made == committed and len(made) == 4
    readme = (REPO / "README.md").read_text()
    for name in made:
        assert f"(docs/figures/{name})" in readme, name
        assert (out / name).stat().st_size < 120_000 and (REPO / "docs/figures" / name).stat().st_size < 120_000
        assert Image.open(out / name).width <= 560
    proc = run([sys.executable, "docs/figures.py", "--from", str(tmp_path / "nothing")], root, check=False)
    assert proc.returncode == 1 and "run `dvc repro` first" in proc.stderr
