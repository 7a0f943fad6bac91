"""params.yaml -> typed, frozen dataclasses, validated before any stage does work.

Every key must be present in params.yaml (the single source of configuration: no defaults here that
could drift from it). An unknown key, a missing key, a wrong type or an out-of-range value raises
`ConfigError` naming the key; stage entry points turn it into exit code 2.

Train recipes live in presets/<name>.yaml; `train.preset` names one. A recipe key that params.yaml leaves
null takes the preset's value (a preset may build on another with `base: <name>`); a value params.yaml
gives wins over the preset's, and is reported as an `Override` (the train stage prints each once, as
nanoGPT's configurator does). MLflow and the model card record the resolved values.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from imgclf.architectures import ARCHITECTURES, TORCHVISION, is_known
from imgclf.data.types import strip_archive_suffix


class ConfigError(ValueError):
    """A params file that cannot be used; the message names the file and the key."""


class _Loader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where `1e-4` is a string; DVC (YAML 1.2) writes floats that way
    (`dvc exp run -S train.lr=1e-4`). Read them as numbers, as DVC does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
        r"|[0-9][0-9_]*[eE][-+]?[0-9]+|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def _bounded(
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    pattern: str | None = None,
) -> Any:
    """A required field with a range (numbers) or a regular expression (strings)."""
    return field(metadata={"ge": ge, "gt": gt, "le": le, "lt": lt, "pattern": pattern})


# Pillow refuses to open an image of more pixels than this (twice its Image.MAX_IMAGE_PIXELS), before any
# limit of ours is asked: a pixel limit above it could never be reached.
PILLOW_MAX_PIXELS = 178_956_970

# Model names in the registry must be usable in a `models:/<name>@champion` URI.
_MODEL_NAME = r"[A-Za-z0-9][A-Za-z0-9_.\-]*"


@dataclass(frozen=True)
class DataConfig:
    """What the download and prepare stages read."""

    dataset: Literal["digits", "cifar10", "cifar100", "imagefolder"]
    # imagefolder: a folder or a .tar/.tar.gz/.zip archive holding train/<class>/<image>.
    path: str | None
    # cifar10/cifar100: an already downloaded official archive, used instead of the network.
    archive: str | None
    cifar100_labels: Literal["fine", "coarse"]
    # Side of the square images the model sees, in pixels; null keeps the dataset's own size.
    image_size: int | None = _bounded(ge=8, le=1024)
    # 1 (grayscale) or 3 (RGB); null keeps the dataset's own channel count.
    channels: Literal[1, 3] | None
    # What prepare does with a corrupt, truncated, oversized or non-image file: fail or skip it.
    on_bad_image: Literal["fail", "skip"]
    # Largest image accepted, in pixels (width x height, read from the file header).
    max_pixels: int = _bounded(ge=1, le=PILLOW_MAX_PIXELS)
    # Most bytes an imagefolder archive's files may expand to, all together: checked against the sizes
    # its headers declare before anything is inflated, and while reading (a decompression bomb's defence).
    max_archive_bytes: int = _bounded(ge=1)
    raw_dir: str

    @property
    def name(self) -> str:
        """A short name for the data: the dataset, or the image folder's name without its suffix."""
        if self.dataset != "imagefolder":
            return self.dataset
        return strip_archive_suffix(Path(self.path.rstrip("/")).name) or "images"

    def __post_init__(self) -> None:
        if self.dataset == "imagefolder":
            if self.path is None:
                raise ConfigError("data.path: required when data.dataset is imagefolder")
            if self.image_size is None:
                raise ConfigError(
                    "data.image_size: required when data.dataset is imagefolder (image folders hold images of any size)"
                )


@dataclass(frozen=True)
class PrepareConfig:
    # Share of the images carved out for test when the dataset has no held-out test split.
    test_fraction: float = _bounded(gt=0, lt=1)
    # Share of the remaining training images held out for validation (unless a val folder exists).
    val_fraction: float = _bounded(gt=0, lt=1)
    seed: int
    workers: int = _bounded(ge=0)  # image-decoding processes; 0 = one per CPU core
    out_dir: str


# Train keys that say where and how a run executes, not what it trains: params.yaml sets them, never a
# preset. Every other train key is a recipe key: null in params.yaml takes the preset's value.
RUN_KEYS = frozenset(
    {"preset", "seed", "device", "threads", "processes", "deterministic", "model_dir", "metrics_dir", "checkpoint_dir"}
    | {"dp_epsilon", "dp_delta", "dp_max_grad_norm"}  # a promise about the data (imgclf.privacy), not a recipe
)


