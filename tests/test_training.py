"""The training loop's airbench pieces, in process on random data: the whitening bias freezes on time."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from conftest import REPO
from imgclf.config import load_params
from imgclf.models import build
from imgclf.train import Arrays, Training


def random_split(n: int, seed: int) -> Arrays:
    rng = np.random.default_rng(seed)
    return Arrays(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n))


def test_whitening_bias_learns_only_for_its_epochs():
    cfg = dataclasses.replace(load_params(REPO / "params.yaml").train, model="fastnet-s", optimizer="sgd", lr=0.05,
                              batch_size=32, epochs=3, whiten_bias_epochs=1, flip=True, alternate_flip=True,
                              translate=2)
    torch.manual_seed(0)
    model = build({"model": "fastnet-s", "classes": [str(i) for i in range(10)], "image_size": 32,
                   "channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3})
    training = Training(model, random_split(64, 0), random_split(16, 1), cfg, torch.device("cpu"))
    bias, head = model.net.whiten.bias, model.net.head.weight

    def snapshot():
        return bias.detach().clone(), head.detach().clone()

    before = snapshot()
    training.run_epoch()
    after_first = snapshot()
    assert not torch.equal(before[0], after_first[0]) and not torch.equal(before[1], after_first[1])
    training.run_epoch()
    after_second = snapshot()
    assert torch.equal(after_first[0], after_second[0])  # frozen from epoch 2 on
    assert not torch.equal(after_first[1], after_second[1])  # the rest still learns
