"""The networks, the normalising wrapper every model is trained and served in, and checkpoints.

A checkpoint is two files: `model.safetensors` (tensors only, loaded without unpickling anything) and
`model.json` (architecture, class names, input size, channels, normalisation): everything serving
needs to rebuild the model and apply the same preprocessing as evaluation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from imgclf.files import write_bytes, write_json

WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"


class LeNet(nn.Module):
    """The CNN of the PyTorch "Training a Classifier" (CIFAR-10) tutorial, for any input shape:
    conv 6@5x5, max-pool 2, conv 16@5x5, max-pool 2, fc 120, fc 84, fc classes."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int) -> None:
        super().__init__()
        side = ((image_size - 4) // 2 - 4) // 2  # two valid 5x5 convolutions, each then pooled by 2
        if side < 1:
            raise ValueError(f"lenet needs images of at least 16x16 pixels, got {image_size}x{image_size}: "
                             "set data.image_size to 16 or more")
        self.conv1 = nn.Conv2d(in_channels, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * side * side, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


# name -> constructor(in_channels, image_size, num_classes)
MODELS: dict[str, Callable[[int, int, int], nn.Module]] = {
    "lenet": LeNet,
}


class Classifier(nn.Module):
    """uint8 images (N, C, H, W) in 0..255 -> logits: the normalisation travels inside the model, so
    training, evaluation and serving cannot disagree about it."""

    def __init__(self, net: nn.Module, mean: list[float], std: list[float], num_classes: int) -> None:
        super().__init__()
        self.net = net
        self.num_classes = num_classes
        # Buffers so they are saved with the weights; shaped to broadcast over (N, C, H, W).
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() / 255.0 - self.mean) / self.std
        return self.net(x)


def build(meta: dict[str, Any]) -> Classifier:
    """A fresh (untrained) classifier from checkpoint metadata."""
    name = meta["model"]
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r} (known: {', '.join(MODELS)})")
    net = MODELS[name](meta["channels"], meta["image_size"], len(meta["classes"]))
    return Classifier(net, meta["mean"], meta["std"], len(meta["classes"]))


def save_checkpoint(model: Classifier, meta: dict[str, Any], out_dir: str | Path) -> None:
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_bytes(Path(out_dir) / WEIGHTS_FILE, save(state))
    write_json(Path(out_dir) / META_FILE, meta)


def load_checkpoint(weights: str | Path, meta_path: str | Path) -> tuple[Classifier, dict[str, Any]]:
    """Rebuild a classifier from its two checkpoint files (no pickle involved), in eval mode."""
    from safetensors.torch import load_file

    meta = json.loads(Path(meta_path).read_text())
    model = build(meta)
    model.load_state_dict(load_file(str(weights)))
    return model.eval(), meta


def load_checkpoint_dir(model_dir: str | Path) -> tuple[Classifier, dict[str, Any]]:
    return load_checkpoint(Path(model_dir) / WEIGHTS_FILE, Path(model_dir) / META_FILE)


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def to_nchw(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (N, H, W, C) numpy -> uint8 (N, C, H, W) tensor on `device`."""
    # np.array copies: the arrays are often read-only memory maps, which torch cannot wrap.
    return torch.from_numpy(np.array(images, dtype=np.uint8)).to(device).permute(0, 3, 1, 2)


@torch.inference_mode()
def predict_proba(model: Classifier, images: np.ndarray, batch_size: int = 512,
                  device: torch.device | None = None) -> np.ndarray:
    """uint8 (N, H, W, C) -> float32 class probabilities (N, classes)."""
    device = device or next(model.parameters()).device
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        batch = to_nchw(images[start:start + batch_size], device)
        out.append(torch.softmax(model(batch).float(), dim=1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.num_classes), np.float32)
