"""Benchmark: fine-tuning ImageNet weights, with the preset's recipe and with a plain one, against
training the same net from scratch, on little data.

    python bench/finetune.py --seeds 3
    python bench/finetune.py --archive ../shared/datasets/cifar10-png.tar.gz --classes 5 --per-class 600

On the 1,000-image slice of CIFAR-10 (`--archive`, default ../shared/datasets/cifar10-jpg-mini.tar.gz:
100 training images per class, 15% of them held out for validation by the prepare stage, and 20 test
images per class) at 96 px (`--image-size`), on the CPU, three arms with the same net, images and seeds:
- presets/finetune.yaml's recipe (or `--preset`): torchvision's mobilenet_v2 (`--model`) from the
  ImageNet weights in `--weights` (default ../shared/weights/mobilenet_v2-imagenet.safetensors, or the
  file IMGCLF_WEIGHTS names);
- plain fine-tuning from the same weights: the options the project had before the recipe (6 epochs,
  AdamW, one frozen epoch, flips and shifts of an eighth of the image, one learning rate for the whole
  net, no label smoothing, crops or policies), the rest as the preset (`--no-plain` leaves it out);
- the preset's recipe from random weights (no frozen epoch, one learning rate for the whole net, and the
  data's own normalisation instead of ImageNet's).
`--classes N --per-class M` first cuts a smaller image folder out of a tar archive: its first N classes
(alphabetically), the first M training images of each, and all their test images. Prints each run's
test accuracy and time, then per arm the mean, standard deviation and range over the seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tarfile
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


def subset(archive: Path, out: Path, classes: int, per_class: int) -> Path:
    """An image-folder tar of `archive`'s first `classes` classes: the first `per_class` training images of
    each (by name) and all of their held-out images, written to `out`."""
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and len(Path(m.name).parts) >= 3]
        split_class = {m.name: Path(m.name).parts[-3:-1] for m in members}
        kept_classes = sorted({c for s, c in split_class.values() if s == "train"})[:classes]
        chosen: list[tarfile.TarInfo] = []
        for name in kept_classes:
            train = sorted((m for m in members if split_class[m.name] == ("train", name)), key=lambda m: m.name)
            chosen += train[:per_class]
            chosen += [m for m in members if split_class[m.name][1] == name and split_class[m.name][0] != "train"]
        with tarfile.open(out, "w") as kept:
            for member in chosen:
                kept.addfile(member, tar.extractfile(member))
    return out


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


def plain(params: Params, image_size: int, epochs: int | None) -> Params:
    """params' fine-tuning with the options the project had before presets/finetune.yaml: 6 epochs (or
    `epochs`), AdamW, one frozen epoch, flips and shifts, one learning rate for the whole net; the rest
    (test-time flips among it) as params'."""
    return dataclasses.replace(
        params,
        train=dataclasses.replace(
            params.train,
            optimizer="adamw",
            epochs=epochs or 6,
            freeze_epochs=1,
            backbone_lr_scale=1.0,
            flip=True,
            translate=image_size // 8,
            resized_crop=0.0,
            auto_augment="none",
            random_erase=0.0,
            mixup_alpha=0.0,
            cutmix_alpha=0.0,
            label_smoothing=0.0,
            ema_decay=0.0,
        ),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", type=Path, default=DEFAULT_ARCHIVE)
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--preset", default="finetune")
    parser.add_argument("--model", default="torchvision:mobilenet_v2")
    parser.add_argument("--epochs", type=int, default=None, help="every arm's epochs (default: the preset's; plain: 6)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--classes", type=int, default=None, help="keep the archive's first N classes")
    parser.add_argument("--per-class", type=int, default=None, help="and the first M training images of each")
    parser.add_argument("--no-plain", action="store_true", help="leave out the plain fine-tuning arm")
    args = parser.parse_args()
    for path in (args.archive, args.weights):
        if not path.is_file():
            raise SystemExit(f"{path} is absent")
    torch.set_num_threads(available_cpus())
    keep_freed_memory()  # as the train stage does
    extra = {"epochs": args.epochs} if args.epochs else {}
    with tempfile.TemporaryDirectory() as tmp:
        archive = args.archive.resolve()
        if args.classes or args.per_class:
            if not tarfile.is_tarfile(archive):
                raise SystemExit(f"--classes and --per-class cut a subset of a .tar or .tar.gz archive, not {archive}")
            archive = subset(archive, Path(tmp) / "subset.tar", args.classes or 10**6, args.per_class or 10**9)
        tuned = prepared_params(
            archive,
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
            f"{archive.name} at {args.image_size} px: {len(meta['classes'])} classes, {counts['train']} training, "
            f"{counts['val']} validation, {counts['test']} test images; {cfg.model}, preset {args.preset} "
            f"({cfg.epochs} epochs, {cfg.freeze_epochs} frozen, {cfg.optimizer} lr {cfg.lr:g}, backbone "
            f"x{cfg.backbone_lr_scale:g}); {available_cpus()} CPU threads; torch {torch.__version__}\n"
        )
        seeds = range(args.seeds)
        arms = {f"fine-tuned from {args.weights.name}": [run(tuned, s, "fine-tuned") for s in seeds]}
        if not args.no_plain:
            baseline = plain(tuned, args.image_size, args.epochs)
            arms["plain fine-tuning (6 epochs, flips and shifts)"] = [run(baseline, s, "plain") for s in seeds]
        arms["from scratch (random weights)"] = [run(scratch, s, "from scratch") for s in seeds]
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
