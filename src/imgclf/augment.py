"""Batched augmentation of uint8 image tensors (N, C, H, W) on whatever device they live on.

Every transform works on the whole batch at once with tensor ops (no per-sample Python), draws its
randomness from an explicit `torch.Generator`, and keeps shape and dtype, so a fixed seed gives the
same batch on every run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F


@dataclass(frozen=True)
class Augment:
    flip: bool = False  # random horizontal flip, probability 1/2
    translate: int = 0  # random shift by up to this many pixels each way (reflection padding)
    cutout: int = 0  # side of a square zeroed at a random place; 0 = off

    @property
    def active(self) -> bool:
        return self.flip or self.translate > 0 or self.cutout > 0

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator, flip_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`flip_mask` (bool, one per image) says which images to mirror instead of drawing it at random."""
        if self.translate:
            images = translate(images, self.translate, generator)
        if self.flip:
            images = flip(images, generator) if flip_mask is None else mirror(images, flip_mask)
        if self.cutout:
            images = cutout(images, self.cutout, generator)
        return images


def _uniform_ints(high: int, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    # Drawn on the generator's device (CPU by default), then moved: the same numbers on any device.
    return torch.randint(0, high, (n,), generator=generator).to(device)


def flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return mirror(images, _uniform_ints(2, len(images), generator, images.device).bool())


def mirror(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror left-right the images where `mask` (N,) is true."""
    return torch.where(mask.to(images.device).view(-1, 1, 1, 1), images.flip(3), images)


class AlternatingFlip:
    """Which training images to mirror in each epoch: a random half in odd epochs and the other half in
    even ones, so every image is seen both ways in any two consecutive epochs (airbench's alternating
    flip, K. Jordan 2024: more varied than flipping each time at random). The halves come from `seed`
    alone, so a resumed run flips the same images as an uninterrupted one."""

    def __init__(self, n: int, seed: int, device: torch.device | str = "cpu") -> None:
        # Drawn on the CPU (the same halves on any device), kept where the batch indices live.
        self.first = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(seed)).bool().to(device)

    def mask(self, epoch: int, index: torch.Tensor) -> torch.Tensor:
        """The flip mask of the images at `index` (on the device given) in `epoch` (1-based)."""
        chosen = self.first[index]
        return chosen if epoch % 2 == 1 else ~chosen


def translate(images: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by (dy, dx) in [-pad, pad], filling with the reflected border."""
    n, c, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")
    dy = _uniform_ints(2 * pad + 1, n, generator, images.device)
    dx = _uniform_ints(2 * pad + 1, n, generator, images.device)
    arange_h = torch.arange(h, device=images.device)
    arange_w = torch.arange(w, device=images.device)
    # Gather the rows, then the columns, of each padded image at its own offset.
    rows = (dy.view(n, 1) + arange_h).view(n, 1, h, 1).expand(n, c, h, w + 2 * pad)
    cols = (dx.view(n, 1) + arange_w).view(n, 1, 1, w).expand(n, c, h, w)
    return torch.gather(torch.gather(padded, 2, rows), 3, cols)


def cutout(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Zero a size x size square (clipped at the border) centred at a random pixel of each image."""
    n, _, h, w = images.shape
    cy = _uniform_ints(h, n, generator, images.device).view(n, 1, 1, 1)
    cx = _uniform_ints(w, n, generator, images.device).view(n, 1, 1, 1)
    ys = torch.arange(h, device=images.device).view(1, 1, h, 1)
    xs = torch.arange(w, device=images.device).view(1, 1, 1, w)
    half = size // 2
    inside = (ys >= cy - half) & (ys < cy - half + size) & (xs >= cx - half) & (xs < cx - half + size)
    return images.masked_fill(inside, 0)