@dataclass(frozen=True)
class TrainConfig:
    # presets/<name>.yaml: the recipe whose values fill the keys params.yaml leaves null.
    preset: str = _bounded(pattern=r"[A-Za-z0-9_\-]+")
    model: str  # see imgclf.architectures
    # torchvision models: a torchvision weights name (DEFAULT, IMAGENET1K_V1, ...: downloaded once into
    # torch's cache, TORCH_HOME), the URL of a state-dict file (likewise), or a local .pth/.safetensors file.
    pretrained: str | None
    freeze_epochs: int = _bounded(ge=0)  # with pretrained weights: train only the new head at first
    # with pretrained weights: the backbone's learning rate as a multiple of the new head's (train.lr)
    backbone_lr_scale: float = _bounded(gt=0)
    optimizer: Literal["sgd", "adam", "adamw", "rmsprop", "muon"]
    lr: float = _bounded(gt=0)
    momentum: float = _bounded(ge=0, lt=1)
    # muon: the convolution filters' learning rate and momentum (the other parameters take lr, momentum)
    muon_lr: float = _bounded(gt=0)
    muon_momentum: float = _bounded(ge=0, lt=1)
    nesterov: bool
    weight_decay: float = _bounded(ge=0)
    norm_bias_lr_scale: float = _bounded(gt=0)  # learning-rate multiple for BatchNorm biases
    schedule: Literal["constant", "onecycle", "cosine"]
    warmup_fraction: float = _bounded(ge=0, le=1)
    final_lr_fraction: float = _bounded(ge=0, le=1)
    label_smoothing: float = _bounded(ge=0, lt=1)
    grad_clip: float = _bounded(ge=0)  # max gradient norm; 0 = off
    ema_decay: float = _bounded(ge=0, lt=1)  # per optimizer step; 0 = off
    lookahead: bool  # with an EMA: ramp its decay up over training and reset the weights to it
    epochs: int = _bounded(ge=1)
    # Score the validation split after every val_every-th epoch and after the last; 0 = after the last
    # only (a recipe racing the clock: scoring with test-time augmentation costs a forward pass per view).
    val_every: int = _bounded(ge=0)
    batch_size: int = _bounded(ge=1)
    # Images per forward/backward pass, gradients accumulated up to batch_size; 0 = the whole batch.
    # Saves memory and, on CPUs, time (smaller activations stay in cache); BatchNorm sees micro-batches.
    micro_batch: int = _bounded(ge=0)
    flip: bool
    alternate_flip: bool  # with flip: mirror each image in every other epoch instead of at random
    translate: int = _bounded(ge=0, le=16)
    cutout: int = _bounded(ge=0)
    # Random resized crop: each crop keeps this share of the image's area at least, resized back; 0 = off.
    resized_crop: float = _bounded(ge=0, lt=1)
    auto_augment: Literal["none", "randaugment", "trivialaugment", "autoaugment", "autoaugment-cifar10"]
    ra_magnitude: int = _bounded(ge=0, le=30)  # randaugment's magnitude (of 30)
    random_erase: float = _bounded(ge=0, le=1)  # probability of erasing a random rectangle; 0 = off
    mixup_alpha: float = _bounded(ge=0)  # MixUp's Beta(alpha, alpha); 0 = off
    cutmix_alpha: float = _bounded(ge=0)  # CutMix's Beta(alpha, alpha); 0 = off
    tta_flip: bool
    tta_translate: int = _bounded(ge=0, le=4)  # also average views shifted this many pixels; 0 = off
    # fastnet: train the whitening layer's bias for this many epochs, then freeze it (saves a backward
    # pass through the first convolution); 0 = train it throughout.
    whiten_bias_epochs: int = _bounded(ge=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"]
    channels_last: bool
    compile: bool
    threads: int = _bounded(ge=0)  # per process; 0 = the CPU cores shared out among the processes
    # Training processes on this machine (DDP, imgclf.distributed): the stage launches them through
    # torch.distributed.run; each trains on its share of every batch (batch_size is the global batch).
    processes: int = _bounded(ge=1)
    deterministic: bool
    # Differential privacy (DP-SGD, imgclf.privacy): the whole run's target epsilon, 0 = off; its delta,
    # null = 1 / the number of training images; the per-sample gradient norm clipped to.
    dp_epsilon: float = _bounded(ge=0)
    dp_delta: float | None = _bounded(gt=0, lt=1)
    dp_max_grad_norm: float = _bounded(gt=0)
    seed: int
    device: str = _bounded(pattern=r"auto|cpu|cuda(:\d+)?|mps")
    model_dir: str
    metrics_dir: str
    checkpoint_dir: str

    def __post_init__(self) -> None:
        if not is_known(self.model):
            raise ConfigError(
                f"train.model: no model {self.model!r} (known: {', '.join(ARCHITECTURES)}, {TORCHVISION}<name>)"
            )
        if self.pretrained is not None and not self.model.startswith(TORCHVISION):
            raise ConfigError("train.pretrained: only torchvision:<name> models load pretrained weights")
        if self.lookahead and not self.ema_decay:
            raise ConfigError("train.lookahead: needs train.ema_decay > 0 (the average it looks ahead to)")
        if self.whiten_bias_epochs and not self.model.startswith("fastnet"):
            raise ConfigError(f"train.whiten_bias_epochs: only fastnet models have a whitening layer, not {self.model}")
        if self.processes > self.batch_size:
            raise ConfigError(
                f"train.processes: {self.processes} processes cannot share batches of train.batch_size {self.batch_size}"
            )
        if self.alternate_flip and not self.flip:
            raise ConfigError("train.alternate_flip: needs train.flip: true (it says how to flip)")
        if self.freeze_epochs and self.pretrained is None:
            raise ConfigError("train.freeze_epochs: needs train.pretrained (a fresh model has no backbone to keep)")
        if self.backbone_lr_scale != 1.0 and self.pretrained is None:
            raise ConfigError(
                "train.backbone_lr_scale: needs train.pretrained (a fresh model's backbone learns at train.lr)"
            )


@dataclass(frozen=True)
class EvaluateConfig:
    batch_size: int = _bounded(ge=1)
    metrics_dir: str
    plots_dir: str
    top_losses: int = _bounded(ge=0)
    gradcam_images: int = _bounded(ge=0)
    seed: int


@dataclass(frozen=True)
class CompressConfig:
    """The compress stage (imgclf.compress)."""

    method: Literal["none", "int8", "prune"]
    calibration_images: int = _bounded(ge=1)  # int8: training images the activation ranges come from
    seed: int  # which training images calibrate
    prune_amount: float = _bounded(gt=0, lt=1)  # prune: share of the inner channels removed
    finetune_epochs: int = _bounded(ge=0)  # prune: epochs of fine-tuning after pruning
    model_dir: str
    metrics_dir: str


@dataclass(frozen=True)
class RegisterConfig:
    model_name: str = _bounded(pattern=_MODEL_NAME)
    receipt: str
    refuse_chance: bool  # refuse a model whose test accuracy is not better than chance (imgclf.admission)


@dataclass(frozen=True)
class ServeConfig:
    """Limits the served model enforces (stored with it by the register stage)."""

    max_request_bytes: int = _bounded(ge=1)  # a whole request body
    max_image_bytes: int = _bounded(ge=1)  # one encoded image file
    max_image_pixels: int = _bounded(ge=1, le=PILLOW_MAX_PIXELS)  # width x height of one image, from its header
    max_request_pixels: int = _bounded(ge=1)  # width x height summed over a request's images, from their headers
    max_images: int = _bounded(ge=1)  # images in one request
    top_k: int = _bounded(ge=1)  # classes returned per image, most probable first
    header_timeout_s: float = _bounded(gt=0)  # to send a request's line and headers (connection.py)


@dataclass(frozen=True)
class MlflowConfig:
    experiment_name: str = _bounded(pattern=r"\S.*")


@dataclass(frozen=True)
class Override:
    """A train key params.yaml gives a value that differs from its preset's."""

    key: str
    value: Any
    preset_value: Any
    preset: str

    def __str__(self) -> str:
        return f"Overriding: train.{self.key} = {self.value!r} (preset {self.preset}: {self.preset_value!r})"


@dataclass(frozen=True)
class Provenance:
    """Where the train section's values came from: the preset files (the named one first, then its
    bases) and the keys params.yaml overrides."""

    presets: tuple[str, ...] = ()
    overrides: tuple[Override, ...] = ()


@dataclass(frozen=True)
class Params:
    data: DataConfig
    prepare: PrepareConfig
    train: TrainConfig
    evaluate: EvaluateConfig
    compress: CompressConfig
    register: RegisterConfig
    serve: ServeConfig
    mlflow: MlflowConfig
    # Not a params.yaml section: filled in by load_params.
    provenance: Provenance = field(default_factory=Provenance, compare=False, metadata={"derived": True})


def load_params(path: str | Path) -> Params:
    """Read and validate a params file, its train preset resolved; raises ConfigError naming the key."""
    path = Path(path)
    raw = read_yaml(path, "params file")
    try:
        provenance = resolve_preset(path.parent, raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    try:
        params = _build(Params, raw, prefix="")
    except ConfigError as exc:
        where = f"{path} with {provenance.presets[0]}" if provenance.presets else f"{path}"
        raise ConfigError(f"{where}: {exc}") from None
    return dataclasses.replace(params, provenance=provenance)


def read_yaml(path: Path, what: str) -> Any:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such {what}") from None
    try:
        _refuse_aliases(text, path)
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None


def _refuse_aliases(text: str, path: Path) -> None:
    """Anchors and aliases are refused from the parser's events, before any value is built: a chain of
    aliases ("billion laughs") builds a value of billions of items that printing or copying exhausts memory."""
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, yaml.NodeEvent) and event.anchor is not None:  # AliasEvent is a NodeEvent
            what = "alias *" if isinstance(event, yaml.AliasEvent) else "anchor &"
            raise ConfigError(
                f"{path}: line {event.start_mark.line + 1}: YAML {what}{event.anchor[:40]}: anchors and "
                "aliases are not allowed in params files (write each value out)"
            )


def parse_value(text: str) -> Any:
    """One value as params.yaml reads it (`-S train.lr=1e-4`, `--set train.flip=true`)."""
    return yaml.load(text, Loader=_Loader)


PRESETS_DIR = "presets"
_PRESET_NAME = r"[A-Za-z0-9_\-]+"


def resolve_preset(root: Path, raw: Any) -> Provenance:
    """Fill in, in place, the train keys that params.yaml leaves null from `train.preset`'s chain of
    presets (presets/<name>.yaml, each building on its `base`). A value given in params.yaml wins over
    the preset's: each such key that differs from the preset is returned as an Override."""
    train = raw.get("train") if isinstance(raw, dict) else None
    name = train.get("preset") if isinstance(train, dict) else None
    if not isinstance(name, str) or not re.fullmatch(_PRESET_NAME, name):
        return Provenance()  # a bad value, or none at all: validation names it
    chain = _preset_chain(root, name)
    merged: dict[str, Any] = {}
    for _, values in reversed(chain):  # the root preset first, then each preset built on it
        merged.update(values)
    hints = typing.get_type_hints(TrainConfig)
    overrides = []
    for key in [f.name for f in dataclasses.fields(TrainConfig) if f.name not in RUN_KEYS]:
        if key not in train:
            continue  # validation reports the missing key
        if train[key] is not None:
            if key in merged and train[key] != merged[key]:
                overrides.append(Override(key, train[key], merged[key], name))
            continue
        if key in merged:
            train[key] = merged[key]
        elif type(None) not in typing.get_args(hints[key]):
            files = " -> ".join(file for file, _ in chain)
            raise ConfigError(f"train.{key}: null (take the preset's value), but no preset sets it ({files})")
    return Provenance(presets=tuple(file for file, _ in chain), overrides=tuple(overrides))


def _preset_chain(root: Path, name: str) -> list[tuple[str, dict[str, Any]]]:
    """[(file, train keys)] of the preset `name`, then its base, its base's base, ..."""
    chain: list[tuple[str, dict[str, Any]]] = []
    recipe_keys = {f.name for f in dataclasses.fields(TrainConfig)} - RUN_KEYS
    while name is not None:
        file = root / PRESETS_DIR / f"{name}.yaml"
        if str(file) in (f for f, _ in chain):
            raise ConfigError(
                f"train.preset: {file}: base {name!r} makes a cycle ({' -> '.join(f for f, _ in chain)} -> {file})"
            )
        if not file.is_file():
            available = sorted(p.stem for p in (root / PRESETS_DIR).glob("*.yaml"))
            what = f"base of {chain[-1][0]}" if chain else "train.preset"
            raise ConfigError(
                f"{what}: no preset {name!r} ({file} does not exist; available: {', '.join(available) or 'none'})"
            )
        values = read_yaml(file, "preset")
        if not isinstance(values, dict):
            raise ConfigError(f"train.preset: {file} must be a mapping of train keys")
        values = dict(values)
        base = values.pop("base", None)
        if base is not None and not (isinstance(base, str) and re.fullmatch(_PRESET_NAME, base)):
            raise ConfigError(f"train.preset: {file}: base: expected the name of another preset, got {base!r}")
        for key in sorted(values):
            if key in RUN_KEYS:
                raise ConfigError(
                    f"train.preset: {file}: {key}: set in params.yaml, not in a preset "
                    "(it says where or how a run executes, not what it trains)"
                )
            if key not in recipe_keys:
                raise ConfigError(f"train.preset: {file}: {key}: unknown train key")
        chain.append((str(file), values))
        name = base
    return chain


def as_flat_dict(params: Params) -> dict[str, Any]:
    """`{"train.lr": 0.01, ...}`: the resolved params, as MLflow logs them."""
    flat: dict[str, Any] = {}
    for f in dataclasses.fields(Params):
        if f.metadata.get("derived"):
            continue
        for key, value in dataclasses.asdict(getattr(params, f.name)).items():
            flat[f"{f.name}.{key}"] = value
    return flat


def stage_params(argv: list[str] | None, description: str | None) -> Params:
    """The `--params` command line every stage shares; a bad file exits with code 2."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        return load_params(args.params)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def from_mapping(cls: type, raw: Any, prefix: str = "") -> Any:
    """One config dataclass (ServeConfig, ...) from a mapping, validated as params.yaml's sections are."""
    return _build(cls, raw, prefix)


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        where = prefix.rstrip(".") or "the top level"
        raise ConfigError(f"{where}: expected a mapping of keys, got {_kind(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("derived")}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (known keys: {', '.join(fields)})")
    missing = [name for name in fields if name not in raw]
    if missing:
        raise ConfigError(f"{prefix}{missing[0]}: missing key")
    values = {}
    for name, f in fields.items():
        key = f"{prefix}{name}"
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, raw[name], prefix=f"{key}.")
        else:
            values[name] = _check(key, raw[name], hint, f.metadata)
    return cls(**values)


