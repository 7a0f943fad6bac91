"""The datasets `data.dataset` chooses among, and how each is fetched and read back.

- `digits`: scikit-learn's bundled handwritten digits (1,797 8x8 grayscale images, 10 classes); no network.
- `cifar10`, `cifar100`: the official archives (see data/cifar.py).
- `imagefolder`: the user's `train/<class>/<image>` folder or archive (see data/imagefolder.py).

The download stage puts the raw data under `data.raw_dir`; the prepare stage reads it back. Array
datasets come back as `RawData`; image folders are decoded by prepare straight from their archive.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from imgclf.config import DataConfig
from imgclf.data import cifar, imagefolder
from imgclf.data.types import DataError, RawData


def download(cfg: DataConfig, dest: Path) -> None:
    """Fetch the raw data named by `cfg` into the (empty, staging) folder `dest`."""
    if cfg.dataset == "digits":
        # Pixel values are ink counts 0..16; scale them to the 0..255 of an 8-bit image. (Imported here:
        # scikit-learn's datasets module takes 1.7 s to import, which no other dataset needs.)
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
        np.savez_compressed(
            dest / "digits.npz",
            images=images,
            labels=digits.target.astype(np.int64),
            classes=np.array([str(name) for name in digits.target_names]),
        )
    elif cfg.dataset in ("cifar10", "cifar100"):
        cifar.fetch(cifar.spec(cfg.dataset), dest, cfg.archive)
    elif cfg.dataset == "imagefolder":
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
        s = cifar.spec(cfg.dataset)
        return cifar.read(s, raw_dir / s.filename, labels=cfg.cifar100_labels)
    raise DataError(f"data.dataset {cfg.dataset!r} is not an array dataset")
