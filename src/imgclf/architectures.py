"""The networks `train.model` names: one table, read by config (to refuse an unknown name before any
stage works) and by models (to build them).

It lives apart from models.py because config must not import torch: every stage, download and prepare
included, reads params.yaml first, and `import torch` costs about 2.3 s here before a bad key could be
refused.
"""

from __future__ import annotations

import re

# name -> the constructor in imgclf.models, called as constructor(in_channels, image_size, num_classes)
ARCHITECTURES = {
    "lenet": "LeNet",
    "lenet-bn": "LeNetBN",
    "fastnet": "FastNet",
    "fastnet-s": "fastnet_s",
    "fastnet-l": "fastnet_l",
    "resnet18": "cifar_resnet18",
}
# Any torchvision classifier, by the name torchvision.models.get_model takes.
TORCHVISION = "torchvision:"


def is_known(name: str) -> bool:
    """Whether `name` is one of ours or `torchvision:<name>` (whose name torchvision checks when building)."""
    return name in ARCHITECTURES or re.fullmatch(rf"{TORCHVISION}[A-Za-z0-9_]+", name) is not None


def list_models() -> list[str]:
    return list(ARCHITECTURES)
