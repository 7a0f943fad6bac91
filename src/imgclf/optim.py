"""Optimizers and learning-rate schedules, built from the train section of params.yaml."""

from __future__ import annotations

import math

import torch
from torch import nn

from imgclf.config import TrainConfig


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """BatchNorm biases learn `norm_bias_lr_scale` times faster, with weight decay scaled down by as
    much so that their decay per step stays the same (airbench's "bias_scaler", K. Jordan 2024).
    Every parameter is included, frozen ones too: they have no gradient while frozen (the optimizer
    skips them) and learn once unfrozen."""
    norm_biases = {id(m.bias) for m in model.modules()
                   if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.bias is not None}
    if cfg.norm_bias_lr_scale == 1.0 or not norm_biases:
        return [{"params": list(model.parameters())}]
    scale = cfg.norm_bias_lr_scale
    return [{"params": [p for p in model.parameters() if id(p) not in norm_biases]},
            {"params": [p for p in model.parameters() if id(p) in norm_biases], "lr": cfg.lr * scale,
             "weight_decay": cfg.weight_decay / scale}]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = param_groups(model, cfg)
    # One fused kernel for all parameters instead of PyTorch's CPU default, a loop over them: an Adam
    # step over lenet-bn's 14 tensors takes a quarter of the time (a few percent of a training step).
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay, fused=True)
    if cfg.optimizer == "adam":  # Adam's momentum is its betas; train.momentum does not apply
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    if cfg.optimizer == "rmsprop":  # no fused RMSprop: one multi-tensor call per operation instead
        return torch.optim.RMSprop(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                   foreach=True)
    raise ValueError(f"train.optimizer: unknown optimizer {cfg.optimizer!r}")


def lr_factor(step: int, total: int, schedule: str, warmup_fraction: float, final_fraction: float) -> float:
    """The multiple of train.lr at optimizer step `step` (0-based) of `total`.

    constant: 1 after the warm-up. onecycle: linear warm-up to 1, then linear decay to final_fraction
    (the triangular schedule of Smith's one-cycle policy, as airbench uses). cosine: warm-up, then
    half a cosine down to final_fraction."""
    warmup = int(round(warmup_fraction * total))
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(total - warmup, 1)
    if schedule == "onecycle":
        return 1.0 + (final_fraction - 1.0) * progress
    if schedule == "cosine":
        return final_fraction + (1.0 - final_fraction) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"train.schedule: unknown schedule {schedule!r}")


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int
                   ) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, cfg.schedule, cfg.warmup_fraction, cfg.final_lr_fraction))
