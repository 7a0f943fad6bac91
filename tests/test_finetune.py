"""Fine-tuning the real ImageNet weights of ../shared/weights (or the folder IMGCLF_WEIGHTS names) on the
CIFAR-10 slice of ../shared/datasets: the README's commands, briefly. They skip when the files are absent
(a plain clone has no ../shared)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import DATASETS, REPO, fresh_copy, readme_command, run

WEIGHTS = Path(
    os.environ.get("IMGCLF_WEIGHTS", REPO.parent / "shared" / "weights" / "mobilenet_v2-imagenet.safetensors")
)
MINI = DATASETS / "cifar10-jpg-mini.tar.gz"


def need_shared_files() -> None:
    for path, variable in ((WEIGHTS, "IMGCLF_WEIGHTS to the weights file"), (MINI, "IMGCLF_DATASETS to its folder")):
        if not path.is_file():
            pytest.skip(f"{path} is absent (set {variable})")


@pytest.mark.integration
def test_readme_finetune_command_fine_tunes_torchvisions_default_weights(tmp_path):
    """`train.pretrained: DEFAULT` through torch's cache: the real weights put where the offline error
    says (as torchvision's file for mobilenet_v2's DEFAULT weights), then the README's command, for 2
    epochs (one of them frozen)."""
    need_shared_files()
    from torchvision.models import MobileNet_V2_Weights

    from imgclf.models import cached_weights_file

    torch_home = tmp_path / "torch"
    cached = cached_weights_file(MobileNet_V2_Weights.DEFAULT.url).name
    (torch_home / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(load_file(str(WEIGHTS)), torch_home / "hub" / "checkpoints" / cached)
    root = fresh_copy(tmp_path / "project")
    command = readme_command("dvc exp run -S train.preset=finetune").replace(
        "../shared/datasets/cifar10-jpg-mini.tar.gz", str(MINI)
    )
    proc = run(command + " -S train.epochs=2", root, TORCH_HOME=str(torch_home))
    assert "Overriding: train.epochs = 2 (preset finetune: " in proc.stdout
    card = json.loads((root / "models/model.json").read_text())
    assert card["model"] == "torchvision:mobilenet_v2" and card["image_size"] == 96
    assert card["mean"] == [0.485, 0.456, 0.406]  # ImageNet's normalisation, for ImageNet's weights
    accuracy = json.loads((root / "metrics/test.json").read_text())["accuracy"]
    assert accuracy > 0.35  # 10 classes, 850 images, 2 epochs: far above chance (from scratch: 10-20%)


def test_readme_finetune_bench_prints_its_table():
    need_shared_files()
    command = readme_command("python bench/finetune.py")
    proc = run(f"{command} --seeds 1 --epochs 2 --archive {MINI} --weights {WEIGHTS}", REPO, timeout=1800)
    lines = proc.stdout.splitlines()
    (tuned,) = [line for line in lines if line.startswith(f"  fine-tuned from {WEIGHTS.name}")]
    (plain,) = [line for line in lines if line.startswith("  plain fine-tuning (6 epochs, flips and shifts)")]
    (scratch,) = [line for line in lines if line.startswith("  from scratch (random weights)")]
    rows = {"tuned": tuned, "plain": plain, "scratch": scratch}
    mean = {name: float(row.split()[-5].rstrip("%")) / 100 for name, row in rows.items()}
    assert mean["tuned"] > 0.35 and mean["tuned"] > mean["scratch"] + 0.1
    assert mean["plain"] > mean["scratch"]  # the same weights, fine-tuned plainly: still above random weights


def test_readme_photo_sized_finetune_bench_runs_on_a_class_subset():
    """The README's second fine-tuning bench (5 classes of the PNG copy), with 12 training images a class,
    1 epoch and 64 px instead of 128 (its 5,000 test images are scored in every arm): the subset is cut,
    prepared and trained in all three arms."""
    png = DATASETS / "cifar10-png.tar.gz"
    if not (png.is_file() and WEIGHTS.is_file()):
        pytest.skip(f"{png} or {WEIGHTS} is absent (set IMGCLF_DATASETS and IMGCLF_WEIGHTS)")
    command = readme_command("python bench/finetune.py --archive").replace(
        "../shared/datasets/cifar10-png.tar.gz", str(png)
    )
    quick = "--per-class 12 --epochs 1 --seeds 1 --image-size 64"
    proc = run(f"{command} {quick} --weights {WEIGHTS}", REPO, timeout=1800)
    assert "subset.tar at 64 px: 5 classes, " in proc.stdout
    assert "5000 test images" in proc.stdout  # every held-out image of the 5 classes
    for arm in (f"fine-tuned from {WEIGHTS.name}", "plain fine-tuning (", "from scratch ("):
        (row,) = [line for line in proc.stdout.splitlines() if line.startswith(f"  {arm}")]
        assert 0 < float(row.split()[-5].rstrip("%")) <= 100


def test_finetune_bench_cuts_a_class_subset_out_of_the_archive(tmp_path, monkeypatch):
    """--classes/--per-class: the first classes, the first training images of each, all their test images."""
    if not MINI.is_file():
        pytest.skip(f"{MINI} is absent (set IMGCLF_DATASETS to its folder)")
    import tarfile

    monkeypatch.syspath_prepend(str(REPO / "bench"))
    from finetune import subset

    out = subset(MINI, tmp_path / "subset.tar", classes=3, per_class=7)
    with tarfile.open(out) as tar:
        names = [Path(m.name).parts[-3:] for m in tar.getmembers()]
    assert sorted({c for _, c, _ in names}) == ["airplane", "automobile", "bird"]
    for name in ("airplane", "automobile", "bird"):
        assert sum(1 for s, c, _ in names if (s, c) == ("train", name)) == 7
        assert sum(1 for s, c, _ in names if (s, c) == ("test", name)) == 20


def test_readme_augment_bench_prints_its_table():
    if not MINI.is_file():
        pytest.skip(f"{MINI} is absent (set IMGCLF_DATASETS to its folder)")
    command = readme_command("python bench/training.py --parts augment")
    proc = run(f"{command} --archive {MINI} --repeats 1", REPO, timeout=1800)
    lines = proc.stdout.splitlines()
    for key in ("flip", "random_erase", "auto_augment randaugment", "mixup_alpha", "cutmix_alpha", "resized_crop"):
        (row,) = [line for line in lines if line.strip().startswith(key)]
        assert float(row.split()[-1]) > 0 and float(row.split()[-2]) > 0
