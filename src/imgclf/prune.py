"""Structured channel pruning for the compress stage (compress.method prune): whole filters are cut out,
so the layers themselves get smaller (unlike torch.nn.utils.prune, which masks weights to zero and keeps
every tensor at full size).

In each pruned layer, the filters with the smallest L1 norm go (Li et al., "Pruning Filters for Efficient
ConvNets", ICLR 2017), together with what reads them: the next layer's input channels, a BatchNorm's
entries. A short fine-tune on the training split (Adam) then recovers accuracy. Pruned here: LeNet's
first convolution and its two hidden fully connected layers, its second convolution (the first fully
connected layer's input columns with it); FastNet's convolutions inside and between its groups (the
whitening layer and the head's outputs stay whole).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from imgclf.card import ModelCard
from imgclf.config import CompressConfig
from imgclf.models import Classifier, FastNet, LeNet, LeNetBN

FINETUNE_LR = 1e-3  # Adam, constant: a short fine-tune of an already trained net
FINETUNE_BATCH = 128


class PruneError(ValueError):
    """A model this pruning does not know how to shrink; the message names it."""


def strongest(weight: torch.Tensor, amount: float) -> torch.Tensor:
    """Indices (ascending) of the output channels to keep: the (1 - amount) share with the largest L1
    norm, at least one."""
    keep = max(1, round(weight.shape[0] * (1 - amount)))
    norms = weight.detach().abs().flatten(1).sum(1)
    return torch.sort(torch.topk(norms, keep).indices).values


def _sliced(module: nn.Module, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Module:
    """A copy of a Conv2d or Linear with only these output channels (rows) and input channels (cols)."""
    weight = module.weight.detach()
    weight = weight if rows is None else weight[rows]
    weight = weight if cols is None else weight[:, cols]
    bias = module.bias
    if bias is not None and rows is not None:
        bias = bias[rows]
    if isinstance(module, nn.Conv2d):
        new = nn.Conv2d(
            weight.shape[1], weight.shape[0], module.kernel_size, module.stride, module.padding, bias=bias is not None
        )
    else:
        new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias.detach())
    new.weight.requires_grad_(module.weight.requires_grad)
    return new


def _sliced_norm(norm: nn.BatchNorm2d, keep: torch.Tensor) -> nn.BatchNorm2d:
    new = nn.BatchNorm2d(len(keep), eps=norm.eps, momentum=norm.momentum)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(new, name).copy_(getattr(norm, name).detach()[keep])
    new.weight.requires_grad_(norm.weight.requires_grad)
    return new


def prune_lenet(net: LeNet, amount: float) -> None:
    side = int(round((net.fc1.in_features / net.conv2.out_channels) ** 0.5))
    keep1 = strongest(net.conv1.weight, amount)
    net.conv1, net.conv2 = _sliced(net.conv1, rows=keep1), _sliced(net.conv2, cols=keep1)
    keep2 = strongest(net.conv2.weight, amount)
    # fc1 reads the flattened (channel, row, column) maps: channel c is columns c*side^2 .. (c+1)*side^2 - 1.
    columns = (keep2[:, None] * side * side + torch.arange(side * side)).flatten()
    net.conv2, net.fc1 = _sliced(net.conv2, rows=keep2), _sliced(net.fc1, cols=columns)
    if isinstance(net, LeNetBN):
        net.bn1, net.bn2 = _sliced_norm(net.bn1, keep1), _sliced_norm(net.bn2, keep2)
    keep3 = strongest(net.fc1.weight, amount)
    net.fc1, net.fc2 = _sliced(net.fc1, rows=keep3), _sliced(net.fc2, cols=keep3)
    keep4 = strongest(net.fc2.weight, amount)
    net.fc2, net.fc3 = _sliced(net.fc2, rows=keep4), _sliced(net.fc3, cols=keep4)


def prune_fastnet(net: FastNet, amount: float) -> None:
    groups = list(net.layers)
    for i, group in enumerate(groups):
        inner = strongest(group.conv1.weight, amount)
        group.conv1, group.norm1 = _sliced(group.conv1, rows=inner), _sliced_norm(group.norm1, inner)
        group.conv2 = _sliced(group.conv2, cols=inner)
        out = strongest(group.conv2.weight, amount)
        group.conv2, group.norm2 = _sliced(group.conv2, rows=out), _sliced_norm(group.norm2, out)
        if i + 1 < len(groups):
            groups[i + 1].conv1 = _sliced(groups[i + 1].conv1, cols=out)
        else:
            net.head = _sliced(net.head, cols=out)


def prune(model: Classifier, card: ModelCard, amount: float) -> Classifier:
    """A pruned copy of the classifier; PruneError for an architecture this module does not know."""
    pruned = copy.deepcopy(model).cpu().eval()
    if isinstance(pruned.net, LeNet):
        prune_lenet(pruned.net, amount)
    elif isinstance(pruned.net, FastNet):
        prune_fastnet(pruned.net, amount)
    else:
        raise PruneError(
            f"model {card.model!r} ({type(pruned.net).__name__}): channel pruning knows lenet, lenet-bn, "
            "fastnet, fastnet-s and fastnet-l (set compress.method to none or int8)"
        )
    return pruned


def finetune(model: Classifier, images: np.ndarray, labels: np.ndarray, epochs: int, seed: int) -> None:
    """A few epochs of Adam at FINETUNE_LR on the training split, in place (no augmentation)."""
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=FINETUNE_LR)
    x_all, y_all = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2), torch.from_numpy(labels)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(y_all), generator=generator)
        for start in range(0, len(order), FINETUNE_BATCH):
            index = order[start : start + FINETUNE_BATCH]
            loss = F.cross_entropy(model(x_all[index]), y_all[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        print(f"compress: fine-tune epoch {epoch + 1}/{epochs}, last batch loss {loss.item():.4f}")
    model.eval()


def prune_and_finetune(model: Classifier, card: ModelCard, cfg: CompressConfig, train: tuple) -> Classifier:
    pruned = prune(model, card, cfg.prune_amount)
    before = sum(p.numel() for p in model.parameters())
    after = sum(p.numel() for p in pruned.parameters())
    print(f"compress: pruned {card.model} from {before:,} to {after:,} parameters ({after / before:.2f}x)")
    if cfg.finetune_epochs:
        finetune(pruned, train[0], train[1], cfg.finetune_epochs, cfg.seed)
    return pruned
