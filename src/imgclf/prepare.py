"""prepare stage: raw dataset -> uint8 arrays split into train / val / test, with normalisation stats.

    python -m imgclf.prepare --params params.yaml

Reads `data.raw_dir`; writes to `prepare.out_dir` (all or nothing: a failure leaves no output):
  {train,val,test}_images.npy  uint8 (N, H, W, C), memory-mappable with np.load(mmap_mode="r")
  {train,val,test}_labels.npy  int64 (N,)
  meta.json                    class names, image size, channels, per-channel mean/std of the
                               training split only (0..1 scale), per-split class counts
  report.json                  the data report: counts, class imbalance, skipped and ignored files

Splits: the dataset's own held-out test split when it has one, else `prepare.test_fraction` of the
images carved out stratified by class; then `prepare.val_fraction` of the remaining training images
(unless the image folder has its own validation folder). Every split is drawn with `prepare.seed`.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import numpy as np
from numpy.lib.format import open_memmap
from PIL import Image
from sklearn.model_selection import train_test_split

from imgclf.config import Params, stage_params
from imgclf.cpus import available_cpus
from imgclf.data import imagefolder
from imgclf.data.archives import Archive
from imgclf.data.datasets import read_arrays
from imgclf.data.types import DataError, RawData
from imgclf.files import staged_dir, write_json
from imgclf.images import to_array
from imgclf.progress import Progress

SPLITS = ("train", "val", "test")


def carve(
    labels: np.ndarray, fraction: float, seed: int, classes: list[str], what: str
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split of positions 0..N-1 into (kept, carved out), both sorted."""
    counts = np.bincount(labels, minlength=len(classes))
    if (counts == 1).any():
        name = classes[int(np.flatnonzero(counts == 1)[0])]
        raise DataError(f"cannot carve a stratified {what} split: class {name!r} has only 1 training image")
    try:
        kept, held = train_test_split(np.arange(len(labels)), test_size=fraction, stratify=labels, random_state=seed)
    except ValueError as exc:
        raise DataError(
            f"cannot carve a stratified {what} split of {fraction:g} from {len(labels)} "
            f"images in {len(classes)} classes: {exc}"
        ) from None
    return np.sort(kept), np.sort(held)


def assign(
    labels: np.ndarray, has_test: bool, has_val: bool, params: Params, classes: list[str]
) -> dict[str, np.ndarray]:
    """Positions of the training pool that go to train, and to val / test when those are carved."""
    cfg = params.prepare
    pool = np.arange(len(labels))
    parts: dict[str, np.ndarray] = {}
    if not has_test:
        kept, held = carve(labels, cfg.test_fraction, cfg.seed, classes, "test")
        pool, parts["test"] = pool[kept], pool[held]
    if not has_val:
        kept, held = carve(labels[pool], cfg.val_fraction, cfg.seed, classes, "validation")
        pool, parts["val"] = pool[kept], pool[held]
    parts["train"] = pool
    return parts


def resize(images: np.ndarray, size: int, channels: int) -> np.ndarray:
    """uint8 (N, H, W, C) -> uint8 (N, size, size, channels), through the same code serving uses."""
    if images.shape[1:] == (size, size, channels):
        return np.asarray(images)
    out = np.empty((len(images), size, size, channels), dtype=np.uint8)
    for i, image in enumerate(images):
        out[i] = to_array(Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image), size, channels)
    return out


