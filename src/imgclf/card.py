"""The model card: what travels with a checkpoint and a logged model, so that evaluation, serving and
export rebuild the network and apply the same preprocessing as training (timm's `pretrained_cfg`).

It is written as `model.json` beside `model.safetensors`. Reading one checks every field: an unknown or
missing field, a wrong type or another card version raises CardError naming the file and the field,
rather than filling in a default that would hide a model written by another version of the code.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Raise it whenever a field is added, removed or changes meaning.
CARD_VERSION = 1


class CardError(ValueError):
    """A model card that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class ModelCard:
    card_version: int
    model: str  # the architecture (imgclf.architectures), e.g. lenet, torchvision:resnet18
    classes: tuple[str, ...]  # class names, in the order of the model's outputs
    image_size: int  # side of the square uint8 images the model takes, in pixels
    channels: int  # 1 (grayscale) or 3 (RGB)
    mean: tuple[float, ...]  # per-channel normalisation on the 0..1 scale, applied inside the model
    std: tuple[float, ...]
    tta_flip: bool  # test-time augmentation in eval mode (see models.Classifier)
    tta_translate: int
    train: dict[str, Any]  # the resolved train section it was trained with
    # No MLflow run id: the same code, params and data must give the same file (DVC records its hash); the
    # run that trained a model is found by the hash of its weights (tracking.resume_pipeline_run).

    def __post_init__(self) -> None:
        _check_version(self.card_version)
        if len(self.classes) < 2:
            raise CardError(f"classes: a classifier needs at least 2, got {list(self.classes)}")
        if self.channels not in (1, 3):
            raise CardError(f"channels: must be 1 or 3, got {self.channels}")
        if self.image_size < 1 or self.tta_translate < 0:
            raise CardError("image_size must be >= 1 and tta_translate >= 0")
        for name in ("mean", "std"):
            if len(getattr(self, name)) != self.channels:
                raise CardError(
                    f"{name}: expected {self.channels} values (one per channel), got {list(getattr(self, name))}"
                )
        if min(self.std) <= 0:
            raise CardError(f"std: must be > 0, got {list(self.std)}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, raw: Any, where: str = "model card") -> ModelCard:
        try:
            return cls(**_checked(raw))
        except CardError as exc:
            raise CardError(f"{where}: {exc}") from None

    @classmethod
    def from_json(cls, text: str, where: str = "model card") -> ModelCard:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CardError(f"{where}: not valid JSON ({exc})") from None
        return cls.from_dict(raw, where)

    @classmethod
    def read(cls, path: str | Path) -> ModelCard:
        return cls.from_json(Path(path).read_text(), str(path))


# field -> (what it must be, check)
_TYPES: dict[str, tuple[str, Any]] = {
    "card_version": ("an integer", lambda v: _is_int(v)),
    "model": ("a string", lambda v: isinstance(v, str) and v != ""),
    "classes": ("a list of strings", lambda v: isinstance(v, list) and all(isinstance(c, str) for c in v)),
    "image_size": ("an integer", lambda v: _is_int(v)),
    "channels": ("an integer", lambda v: _is_int(v)),
    "mean": ("a list of numbers", lambda v: _is_numbers(v)),
    "std": ("a list of numbers", lambda v: _is_numbers(v)),
    "tta_flip": ("true or false", lambda v: isinstance(v, bool)),
    "tta_translate": ("an integer", lambda v: _is_int(v)),
    "train": ("a mapping", lambda v: isinstance(v, dict)),
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_numbers(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value)


def _checked(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise CardError(f"expected a JSON object, got {type(raw).__name__}")
    _check_version(raw.get("card_version"))  # before the fields: another version has other fields
    unknown = sorted(set(raw) - set(_TYPES))
    if unknown:
        raise CardError(f"{unknown[0]}: unknown field (known: {', '.join(_TYPES)})")
    missing = [name for name in _TYPES if name not in raw]
    if missing:
        raise CardError(f"{missing[0]}: missing field")
    for name, (kind, ok) in _TYPES.items():
        if not ok(raw[name]):
            raise CardError(f"{name}: expected {kind}, got {raw[name]!r}")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}


def _check_version(version: Any) -> None:
    if version != CARD_VERSION:
        raise CardError(
            f"card_version: {version!r}, but this code reads version {CARD_VERSION} (the model was "
            "written by another version of imgclf: retrain it, or load it with that version)"
        )
