"""What keeps a broken model out of the registry: a content checksum of saved training states, finite
weights, and the accuracy a model must beat to be more than a guess.

A checkpoint's zip container can be damaged in place and still load (torch does not check the tensors'
bytes against the zip's CRC), so the checksum is over the content itself: every tensor's dtype, shape
and bytes, and every plain value, in order.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from typing import Any, Iterable, Mapping

import torch

# How far above a constant guess a model must score, in standard errors of the guess's accuracy on the
# test split (binomial: sqrt(p (1 - p) / n)). 3 leaves about a 0.1% chance that a guess passes.
CHANCE_MARGIN_SE = 3.0


def content_sha256(value: Any) -> str:
    """SHA-256 over a nested state (dicts, lists, tuples, tensors, plain values), in its order."""
    digest = hashlib.sha256()
    _feed(digest, value)
    return digest.hexdigest()


def _feed(digest, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"T{tensor.dtype}{tuple(value.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy())
    elif isinstance(value, Mapping):
        digest.update(f"D{len(value)}".encode())
        for key, item in value.items():
            _feed(digest, key)
            _feed(digest, item)
    elif isinstance(value, (list, tuple)):
        digest.update(f"L{len(value)}".encode())
        for item in value:
            _feed(digest, item)
    else:
        digest.update(f"V{type(value).__name__}:{value!r}".encode())


def nonfinite(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors that hold a NaN or an infinity."""
    return [
        name
        for name, tensor in tensors.items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor.detach()).all())
    ]


def nonfinite_message(names: list[str], what: str) -> str:
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f"{what} hold NaN or infinite values (in {shown})"


def chance_accuracy(labels: Iterable[int]) -> float:
    """The accuracy of the best constant guess: the share of the most common class (1/classes when the
    classes are balanced)."""
    counts = Counter(int(label) for label in labels)
    return max(counts.values()) / sum(counts.values())


def chance_bar(labels: Iterable[int], margin_se: float = CHANCE_MARGIN_SE) -> float:
    """The test accuracy a model must exceed to be better than chance: the constant guess's accuracy
    plus `margin_se` standard errors of it on this many test images."""
    labels = list(labels)
    p = chance_accuracy(labels)
    return p + margin_se * math.sqrt(p * (1 - p) / len(labels))
