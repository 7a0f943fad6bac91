"""Batched augmentation: shape and dtype kept, deterministic for a seed, and doing what it says."""

from __future__ import annotations

import pytest
import torch

from imgclf.augment import (
    AlternatingFlip,
    Augment,
    Mix,
    auto_augment,
    cutout,
    flip,
    random_erase,
    resized_crop,
    translate,
)


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


# ---- the stronger augmentations ------------------------------------------------------------------


@pytest.mark.parametrize(
    "augment",
    [
        Augment(resized_crop=0.3),
        Augment(auto_augment="randaugment", ra_magnitude=15),
        Augment(auto_augment="trivialaugment"),
        Augment(auto_augment="autoaugment"),
        Augment(auto_augment="autoaugment-cifar10"),
        Augment(random_erase=0.5),
        Augment(flip=True, resized_crop=0.08, auto_augment="trivialaugment", cutout=8, random_erase=0.25),
    ],
)
def test_strong_augmentations_are_seeded_and_leave_the_global_generator_alone(augment):
    images = batch()
    before = torch.get_rng_state()
    a = augment(images, torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), before)
    b = augment(images, torch.Generator().manual_seed(7))
    c = augment(images, torch.Generator().manual_seed(8))
    assert augment.active and a.shape == images.shape and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("name", ["randaugment", "trivialaugment", "autoaugment"])
def test_a_policy_draws_its_operations_for_each_image(name):
    """The same image 32 times over comes out in many different ways (one op for the whole batch would
    give at most a few)."""
    images = batch(1).expand(32, -1, -1, -1).contiguous()
    out = auto_augment(images, name, torch.Generator().manual_seed(0))
    distinct = {o.numpy().tobytes() for o in out}
    assert len(distinct) > 8


def test_resized_crop_zooms_in_and_keeps_the_image_in_order():
    """On a left-to-right ramp every output row still rises left to right, over a narrower range where
    the crop zoomed in; min_scale near 1 leaves nearly the whole image."""
    ramp = torch.arange(64, dtype=torch.uint8).mul(4).view(1, 1, 1, 64).expand(32, 3, 64, 64).contiguous()
    out = resized_crop(ramp, 0.08, torch.Generator().manual_seed(0))
    rows = out[:, 0].int()
    assert (rows.diff(dim=2) >= 0).all()
    spans = rows[:, :, -1] - rows[:, :, 0]
    assert (spans.float().mean(1) < 0.9 * 252).sum() > 16  # most images zoomed in
    whole = resized_crop(ramp, 0.999, torch.Generator().manual_seed(0))
    assert (whole.int() - ramp.int()).abs().float().mean() < 6


def test_random_erasing_replaces_one_rectangle_of_two_to_33_percent():
    images = batch(64) // 2 * 2  # even pixels: noise differs from them in at least half of its draws
    out = random_erase(images, 1.0, torch.Generator().manual_seed(0))
    changed = (out != images).any(dim=1)
    share = changed.flatten(1).float().mean(1)
    assert (share > 0).all() and (share < 0.36).all()  # a third of the area, sides rounded to pixels
    for mask in changed:  # all within one rectangle: the bounding box of the changes
        ys, xs = mask.nonzero(as_tuple=True)
        box = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
        assert box.float().mean() > 0.8
    assert torch.equal(random_erase(images, 0.0, torch.Generator().manual_seed(0)), images)


def test_mixup_mixes_each_image_with_its_neighbour_and_its_labels_alike():
    images, labels = batch(16), torch.arange(16) % 10
    before = torch.get_rng_state()
    mixed, target = Mix(10, mixup_alpha=0.4)(images, labels, torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), before)
    assert mixed.dtype == torch.float32 and target.shape == (16, 10)
    torch.testing.assert_close(target.sum(1), torch.ones(16))
    lam = float(target[0, labels[0]])
    torch.testing.assert_close(mixed, lam * images.float() + (1 - lam) * images.roll(1, 0).float())
    again, _ = Mix(10, mixup_alpha=0.4)(images, labels, torch.Generator().manual_seed(3))
    assert torch.equal(mixed, again)


def test_cutmix_pastes_a_box_of_the_neighbour_weighted_by_its_area():
    images, labels = batch(16), torch.arange(16) % 10
    mixed, target = Mix(10, cutmix_alpha=1.0)(images, labels, torch.Generator().manual_seed(5))
    assert mixed.dtype == torch.uint8
    own = (mixed == images).all(dim=1).flatten(1).float().mean(1)
    torch.testing.assert_close(target[torch.arange(16), labels], own, atol=0.02, rtol=0)


def test_with_both_alphas_each_batch_gets_one_of_the_two():
    images, labels = batch(16), torch.arange(16) % 10
    mix = Mix(10, mixup_alpha=0.8, cutmix_alpha=1.0)
    generator = torch.Generator().manual_seed(0)
    kinds = set()
    for _ in range(12):
        mixed, _ = mix(images, labels, generator)
        whole_pixels = (mixed.float() == images.float()).all(dim=1).float().mean()
        kinds.add("cutmix" if whole_pixels > 0.3 else "mixup")
    assert kinds == {"cutmix", "mixup"}
