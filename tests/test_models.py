"""Every registered model trains on CPU; checkpoints round-trip without pickle."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imgclf.models import MODELS, Classifier, build, load_checkpoint_dir, predict_proba, save_checkpoint


def meta_for(model: str, channels: int = 3, size: int = 32, classes: int = 10) -> dict:
    return {"model": model, "classes": [str(i) for i in range(classes)], "image_size": size,
            "channels": channels, "mean": [0.5] * channels, "std": [0.25] * channels}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("channels, size, classes", [(1, 32, 10), (3, 32, 100), (3, 64, 2)])
def test_forward_and_backward(name, channels, size, classes):
    torch.manual_seed(0)
    model = build(meta_for(name, channels, size, classes))
    images = torch.randint(0, 256, (4, channels, size, size), dtype=torch.uint8)
    logits = model(images)
    assert logits.shape == (4, classes)
    loss = torch.nn.functional.cross_entropy(logits, torch.arange(4) % classes)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_loss_falls_on_a_tiny_batch(name):
    torch.manual_seed(0)
    model = build(meta_for(name))
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(8) % 10
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_lenet_refuses_images_too_small():
    with pytest.raises(ValueError, match="at least 16x16.*data.image_size"):
        build(meta_for("lenet", size=8))


def test_normalisation_travels_in_the_model():
    model = build(meta_for("lenet"))
    assert isinstance(model, Classifier)
    assert set(model.state_dict()) >= {"mean", "std"}
    assert model.mean.flatten().tolist() == [0.5] * 3


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build(meta_for("lenet", channels=1))
    save_checkpoint(model, meta_for("lenet", channels=1), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.safetensors"]
    loaded, meta = load_checkpoint_dir(tmp_path)
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 1), dtype=np.uint8)
    np.testing.assert_array_equal(predict_proba(model, images), predict_proba(loaded, images))
    assert meta["classes"] == [str(i) for i in range(10)]
    assert predict_proba(loaded, images[:0]).shape == (0, 10)
