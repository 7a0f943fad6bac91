"""Grad-CAM (Selvaraju et al. 2017): where in an image the evidence for a class lies, from captum's LayerGradCam.

The maps are taken at the last convolution of the network (found by walking its modules, so our
architectures and torchvision's alike need no per-model setting), then scaled up to the image's size.
captum is Meta's maintained interpretability library for PyTorch, and a pure-Python wheel with no
dependencies beyond ours (pytorch-grad-cam would bring OpenCV).
"""

from __future__ import annotations

import numpy as np
import torch
from captum.attr import LayerAttribution, LayerGradCam
from torch import nn

from imgclf.models import Classifier, ModelError, to_nchw


def last_conv(net: nn.Module) -> nn.Conv2d:
    """The last nn.Conv2d registered in the network: the one closest to the classifier head for the
    sequential CNNs of this project and torchvision's (ResNet, VGG, MobileNet, EfficientNet, ...)."""
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ModelError(f"{type(net).__name__} has no convolution for Grad-CAM")
    return convs[-1]


def gradcam(model: Classifier, images: np.ndarray, targets: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """uint8 images (N, H, W, C) and the class to explain for each -> maps (N, H, W) in 0..1, 1 where the
    evidence for that class is strongest. The network is explained without test-time augmentation (the
    flipped view would mirror the map)."""
    model = model.eval()
    device = next(model.parameters()).device
    cam = LayerGradCam(model.net, last_conv(model.net))
    out = []
    for start in range(0, len(images), batch_size):
        batch = model.normalise(to_nchw(images[start : start + batch_size], device)).requires_grad_(True)
        target = torch.as_tensor(targets[start : start + batch_size], device=device).long()
        with torch.enable_grad():
            maps = cam.attribute(batch, target=target, relu_attributions=True)
        maps = LayerAttribution.interpolate(maps, tuple(batch.shape[2:]), interpolate_mode="bilinear")
        maps = maps[:, 0].detach().float()
        peak = maps.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
        out.append((maps.clamp_min(0) / peak).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, *images.shape[1:3]), np.float32)


def seeded_sample(correct: np.ndarray, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of up to `count` correctly and `count` wrongly classified images, drawn with `seed` (the same
    images in every run on the same test split, so that runs compare on the same pictures), sorted."""
    rng = np.random.default_rng(seed)
    picked = []
    for mask in (correct, ~correct):
        pool = np.flatnonzero(mask)
        picked.append(np.sort(rng.choice(pool, size=min(count, len(pool)), replace=False)))
    return picked[0], picked[1]
