"""What the data modules share: their error, the raw arrays of an array dataset, archive suffixes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

# The archives an image folder may come as (data.path), and that prepare and predict read.
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".zip")


class DataError(Exception):
    """Raw data that cannot be used; the message says which file and why."""


@dataclass(frozen=True)
class RawData:
    classes: list[str]
    # split -> (uint8 images (N, H, W, C), int64 labels (N,)). Always "train"; "test" when the
    # dataset has an official held-out split (otherwise prepare carves one from train).
    splits: dict[str, tuple[np.ndarray, np.ndarray]]


def archive_suffix(path: str | Path) -> str | None:
    """The archive suffix of a file name (`.tar.gz` before `.gz`), or None."""
    name = Path(path).name.lower()
    return next((s for s in sorted(ARCHIVE_SUFFIXES, key=len, reverse=True) if name.endswith(s)), None)


def strip_archive_suffix(name: str) -> str:
    suffix = archive_suffix(name)
    return name[: -len(suffix)] if suffix else name
