"""CIFAR-10 and CIFAR-100: the official "python version" archives, fetched and checked with
torchvision's download code and published MD5 checksums.

The archive is the raw data DVC versions (one file, not 60,000). Its checksum is verified before it is
copied into place and again before anything in it is unpacked or unpickled, and the batch files inside
are unpickled with an unpickler that admits only the NumPy array types CIFAR's pickles hold.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import shutil
import socket
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgclf.data.types import DataError, RawData


@dataclass(frozen=True)
class CifarSpec:
    """Where an archive comes from and what it must hold (torchvision's published constants)."""

    name: str
    url: str
    filename: str
    md5: str
    folder: str  # the folder inside the archive
    train: list[tuple[str, str]]  # (batch file, md5)
    test: list[tuple[str, str]]
    meta_file: str


def spec(dataset: str) -> CifarSpec:
    # Imported here: torchvision.datasets takes 4.6 s to import (torch with it), which the other datasets
    # and every prepare of an image folder would otherwise pay.
    from torchvision.datasets import CIFAR10, CIFAR100

    source = {"cifar10": CIFAR10, "cifar100": CIFAR100}[dataset]
    return CifarSpec(
        name=dataset,
        url=source.url,
        filename=source.filename,
        md5=source.tgz_md5,
        folder=source.base_folder,
        train=[tuple(x) for x in source.train_list],
        test=[tuple(x) for x in source.test_list],
        meta_file=source.meta["filename"],
    )


def md5_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify(path: Path, s: CifarSpec, what: str) -> None:
    actual = md5_of(path)
    if actual != s.md5:
        raise DataError(
            f"{what}: {path} has MD5 {actual}, but {s.filename} must have MD5 {s.md5}: "
            "the file is truncated, corrupt or not the official archive"
        )


def fetch(s: CifarSpec, dest_dir: Path, archive: str | None, timeout: float = 60.0) -> Path:
    """Put the verified archive in `dest_dir` (a staging folder): copied from `archive` when given,
    else downloaded from the official URL."""
    dest = dest_dir / s.filename
    if archive is not None:
        source = Path(archive)
        if not source.is_file():
            raise DataError(f"data.archive: no such file: {source}")
        verify(source, s, "data.archive")  # before anything is copied, unpacked or unpickled
        shutil.copyfile(source, dest)
        return dest
    from torchvision.datasets.utils import download_url  # see spec()

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)  # urllib has no timeout of its own: a dead network would hang
    try:
        download_url(s.url, str(dest_dir), filename=s.filename, md5=s.md5)
    except Exception as exc:  # URLError, timeouts, torchvision's "File not found or corrupted."
        raise DataError(
            f"could not download {s.url} ({exc}). Without network access, download {s.filename} "
            f"elsewhere and set data.archive to its path (its MD5 must be {s.md5})."
        ) from None
    finally:
        socket.setdefaulttimeout(previous)
    verify(dest, s, "download")
    return dest


class _ArrayUnpickler(pickle.Unpickler):
    """CIFAR batches are dicts of lists, strings and NumPy arrays: refuse anything else."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("copy_reg", "_reconstructor"),
        ("copyreg", "_reconstructor"),
        ("__builtin__", "object"),
        ("builtins", "object"),
        ("_codecs", "encode"),
    }  # how protocol-2 pickles written by Python 3 store bytes

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")
        return super().find_class(module, name)


def _load_batch(tar: tarfile.TarFile, member: str, md5: str | None) -> dict:
    f = tar.extractfile(member)
    if f is None:
        raise DataError(f"{member}: not a file in the archive")
    data = f.read()
    if md5 is not None and hashlib.md5(data, usedforsecurity=False).hexdigest() != md5:
        raise DataError(f"{member}: checksum mismatch inside the archive")
    return _ArrayUnpickler(io.BytesIO(data), encoding="latin1").load()


def read(s: CifarSpec, path: Path, labels: str = "fine") -> RawData:
    """The verified archive -> uint8 images (N, 32, 32, 3), labels and class names, with the
    official train/test split. CIFAR-100 has `fine` (100) and `coarse` (20) labels."""
    verify(path, s, "raw data")
    label_key, names_key = ("labels", "label_names")
    if s.name == "cifar100":
        label_key, names_key = f"{labels}_labels", f"{labels}_label_names"
    try:
        with tarfile.open(path, "r:gz") as tar:
            meta = _load_batch(tar, f"{s.folder}/{s.meta_file}", None)
            splits = {}
            for split, files in (("train", s.train), ("test", s.test)):
                images, targets = [], []
                for name, md5 in files:
                    batch = _load_batch(tar, f"{s.folder}/{name}", md5)
                    images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                    targets.extend(batch[label_key])
                splits[split] = (
                    np.concatenate(images).transpose(0, 2, 3, 1).copy(),
                    np.asarray(targets, dtype=np.int64),
                )
    except (tarfile.TarError, KeyError, EOFError, pickle.UnpicklingError, ValueError) as exc:
        raise DataError(f"{path}: not a readable {s.filename} ({type(exc).__name__}: {exc})") from None
    return RawData(classes=[str(c) for c in meta[names_key]], splits=splits)
