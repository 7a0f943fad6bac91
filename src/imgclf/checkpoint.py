"""Training checkpoints: the full state after each epoch, written atomically, resumed only when it
belongs to the same params, data and code.

A checkpoint holds the model, optimizer, scheduler, grad scaler and EMA states, every random
generator, the epoch, the per-epoch metrics so far and the MLflow run id, plus a fingerprint of what
it belongs to. It is written to a temporary file, fsynced and renamed, so a kill during a save leaves
the previous checkpoint intact; it loads with `torch.load(weights_only=True)` (tensors and plain
containers only, no pickled objects). It carries the SHA-256 of its own content (imgclf.integrity),
checked on load: a file damaged in place (which torch still loads) or holding non-finite weights is
treated like an unreadable one: said, ignored, and training starts afresh.
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
from imgclf.integrity import content_sha256, nonfinite, nonfinite_message

FILE = "last.pt"
CHECKSUM_KEY = "content_sha256"
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
    torch.save({**state, CHECKSUM_KEY: content_sha256(state)}, buffer)
    write_bytes(Path(checkpoint_dir) / FILE, buffer.getvalue())


def load(checkpoint_dir: str | Path) -> dict[str, Any] | None:
    """The last checkpoint, or None when there is none (or it cannot be trusted: then say why)."""
    path = Path(checkpoint_dir) / FILE
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        problem = damage(state)
    except Exception as exc:  # a foreign or damaged file: never resume from it
        problem = f"unreadable: {type(exc).__name__}: {exc}"
    if problem:
        print(f"train: ignoring checkpoint {path} ({problem}); starting afresh")
        return None
    return state


def damage(state: Any) -> str | None:
    """What makes a loaded checkpoint untrustworthy, or None: no checksum, a checksum that does not match
    its content, or model weights that are not finite. Removes the checksum from `state`."""
    if not isinstance(state, dict) or CHECKSUM_KEY not in state:
        return "it carries no content checksum"
    if state.pop(CHECKSUM_KEY) != content_sha256(state):
        return "its content does not match its checksum: the file was damaged"
    bad = nonfinite(state.get("model") or {})
    return nonfinite_message(bad, "its model weights") if bad else None
