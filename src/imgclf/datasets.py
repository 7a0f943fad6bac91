"""The datasets `data.dataset` chooses among: how each is fetched and read back.

A dataset writes its raw files under `data.raw_dir` (download stage) and reads them back as
`RawData`: uint8 images, integer labels and class names (prepare stage).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class RawData:
    images: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray  # int64 (N,)
    classes: list[str]


def _download_digits(raw_dir: Path) -> None:
    # scikit-learn ships the UCI handwritten digits (1,797 8x8 images): real data, no network.
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel values are ink counts 0..16; scale them to the usual 0..255 of an 8-bit image.
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    np.savez_compressed(raw_dir / "digits.npz", images=images, labels=digits.target.astype(np.int64),
                        classes=np.array([str(name) for name in digits.target_names]))


def _read_digits(raw_dir: Path) -> RawData:
    with np.load(raw_dir / "digits.npz") as archive:
        return RawData(archive["images"], archive["labels"], [str(c) for c in archive["classes"]])


@dataclass(frozen=True)
class Dataset:
    download: Callable[[Path], None]
    read: Callable[[Path], RawData]


DATASETS: dict[str, Dataset] = {
    "digits": Dataset(download=_download_digits, read=_read_digits),
}
