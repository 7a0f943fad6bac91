"""Differential privacy for the train stage: DP-SGD (Abadi et al., "Deep Learning with Differential
Privacy", 2016) as Opacus does it, turned on by `train.dp_epsilon` > 0.

- Batches are Poisson-sampled: at each step every training image joins the batch independently with
  probability q = 1 / steps per epoch (Opacus's UniformWithReplacementSampler), so a batch holds
  train.batch_size images on average, and an epoch is ceil(N / batch_size) steps.
- Each image's gradient is clipped to the L2 norm `train.dp_max_grad_norm`, the clipped gradients are
  summed, Gaussian noise of standard deviation noise_multiplier x dp_max_grad_norm is added and the sum
  is divided by the expected batch size (Opacus's GradSampleModule and DPOptimizer, flat clipping).
- The noise multiplier is the smallest that keeps the whole run (train.epochs epochs) within
  (dp_epsilon, dp_delta) by Opacus's PRV accountant (PrivacyEngine.make_private_with_epsilon); the
  accountant's epsilon after each epoch is part of the epoch's metrics, and its state is checkpointed, so
  a resumed run accounts exactly as an uninterrupted one.

Options whose effect on the model is not covered by that analysis are refused (`not_private`, exit
code 2 naming the key); BatchNorm layers are replaced by GroupNorm (`models.replace_batch_norm`, in every
build of a model whose card says it was trained with DP-SGD), and a layer Opacus cannot train is refused
by name.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from imgclf.models import BATCH_NORM

if TYPE_CHECKING:
    from imgclf.config import TrainConfig

# Opacus's default accountant: the privacy loss random variable (Gopi et al., 2021); tighter than RDP for
# the same noise, so less noise for the same epsilon.
ACCOUNTANT = "prv"

# Train options whose effect depends on training data outside the clipped and noised per-sample
# gradients, each with the reason it is refused under train.dp_epsilon.
_REFUSED = (
    (
        "mixup_alpha",
        lambda cfg: cfg.mixup_alpha > 0,
        "MixUp blends pairs of training images, so one image's gradient carries another's",
    ),
    (
        "cutmix_alpha",
        lambda cfg: cfg.cutmix_alpha > 0,
        "CutMix pastes one training image into another, so one image's gradient carries another's",
    ),
    (
        "micro_batch",
        lambda cfg: cfg.micro_batch > 0,
        "Opacus clips and noises the gradients of one backward pass over the whole Poisson-sampled batch",
    ),
    (
        "grad_clip",
        lambda cfg: cfg.grad_clip > 0,
        "DP-SGD clips each image's gradient to train.dp_max_grad_norm instead of the batch's",
    ),
    ("compile", lambda cfg: cfg.compile, "Opacus's per-sample gradient hooks do not run under torch.compile"),
    (
        "precision",
        lambda cfg: cfg.precision == "fp16",
        "fp16's loss scaling skips steps whose gradients overflow, which the privacy accountant cannot see",
    ),
    (
        "model",
        lambda cfg: cfg.model.startswith("fastnet"),
        "fastnet's whitening layer is computed from the training images' patch covariance, which DP-SGD does "
        "not cover (use lenet, lenet-bn, resnet18 or a torchvision model)",
    ),
    (
        "processes",
        lambda cfg: cfg.processes > 1,
        "DP-SGD here samples, clips and noises every batch in one process; Opacus's DDP wrapper is not wired "
        "in, so the accountant would not describe what several processes train (train with processes: 1)",
    ),
)


def not_private(cfg: TrainConfig) -> str | None:
    """Why `cfg` cannot be trained with differential privacy, naming the key; None when it can."""
    for key, refused, reason in _REFUSED:
        if refused(cfg):
            return f"train.{key}: {getattr(cfg, key)!r} cannot be used with train.dp_epsilon > 0: {reason}"
    return None


def delta(cfg: TrainConfig, num_train: int) -> float:
    """train.dp_delta, or 1 / the number of training images when it is null."""
    return cfg.dp_delta if cfg.dp_delta is not None else 1.0 / num_train


def fixed_normalisation(channels: int) -> tuple[list[float], list[float]]:
    """The mean and std a DP-SGD model normalises with: fixed, not the training images' own statistics
    (prepare's meta.json), which are computed from every training image and released without noise."""
    return [0.5] * channels, [0.25] * channels


class PrivacyError(ValueError):
    """A model Opacus cannot train privately; the message names the layer."""


def check_model(model: nn.Module) -> None:
    """Raise PrivacyError naming each layer Opacus's ModuleValidator refuses (after our BatchNorm swap)."""
    from opacus.validators import ModuleValidator

    model.train()
    names = {id(m): name for name, m in model.named_modules()}
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise PrivacyError(f"train.dp_epsilon: Opacus cannot train this model privately: {errors}")
    for module in model.modules():
        if isinstance(module, BATCH_NORM):  # pragma: no cover - models.build replaces them all
            raise PrivacyError(f"train.dp_epsilon: layer {names[id(module)]} is BatchNorm")


@dataclass(frozen=True)
class Budget:
    """What the run was set up to spend."""

    epsilon: float  # the target, train.dp_epsilon
    delta: float
    noise_multiplier: float  # noise std / dp_max_grad_norm, chosen by the accountant for the target
    sample_rate: float  # q, the chance of each image to be in each batch
    steps: int  # optimizer steps in the whole run

    def describe(self, max_grad_norm: float) -> str:
        return (
            f"train: DP-SGD for epsilon {self.epsilon:g} at delta {self.delta:.3g}: {self.steps} Poisson-sampled "
            f"batches (q = {self.sample_rate:.4g}), each image's gradient clipped to {max_grad_norm:g}, "
            f"noise multiplier {self.noise_multiplier:.4f} ({ACCOUNTANT} accountant)"
        )


class DPSGD:
    """Opacus attached to one training run: the per-sample-gradient module to run forward, the noising
    optimizer to step, the Poisson-sampled batches of each epoch and the accountant, all checkpointable."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        num_train: int,
        cfg: TrainConfig,
        order: torch.Generator,
        device: torch.device,
    ) -> None:
        from opacus import PrivacyEngine

        # Said once here instead of at every run or step: the noise comes from torch's seeded generator
        # (reproducible, not cryptographically secure: see the README); hooks on a first layer whose input
        # needs no gradient; PRV's RDP-based domain estimate at its largest order.
        for message in ("Secure RNG turned off", "Full backward hook is firing", "Optimal order is the largest"):
            warnings.filterwarnings("ignore", message=message)
        if (refused := not_private(cfg)) is not None:
            raise PrivacyError(refused)
        check_model(model)
        self.engine = PrivacyEngine(accountant=ACCOUNTANT)
        # The loader only carries the dataset size and the batch size: batches are index lists drawn from
        # its Poisson sampler, gathered from the images already on the device.
        indices = torch.utils.data.TensorDataset(torch.arange(num_train))
        loader = torch.utils.data.DataLoader(indices, batch_size=cfg.batch_size)
        self.noise = torch.Generator(device=device).manual_seed(cfg.seed + 3)
        self.module, self.optimizer, loader = self.engine.make_private_with_epsilon(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            target_epsilon=cfg.dp_epsilon,
            target_delta=delta(cfg, num_train),
            epochs=cfg.epochs,
            max_grad_norm=cfg.dp_max_grad_norm,
            poisson_sampling=True,
            noise_generator=self.noise,
        )
        self.sampler = loader.batch_sampler
        self.sampler.generator = order  # train.seed's shuffling generator, checkpointed with the run
        # ceil(N / batch_size) steps an epoch, as q = 1 / that says: the sampler's own int(1 / q) is one
        # short for some counts (int(1 / (1 / 93)) == 92).
        self.sampler.steps = math.ceil(num_train / cfg.batch_size)
        self.device = device
        self.budget = Budget(
            epsilon=cfg.dp_epsilon,
            delta=delta(cfg, num_train),
            noise_multiplier=self.optimizer.noise_multiplier,
            sample_rate=self.sampler.sample_rate,
            steps=cfg.epochs * len(self.sampler),
        )

    def batches(self) -> list[torch.Tensor]:
        """One epoch of Poisson-sampled batches: the images' indices, on the device (some may be empty)."""
        return [torch.tensor(index, dtype=torch.long).to(self.device) for index in self.sampler]

    def steps(self) -> int:
        """Noised optimizer steps the accountant has counted."""
        return sum(steps for _, _, steps in self.engine.accountant.history)

    def epsilon(self) -> float:
        """The accountant's epsilon for the steps so far, at the run's delta."""
        if not self.engine.accountant.history:
            return 0.0
        return float(self.engine.accountant.get_epsilon(delta=self.budget.delta))

    def check_steps(self, expected: int) -> None:
        """Fail unless every optimizer step so far was clipped, noised and accounted for."""
        if self.steps() != expected:
            raise RuntimeError(
                f"DP-SGD: the privacy accountant counted {self.steps()} noised steps, not {expected}: the model is "
                "not private as configured"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"accountant": self.engine.accountant.state_dict(), "noise": self.noise.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.engine.accountant.load_state_dict(state["accountant"])
        self.noise.set_state(state["noise"])


def empty_batch(forward: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A Poisson-sampled batch of no images: a backward pass with no per-sample gradients, so Opacus's
    optimizer still takes the step with its noise alone (as its DPDataLoader's empty batches do).
    Returns a zero loss and zero correct predictions."""
    forward(images).sum().backward()
    return torch.zeros((), device=images.device), torch.zeros((), device=images.device, dtype=torch.long)


def describe_replaced(plain: nn.Module, private: nn.Module) -> list[str]:
    """The BatchNorm layers of `plain` that `private` (the same model built for DP-SGD) has as GroupNorm,
    one line each: DP-SGD changes the architecture, and says so."""
    layers = dict(private.named_modules())
    return [
        f"train: DP-SGD cannot train batch statistics: {name} ({type(m).__name__}) replaced by "
        f"GroupNorm({layers[name].num_groups}, {layers[name].num_channels})"
        for name, m in plain.named_modules()
        if isinstance(m, BATCH_NORM)
    ]
