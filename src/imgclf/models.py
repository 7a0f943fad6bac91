"""The networks, the normalising wrapper every model is trained and served in, and checkpoints.

A checkpoint is two files: `model.safetensors` (tensors only, loaded without unpickling anything) and
`model.json`, the model card (imgclf.card: architecture, class names, input size, channels,
normalisation, the train config): everything serving needs to rebuild the model and apply the same
preprocessing as evaluation.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import numpy as np
import torch
from safetensors.torch import load_file, save
from torch import nn
from torch.nn import functional as F
from torchvision.models import get_model, get_model_weights, resnet18

from imgclf.architectures import ARCHITECTURES, TORCHVISION
from imgclf.card import ModelCard
from imgclf.files import write_bytes

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "model.json"


class ModelError(ValueError):
    """A model that cannot be built as asked: the message names the setting to change."""


class LeNet(nn.Module):
    """The CNN of the PyTorch "Training a Classifier" (CIFAR-10) tutorial, for any input shape:
    conv 6@5x5, max-pool 2, conv 16@5x5, max-pool 2, fc 120, fc 84, fc classes."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int) -> None:
        super().__init__()
        side = ((image_size - 4) // 2 - 4) // 2  # two valid 5x5 convolutions, each then pooled by 2
        if side < 1:
            raise ModelError(
                f"lenet needs images of at least 16x16 pixels, got {image_size}x{image_size}: "
                "set data.image_size to 16 or more"
            )
        self.conv1 = nn.Conv2d(in_channels, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * side * side, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The tutorial pools after the ReLU; max-pool and ReLU commute, and ReLU after the pool touches
        # a quarter of the values: the same function, 1.1x the training images/s.
        x = F.relu(pool_wide(self.pool, self.conv1(x)))
        x = F.relu(self.pool(self.conv2(x)))
        return self.classify(x)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """The three fully connected layers, from the second conv's pooled maps to logits."""
        x = torch.flatten(features, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def pool_wide(pool: Callable[[torch.Tensor], torch.Tensor], maps: torch.Tensor) -> torch.Tensor:
    """`pool(maps)`, bf16 maps on a CPU pooled in fp32. PyTorch's CPU max-pool (forward and backward)
    runs slower on LeNet's 6-channel bf16 maps than on the same maps in fp32: in bf16 autocast a LeNet
    step trained 1.07x as many images/s pooling them in fp32, conversions included (batch 1024, 2 cores
    with bf16 units; lenet-bn 1.05x). A maximum is exact in either type and the result goes back to
    bf16: the same values, the same gradients."""
    if maps.dtype == torch.bfloat16 and maps.device.type == "cpu":
        return pool(maps.float()).to(maps.dtype)
    return pool(maps)


class TutorialLeNet(LeNet):
    """LeNet exactly as the tutorial writes it: ReLU, then max-pool (ours pools first: the same function
    with less work). The reference loop of bench/training.py trains it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        return self.classify(x)


class LeNetBN(LeNet):
    """LeNet with batch normalisation after each pooled convolution: LeNet's weights plus 44 scales and
    shifts. It trains at 15-20% fewer images/s on a CPU but needs far fewer images to the same
    accuracy early on (bench/training.py reaches the tutorial's 2-epoch accuracy with it)."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int) -> None:
        super().__init__(in_channels, image_size, num_classes)
        self.bn1, self.bn2 = nn.BatchNorm2d(6), nn.BatchNorm2d(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalising the pooled maps: a quarter of the values.
        x = F.relu(self.bn1(pool_wide(self.pool, self.conv1(x))))
        x = F.relu(self.bn2(self.pool(self.conv2(x))))
        return self.classify(x)


class ConvGroup(nn.Module):
    """conv 3x3, max-pool 2, BN, GELU, conv 3x3, BN, GELU: one stage of the fast CIFAR net."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = _identity_conv(cin, cout)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = _batch_norm(cout)
        self.conv2 = _identity_conv(cout, cout)
        self.norm2 = _batch_norm(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm1(self.pool(self.conv1(x))))
        return F.gelu(self.norm2(self.conv2(x)))


def _identity_conv(cin: int, cout: int) -> nn.Conv2d:
    """A 3x3 convolution whose first `cin` filters start as the identity (Dirac) and the rest at
    PyTorch's default: the net starts close to passing its input through, which trains stably at
    airbench's high learning rates."""
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[: min(cin, cout)])
    return conv


def _batch_norm(channels: int) -> nn.BatchNorm2d:
    # Fast running statistics (PyTorch momentum 0.4) and a fixed scale of 1, only the shift learned:
    # as in Keller Jordan's airbench (2024).
    norm = nn.BatchNorm2d(channels, momentum=0.4, eps=1e-12)
    norm.weight.requires_grad_(False)
    return norm


class FastNet(nn.Module):
    """A fast CIFAR net of the airbench class (K. Jordan, "94% on CIFAR-10 in 3.29 seconds", 2024):
    a frozen 2x2 patch-whitening convolution set from the training data, three ConvGroups and a
    global max-pool into a linear head, whose output is scaled down by `head_scale`."""

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        num_classes: int,
        widths: tuple[int, int, int] = (64, 256, 256),
        head_scale: float = 1 / 9,
    ) -> None:
        super().__init__()
        if image_size < 16:
            raise ModelError(f"fastnet needs images of at least 16x16 pixels, got {image_size}x{image_size}")
        patch = in_channels * 4
        self.whiten = nn.Conv2d(in_channels, 2 * patch, 2, bias=True)  # 2x2 patches, both signs
        self.whiten.weight.requires_grad_(False)
        self.layers = nn.Sequential(
            ConvGroup(2 * patch, widths[0]), ConvGroup(widths[0], widths[1]), ConvGroup(widths[1], widths[2])
        )
        self.head = nn.Linear(widths[2], num_classes, bias=False)
        self.head_scale = head_scale

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the whitening filters from (normalised, float) training images: the eigenvectors of
        the covariance of their 2x2 patches, scaled by 1/sqrt(eigenvalue), and their negatives."""
        c = images.shape[1]
        patches = F.unfold(images.float(), kernel_size=2).transpose(1, 2).reshape(-1, c * 4).double()
        patches = patches - patches.mean(0)
        eigenvalues, eigenvectors = torch.linalg.eigh(patches.T @ patches / len(patches))
        filters = eigenvectors.T / torch.sqrt(eigenvalues.clamp_min(0) + eps).view(-1, 1)
        filters = filters.view(c * 4, c, 2, 2).float()  # unfold orders (channel, row, col)
        self.whiten.weight.copy_(torch.cat([filters, -filters]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(F.gelu(self.whiten(x)))
        # Global max-pool as max(dim), whose backward routes the gradient by the saved index: amax's
        # backward compares the input against the max again, and torch.compile under bf16 autocast
        # recomputes one side at another precision, so no element matches and it divides 0 by 0.
        return self.head(x.flatten(2).max(dim=2).values) * self.head_scale


def fastnet_s(in_channels: int, image_size: int, num_classes: int) -> FastNet:
    """FastNet at half width."""
    return FastNet(in_channels, image_size, num_classes, widths=(32, 128, 128))


def fastnet_l(in_channels: int, image_size: int, num_classes: int) -> FastNet:
    """FastNet with airbench95's widths in its last two groups (384) and 96 in its first (airbench95: 128,
    which costs 15% more time per image on a CPU): about 2.2x fastnet's FLOPs and training time per image."""
    return FastNet(in_channels, image_size, num_classes, widths=(96, 384, 384))


def cifar_resnet18(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """torchvision's ResNet-18 adapted to 32x32 inputs: a 3x3 stride-1 stem and no stem max-pool."""
    net = resnet18(num_classes=num_classes)
    net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


# The normalisation torchvision's ImageNet weights were trained with.
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


# train.pretrained: a torchvision weights name (DEFAULT, IMAGENET1K_V1, MobileNet_V2_Weights.IMAGENET1K_V1, ...),
# a URL, or else a local file.
WEIGHTS_NAME = re.compile(r"(?:[A-Za-z0-9_]+_Weights\.)?[A-Z][A-Z0-9_]*")
WEIGHTS_URL = re.compile(r"(?:https?|file)://")


def torchvision_net(name: str, in_channels: int, num_classes: int, pretrained: str | None) -> nn.Module:
    """A torchvision classifier; with `pretrained`, its weights (a torchvision weights name, a URL, a local
    file) are loaded and its last linear layer is replaced by a fresh one for `num_classes`."""
    if in_channels != 3:
        raise ModelError(f"{TORCHVISION}{name} takes RGB images: set data.channels to 3")
    if pretrained is not None and WEIGHTS_NAME.fullmatch(pretrained):
        net = _net_with_named_weights(name, pretrained)
    else:
        try:
            net = get_model(name, weights=None, **({} if pretrained else {"num_classes": num_classes}))
        except ValueError as exc:  # torchvision's "Unknown model ..."
            raise ModelError(f"train.model: {TORCHVISION}{name}: {exc}") from None
        if pretrained is None:
            return net
        state = download_weights(pretrained) if WEIGHTS_URL.match(pretrained) else load_weights(pretrained)
        load_fitting(net, state, f"train.pretrained: {pretrained} does not fit {TORCHVISION}{name}")
    _, parent, attr, last = _last_linear(net)
    setattr(parent, attr, nn.Linear(last.in_features, num_classes))
    return net


def _net_with_named_weights(name: str, weights_name: str) -> nn.Module:
    """torchvision's model `name` with its weights `weights_name`, built as torchvision builds it (some
    builders set options to match their weights): the weights file comes from torch's cache
    ($TORCH_HOME/hub/checkpoints), downloaded there with its hash checked on first use."""
    try:
        table = get_model_weights(name)
    except ValueError as exc:  # torchvision's "Unknown model ..."
        raise ModelError(f"train.model: {TORCHVISION}{name}: {exc}") from None
    try:
        weights = table.verify(weights_name)
    except KeyError:
        known = ", ".join(["DEFAULT", *(w.name for w in table)])
        raise ModelError(
            f"train.pretrained: torchvision has no weights {weights_name!r} for {TORCHVISION}{name} (it has: {known})"
        ) from None
    try:
        return get_model(name, weights=weights, progress=False)
    except (OSError, RuntimeError) as exc:
        error = _download_error(weights.url, f"{weights_name} ({weights!r}) for {TORCHVISION}{name}", exc)
        if error is None:
            raise
        raise error from None


def cached_weights_file(url: str) -> Path:
    """Where torch.hub keeps the file downloaded from `url`: $TORCH_HOME/hub/checkpoints/<its name>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def download_weights(url: str) -> dict[str, torch.Tensor]:
    """The state dict (a torch.save file) at `url`, through torch's cache: downloaded on first use only,
    its hash checked when its name carries one (torch.hub's `name-<sha256 prefix>.pth`), loaded without
    unpickling objects."""
    try:
        state = torch.hub.load_state_dict_from_url(
            url, map_location="cpu", progress=False, check_hash=True, weights_only=True
        )
    except (OSError, RuntimeError) as exc:
        error = _download_error(url, url, exc)
        if error is None:
            raise
        raise error from None
    if not isinstance(state, dict):
        raise ModelError(f"train.pretrained: {url} does not hold a state dict")
    return state


def _download_error(url: str, what: str, exc: Exception) -> ModelError | None:
    """The error to report for `exc`, raised while fetching `url`; None when it is no download problem."""
    cached = cached_weights_file(url)
    if isinstance(exc, RuntimeError) and "invalid hash" not in str(exc):
        return None
    if isinstance(exc, RuntimeError):  # torch.hub deleted the bad download
        return ModelError(f"train.pretrained: {what}: the file downloaded from {url} is corrupt: {exc}")
    return ModelError(
        f"train.pretrained: {what} is not in torch's cache and could not be downloaded from {url} ({exc}). "
        f"Without a network, download that file elsewhere and put it at {cached} (torch's cache is "
        "$TORCH_HOME/hub/checkpoints; TORCH_HOME defaults to ~/.cache/torch), or set train.pretrained to a "
        "local .pth or .safetensors file"
    )


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors or a torch.save file, loaded without unpickling objects."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(
            f"train.pretrained: no such file: {path} (a local file of weights: save a state dict there, "
            "e.g. torch.save(model.state_dict(), path); or name torchvision's weights, e.g. DEFAULT)"
        )
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ModelError(f"train.pretrained: {path} does not hold a state dict")
    return state


def load_fitting(net: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load `state` into `net`, its classification head aside (it is replaced for the new classes, so a
    file with another number of classes fits). One of our checkpoints (a Classifier's state: `net.*`
    and the normalisation) fits too. Anything else that differs raises ModelError naming the layers."""
    if "mean" in state and any(k.startswith("net.") for k in state):
        state = {k[len("net.") :]: v for k, v in state.items() if k.startswith("net.")}
    own = net.state_dict()
    head_name = _last_linear(net)[0]
    head = {k for k in own if k.startswith(f"{head_name}.")}
    missing = _layers(k for k in own if k not in state and k not in head)
    unexpected = _layers(k for k in state if k not in own)
    shapes = [
        f"{k} ({list(state[k].shape)} in the file, {list(own[k].shape)} in the model)"
        for k in own
        if k in state and k not in head and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = [f"missing from the file: {_some(missing)}"] if missing else []
        parts += [f"not in the model: {_some(unexpected)}"] if unexpected else []
        parts += [f"other shapes: {_some(shapes)}"] if shapes else []
        raise ModelError(f"{what}: " + "; ".join(parts))
    net.load_state_dict({k: v for k, v in state.items() if k not in head or v.shape == own[k].shape}, strict=False)


def _layers(keys) -> list[str]:
    """The layers (a tensor's name without its last part) of these tensors, in order, each once."""
    return list(dict.fromkeys(k.rpartition(".")[0] or k for k in keys))


def _some(items: list[str], shown: int = 6) -> str:
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


def _last_linear(net: nn.Module) -> tuple[str, nn.Module, str, nn.Linear]:
    """(name, parent module, attribute name, layer) of the last nn.Linear: the classification head."""
    found = None
    for name, module in net.named_modules():
        if isinstance(module, nn.Linear):
            found = name, module
    if found is None:
        raise ModelError("the model has no linear classification head to replace")
    name, layer = found
    parent_name, _, attr = name.rpartition(".")
    return name, net.get_submodule(parent_name) if parent_name else net, attr, layer


def head_parameters(net: nn.Module) -> list[nn.Parameter]:
    """The parameters of the classification head (the last linear layer)."""
    return list(_last_linear(net)[3].parameters())


class Classifier(nn.Module):
    """uint8 images (N, C, H, W) in 0..255 -> logits: the normalisation travels inside the model, so
    training, evaluation and serving cannot disagree about it."""

    def __init__(
        self,
        net: nn.Module,
        mean: list[float],
        std: list[float],
        num_classes: int,
        tta_flip: bool = False,
        tta_translate: int = 0,
    ) -> None:
        super().__init__()
        self.net = net
        self.num_classes = num_classes
        # Test-time augmentation, in eval mode only: average the logits of each image and its mirror
        # image (tta_flip); with tta_translate = p, weigh those 1/2 and give 1/4 each to the same views
        # shifted by p pixels up-left and down-right (airbench's "level 2" test-time augmentation).
        self.tta_flip = tta_flip
        self.tta_translate = tta_translate
        # Buffers so they are saved with the weights; shaped to broadcast over (N, C, H, W).
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """(images / 255 - mean) / std, as one multiply-add: one pass over the batch instead of three."""
        x = images.float()
        # Scale and shift as whole images laid out like the batch (same strides): in channels-last
        # memory a (1, C, 1, 1) operand leaves an innermost loop C = 3 values wide, which the CPU does
        # not vectorise (2.2x slower on a batch of CIFAR images); whole images make it one loop
        # over C * H * W contiguous values.
        one = x[:1]
        scale = torch.empty_like(one).copy_((1 / (255.0 * self.std)).expand_as(one))
        shift = torch.empty_like(one).copy_((-self.mean / self.std).expand_as(one))
        return torch.addcmul(shift, x, scale)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.normalise(images)
        if self.training:
            return self.net(x)
        logits = self._views(x)
        if self.tta_translate:
            p = self.tta_translate
            h, w = x.shape[2:]
            padded = F.pad(x, (p, p, p, p), mode="reflect")
            shifted = self._views(padded[:, :, :h, :w]) + self._views(padded[:, :, 2 * p :, 2 * p :])
            logits = 0.5 * logits + 0.25 * shifted
        return logits

    def _views(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.net(x) + self.net(x.flip(3))) if self.tta_flip else self.net(x)


# Batch statistics make each image's output depend on the other images in its batch, and running
# statistics are averages over training images outside any noise: DP-SGD cannot train them.
BATCH_NORM = (nn.modules.batchnorm._BatchNorm,)


def replace_batch_norm(net: nn.Module) -> list[str]:
    """Replace every BatchNorm layer of `net` in place with GroupNorm as Opacus's ModuleValidator.fix does
    (gcd(32, channels) groups, the same eps and affine setting); returns the names of the layers replaced.

    Ours, not ModuleValidator.fix itself: a served or evaluated model is rebuilt from its card without
    Opacus, and fix leaves alone a BatchNorm whose parameters are all frozen, which still normalises
    with batch statistics."""
    replaced = [name for name, module in net.named_modules() if isinstance(module, BATCH_NORM)]
    for name in replaced:
        old = net.get_submodule(name)
        parent, _, attr = name.rpartition(".")
        new = nn.GroupNorm(math.gcd(32, old.num_features), old.num_features, eps=old.eps, affine=old.affine)
        setattr(net.get_submodule(parent) if parent else net, attr, new)
    return replaced


def constructor(name: str) -> Callable[[int, int, int], nn.Module]:
    """The constructor of one of our architectures: (in_channels, image_size, num_classes) -> net."""
    if name not in ARCHITECTURES:
        raise ModelError(f"unknown model {name!r} (known: {', '.join(ARCHITECTURES)}, {TORCHVISION}<name>)")
    return globals()[ARCHITECTURES[name]]


def build(card: ModelCard, pretrained: str | None = None) -> Classifier:
    """A classifier from its card: fresh weights, or a torchvision model's from `pretrained`."""
    if card.model.startswith(TORCHVISION):
        net = torchvision_net(card.model[len(TORCHVISION) :], card.channels, card.num_classes, pretrained)
    else:
        net = constructor(card.model)(card.channels, card.image_size, card.num_classes)
    if card.train.get("dp_epsilon"):  # trained with DP-SGD, which cannot train batch statistics
        replace_batch_norm(net)
    return Classifier(
        net, list(card.mean), list(card.std), card.num_classes, tta_flip=card.tta_flip, tta_translate=card.tta_translate
    )


def save_checkpoint(model: Classifier, card: ModelCard, out_dir: str | Path) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_bytes(Path(out_dir) / WEIGHTS_FILE, save(state))
    write_bytes(Path(out_dir) / CARD_FILE, card.to_json().encode())


def load_checkpoint(weights: str | Path, card_path: str | Path) -> tuple[Classifier, ModelCard]:
    """Rebuild a classifier from its two checkpoint files (no pickle involved), in eval mode."""
    card = ModelCard.read(card_path)
    model = build(card)
    model.load_state_dict(load_file(str(weights)))
    return model.eval(), card


def load_checkpoint_dir(model_dir: str | Path) -> tuple[Classifier, ModelCard]:
    return load_checkpoint(Path(model_dir) / WEIGHTS_FILE, Path(model_dir) / CARD_FILE)


class GlobalAvgPool(nn.Module):
    """Mean over height and width: AdaptiveAvgPool2d(1) without its non-deterministic CUDA backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3), keepdim=True)


def make_deterministic(model: nn.Module) -> nn.Module:
    """Replace layers whose CUDA backward has no deterministic implementation with equivalent ones
    that have (torch.use_deterministic_algorithms would otherwise refuse them)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.AdaptiveAvgPool2d) and module.output_size in (1, (1, 1)):
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, GlobalAvgPool())
    return model


def to_nchw(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (N, H, W, C) numpy -> uint8 (N, C, H, W) tensor on `device`."""
    # np.array copies: the arrays are often read-only memory maps, which torch cannot wrap.
    return torch.from_numpy(np.array(images, dtype=np.uint8)).to(device).permute(0, 3, 1, 2)


@torch.inference_mode()
def predict_proba(
    model: Classifier,
    images: np.ndarray,
    batch_size: int = 512,
    device: torch.device | None = None,
    on_batch: Callable[[int], None] = lambda n: None,
) -> np.ndarray:
    """uint8 (N, H, W, C) -> float32 class probabilities (N, classes); `on_batch(n)` after each batch of n."""
    device = device or next(model.parameters()).device
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        batch = to_nchw(images[start : start + batch_size], device)
        out.append(torch.softmax(model(batch).float(), dim=1).cpu().numpy())
        on_batch(len(batch))
    return np.concatenate(out) if out else np.zeros((0, model.num_classes), np.float32)