def channel_stats(images: np.ndarray, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation on the 0..1 scale, exact: from a histogram of the
    256 possible values of each channel, counted chunk by chunk."""
    channels = images.shape[-1]
    histogram = np.zeros((channels, 256), dtype=np.int64)
    for start in range(0, len(images), chunk):
        block = np.asarray(images[start : start + chunk]).reshape(-1, channels)
        for c in range(channels):
            histogram[c] += np.bincount(block[:, c], minlength=256)
    values = np.arange(256) / 255.0
    count = np.maximum(histogram.sum(axis=1), 1)
    mean = histogram @ values / count
    std = np.sqrt(np.maximum(histogram @ values**2 / count - mean**2, 0.0))
    std = np.where(std > 1e-6, std, 1.0)  # a constant channel would divide by zero
    return [round(float(m), 6) for m in mean], [round(float(s), 6) for s in std]


def new_images(out: Path, split: str, count: int, size: int, channels: int) -> np.ndarray:
    return open_memmap(out / f"{split}_images.npy", mode="w+", dtype=np.uint8, shape=(count, size, size, channels))


def prepare_arrays(raw: RawData, params: Params, out: Path) -> dict:
    """digits, CIFAR: split the arrays, resize them in chunks into the output files."""
    images, labels = raw.splits["train"]
    size = params.data.image_size or images.shape[1]
    channels = params.data.channels or images.shape[-1]
    parts = assign(labels, "test" in raw.splits, False, params, raw.classes)
    sources = {split: (images, labels, index) for split, index in parts.items()}
    if "test" in raw.splits:
        test_images, test_labels = raw.splits["test"]
        sources["test"] = (test_images, test_labels, np.arange(len(test_labels)))
    split_labels = {}
    for split, (source, source_labels, index) in sources.items():
        target = new_images(out, split, len(index), size, channels)
        for start in range(0, len(index), 4096):
            target[start : start + 4096] = resize(source[index[start : start + 4096]], size, channels)
        target.flush()
        split_labels[split] = source_labels[index].astype(np.int64)
    return finish(out, params, raw.classes, split_labels, size, channels, skipped=[], ignored=[])


def prepare_imagefolder(archive_path: Path, params: Params, out: Path) -> dict:
    """Image folders: list the archive, assign every file a row, decode each file once in parallel."""
    cfg = params.data
    archive = Archive(archive_path, cfg.max_archive_bytes)
    listing = imagefolder.list_entries(*archive.listing())
    classes = listing.classes
    if len(classes) < 2:
        raise DataError(
            f"{archive_path}: found {len(classes)} class folder(s) with images under train/ "
            f"({', '.join(classes) or 'none'}); a classifier needs at least 2"
        )
    index = {name: i for i, name in enumerate(classes)}
    by_split = {split: [e for e in listing.entries if e.split == split] for split in SPLITS}
    train_labels = np.array([index[e.label] for e in by_split["train"]], dtype=np.int64)
    pool = by_split["train"]
    for split, positions in assign(train_labels, listing.has_test, listing.has_val, params, classes).items():
        by_split[split] = [pool[i] for i in positions]
    size, channels = cfg.image_size, cfg.channels or 3
    plan, arrays = {}, {}
    for split in SPLITS:
        arrays[split] = new_images(out, split, len(by_split[split]), size, channels)
        plan.update({e.name: (split, row) for row, e in enumerate(by_split[split])})

    workers = params.prepare.workers or available_cpus()
    with Progress("prepare: decoding", len(plan), "img") as progress:
        failed = imagefolder.decode_into(
            archive, plan, arrays, size, channels, cfg.max_pixels, workers, on_progress=progress.update
        )
    problems = sorted(listing.problems + failed)
    if problems and cfg.on_bad_image == "fail":
        lines = "\n".join(f"  {name}: {why}" for name, why in problems)
        raise DataError(
            f"{len(problems)} bad file(s) or folder(s) in {archive_path} (set data.on_bad_image: "
            f"skip to leave them out):\n{lines}"
        )
    bad = {name for name, _ in failed}
    split_labels = {}
    for split in SPLITS:
        keep = np.array([e.name not in bad for e in by_split[split]], dtype=bool)
        if not keep.all():
            arrays[split] = compact(out, split, arrays[split], keep)
        arrays[split].flush()
        split_labels[split] = np.array([index[e.label] for e, k in zip(by_split[split], keep) if k], np.int64)
    skipped = sorted(problems + listing.unsafe)  # unsafe entries are skipped whatever on_bad_image says
    return finish(out, params, classes, split_labels, size, channels, skipped=skipped, ignored=listing.ignored)


def compact(out: Path, split: str, images: np.ndarray, keep: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Drop the rows of skipped files, copying in chunks into a new file of the final size."""
    rows = np.flatnonzero(keep)
    tmp = out / f"{split}_images.compact.npy"
    target = open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(rows), *images.shape[1:]))
    for start in range(0, len(rows), chunk):
        target[start : start + chunk] = images[rows[start : start + chunk]]
    target.flush()
    del images, target
    tmp.replace(out / f"{split}_images.npy")
    return np.load(out / f"{split}_images.npy", mmap_mode="r")


def finish(
    out: Path,
    params: Params,
    classes: list[str],
    labels: dict[str, np.ndarray],
    size: int,
    channels: int,
    skipped: list,
    ignored: list,
) -> dict:
    """Write labels, meta.json (with the training split's statistics) and report.json."""
    counts = {}
    for split in SPLITS:
        np.save(out / f"{split}_labels.npy", labels[split])
        per_class = np.bincount(labels[split], minlength=len(classes))
        counts[split] = {name: int(n) for name, n in zip(classes, per_class)}
    mean, std = channel_stats(np.load(out / "train_images.npy", mmap_mode="r"))
    meta = {
        "dataset": params.data.dataset,
        "classes": classes,
        "image_size": size,
        "channels": channels,
        "mean": mean,
        "std": std,
        "counts": counts,
    }
    imbalance = {split: round(max(c.values()) / max(min(c.values()), 1), 3) for split, c in counts.items()}
    report = {
        "dataset": params.data.dataset,
        "classes": len(classes),
        "images": {split: sum(c.values()) for split, c in counts.items()},
        "imbalance_max_over_min": imbalance,
        "counts": counts,
        "skipped": [{"file": name, "reason": why} for name, why in skipped],
        "ignored": [{"file": name, "reason": why} for name, why in ignored],
    }
    write_json(out / "meta.json", meta)
    write_json(out / "report.json", report)
    return meta


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # so that `kill` cleans up (staging folder, workers) as Ctrl-C does


def main(argv: list[str] | None = None) -> None:
    params = stage_params(argv, __doc__)
    previous = signal.signal(signal.SIGTERM, _terminated)
    raw_dir = Path(params.data.raw_dir)
    try:
        with staged_dir(params.prepare.out_dir) as staging:
            if params.data.dataset == "imagefolder":
                meta = prepare_imagefolder(imagefolder.find_archive(raw_dir), params, staging)
            else:
                meta = prepare_arrays(read_arrays(params.data, raw_dir), params, staging)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    sizes = ", ".join(f"{s} {sum(meta['counts'][s].values())}" for s in SPLITS)
    print(f"prepare: {len(meta['classes'])} classes, {meta['image_size']}px x {meta['channels']}: {sizes}")


if __name__ == "__main__":
    main()
