"""prepare stage: raw dataset -> uint8 arrays split into train / val / test, with normalisation stats.

    python -m imgclf.prepare --params params.yaml

Reads `data.raw_dir`; writes to `prepare.out_dir`:
  {train,val,test}_images.npy  uint8 (N, H, W, C), memory-mappable with np.load(mmap_mode="r")
  {train,val,test}_labels.npy  int64 (N,)
  meta.json                    class names, image size, channels, per-channel mean/std of the
                               training split only (on the 0..1 scale), per-split class counts
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from imgclf.config import Params, stage_params
from imgclf.datasets import DATASETS, RawData
from imgclf.files import staged_dir, write_json
from imgclf.images import to_array

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Split:
    train: np.ndarray  # indices into the dataset
    val: np.ndarray
    test: np.ndarray


def split(labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int) -> Split:
    """A stratified three-way split: every class keeps its share in each part."""
    from sklearn.model_selection import train_test_split

    index = np.arange(len(labels))
    rest, test = train_test_split(index, test_size=test_fraction, stratify=labels, random_state=seed)
    # val_fraction is a share of the whole dataset, not of what is left after the test split.
    train, val = train_test_split(rest, test_size=val_fraction / (1.0 - test_fraction),
                                  stratify=labels[rest], random_state=seed)
    return Split(np.sort(train), np.sort(val), np.sort(test))


def resize(images: np.ndarray, size: int, channels: int) -> np.ndarray:
    """uint8 (N, H, W, C) -> uint8 (N, size, size, channels), through the same code serving uses."""
    if images.shape[1:] == (size, size, channels):
        return images
    out = np.empty((len(images), size, size, channels), dtype=np.uint8)
    for i, image in enumerate(images):
        pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        out[i] = to_array(pil, size, channels)
    return out


def channel_stats(images: np.ndarray, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation on the 0..1 scale, accumulated in float64 chunks."""
    total = np.zeros(images.shape[-1])
    total_sq = np.zeros(images.shape[-1])
    for start in range(0, len(images), chunk):
        block = images[start:start + chunk].astype(np.float64) / 255.0
        total += block.sum(axis=(0, 1, 2))
        total_sq += np.square(block).sum(axis=(0, 1, 2))
    count = images.shape[0] * images.shape[1] * images.shape[2]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    # A constant channel would divide by zero at normalisation time.
    std = np.where(std > 1e-6, std, 1.0)
    return [round(float(m), 6) for m in mean], [round(float(s), 6) for s in std]


def prepare(raw: RawData, params: Params, out: Path) -> dict:
    """Split, resize and write the arrays into `out`; returns the metadata written as meta.json."""
    cfg = params.data
    size = cfg.image_size or raw.images.shape[1]
    channels = cfg.channels or raw.images.shape[-1]
    parts = split(raw.labels, params.prepare.val_fraction, params.prepare.test_fraction,
                  params.prepare.seed)
    images = resize(raw.images, size, channels)
    counts = {}
    for name in SPLITS:
        index = getattr(parts, name)
        np.save(out / f"{name}_images.npy", images[index])
        np.save(out / f"{name}_labels.npy", raw.labels[index].astype(np.int64))
        counts[name] = {c: int(n) for c, n in zip(raw.classes, np.bincount(raw.labels[index],
                                                                          minlength=len(raw.classes)))}
    mean, std = channel_stats(images[parts.train])
    meta = {"dataset": cfg.dataset, "classes": raw.classes, "image_size": size, "channels": channels,
            "mean": mean, "std": std, "counts": counts}
    write_json(out / "meta.json", meta)
    return meta


def main(argv: list[str] | None = None) -> None:
    params = stage_params(argv, __doc__)
    raw = DATASETS[params.data.dataset].read(Path(params.data.raw_dir))
    with staged_dir(params.prepare.out_dir) as staging:
        meta = prepare(raw, params, staging)
    sizes = ", ".join(f"{s} {sum(meta['counts'][s].values())}" for s in SPLITS)
    print(f"prepare: {len(meta['classes'])} classes, {meta['image_size']}px x {meta['channels']}: {sizes}")


if __name__ == "__main__":
    main()
