"""Benchmark: fine-tuning ImageNet weights against training the same net from scratch, on little data.

    python bench/finetune.py --seeds 3

On the 1,000-image slice of CIFAR-10 (`--archive`, default ../shared/datasets/cifar10-jpg-mini.tar.gz:
100 training images per class, 15% of them held out for validation by the prepare stage, and 20 test
images per class) at 96 px (`--image-size`), on the CPU, with presets/finetune.yaml's recipe (or
`--preset`): torchvision's mobilenet_v2 (`--model`) from the ImageNet weights in `--weights` (default
../shared/weights/mobilenet_v2-imagenet.safetensors, or the file IMGCLF_WEIGHTS names), against the
same net, recipe, images and seeds from random weights (the only differences: no frozen epoch, one
learning rate for the whole net, and the data's own normalisation instead of ImageNet's). Prints each
run's test accuracy and time, then per arm the mean, standard deviation and range over the seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from shipped import committed_params, copy_presets  # bench/shipped.py: the project as git holds it

from imgclf import download, prepare
from imgclf.allocator import keep_freed_memory
from imgclf.config import Params, load_params
from imgclf.cpus import available_cpus
from imgclf.models import to_nchw
from imgclf.train import Arrays, FitResult, fit, new_card, score

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DEFAULT_ARCHIVE = Path(os.environ.get("IMGCLF_DATASETS", SHARED / "datasets")) / "cifar10-jpg-mini.tar.gz"
DEFAULT_WEIGHTS = Path(os.environ.get("IMGCLF_WEIGHTS", SHARED / "weights" / "mobilenet_v2-imagenet.safetensors"))
CPU = torch.device("cpu")


def log(*args) -> None:
    print(*args, flush=True)


def prepared_params(archive: Path | None, work: Path, image_size: int, preset: str, **train) -> Params:
    """The shipped params for `archive` (None: the digits) at `image_size` with `preset`, its data prepared
    under `work` by the download and prepare stages."""
    params = committed_params()
    if archive is not None:
        params["data"].update(dataset="imagefolder", path=str(archive), image_size=image_size)
    params["data"].update(raw_dir=str(work / "raw"))
    params["prepare"].update(out_dir=str(work / "prepared"))
    params["train"].update(preset=preset, **train)
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    copy_presets(work / "presets")
    download.main(["--params", str(work / "params.yaml")])
    prepare.main(["--params", str(work / "params.yaml")])
    return load_params(work / "params.yaml")


def split(prepared: Path, name: str) -> Arrays:
    return Arrays(np.load(prepared / f"{name}_images.npy"), np.load(prepared / f"{name}_labels.npy"))


def fit_and_score(params: Params, on_epoch=lambda training, metrics: None) -> tuple[FitResult, float, float]:
    """Train params' recipe on the prepared data: the result, its test accuracy and the training seconds."""
    prepared = Path(params.prepare.out_dir)
    card = new_card(params, json.loads((prepared / "meta.json").read_text()))
    train, val, test = split(prepared, "train"), split(prepared, "val"), split(prepared, "test")
    start = time.perf_counter()
    result = fit(params, card, train, val, CPU, on_epoch=on_epoch)
    seconds = time.perf_counter() - start
    x_test, y_test = to_nchw(test.images, CPU), torch.from_numpy(test.labels)
    _, accuracy = score(result.model, x_test, y_test, result.training.memory_format)
    return result, accuracy, seconds


def run(params: Params, seed: int, label: str) -> tuple[float, float]:
    """(test accuracy, training seconds) of params' recipe from train.seed `seed`."""
    params = dataclasses.replace(params, train=dataclasses.replace(params.train, seed=seed))
    start = time.perf_counter()
    _, accuracy, seconds = fit_and_score(
        params,
        on_epoch=lambda training, m: log(
            f"    {label}, seed {seed}, epoch {training.epoch}: train loss {m['train_loss']:.3f}, "
            f"val accuracy {m['val_accuracy']:.4f} ({time.perf_counter() - start:.0f} s)"
        ),
    )
    log(f"  {label}, seed {seed}: test accuracy {accuracy:.4f} ({seconds:.0f} s training)")
    return accuracy, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", type=Path, default=DEFAULT_ARCHIVE)
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--preset", default="finetune")
    parser.add_argument("--model", default="torchvision:mobilenet_v2")
    parser.add_argument("--epochs", type=int, default=None, help="default: the preset's")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    for path in (args.archive, args.weights):
        if not path.is_file():
            raise SystemExit(f"{path} is absent")
    torch.set_num_threads(available_cpus())
    keep_freed_memory()  # as the train stage does
    extra = {"epochs": args.epochs} if args.epochs else {}
    with tempfile.TemporaryDirectory() as tmp:
        tuned = prepared_params(
            args.archive.resolve(),
            Path(tmp),
            args.image_size,
            args.preset,
            model=args.model,
            pretrained=str(args.weights.resolve()),
            **extra,
        )
        scratch = dataclasses.replace(
            tuned, train=dataclasses.replace(tuned.train, pretrained=None, freeze_epochs=0, backbone_lr_scale=1.0)
        )
        meta = json.loads((Path(tuned.prepare.out_dir) / "meta.json").read_text())
        counts = {s: sum(meta["counts"][s].values()) for s in ("train", "val", "test")}
        cfg = tuned.train
        log(
            f"{args.archive.name} at {args.image_size} px: {counts['train']} training, {counts['val']} validation, "
            f"{counts['test']} test images; {cfg.model}, preset {args.preset} ({cfg.epochs} epochs, "
            f"{cfg.freeze_epochs} frozen, {cfg.optimizer} lr {cfg.lr:g}, backbone x{cfg.backbone_lr_scale:g}); "
            f"{available_cpus()} CPU threads; torch {torch.__version__}\n"
        )
        seeds = range(args.seeds)
        arms = {
            f"fine-tuned from {args.weights.name}": [run(tuned, s, "fine-tuned") for s in seeds],
            "from scratch (random weights)": [run(scratch, s, "from scratch") for s in seeds],
        }
    log(f"\ntest accuracy on {counts['test']} images, {len(seeds)} seeds")
    log(f"  {'':<50} {'mean':>7} {'std':>7} {'min':>7} {'max':>7} {'s/run':>7}")
    for name, results in arms.items():
        accuracies = [a for a, _ in results]
        spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
        log(
            f"  {name:<50} {statistics.mean(accuracies):>7.2%} {spread:>7.2%} {min(accuracies):>7.2%} "
            f"{max(accuracies):>7.2%} {statistics.median(s for _, s in results):>7.0f}"
        )


if __name__ == "__main__":
    main()
