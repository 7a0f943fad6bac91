"""Every registered model trains on CPU; checkpoints round-trip without pickle."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from conftest import card_for
from imgclf.architectures import list_models
from imgclf.card import CardError, ModelCard
from imgclf.models import (
    Classifier,
    GlobalAvgPool,
    TutorialLeNet,
    build,
    constructor,
    load_checkpoint_dir,
    make_deterministic,
    pool_wide,
    predict_proba,
    save_checkpoint,
)

# Every model in the registry, plus torchvision classifiers as `torchvision:<name>` (a small one here).
ALL_MODELS = list_models() + ["torchvision:mobilenet_v3_small", "torchvision:resnet18"]


@pytest.mark.parametrize("name", ALL_MODELS)
@pytest.mark.parametrize("channels, size, classes", [(1, 32, 10), (3, 32, 100), (3, 64, 2)])
def test_forward_and_backward(name, channels, size, classes):
    if name.startswith("torchvision:") and channels == 1:
        with pytest.raises(ValueError, match="set data.channels to 3"):
            build(card_for(name, channels, size, classes))
        return
    torch.manual_seed(0)
    model = build(card_for(name, channels, size, classes))
    images = torch.randint(0, 256, (4, channels, size, size), dtype=torch.uint8)
    logits = model(images)
    assert logits.shape == (4, classes)
    loss = torch.nn.functional.cross_entropy(logits, torch.arange(4) % classes)
    loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_loss_falls_on_a_tiny_batch(name):
    torch.manual_seed(0)
    model = build(card_for(name))
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(8) % 10
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
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
        build(card_for("lenet", size=8))


def test_lenet_is_the_tutorial_function():
    """LeNet applies ReLU after the max-pool, the tutorial (TutorialLeNet, which bench/training.py's
    reference loop trains) before it: outputs and gradients agree to the bit."""
    torch.manual_seed(0)
    ours = constructor("lenet")(3, 32, 10)
    tutorial = TutorialLeNet(3, 32, 10)
    tutorial.load_state_dict(ours.state_dict())
    x = torch.randn(32, 3, 32, 32)
    a, b = ours(x), tutorial(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    for ga, gb in zip(
        torch.autograd.grad(a.square().sum(), list(ours.parameters())),
        torch.autograd.grad(b.square().sum(), list(tutorial.parameters())),
    ):
        torch.testing.assert_close(ga, gb, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["lenet", "lenet-bn"])
def test_lenet_pools_bf16_maps_in_fp32_to_the_same_values(name):
    """In bf16 autocast on a CPU, LeNet pools its first maps in fp32 (faster there) and hands the result
    on in bf16: the logits and gradients are those of pooling them in bf16, to the bit."""
    torch.manual_seed(0)
    ours = constructor(name)(3, 32, 10)
    x = torch.randn(16, 3, 32, 32)

    def bf16_pools(model, x):  # the forward pass with every map pooled in the dtype autocast gave it
        x = model.pool(model.conv1(x))
        x = F.relu(model.bn1(x) if name == "lenet-bn" else x)
        x = model.pool(model.conv2(x))
        return model.classify(F.relu(model.bn2(x) if name == "lenet-bn" else x))

    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = ours(x), bf16_pools(ours, x)
        seen = []  # the dtype the pool is given, and the one handed on
        pooled = pool_wide(lambda maps: seen.append(maps.dtype) or ours.pool(maps), ours.conv1(x))
        assert seen == [torch.float32] and pooled.dtype == torch.bfloat16
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    for ga, gb in zip(
        torch.autograd.grad(a.float().square().sum(), list(ours.parameters())),
        torch.autograd.grad(b.float().square().sum(), list(ours.parameters())),
    ):
        torch.testing.assert_close(ga, gb, rtol=0, atol=0)


def test_normalisation_travels_in_the_model():
    model = build(card_for("lenet"))
    assert isinstance(model, Classifier)
    assert set(model.state_dict()) >= {"mean", "std"}
    assert model.mean.flatten().tolist() == [0.5] * 3
    images = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8).permute(0, 3, 1, 2)  # channels_last
    x = model.normalise(images)
    torch.testing.assert_close(x, (images.float() / 255 - 0.5) / 0.25)
    assert x.is_contiguous(memory_format=torch.channels_last)
    # Each channel its own mean and std, in either memory layout.
    model.mean.copy_(torch.tensor([0.1, 0.5, 0.9]).view(1, 3, 1, 1))
    model.std.copy_(torch.tensor([0.2, 0.3, 0.4]).view(1, 3, 1, 1))
    for batch in (images, images.contiguous()):
        x = model.normalise(batch)
        torch.testing.assert_close(x, (batch.float() / 255 - model.mean) / model.std)
        assert x.stride() == batch.stride()


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build(card_for("lenet", channels=1))
    save_checkpoint(model, card_for("lenet", channels=1), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.safetensors"]
    loaded, card = load_checkpoint_dir(tmp_path)
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 1), dtype=np.uint8)
    np.testing.assert_array_equal(predict_proba(model, images), predict_proba(loaded, images))
    assert card == card_for("lenet", channels=1)
    assert predict_proba(loaded, images[:0]).shape == (0, 10)


def test_the_model_card_round_trips_through_json():
    card = card_for("fastnet", tta_flip=True, tta_translate=1, train={"epochs": 7})
    assert ModelCard.from_json(card.to_json()) == card


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(colour="red"), "model.json: colour: unknown field"),
        (lambda d: d.pop("tta_flip"), "model.json: tta_flip: missing field"),
        (lambda d: d.update(card_version=0), "model.json: card_version: 0, but this code reads version 1"),
        (lambda d: d.pop("card_version"), "model.json: card_version: None, but this code reads version 1"),
        (lambda d: d.update(image_size="32"), "model.json: image_size: expected an integer, got '32'"),
        (lambda d: d.update(mean=[0.5, 0.5]), "model.json: mean: expected 3 values"),
        (lambda d: d.update(classes=["one"]), "model.json: classes: a classifier needs at least 2"),
    ],
)
def test_a_bad_model_card_fails_loudly_naming_the_field(tmp_path, edit, message):
    """No defaults fill in what a card lacks: a model written by other code is refused, not misread."""
    raw = card_for("lenet").to_dict()
    edit(raw)
    (tmp_path / "model.json").write_text(json.dumps(raw))
    with pytest.raises(CardError, match=message):
        ModelCard.read(tmp_path / "model.json")


def test_pretrained_weights_round_trip(tmp_path):
    """Save random weights as a pretrained file, fine-tune from them: the backbone loads, the head is new."""
    from torchvision.models import get_model

    source = get_model("mobilenet_v3_small", weights=None)
    torch.save(source.state_dict(), tmp_path / "weights.pth")
    model = build(card_for("torchvision:mobilenet_v3_small", classes=7), pretrained=str(tmp_path / "weights.pth"))
    torch.testing.assert_close(model.net.features[0][0].weight, source.features[0][0].weight)
    assert model.net.classifier[-1].out_features == 7
    from safetensors.torch import save_file

    save_file(source.state_dict(), str(tmp_path / "weights.safetensors"))
    again = build(
        card_for("torchvision:mobilenet_v3_small", classes=7), pretrained=str(tmp_path / "weights.safetensors")
    )
    torch.testing.assert_close(again.net.features[0][0].weight, source.features[0][0].weight)


def test_missing_pretrained_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="train.pretrained: no such file: .*name torchvision's weights"):
        build(card_for("torchvision:resnet18"), pretrained=str(tmp_path / "nope.pth"))


def test_fastnet_whitening_comes_from_the_data():
    torch.manual_seed(0)
    model = build(card_for("fastnet"))
    images = torch.rand(64, 3, 32, 32)
    model.net.init_from_data(images)
    weights = model.net.whiten.weight
    assert weights.shape == (24, 3, 2, 2) and not weights.requires_grad
    torch.testing.assert_close(weights[:12], -weights[12:])
    whitened = torch.nn.functional.conv2d(images, weights[:12]).permute(0, 2, 3, 1).reshape(-1, 12)
    covariance = torch.cov(whitened.T.double())
    assert torch.allclose(covariance, torch.eye(12, dtype=torch.float64), atol=0.05)  # decorrelated


def test_make_deterministic_swaps_adaptive_average_pooling():
    torch.manual_seed(0)
    model = build(card_for("torchvision:resnet18")).eval()
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    before = model(images)
    make_deterministic(model)
    assert isinstance(model.net.avgpool, GlobalAvgPool)
    torch.testing.assert_close(model(images), before)


def test_tta_flip_averages_an_image_and_its_mirror():
    torch.manual_seed(0)
    model = build(card_for("lenet", tta_flip=True)).eval()
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    x = model.normalise(images)
    torch.testing.assert_close(model(images), 0.5 * (model.net(x) + model.net(x.flip(3))))
    model.train()
    torch.testing.assert_close(model(images), model.net(x))  # never while training


def test_tta_translate_adds_views_shifted_up_left_and_down_right():
    torch.manual_seed(0)
    model = build(card_for("lenet", tta_flip=True, tta_translate=1)).eval()
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    x = model.normalise(images)

    def mirrored(v):
        return 0.5 * (model.net(v) + model.net(v.flip(3)))

    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    expected = 0.5 * mirrored(x) + 0.25 * (mirrored(padded[:, :, :32, :32]) + mirrored(padded[:, :, 2:, 2:]))
    torch.testing.assert_close(model(images), expected)
    assert not torch.allclose(model(images), mirrored(x))


def test_lenet_bn_is_lenet_with_normalised_pooled_maps():
    torch.manual_seed(0)
    plain, normed = constructor("lenet")(3, 32, 10), constructor("lenet-bn")(3, 32, 10)
    assert set(plain.state_dict()) < set(normed.state_dict())
    normed.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(8, 3, 32, 32)
    # In eval mode, with fresh running statistics (mean 0, variance 1) and unit scales, the
    # normalisation is the identity up to its epsilon: the two nets agree.
    assert torch.allclose(normed.eval()(x), plain.eval()(x), atol=1e-4)
    normed.train()(x)
    assert normed.bn1.running_mean.abs().sum() > 0  # it does normalise while training


@pytest.mark.skipif(shutil.which("cc") is None, reason="torch.compile on a CPU needs a C compiler (cc)")
def test_fastnet_compiled_under_bf16_autocast_has_finite_gradients():
    """`train.compile` with bf16 autocast (what `precision: auto` gives on a GPU or a CPU with bf16 units),
    here on the CPU: the compiled backward of a global max-pool written as amax returned NaN for every
    gradient below it."""
    torch.manual_seed(0)
    model = build(card_for("fastnet-s"))
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    model.net.init_from_data(model.normalise(images))
    torch._dynamo.reset()
    compiled = torch.compile(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(compiled(images).float(), torch.arange(16) % 10)
    loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert [n for n, p in trainable if not torch.isfinite(p.grad).all()] == []


def test_a_state_dict_that_does_not_fit_names_the_model_and_the_layers(tmp_path):
    from torchvision.models import get_model

    torch.save(get_model("mobilenet_v3_large", weights=None).state_dict(), tmp_path / "large.pth")
    with pytest.raises(ValueError) as error:
        build(card_for("torchvision:mobilenet_v3_small"), pretrained=str(tmp_path / "large.pth"))
    message = str(error.value)
    assert message.startswith(
        f"train.pretrained: {tmp_path / 'large.pth'} does not fit torchvision:mobilenet_v3_small:"
    )
    assert ": missing from the file: features.1.block.1.fc1, " in message  # layers, each once
    assert "; not in the model: features.1.block.1.0, " in message
    assert (
        "; other shapes: features.2.block.0.0.weight ([64, 16, 1, 1] in the file, [72, 16, 1, 1] in the model)"
        in message
    )
    assert message.endswith(" and 121 more")  # the first six of each kind shown


def test_our_own_checkpoint_fits_as_pretrained_weights_with_another_head(tmp_path):
    """A fine-tuned model (models/model.safetensors: the Classifier's `net.*` tensors) fine-tunes again,
    for another number of classes: the head is replaced anyway."""
    torch.manual_seed(0)
    first = build(card_for("torchvision:mobilenet_v3_small", classes=10))
    save_checkpoint(first, card_for("torchvision:mobilenet_v3_small", classes=10), tmp_path)
    again = build(card_for("torchvision:mobilenet_v3_small", classes=3), pretrained=str(tmp_path / "model.safetensors"))
    torch.testing.assert_close(again.net.features[0][0].weight, first.net.features[0][0].weight)
    assert again.net.classifier[-1].out_features == 3


def test_a_weights_name_loads_from_torchs_cache_without_a_network(tmp_path, monkeypatch):
    """`train.pretrained: DEFAULT` builds the model the way torchvision does, from the file torch.hub keeps
    in $TORCH_HOME/hub/checkpoints (what the offline error tells the user to put there)."""
    from torchvision.models import MobileNet_V3_Small_Weights, get_model

    from imgclf.models import cached_weights_file

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    source = get_model("mobilenet_v3_small", weights=None)
    cached = cached_weights_file(MobileNet_V3_Small_Weights.DEFAULT.url)
    assert cached == tmp_path / "torch" / "hub" / "checkpoints" / "mobilenet_v3_small-047dcff4.pth"
    cached.parent.mkdir(parents=True)
    torch.save(source.state_dict(), cached)
    for name in ("DEFAULT", "IMAGENET1K_V1", "MobileNet_V3_Small_Weights.IMAGENET1K_V1"):
        model = build(card_for("torchvision:mobilenet_v3_small", classes=5), pretrained=name)
        torch.testing.assert_close(model.net.features[0][0].weight, source.features[0][0].weight)
        assert model.net.classifier[-1].out_features == 5


def test_an_unknown_weights_name_lists_the_models_weights():
    with pytest.raises(
        ValueError,
        match=r"train.pretrained: torchvision has no weights 'IMAGENET9K' for "
        r"torchvision:mobilenet_v3_small \(it has: DEFAULT, IMAGENET1K_V1\)",
    ):
        build(card_for("torchvision:mobilenet_v3_small"), pretrained="IMAGENET9K")


@pytest.mark.parametrize(
    "name, widths", [("fastnet-s", [32, 128, 128]), ("fastnet", [64, 256, 256]), ("fastnet-l", [96, 384, 384])]
)
def test_fastnet_widths(name, widths):
    """Each conv group's two convolutions have the width its name promises, and the head reads the last."""
    net = build(card_for(name)).net
    convs = [m.out_channels for m in net.layers.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs == [w for w in widths for _ in range(2)]
    assert net.head.in_features == widths[-1]