def _check(key: str, value: Any, hint: Any, limits: typing.Mapping[str, Any]) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        return _check(key, value, hint, limits)
    if origin is Literal:
        if value not in args or isinstance(value, bool):
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{key}: must be one of {choices}, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {_kind(value)} {value!r}")
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{key}: expected a finite number, got {value}")
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {_kind(value)} {value!r}")
    elif hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {_kind(value)} {value!r}")
    elif hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {_kind(value)} {value!r}")
    else:  # pragma: no cover - a dataclass field with a type this loader does not know
        raise TypeError(f"{key}: unsupported field type {hint!r}")
    _check_limits(key, value, limits)
    return value


def _check_limits(key: str, value: Any, limits: typing.Mapping[str, Any]) -> None:
    checks = [
        ("ge", ">=", lambda v, b: v >= b),
        ("gt", ">", lambda v, b: v > b),
        ("le", "<=", lambda v, b: v <= b),
        ("lt", "<", lambda v, b: v < b),
    ]
    for name, symbol, ok in checks:
        bound = limits.get(name)
        if bound is not None and not ok(value, bound):
            shown = f"{bound:,}" if isinstance(bound, int) else f"{bound:g}"
            raise ConfigError(f"{key}: must be {symbol} {shown}, got {value!r}")
    pattern = limits.get("pattern")
    if pattern is not None and not re.fullmatch(pattern, value):
        raise ConfigError(f"{key}: {value!r} does not match the pattern {pattern}")


def _kind(value: Any) -> str:
    return {
        type(None): "null",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a mapping",
    }.get(type(value), type(value).__name__)


def main(argv: list[str] | None = None) -> None:
    """`python -m imgclf.config --params params.yaml`: check a params file without running a stage.
    Run it before `dvc repro` on a file from elsewhere: DVC reads params.yaml itself first (for ${...}
    and params dependencies) and would expand a chain of YAML aliases before any stage refuses it."""
    params = stage_params(argv, main.__doc__)
    print(f"{params.data.dataset} / train.preset {params.train.preset}: the params file is valid")


if __name__ == "__main__":
    main()
