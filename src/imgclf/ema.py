"""An exponential moving average of a model's weights, with airbench's lookahead (as torchvision's
references keep their `ExponentialMovingAverage` beside the training loop)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

# With lookahead, the weights are reset to their average every this many steps (airbench: 5).
LOOKAHEAD_EVERY = 5


class WeightAverage:
    """The average of the weights (and buffers) after each optimizer step: `decay` per step.

    With `lookahead` (K. Jordan, airbench, 2024) the average is updated every LOOKAHEAD_EVERY steps, with
    the decay of as many steps ramped up as progress^3 (move fast early, average strongly late), and the
    weights being trained then jump back to it."""

    def __init__(self, model: nn.Module, decay: float, lookahead: bool, total_steps: int) -> None:
        self.decay, self.lookahead, self.total_steps = decay, lookahead, total_steps
        self.steps = 0
        self.averaged = AveragedModel(model, multi_avg_fn=self._average, use_buffers=True)

    @property
    def module(self) -> nn.Module:
        """The averaged copy of the model: what evaluation and serving get."""
        return self.averaged.module

    def decay_now(self) -> float:
        if not self.lookahead:
            return self.decay
        return self.decay**LOOKAHEAD_EVERY * (self.steps / self.total_steps) ** 3

    def update(self, model: nn.Module, steps: int) -> None:
        """After the optimizer's `steps`-th step (counted over the whole run)."""
        self.steps = steps
        if not self.lookahead:
            self.averaged.update_parameters(model)
        elif steps % LOOKAHEAD_EVERY == 0:
            self.averaged.update_parameters(model)
            model.load_state_dict(self.module.state_dict())

    def end_epoch(self, model: nn.Module) -> None:
        """With lookahead and fewer than LOOKAHEAD_EVERY steps so far, start the average at the weights."""
        if self.lookahead and int(self.averaged.n_averaged) == 0:
            self.averaged.update_parameters(model)

    @torch.no_grad()
    def _average(self, averaged: list[torch.Tensor], current: list[torch.Tensor], count: Any) -> None:
        pairs = [(a, c) for a, c in zip(averaged, current) if a.is_floating_point()]
        if pairs:
            torch._foreach_lerp_([a for a, _ in pairs], [c for _, c in pairs], 1.0 - self.decay_now())
        for a, c in zip(averaged, current):
            if not a.is_floating_point():  # counters such as BatchNorm's num_batches_tracked
                a.copy_(c)

    def state_dict(self) -> dict[str, Any]:
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.averaged.load_state_dict(state)
