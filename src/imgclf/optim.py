"""Optimizers and learning-rate schedules, built from the train section of params.yaml."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.sgd import sgd

from imgclf.config import TrainConfig


def param_groups(model: nn.Module, cfg: TrainConfig, head: set[int] = frozenset()) -> list[dict]:
    """BatchNorm biases learn `norm_bias_lr_scale` times faster, with weight decay scaled down by as
    much so that their decay per step stays the same (airbench's "bias_scaler", K. Jordan 2024).
    With `head` (the ids of a fine-tuned model's new head parameters), every other parameter (the
    pretrained backbone) learns at `backbone_lr_scale` times train.lr, its decay per step scaled alike
    (discriminative fine-tuning: Howard & Ruder 2018, "ULMFiT"). Every parameter is included, frozen ones
    too: they have no gradient while frozen (the optimizer skips them) and learn once unfrozen."""
    norm_biases = {
        id(m.bias) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.bias is not None
    }
    backbone = cfg.backbone_lr_scale if head else 1.0
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for p in model.parameters():
        scale = 1.0 if id(p) in head else backbone
        decay = cfg.weight_decay
        if id(p) in norm_biases and cfg.norm_bias_lr_scale != 1.0:
            scale *= cfg.norm_bias_lr_scale
            decay /= cfg.norm_bias_lr_scale
        groups.setdefault((scale, decay), []).append(p)
    return [
        {"params": params}
        if scale == 1.0 and decay == cfg.weight_decay
        else {"params": params, "lr": cfg.lr * scale, "weight_decay": decay}
        for (scale, decay), params in groups.items()
    ]


class Muon(torch.optim.Optimizer):
    """Muon (K. Jordan et al., 2024) for the convolution filters, SGD for every other parameter: one
    optimizer, so that one schedule, one checkpoint and one gradient scaler cover both.

    A filter bank's step is its Nesterov momentum, flattened to (out_channels, fan_in) and made nearly
    orthogonal by a Newton-Schulz iteration (towards U V^T of its SVD): every direction of the update
    moves at the same rate. Before each step the bank is rescaled to norm sqrt(out_channels): with a
    batch norm after the convolution its scale does not change the function, and fixing it keeps the
    step's relative size fixed, in place of weight decay (airbench94_muon). Groups with `orthogonalise`
    false take fused SGD steps. PyTorch's torch.optim.Muon takes 2-D parameters only."""

    def __init__(
        self, params, lr: float, momentum: float, nesterov: bool, weight_decay: float, ns_steps: int = 3
    ) -> None:
        super().__init__(
            params,
            {
                "lr": lr,
                "momentum": momentum,
                "nesterov": nesterov,
                "weight_decay": weight_decay,
                "orthogonalise": False,
                "ns_steps": ns_steps,
            },
        )

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:  # the Optimizer contract: re-evaluate the loss first
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if not group["orthogonalise"]:
                buffers = [self.state[p].get("momentum_buffer") for p in params]
                sgd(
                    params,
                    [p.grad for p in params],
                    buffers,
                    fused=True,
                    weight_decay=group["weight_decay"],
                    momentum=group["momentum"],
                    lr=group["lr"],
                    dampening=0.0,
                    nesterov=group["nesterov"],
                    maximize=False,
                )
                for p, buffer in zip(params, buffers):
                    self.state[p]["momentum_buffer"] = buffer
                continue
            for p in params:
                buffer = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buffer.mul_(group["momentum"]).add_(p.grad)
                update = p.grad.add(buffer, alpha=group["momentum"]) if group["nesterov"] else buffer
                p.mul_(math.sqrt(len(p)) / p.norm().clamp_min(1e-12))
                p.add_(orthogonalise(update.reshape(len(p), -1), group["ns_steps"]).view_as(p), alpha=-group["lr"])
        return loss


def orthogonalise(matrix: torch.Tensor, steps: int, eps: float = 1e-7) -> torch.Tensor:
    """Newton-Schulz iteration towards U V^T (U S V^T the SVD of `matrix`), with the quintic
    coefficients that grow small singular values fastest (Muon's): it leaves them between roughly
    0.7 and 1.2 (three steps lift all but the smallest), which trains as well as exact
    orthogonalisation. In fp32: CPUs without bf16 units run bf16 matrix products slower."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = matrix.float()
    wide = x.shape[0] <= x.shape[1]
    x = x if wide else x.T
    x = x / (x.norm() + eps)  # the spectral norm is at most the Frobenius norm: now <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + torch.addmm(gram, gram, gram, beta=b, alpha=c) @ x
    return (x if wide else x.T).to(matrix.dtype)


def make_optimizer(model: nn.Module, cfg: TrainConfig, head: set[int] = frozenset()) -> torch.optim.Optimizer:
    """`head`: the ids of the parameters of a pretrained model's new head (see param_groups)."""
    params = param_groups(model, cfg, head)
    if cfg.optimizer == "muon":
        filters = [p for p in model.parameters() if p.ndim == 4]
        groups = [{**g, "params": [p for p in g["params"] if p.ndim != 4]} for g in params]
        groups.append(
            {
                "params": filters,
                "orthogonalise": True,
                "lr": cfg.muon_lr,
                "momentum": cfg.muon_momentum,
                "weight_decay": 0.0,
            }
        )
        return Muon(
            [g for g in groups if g["params"]],
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
            weight_decay=cfg.weight_decay,
        )
    # One fused kernel for all parameters instead of PyTorch's CPU default, a loop over them: an Adam
    # step over lenet-bn's 14 tensors takes a quarter of the time (a few percent of a training step).
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay, fused=True
        )
    if cfg.optimizer == "adam":  # Adam's momentum is its betas; train.momentum does not apply
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    if cfg.optimizer == "rmsprop":  # no fused RMSprop: one multi-tensor call per operation instead
        return torch.optim.RMSprop(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, foreach=True
        )
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


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, cfg.schedule, cfg.warmup_fraction, cfg.final_lr_fraction)
    )
