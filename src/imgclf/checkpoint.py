"""Training checkpoints: the full state after each epoch, written atomically, resumed only when it
belongs to the same params, data and code.

A checkpoint holds the model, optimizer, scheduler, grad scaler and EMA states, every random
generator, the epoch, the per-epoch metrics so far and the MLflow run id, plus a fingerprint of what
it belongs to. It is written to a temporary file, fsynced and renamed, so a kill during a save leaves
the previous checkpoint intact; it loads with `torch.load(weights_only=True)` (tensors and plain
containers only, no pickled objects).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import torch

from imgclf.config import Params
from imgclf.files import write_bytes

FILE = "last.pt"
PACKAGE_DIR = Path(__file__).resolve().parent
# Output locations do not change what training computes.
_NOT_FINGERPRINTED = {"model_dir", "metrics_dir", "checkpoint_dir"}


def fingerprint(params: Params, prepared_dir: str | Path) -> str:
    """SHA-256 over the train params, the prepared data files and the package's code."""
    digest = hashlib.sha256()
    train = {k: v for k, v in dataclasses.asdict(params.train).items() if k not in _NOT_FINGERPRINTED}
    digest.update(json.dumps(train, sort_keys=True).encode())
    files = [(p.name, p) for p in sorted(Path(prepared_dir).iterdir())]
    files += [(p.relative_to(PACKAGE_DIR).as_posix(), p) for p in sorted(PACKAGE_DIR.rglob("*.py"))]
    for name, path in files:
        digest.update(name.encode())
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()


def save(state: dict[str, Any], checkpoint_dir: str | Path) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes(Path(checkpoint_dir) / FILE, buffer.getvalue())


def load(checkpoint_dir: str | Path) -> dict[str, Any] | None:
    """The last checkpoint, or None when there is none (or it cannot be read: then say so)."""
    path = Path(checkpoint_dir) / FILE
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a foreign or damaged file: never resume from it
        print(f"train: ignoring unreadable checkpoint {path} ({type(exc).__name__}: {exc})")
        return None
