"""Optimizers and schedules: learning-rate multiples for BatchNorm biases, schedule shapes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import card_for, default_config
from imgclf.models import build
from imgclf.optim import lr_factor, make_optimizer, make_scheduler, orthogonalise

TRAIN = default_config().train
META = card_for("fastnet-s")


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "rmsprop", "muon"])
def test_every_optimizer_steps(name):
    model = build(META)
    optimizer = make_optimizer(model, dataclasses.replace(TRAIN, optimizer=name, lr=0.01))
    before = model.net.head.weight.clone()
    model(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)).sum().backward()
    optimizer.step()
    assert not torch.equal(before, model.net.head.weight)


@pytest.mark.parametrize(
    "name, reference",
    [
        (
            "sgd",
            lambda params, cfg: torch.optim.SGD(
                params, lr=cfg.lr, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay, foreach=False
            ),
        ),
        ("adam", lambda params, cfg: torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False)),
        (
            "adamw",
            lambda params, cfg: torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False),
        ),
        (
            "rmsprop",
            lambda params, cfg: torch.optim.RMSprop(
                params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, foreach=False
            ),
        ),
    ],
)
def test_fast_optimizers_step_like_the_reference_loop(name, reference):
    """Our optimizers run fused or multi-tensor kernels: three steps must match PyTorch's plain
    per-parameter implementation of the same algorithm."""
    cfg = dataclasses.replace(TRAIN, optimizer=name, lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-3)
    ours = three_steps(make_optimizer, cfg)
    plain = three_steps(lambda model, cfg: reference(model.parameters(), cfg), cfg)
    for a, b in zip(ours, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def three_steps(make, cfg, filters_fixed: bool = False) -> list[torch.Tensor]:
    """LeNet's weights after three steps of the optimizer `make(model, cfg)` on a fixed batch."""
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    model = build(card_for("lenet"))  # no bias ahead of a BatchNorm: no gradient that is only rounding noise
    for p in model.parameters():
        p.requires_grad_(not (filters_fixed and p.ndim == 4))
    optimizer = make(model, cfg)
    for _ in range(3):
        optimizer.zero_grad()
        model(images).square().mean().backward()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


def test_muon_steps_other_parameters_like_sgd():
    """muon's SGD part (every parameter but the convolution filters) is PyTorch's SGD."""
    cfg = dataclasses.replace(TRAIN, optimizer="muon", lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-3)
    # The filters fixed, so that the same gradients reach both optimizers.
    ours = three_steps(make_optimizer, cfg, filters_fixed=True)
    plain = three_steps(
        lambda model, cfg: torch.optim.SGD(
            [p for p in model.parameters() if p.ndim != 4],
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=True,
            weight_decay=cfg.weight_decay,
            foreach=False,
        ),
        cfg,
        filters_fixed=True,
    )
    for a, b in zip(ours, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(64, 216), (256, 2304), (300, 20), (10, 10)])
def test_orthogonalise_keeps_the_singular_vectors_and_evens_the_singular_values(shape):
    """Newton-Schulz gives U S' V^T for a matrix U S V^T, with S' between about 0.7 and 1.2 however
    spread S is (here over two orders of magnitude)."""
    torch.manual_seed(0)
    u, _, vt = torch.linalg.svd(torch.randn(*shape, dtype=torch.float64), full_matrices=False)
    s = torch.logspace(0, -2, len(vt), dtype=torch.float64)
    got = orthogonalise(((u * s) @ vt).float(), steps=5).double()
    inner = u.T @ got @ vt.T
    spread = torch.diagonal(inner)
    assert (spread > 0.6).all() and (spread < 1.25).all()
    assert (inner - torch.diag(spread)).abs().max() < 0.02


def test_muon_takes_orthogonal_steps_on_normalised_filters():
    cfg = dataclasses.replace(TRAIN, optimizer="muon", muon_lr=0.1, muon_momentum=0.6, nesterov=True)
    torch.manual_seed(0)
    model = build(META)
    optimizer = make_optimizer(model, cfg)
    conv = model.net.layers[1].conv2
    before = conv.weight.detach().clone()
    model(torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)).square().mean().backward()
    gradient = conv.weight.grad.reshape(len(before), -1).double()
    optimizer.step()
    normalised = before * (len(before) ** 0.5 / before.norm())
    step = (conv.weight.detach() - normalised).reshape(len(before), -1).double() / -cfg.muon_lr
    u, s, vt = torch.linalg.svd(gradient, full_matrices=False)
    spread = torch.diagonal(u.T @ step @ vt.T)  # the first step follows the gradient's singular vectors
    assert torch.linalg.matrix_norm(step - (u * spread) @ vt) < 0.05 * torch.linalg.matrix_norm(step)
    # with evened singular values: three iterations lift all but the smallest of the gradient's
    assert spread.max() < 1.25 and spread.median() > 0.6
    assert spread.min() / spread.max() > 5 * s.min() / s.max()


def test_norm_biases_learn_faster_with_the_same_decay_per_step():
    cfg = dataclasses.replace(TRAIN, optimizer="sgd", lr=0.5, weight_decay=1e-3, norm_bias_lr_scale=64.0)
    model = build(META)
    others, biases = make_optimizer(model, cfg).param_groups
    norm_biases = {id(m.bias) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert {id(p) for p in biases["params"]} == norm_biases
    assert biases["lr"] == 32.0 and others["lr"] == 0.5
    assert biases["lr"] * biases["weight_decay"] == pytest.approx(others["lr"] * others["weight_decay"])
    assert len(biases["params"]) + len(others["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize(
    "schedule, expected",
    [
        ("constant", [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0]),
        ("onecycle", [0.25, 0.5, 0.75, 1.0, 1.0, 0.75, 0.5, 0.25]),
    ],
)
def test_schedules(schedule, expected):
    got = [lr_factor(step, 8, schedule, 0.5, 0.0) for step in range(8)]
    assert got == pytest.approx(expected)
    cosine = [lr_factor(step, 100, "cosine", 0.0, 0.1) for step in range(100)]
    assert cosine[0] == pytest.approx(1.0) and cosine[-1] == pytest.approx(0.1, abs=0.01)
    assert all(a >= b for a, b in zip(cosine, cosine[1:]))


def test_scheduler_scales_every_group():
    cfg = dataclasses.replace(
        TRAIN,
        optimizer="sgd",
        lr=1.0,
        norm_bias_lr_scale=10.0,
        schedule="onecycle",
        warmup_fraction=0.0,
        final_lr_fraction=0.0,
    )
    optimizer = make_optimizer(build(META), cfg)
    scheduler = make_scheduler(optimizer, cfg, total_steps=10)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.5, 5.0])


def test_micro_batches_accumulate_to_the_whole_batch():
    """Without BatchNorm (LeNet), micro-batches give the same step as the whole batch."""
    import numpy as np

    from imgclf.train import Arrays, Training

    rng = np.random.default_rng(0)
    data = Arrays(rng.integers(0, 256, (96, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 96))
    weights = []
    for micro in (0, 16):
        torch.manual_seed(0)
        cfg = dataclasses.replace(
            TRAIN, model="lenet", optimizer="sgd", lr=0.05, batch_size=48, micro_batch=micro, epochs=1
        )
        training = Training(build(card_for("lenet")), data, data, cfg, torch.device("cpu"))
        training.run_epoch()
        weights.append(training.model.net.fc3.weight.detach().clone())
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-4, atol=1e-5)
