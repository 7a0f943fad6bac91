"""Batched augmentation of uint8 image tensors (N, C, H, W) on whatever device they live on.

Every transform draws its randomness from an explicit `torch.Generator` (saved in training checkpoints),
so a fixed seed gives the same batch on every run and a resumed run the same batches as an uninterrupted
one. Most work on the whole batch at once with tensor ops and keep shape and dtype. Two kinds come from
torchvision.transforms.v2 and draw from torch's global generator instead: the automatic policies
(RandAugment, TrivialAugmentWide, AutoAugment), applied image by image so that each image gets its own
operations, and MixUp / CutMix, which mix the batch and return soft targets. They run inside
`torch.random.fork_rng`, seeded from our generator: seeded and resumable like the others, and leaving
the global generator as it was.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch.nn import functional as F

# train.auto_augment's names -> (torchvision.transforms.v2 class, AutoAugment policy)
POLICIES = {
    "randaugment": ("RandAugment", None),
    "trivialaugment": ("TrivialAugmentWide", None),
    "autoaugment": ("AutoAugment", "IMAGENET"),
    "autoaugment-cifar10": ("AutoAugment", "CIFAR10"),
}


@dataclass(frozen=True)
class Augment:
    """The order is that of torchvision's reference training script: crop, flip, policy, (normalise,)
    erase; then the batch is mixed (Mix)."""

    flip: bool = False  # random horizontal flip, probability 1/2
    translate: int = 0  # random shift by up to this many pixels each way (reflection padding)
    cutout: int = 0  # side of a square zeroed at a random place; 0 = off
    resized_crop: float = 0.0  # random resized crop keeping at least this share of the area; 0 = off
    auto_augment: str = "none"  # a name of POLICIES, or none
    ra_magnitude: int = 9  # RandAugment's magnitude, 0..30
    random_erase: float = 0.0  # probability of erasing a random rectangle of each image; 0 = off

    @property
    def active(self) -> bool:
        return (
            self.flip
            or self.translate > 0
            or self.cutout > 0
            or self.resized_crop > 0
            or self.auto_augment != "none"
            or self.random_erase > 0
        )

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator, flip_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`flip_mask` (bool, one per image) says which images to mirror instead of drawing it at random."""
        if self.resized_crop:
            images = resized_crop(images, self.resized_crop, generator)
        if self.translate:
            images = translate(images, self.translate, generator)
        if self.flip:
            images = flip(images, generator) if flip_mask is None else mirror(images, flip_mask)
        if self.auto_augment != "none":
            images = auto_augment(images, self.auto_augment, generator, self.ra_magnitude)
        if self.cutout:
            images = cutout(images, self.cutout, generator)
        if self.random_erase:
            images = random_erase(images, self.random_erase, generator)
        return images


@dataclass(frozen=True)
class Mix:
    """MixUp and CutMix (torchvision.transforms.v2): each batch mixed with itself rolled by one, its
    labels turned into the matching soft targets; with both alphas set, one of the two per batch at
    random (as torchvision's reference script does)."""

    num_classes: int
    mixup_alpha: float = 0.0  # Beta(alpha, alpha) mixing weights; 0 = off
    cutmix_alpha: float = 0.0

    @property
    def active(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, int64 labels (N,)) -> (mixed images, float soft targets (N, num_classes)). MixUp's
        images are float32 on the 0..255 scale (the model normalises them as it does uint8 ones)."""
        from torchvision.transforms import v2

        choices = []
        if self.mixup_alpha:
            choices.append(v2.MixUp(alpha=self.mixup_alpha, num_classes=self.num_classes))
            images = images.float()  # a weighted sum of two images is not a uint8 image
        if self.cutmix_alpha:
            choices.append(v2.CutMix(alpha=self.cutmix_alpha, num_classes=self.num_classes))
        transform = choices[0] if len(choices) == 1 else v2.RandomChoice(choices)
        with _seeded_global_rng(generator):
            return transform(images, labels)


@contextmanager
def _seeded_global_rng(generator: torch.Generator) -> Iterator[None]:
    """torch's global CPU generator seeded from `generator` for the block, then restored: for
    torchvision's transforms, which draw from it."""
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def auto_augment(images: torch.Tensor, name: str, generator: torch.Generator, magnitude: int = 9) -> torch.Tensor:
    """torchvision.transforms.v2's policy `name` (see POLICIES) applied to each image on its own: every
    image draws its own operations and magnitudes. A Python loop over the images, on their device."""
    from torchvision.transforms import v2

    cls, policy = POLICIES[name]
    if cls == "RandAugment":
        transform = v2.RandAugment(magnitude=magnitude)
    elif cls == "AutoAugment":
        transform = v2.AutoAugment(policy=getattr(v2.AutoAugmentPolicy, policy))
    else:
        transform = getattr(v2, cls)()
    with _seeded_global_rng(generator), _one_thread(images.device):
        return torch.stack([transform(image) for image in images])


