"""DP-SGD (train.dp_epsilon, imgclf.privacy): bad values and options that would break the guarantee are
refused naming the key; BatchNorm becomes GroupNorm as Opacus's fixer makes it; the accountant counts
every step, stays within the target and survives a checkpoint; the train stage refuses with exit code 2."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.validators import ModuleValidator
from torch import nn

from conftest import card_for, default_config, default_params, prepare_once, stage, write_params
from imgclf import checkpoint, privacy
from imgclf.config import ConfigError
from imgclf.models import build
from imgclf.train import Arrays, Training, new_card


def random_split(n: int, seed: int) -> Arrays:
    rng = np.random.default_rng(seed)
    return Arrays(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n))


def dp_training(n: int, **train) -> Training:
    train = {"model": "lenet", "dp_epsilon": 3.0, "epochs": 2, "batch_size": 16, **train}
    cfg = default_config(**train).train
    card = card_for(cfg.model, train=dataclasses.asdict(cfg))
    torch.manual_seed(0)
    return Training(build(card), random_split(n, 0), random_split(16, 1), cfg, torch.device("cpu"))


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("dp_epsilon", -1, "train.dp_epsilon: must be >= 0, got -1"),
        ("dp_delta", 0, "train.dp_delta: must be > 0, got 0"),
        ("dp_delta", 1.5, "train.dp_delta: must be < 1, got 1.5"),
        ("dp_max_grad_norm", 0, "train.dp_max_grad_norm: must be > 0, got 0"),
        ("dp_epsilon", "high", "train.dp_epsilon: expected a number, got a string 'high'"),
    ],
)
def test_bad_privacy_values_name_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message):
        default_config(**{key: value})


@pytest.mark.parametrize(
    "key, value",
    [
        ("mixup_alpha", 0.2),
        ("cutmix_alpha", 1.0),
        ("micro_batch", 8),
        ("grad_clip", 1.0),
        ("compile", True),
        ("precision", "fp16"),
        ("model", "fastnet-s"),
    ],
)
def test_options_that_break_the_guarantee_are_refused_with_the_reason(key, value):
    cfg = default_config(dp_epsilon=8.0, **{key: value}).train
    refused = privacy.not_private(cfg)
    assert refused is not None and refused.startswith(f"train.{key}: {value!r} cannot be used with train.dp_epsilon")
    assert privacy.not_private(default_config(dp_epsilon=8.0).train) is None
    if key != "precision":  # (a CPU refuses fp16 before anything else)
        with pytest.raises(privacy.PrivacyError, match=f"train.{key}"):  # the core refuses too
            dp_training(32, **{key: value})


@pytest.mark.parametrize("model", ["lenet-bn", "resnet18"])
def test_batch_norm_becomes_group_norm_as_opacus_fixes_it(model):
    plain = build(card_for(model))
    private = build(card_for(model, train={"dp_epsilon": 8.0}))
    fixed = ModuleValidator.fix(plain)
    assert ModuleValidator.validate(plain) and not ModuleValidator.validate(private.train())

    def layers(net: nn.Module) -> dict[str, tuple]:
        return {n: (type(m).__name__, getattr(m, "num_groups", None)) for n, m in net.named_modules()}

    assert layers(private) == layers(fixed)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in private.modules())
    lines = privacy.describe_replaced(plain, private)
    assert lines and all("replaced by GroupNorm(" in line for line in lines)
    assert sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in plain.modules()) == len(lines)


def test_dp_training_spends_the_target_epsilon_over_the_run_in_poisson_batches():
    run = dp_training(160, epochs=3, dp_epsilon=3.0)  # 10 steps an epoch, q = 1/10
    sizes = [len(b) for b in run.privacy.batches()]
    assert len(sizes) == run.steps_per_epoch == 10 and len(set(sizes)) > 1  # Poisson: sizes vary
    epsilons = []
    for _ in range(3):
        epsilons.append(run.run_epoch()["dp_epsilon"])
        assert run.privacy.steps() == run.epoch * 10
    assert epsilons == sorted(epsilons) and epsilons[0] < epsilons[-1]
    # make_private_with_epsilon chose the noise for the whole run: the last epoch ends just within it.
    assert 3.0 - 0.05 <= epsilons[-1] <= 3.0
    assert run.privacy.budget.delta == 1 / 160
    assert [row["dp_epsilon"] for row in run.history] == epsilons
    # The per-sample gradients Opacus clips: one per image of the batch.
    param = next(p for p in run.model.parameters())
    assert type(run.optimizer).__name__ == "DPOptimizer" and hasattr(param, "grad_sample")


def test_a_smaller_epsilon_means_more_noise():
    loose, strict = dp_training(64, dp_epsilon=8.0), dp_training(64, dp_epsilon=1.0)
    assert strict.privacy.budget.noise_multiplier > loose.privacy.budget.noise_multiplier > 0


def test_empty_poisson_batches_are_noised_steps_too():
    run = dp_training(8, batch_size=1, epochs=3)  # q = 1/8: a batch is empty with probability 0.34
    before = [p.detach().clone() for p in run.model.parameters()]
    empty = 0
    for _ in range(3):
        empty += sum(len(b) == 0 for b in run.privacy.batches())  # what the next epoch does not see
        metrics = run.run_epoch()
        assert np.isfinite(metrics["train_loss"]) and np.isfinite(metrics["dp_epsilon"])
    assert empty > 0
    assert run.privacy.steps() == 24
    assert not any(torch.equal(a, b) for a, b in zip(before, run.model.parameters()))


def test_a_resumed_run_spends_the_same_epsilon_and_ends_with_the_same_weights(tmp_path):
    whole = dp_training(96, epochs=2)
    whole.run_epoch()
    whole.run_epoch()
    first = dp_training(96, epochs=2)
    first.run_epoch()
    checkpoint.save(first.state_dict(), tmp_path)
    resumed = dp_training(96, epochs=2)
    resumed.load_state_dict(checkpoint.load(tmp_path))  # weights_only: the accountant is plain data
    assert resumed.privacy.epsilon() == first.privacy.epsilon()
    resumed.run_epoch()
    assert resumed.history[-1]["dp_epsilon"] == whole.history[-1]["dp_epsilon"]
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


def test_the_card_of_a_private_model_normalises_with_fixed_values_not_the_training_sets():
    meta = {"classes": ["a", "b"], "image_size": 32, "channels": 3, "mean": [0.4, 0.4, 0.4], "std": [0.2] * 3}
    assert new_card(default_config(), meta).mean == (0.4, 0.4, 0.4)
    private = new_card(default_config(dp_epsilon=8.0), meta)
    assert (private.mean, private.std) == ((0.5,) * 3, (0.25,) * 3)


# ---- the train stage, as a process on the digits ---------------------------------------------------


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return prepare_once(tmp_path_factory)


def with_train(root: Path, prepared: Path, **train) -> Path:
    shutil.copytree(prepared, root / "data")
    params = default_params()
    params["train"].update(train)
    write_params(root, params)
    return root


def test_the_train_stage_refuses_a_breaking_option_with_exit_code_2(tmp_path, prepared):
    root = with_train(tmp_path, prepared, dp_epsilon=8.0, mixup_alpha=0.2)
    proc = stage(root, "train")
    assert proc.returncode == 2
    assert "train.mixup_alpha: 0.2 cannot be used with train.dp_epsilon > 0: MixUp blends" in proc.stderr
    assert not (root / "models").exists()  # nothing trained, nothing written


def test_the_train_stage_says_which_batch_norm_layers_it_replaced(tmp_path, prepared):
    root = with_train(tmp_path, prepared, dp_epsilon=8.0, model="lenet-bn", epochs=1)
    proc = stage(root, "train")
    assert proc.returncode == 0, proc.stderr
    assert "train: DP-SGD cannot train batch statistics: net.bn1 (BatchNorm2d) replaced by GroupNorm(2, 6)" in (
        proc.stdout
    )
    assert "train: DP-SGD for epsilon 8 at delta " in proc.stdout
    assert ", epsilon " in proc.stderr  # the epoch line
    assert stage(root, "evaluate").returncode == 0  # rebuilt from its card with GroupNorm


def test_an_epoch_is_ceil_n_over_batch_size_steps_even_where_one_over_q_rounds_down():
    run = dp_training(93 * 4, batch_size=4, epochs=1)  # int(1 / (1 / 93)) == 92
    assert len(run.privacy.batches()) == run.steps_per_epoch == 93
