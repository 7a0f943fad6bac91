"""Batched augmentation: shape and dtype kept, deterministic for a seed, and doing what it says."""

from __future__ import annotations

import pytest
import torch

from imgclf.augment import AlternatingFlip, Augment, cutout, flip, translate


def batch(n: int = 16) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "augment", [Augment(flip=True), Augment(translate=2), Augment(cutout=8), Augment(flip=True, translate=4, cutout=12)]
)
def test_shape_dtype_and_determinism(augment):
    images = batch()
    a = augment(images, torch.Generator().manual_seed(7))
    b = augment(images, torch.Generator().manual_seed(7))
    c = augment(images, torch.Generator().manual_seed(8))
    assert a.shape == images.shape and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_flip_mirrors_some_images_and_keeps_the_others():
    images = batch(64)
    out = flip(images, torch.Generator().manual_seed(0))
    mirrored = [torch.equal(o, i.flip(2)) for o, i in zip(out, images)]
    kept = [torch.equal(o, i) for o, i in zip(out, images)]
    assert all(m or k for m, k in zip(mirrored, kept)) and 10 < sum(mirrored) < 54


def test_translate_shifts_with_reflection():
    images = batch(32)
    out = translate(images, 2, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2), mode="reflect")
    for o, p in zip(out, padded):  # each output is some 32x32 window of its padded image
        assert any(torch.equal(o, p[:, dy : dy + 32, dx : dx + 32]) for dy in range(5) for dx in range(5))


def test_cutout_zeroes_one_square_at_most_size_squared():
    images = batch(32) | 1  # no zero pixels to begin with
    out = cutout(images, 6, torch.Generator().manual_seed(0))
    zeroed = (out == 0).all(dim=1).flatten(1).sum(1)
    assert (zeroed <= 36).all() and (zeroed > 0).all()


def test_alternating_flip_mirrors_each_image_in_every_other_epoch():
    flips = AlternatingFlip(1000, seed=3)
    index = torch.randperm(1000)[:256]
    odd, even = flips.mask(1, index), flips.mask(2, index)
    assert torch.equal(odd, ~even) and torch.equal(odd, flips.mask(3, index))
    assert 90 < int(odd.sum()) < 166  # about half
    assert torch.equal(odd, AlternatingFlip(1000, seed=3).mask(1, index))  # the seed fixes the halves
    images = batch(256)
    out = Augment(flip=True)(images, torch.Generator().manual_seed(0), flip_mask=odd)
    for o, i, m in zip(out, images, odd):
        assert torch.equal(o, i.flip(2) if m else i)
