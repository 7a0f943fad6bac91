"""The datasets `data.dataset` chooses among, and how each is fetched and read back.

- `digits`: scikit-learn's bundled handwritten digits (1,797 8x8 grayscale images, 10 classes); no network.
- `cifar10`, `cifar100`: the official archives (see cifar.py).
- `imagefolder`: the user's `train/<class>/<image>` folder or archive (see imagefolder.py).

The download stage puts the raw data under `data.raw_dir`; the prepare stage reads it back. Array
datasets come back as `RawData`; image folders are decoded by prepare straight from their archive.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgclf.config import DataConfig


class DataError(Exception):
    """Raw data that cannot be used; the message says which file and why."""


@dataclass(frozen=True)
class RawData:
    classes: list[str]
    # split -> (uint8 images (N, H, W, C), int64 labels (N,)). Always "train"; "test" when the
    # dataset has an official held-out split (otherwise prepare carves one from train).
    splits: dict[str, tuple[np.ndarray, np.ndarray]]


def download(cfg: DataConfig, dest: Path) -> None:
    """Fetch the raw data named by `cfg` into the (empty, staging) folder `dest`."""
    if cfg.dataset == "digits":
        # Pixel values are ink counts 0..16; scale them to the 0..255 of an 8-bit image.
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
        np.savez_compressed(dest / "digits.npz", images=images, labels=digits.target.astype(np.int64),
                            classes=np.array([str(name) for name in digits.target_names]))
    elif cfg.dataset in ("cifar10", "cifar100"):
        from imgclf import cifar

        cifar.fetch(cifar.spec(cfg.dataset), dest, cfg.archive)
    elif cfg.dataset == "imagefolder":
        from imgclf import imagefolder

        imagefolder.stage_source(cfg.path, dest)
    else:  # pragma: no cover - config validation admits only the names above
        raise DataError(f"data.dataset: unknown dataset {cfg.dataset!r}")


def read_arrays(cfg: DataConfig, raw_dir: Path) -> RawData:
    """The raw data of an array dataset (all but imagefolder)."""
    if cfg.dataset == "digits":
        with np.load(raw_dir / "digits.npz") as archive:
            classes = [str(c) for c in archive["classes"]]
            return RawData(classes, {"train": (archive["images"], archive["labels"])})
    if cfg.dataset in ("cifar10", "cifar100"):
        from imgclf import cifar

        s = cifar.spec(cfg.dataset)
        return cifar.read(s, raw_dir / s.filename, labels=cfg.cifar100_labels)
    raise DataError(f"data.dataset {cfg.dataset!r} is not an array dataset")