@contextmanager
def _one_thread(device: torch.device) -> Iterator[None]:
    """On a CPU, torch on one thread for the block: an operation on one small image costs less than
    waking the other threads (per-image policies ran 2-30x faster on 2 busy cores, bench/training.py)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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


def _uniform(low: float, high: float, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator)


def _boxes(
    n: int, h: int, w: int, scale: tuple[float, float], ratio: tuple[float, float], generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(heights, widths, fits) of boxes of a random share of the area in `scale` and a log-uniform
    aspect ratio in `ratio`: torchvision's RandomResizedCrop / RandomErasing draw, with its 10 attempts
    made at once and the first that fits the image kept (`fits` false where none did)."""
    attempts = 10
    area = _uniform(*scale, (n, attempts), generator) * h * w
    aspect = torch.exp(_uniform(math.log(ratio[0]), math.log(ratio[1]), (n, attempts), generator))
    heights = torch.sqrt(area / aspect).round().long()
    widths = torch.sqrt(area * aspect).round().long()
    ok = (heights >= 1) & (heights <= h) & (widths >= 1) & (widths <= w)
    first = ok.long().argmax(1, keepdim=True)  # the first attempt that fits (0 when none does)
    return heights.gather(1, first).squeeze(1), widths.gather(1, first).squeeze(1), ok.any(1)


def resized_crop(
    images: torch.Tensor,
    min_scale: float,
    generator: torch.Generator,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """torchvision's RandomResizedCrop, batched: a crop of a random share (min_scale..1) of each image's
    area with a random aspect ratio (3/4..4/3), at a random place, resized bilinearly back to the
    image's size (the whole image where no attempt fits, a close stand-in for torchvision's central
    fallback). Scale jitter for images larger than CIFAR's 32 px, where a crop keeps enough detail."""
    n, c, h, w = images.shape
    heights, widths, fits = _boxes(n, h, w, (min_scale, 1.0), ratio, generator)
    heights, widths = torch.where(fits, heights, h), torch.where(fits, widths, w)
    top = (torch.rand(n, generator=generator) * (h - heights + 1)).floor()
    left = (torch.rand(n, generator=generator) * (w - widths + 1)).floor()
    # An affine grid per image mapping the output onto its box, in grid_sample's [-1, 1] coordinates
    # (align_corners=False: pixel centres at (2i + 1) / size - 1).
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = widths / w
    theta[:, 0, 2] = (2 * left + widths) / w - 1
    theta[:, 1, 1] = heights / h
    theta[:, 1, 2] = (2 * top + heights) / h - 1
    grid = F.affine_grid(theta.to(images.device), [n, c, h, w], align_corners=False)
    out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.round_().clamp_(0, 255).to(images.dtype)


def random_erase(
    images: torch.Tensor,
    p: float,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.02, 1 / 3),
    ratio: tuple[float, float] = (0.3, 3.3),
) -> torch.Tensor:
    """Random erasing (Zhong et al. 2017; torchvision's RandomErasing ranges), batched: with probability
    `p`, a rectangle of 2-33% of the image's area and aspect 0.3-3.3 at a random place filled with
    random pixels (timm's "pixel" mode: noise, not a flat colour the net could learn to spot)."""
    n, c, h, w = images.shape
    heights, widths, fits = _boxes(n, h, w, scale, ratio, generator)
    erase = fits & (torch.rand(n, generator=generator) < p)
    top = (torch.rand(n, generator=generator) * (h - heights + 1)).floor().long()
    left = (torch.rand(n, generator=generator) * (w - widths + 1)).floor().long()
    noise = torch.randint(0, 256, images.shape, generator=generator, dtype=torch.uint8).to(images.device)
    ys = torch.arange(h).view(1, h, 1)
    xs = torch.arange(w).view(1, 1, w)
    inside = (
        erase.view(n, 1, 1)
        & (ys >= top.view(n, 1, 1))
        & (ys < (top + heights).view(n, 1, 1))
        & (xs >= left.view(n, 1, 1))
        & (xs < (left + widths).view(n, 1, 1))
    )
    return torch.where(inside.unsqueeze(1).to(images.device), noise.to(images.dtype), images)
