"""train stage: prepared arrays -> trained classifier, resumable after a crash, metrics in MLflow.

    python -m imgclf.train --params params.yaml

Reads `prepare.out_dir` (and `train.pretrained` when set: a local file, or torchvision's weights or a URL
through torch's download cache, TORCH_HOME); writes `train.model_dir`/{model.safetensors,
model.json}, `train.metrics_dir`/{train.json, train_history.csv} and, after every epoch,
`train.checkpoint_dir`/last.pt (kept across failed runs: `persist` in dvc.yaml). Starts the MLflow run
that evaluate and register continue: every resolved param, per-epoch train/val loss and accuracy, the git
commit and the data version. A checkpoint of the same params, data and code is resumed from, in the
same MLflow run, and ends with the same weights as an uninterrupted run.

With `train.processes` > 1 (or under torchrun) every process trains its share of each batch, in DDP
(imgclf.distributed); rank 0 alone logs to MLflow and writes the checkpoint and the outputs.

The core is `fit(params, card, train, val, device)`: no MLflow, no files, no environment; `main` and the
benchmarks call it. The whole training set lives on the device as one uint8 tensor: batches are gathered
by index, augmented as whole batches and normalised inside the model; no per-sample Python, no DataLoader.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import mlflow
import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from imgclf import checkpoint, distributed, privacy
from imgclf.allocator import keep_freed_memory
from imgclf.architectures import TORCHVISION
from imgclf.augment import AlternatingFlip, Augment, Mix
from imgclf.card import CARD_VERSION, ModelCard
from imgclf.config import Params, TrainConfig, as_flat_dict, stage_params
from imgclf.devices import PrecisionError, autocast_dtype, configure_torch, deterministic_environment, resolve_device
from imgclf.distributed import World
from imgclf.ema import WeightAverage
from imgclf.failures import run_stage
from imgclf.files import write_bytes, write_json
from imgclf.integrity import nonfinite, nonfinite_message
from imgclf.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    WEIGHTS_FILE,
    Classifier,
    ModelError,
    build,
    head_parameters,
    make_deterministic,
    to_nchw,
)
from imgclf.models import save_checkpoint as save_model
from imgclf.optim import make_optimizer, make_scheduler
from imgclf.progress import epoch_line, in_terminal
from imgclf.tracking import EpochLogger, StoreUnavailable, log_data_lineage, start_pipeline_run, tag_weights

# How often (in steps) the device is asked whether the loss went non-finite: asking syncs a GPU.
DIVERGENCE_CHECK_EVERY = 50


@dataclass(frozen=True)
class Arrays:
    """One split of the prepared data: uint8 images (N, H, W, C) and int64 labels (N,)."""

    images: np.ndarray
    labels: np.ndarray


class Diverged(FloatingPointError):
    """The training loss became NaN or infinite."""


def load_split(prepared: Path, split: str) -> Arrays:
    return Arrays(np.load(prepared / f"{split}_images.npy", mmap_mode="r"), np.load(prepared / f"{split}_labels.npy"))


class Divergence:
    """Watches the loss for NaN or infinity without syncing the device every step: the first bad step is
    kept on the device and read every DIVERGENCE_CHECK_EVERY steps."""

    def __init__(self, device: torch.device) -> None:
        self.first_bad = torch.full((), -1, device=device, dtype=torch.long)

    def record(self, loss: torch.Tensor, step: int) -> None:
        self.first_bad = torch.where((self.first_bad < 0) & ~torch.isfinite(loss), step, self.first_bad)

    def check(self, step: int, steps: int, epoch: int) -> None:
        if step % DIVERGENCE_CHECK_EVERY and step != steps:
            return
        if (bad := int(self.first_bad)) >= 0:
            raise Diverged(
                f"training diverged: the loss is not finite at epoch {epoch}, step {bad} of {steps}; "
                "nothing was saved for this epoch (lower train.lr, or set train.grad_clip)"
            )


def refuse_nonfinite(model: nn.Module, when: str) -> None:
    """Weights with NaN or infinity are never saved: the loss can stay finite while they are not (a
    BatchNorm statistic, an unused layer), and a checkpoint or model holding them would be served."""
    if bad := nonfinite(model.state_dict()):
        raise Diverged(
            f"training diverged: {nonfinite_message(bad, 'the weights')} {when}; nothing was saved for it "
            "(lower train.lr, or set train.grad_clip)"
        )


class Training:
    """Everything that changes while training, with a state dict to checkpoint and resume it."""

    def __init__(
        self,
        model: Classifier,
        train: Arrays,
        val: Arrays,
        cfg: TrainConfig,
        device: torch.device,
        world: World = World(),
    ) -> None:
        self.cfg, self.device, self.world = cfg, device, world
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.model = model.to(device, memory_format=self.memory_format)
        self.x_train, self.y_train = to_nchw(train.images, device), torch.from_numpy(train.labels).to(device)
        self.x_val, self.y_val = to_nchw(val.images, device), torch.from_numpy(val.labels).to(device)
        self.steps_per_epoch = math.ceil(len(self.x_train) / cfg.batch_size)
        # A pretrained model's new head: it alone learns for the first freeze_epochs, then at train.lr
        # while the backbone learns at backbone_lr_scale times that.
        self.head = {id(p) for p in head_parameters(model.net)} if cfg.pretrained is not None else set()
        self.optimizer = make_optimizer(model, cfg, self.head)
        self.scheduler = make_scheduler(self.optimizer, cfg, cfg.epochs * self.steps_per_epoch)
        self.dtype = autocast_dtype(cfg, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.ema = (
            WeightAverage(model, cfg.ema_decay, cfg.lookahead, cfg.epochs * self.steps_per_epoch)
            if cfg.ema_decay
            else None
        )
        # Shuffling and augmentation draw from their own generators, seeded by train.seed alone.
        self.order = torch.Generator().manual_seed(cfg.seed)
        self.augment_rng = torch.Generator().manual_seed(cfg.seed + 1)
        self.augment = Augment(
            flip=cfg.flip,
            translate=cfg.translate,
            cutout=cfg.cutout,
            resized_crop=cfg.resized_crop,
            auto_augment=cfg.auto_augment,
            ra_magnitude=cfg.ra_magnitude,
            random_erase=cfg.random_erase,
        )
        self.mix = Mix(model.num_classes, mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha)
        self.alternating_flip = AlternatingFlip(len(self.x_train), cfg.seed + 2, device) if cfg.alternate_flip else None
        # fastnet's whitening bias, trained for the first train.whiten_bias_epochs epochs only.
        whiten = getattr(model.net, "whiten", None)
        self.whiten_bias = whiten.bias if cfg.whiten_bias_epochs and whiten is not None else None
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.forward = world.replicate(self.model, device, compile=cfg.compile)  # in DDP with several ranks
        # DP-SGD (train.dp_epsilon): Opacus's per-sample clipping and noise, and Poisson-sampled batches.
        self.privacy = (
            privacy.DPSGD(self.model, self.optimizer, len(self.x_train), cfg, self.order, device)
            if cfg.dp_epsilon
            else None
        )
        if self.privacy is not None:
            self.forward, self.optimizer = self.privacy.module, self.privacy.optimizer
        self.epoch = 0
        self.history: list[dict[str, float]] = []

    @property
    def final_model(self) -> Classifier:
        """The model evaluation and serving get: the EMA of the weights when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def state_dict(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state(), "order": self.order.get_state(), "augment": self.augment_rng.get_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "epoch": self.epoch,
            "epochs": self.cfg.epochs,
            "history": self.history,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "privacy": self.privacy.state_dict() if self.privacy else None,
            "rng": rng,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.history = state["epoch"], list(state["history"])
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        if self.privacy is not None:
            self.privacy.load_state_dict(state["privacy"])
        torch.set_rng_state(state["rng"]["torch"])
        self.order.set_state(state["rng"]["order"])
        self.augment_rng.set_state(state["rng"]["augment"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])

    # ---- one epoch, in parts -----------------------------------------------------------------------

    def begin_epoch(self) -> None:
        """Which parameters learn this epoch: the head alone while the backbone is frozen, and the
        whitening bias only for its first epochs."""
        self.epoch += 1
        frozen = bool(self.head) and self.epoch <= self.cfg.freeze_epochs
        if self.head:
            for p in self.trainable:
                if id(p) not in self.head:
                    p.requires_grad_(not frozen)
        if self.whiten_bias is not None:
            self.whiten_bias.requires_grad_(self.epoch <= self.cfg.whiten_bias_epochs)
        self.model.train()
        if frozen:  # a frozen backbone keeps its BatchNorm statistics too: they normalise as pretrained
            for module in self.model.net.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The images (augmented), the loss's targets (soft ones when mixed) and the labels at `index`."""
        images, labels = self.x_train[index], self.y_train[index]
        if self.augment.active:
            flips = self.alternating_flip.mask(self.epoch, index) if self.alternating_flip else None
            images = self.augment(images, self.augment_rng, flip_mask=flips)
        if self.mix.active:
            images, target = self.mix(images, labels, self.augment_rng)
            return images, target, labels
        return images, labels, labels

    def gradients(
        self, images: torch.Tensor, target: torch.Tensor, labels: torch.Tensor | None = None, weight: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Backward passes over micro-batches of train.micro_batch images, accumulating the whole batch's
        gradient (times `weight`: see World.shard); returns the batch's mean loss (against `target`:
        labels, or class probabilities) and its number of predictions equal to `labels` (default:
        `target`), on the device."""
        labels = target if labels is None else labels
        if not len(images):  # a Poisson-sampled (DP-SGD) batch can be empty: the step is noise alone
            return privacy.empty_batch(self.forward, images)
        loss = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        size = self.cfg.micro_batch or len(images)
        for start in range(0, len(images), size):
            part = images[start : start + size].contiguous(memory_format=self.memory_format)
            part_target = target[start : start + size]
            with self.world.accumulating(self.forward, last=start + size >= len(images)):
                with torch.autocast(
                    self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None
                ):
                    logits = self.forward(part)
                    part_loss = self.loss_fn(logits.float(), part_target) * (len(part) / len(images))
                self.scaler.scale(part_loss * weight).backward()
            loss += part_loss.detach()
            correct += (logits.argmax(1) == labels[start : start + size]).sum()
        return loss, correct

    def step(self) -> None:
        """One optimizer step on the accumulated gradients (clipped, scaled), then the schedule and the
        weight average."""
        if self.cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.trainable, self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model, self.scheduler.last_epoch)

    def validates(self, epoch: int) -> bool:
        """Whether the validation split is scored after `epoch` (train.val_every; always after the last)."""
        every = self.cfg.val_every
        return epoch >= self.cfg.epochs or (every > 0 and epoch % every == 0)

    def run_epoch(self, on_step: Callable[[], None] = lambda: None) -> dict[str, float]:
        """Train one epoch, then score the validation split (on the epochs train.val_every names);
        returns the epoch's metrics, val_loss and val_accuracy only when it was scored."""
        self.begin_epoch()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        seen = 0  # images trained on: N, or about N with Poisson-sampled batches
        divergence = Divergence(self.device)
        if self.privacy is not None:
            batches = self.privacy.batches()
        else:
            batches = torch.randperm(len(self.x_train), generator=self.order).to(self.device).split(self.cfg.batch_size)
        for step, index in enumerate(batches, start=1):
            # Every rank draws and augments the whole batch alike, then trains on its rows of it.
            images, target, labels, weight, share = self.world.shard(*self.batch(index))
            self.optimizer.zero_grad(set_to_none=True)
            loss, batch_correct = self.gradients(images, target, labels, weight)
            loss, batch_correct = self.world.sum(loss * share, batch_correct)
            self.step()
            divergence.record(loss, step)
            loss_sum += loss * len(index)
            correct += batch_correct
            seen += len(index)
            divergence.check(step, len(batches), self.epoch)
            on_step()
        if self.ema is not None:
            self.ema.end_epoch(self.model)
        metrics = {"train_loss": loss_sum.item() / max(seen, 1), "train_accuracy": correct.item() / max(seen, 1)}
        if self.validates(self.epoch):
            val_loss, val_accuracy = score(self.final_model, self.x_val, self.y_val, self.memory_format)
            metrics |= {"val_loss": val_loss, "val_accuracy": val_accuracy}
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        if self.privacy is not None:  # every step so far noised and accounted for, or no model at all
            self.privacy.check_steps(self.epoch * self.steps_per_epoch)
            metrics["dp_epsilon"] = self.privacy.epsilon()
        self.history.append({"epoch": self.epoch, **metrics})
        return metrics


@torch.inference_mode()
def score(
    model: Classifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    memory_format: torch.memory_format = torch.contiguous_format,
    batch_size: int = 1024,
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over a whole split held on the device (eval mode)."""
    was_training = model.training
    model.eval()
    loss = torch.zeros((), device=images.device)
    correct = torch.zeros((), device=images.device, dtype=torch.long)
    for start in range(0, len(images), batch_size):
        logits = model(images[start : start + batch_size].contiguous(memory_format=memory_format)).float()
        target = labels[start : start + batch_size]
        loss += nn.functional.cross_entropy(logits, target, reduction="sum")
        correct += (logits.argmax(1) == target).sum()
    model.train(was_training)
    n = max(len(images), 1)
    return loss.item() / n, correct.item() / n


# ---- the core: fit -----------------------------------------------------------------------------------


def new_card(params: Params, data_meta: dict[str, Any]) -> ModelCard:
    """The card of the model params.train describes, for data with prepare's meta.json."""
    cfg = params.train
    mean, std = data_meta["mean"], data_meta["std"]
    if cfg.model.startswith(TORCHVISION) and cfg.pretrained is not None:
        # Fine-tuning keeps the normalisation the pretrained weights were trained with.
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    elif cfg.dp_epsilon:  # the training set's own mean and std would be released without noise
        mean, std = privacy.fixed_normalisation(data_meta["channels"])
    return ModelCard(
        card_version=CARD_VERSION,
        model=cfg.model,
        classes=tuple(data_meta["classes"]),
        image_size=data_meta["image_size"],
        channels=data_meta["channels"],
        mean=tuple(mean),
        std=tuple(std),
        tta_flip=cfg.tta_flip,
        tta_translate=cfg.tta_translate,
        train=dataclasses.asdict(cfg),
    )


def new_training(
    params: Params, card: ModelCard, train: Arrays, val: Arrays, device: torch.device, world: World = World()
) -> Training:
    """A fresh Training: the model built (and fastnet's whitening set from the data) from train.seed."""
    cfg = params.train
    torch.manual_seed(cfg.seed)
    model = build(card, pretrained=cfg.pretrained)
    if cfg.deterministic:
        make_deterministic(model)
    if hasattr(model.net, "init_from_data"):  # e.g. FastNet's patch whitening, from training images
        # A random sample: prepared splits are sorted by class, so the first rows are one class.
        sample = torch.randperm(len(train.labels), generator=torch.Generator().manual_seed(cfg.seed))[:5000]
        with torch.no_grad():
            images = to_nchw(train.images[np.sort(sample.numpy())], torch.device("cpu"))
            model.net.init_from_data(model.normalise(images))
    return Training(model, train, val, cfg, device, world)


@dataclass(frozen=True)
class FitResult:
    model: Classifier  # the weights to evaluate and serve (their average, with train.ema_decay)
    history: list[dict[str, float]]  # one row of metrics per epoch
    training: Training


def fit(
    params: Params,
    card: ModelCard,
    train: Arrays,
    val: Arrays,
    device: torch.device,
    *,
    resume: dict[str, Any] | None = None,
    on_start: Callable[[Training], None] = lambda training: None,
    on_step: Callable[[Training], None] = lambda training: None,
    on_epoch: Callable[[Training, dict[str, float]], None] = lambda training, metrics: None,
    world: World = World(),
) -> FitResult:
    """Train `params.train`'s recipe on `train`, scoring `val` after each epoch; from the training state
    `resume` (a checkpoint's) when given. `on_start` runs once before the first epoch, `on_step` after
    every optimizer step, `on_epoch` after every epoch (where the stage checkpoints and logs). In DDP
    (`world` of several ranks) every rank calls it alike. Raises Diverged when the loss stops being finite."""
    cfg = params.train
    configure_torch(cfg, threads=world.threads(cfg.threads))
    training = new_training(params, card, train, val, device, world)
    if resume is not None:
        training.load_state_dict(resume)
    on_start(training)
    while training.epoch < cfg.epochs:
        metrics = training.run_epoch(on_step=lambda: on_step(training))
        on_epoch(training, metrics)
    return FitResult(training.final_model, training.history, training)


# ---- the stage ---------------------------------------------------------------------------------------


def history_csv(history: list[dict]) -> bytes:
    """One row per epoch; an epoch without a metric (validation skipped, train.val_every) leaves it empty."""
    buffer = io.StringIO()
    fields = list(dict.fromkeys(key for row in history for key in row))  # every row's, in order of appearance
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()})
    return buffer.getvalue().encode()


def resumable_state(cfg: TrainConfig, fingerprint: str) -> dict[str, Any] | None:
    """The checkpoint to resume from, if it belongs to these params, data and code (else say why not,
    unless it is of a run that finished: then there is nothing to resume)."""
    state = checkpoint.load(cfg.checkpoint_dir)
    if state is None:
        return None
    if state.get("fingerprint") == fingerprint:
        print(f"train: resuming from the checkpoint of epoch {state['epoch']} of {cfg.epochs}")
        return state
    if state.get("epoch") != state.get("epochs"):
        print(
            f"train: not resuming from {Path(cfg.checkpoint_dir) / checkpoint.FILE}: it was written for "
            "other params, data or code; starting fresh"
        )
    return None


def main(argv: list[str] | None = None) -> None:
    params: Params = stage_params(argv, __doc__)
    world = distributed.from_environment()  # the rank torchrun gave this process, else rank 0 of 1
    if distributed.launched():  # torchrun's processes train, whatever train.processes says
        params = dataclasses.replace(params, train=dataclasses.replace(params.train, processes=world.size))
    cfg = params.train
    launching = cfg.processes > 1 and not distributed.launched()  # the stage starts its ranks, as torchrun does
    for override in params.provenance.overrides if world.main and not launching else ():
        print(override)
    prepared = Path(params.prepare.out_dir)
    card = new_card(params, json.loads((prepared / "meta.json").read_text()))
    try:
        # The model built once before anything starts: a bad weights name, a file that does not fit the
        # model, or weights that cannot be downloaded stop here (exit code 2), and a download lands in
        # torch's cache for the real build.
        model = build(card, pretrained=cfg.pretrained)
        if cfg.dp_epsilon:  # an option that breaks the guarantee, or a layer Opacus cannot train, stops here
            if (refused := privacy.not_private(cfg)) is not None:
                raise privacy.PrivacyError(refused)
            privacy.check_model(model)
    except (ModelError, privacy.PrivacyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    device = resolve_device(cfg.device)
    try:
        autocast_dtype(cfg, device)  # a precision this device cannot use: refused before the run starts
    except PrecisionError as exc:
        raise SystemExit(f"error: {exc}") from None
    if launching:
        raise SystemExit(distributed.launch(cfg.processes, sys.argv[1:] if argv is None else argv))
    train, val = load_split(prepared, "train"), load_split(prepared, "val")
    if cfg.dp_epsilon:
        plain = build(dataclasses.replace(card, train={**card.train, "dp_epsilon": 0.0}))
        for line in privacy.describe_replaced(plain, model):
            print(line)
    deterministic_environment(os.environ, cfg)
    keep_freed_memory()  # ~1.2x the images/s on the CPU for nets with large activations (bench/allocator.py)
    # MLflow's system-metrics monitor says "started", "stopping", "terminated" at INFO in every run.
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    # A store that hiccups during training must not stall it for minutes (MLflow's default retries).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    try:
        with distributed.process_group(world, device) as device:
            if world.main:
                train_and_log(params, card, train, val, device, world)
            else:
                train_replica(params, card, train, val, device, world)
    except distributed.DistributedError as exc:
        raise SystemExit(f"error: {exc}") from None


def train_replica(
    params: Params, card: ModelCard, train: Arrays, val: Arrays, device: torch.device, world: World
) -> None:
    """A rank other than 0: trains its rows of each batch beside rank 0, from the checkpoint rank 0
    resumes from, and writes and logs nothing."""
    state, run_id = world.broadcast(None)
    # Anything on this rank that logs to MLflow would log into rank 0's run, never start one of its own.
    os.environ["MLFLOW_RUN_ID"] = run_id
    try:
        fit(params, card, train, val, device, resume=state, world=world)
    except (Diverged, ModelError):
        raise SystemExit(1) from None  # rank 0 meets the same and says it


def train_and_log(
    params: Params, card: ModelCard, train: Arrays, val: Arrays, device: torch.device, world: World
) -> None:
    """Rank 0 (or the only process): trains, logs to MLflow, writes the checkpoints and the outputs."""
    cfg = params.train
    prepared = Path(params.prepare.out_dir)
    fingerprint = checkpoint.fingerprint(params, prepared)
    state = resumable_state(cfg, fingerprint)

    try:
        run = start_pipeline_run(params.mlflow.experiment_name, resume_run_id=state["mlflow_run_id"] if state else None)
    except StoreUnavailable as exc:
        raise SystemExit(f"error: {exc}") from None
    with run:
        run_id = run.info.run_id
        world.broadcast((state, run_id))  # to the other ranks
        if state is None:
            mlflow.log_params(as_flat_dict(params))
            mlflow.log_params({"device_used": str(device)})
        log_data_lineage(params.data.name, params.data.raw_dir, params.prepare.out_dir)
        mlflow.log_artifact(str(prepared / "report.json"), artifact_path="data")
        logger = EpochLogger(run_id)
        for row in state["history"] if state else []:  # a resumed run logs what the store does not hold yet
            logger.add(row["epoch"], {k: v for k, v in row.items() if k != "epoch"})
        history_file = Path(cfg.metrics_dir) / "train_history.csv"
        remaining = cfg.epochs - (state["epoch"] if state else 0)
        clock = {"start": time.monotonic(), "epoch": time.monotonic()}

        def end_of_epoch(training: Training, metrics: dict[str, float]) -> None:
            refuse_nonfinite(training.model, f"after epoch {training.epoch}")
            refuse_nonfinite(training.final_model, f"after epoch {training.epoch}")  # (the EMA, when kept)
            checkpoint.save(
                {**training.state_dict(), "fingerprint": fingerprint, "mlflow_run_id": run_id}, cfg.checkpoint_dir
            )
            write_bytes(history_file, history_csv(training.history))
            now = time.monotonic()
            epoch_s, clock["epoch"] = now - clock["epoch"], now
            images_per_s = len(train.labels) / epoch_s
            # The timings go to MLflow only: the history file is a DVC output, the same for the same inputs.
            logger.add(training.epoch, {**metrics, "images_per_s": images_per_s, "epoch_s": epoch_s})
            if bar is not None:
                shown = {"loss": f"{metrics['train_loss']:.3f}"}
                if "val_accuracy" in metrics:  # a scored epoch (train.val_every)
                    shown["val_acc"] = f"{metrics['val_accuracy']:.3f}"
                if "dp_epsilon" in metrics:
                    shown["epsilon"] = f"{metrics['dp_epsilon']:.2f}"
                bar.set_postfix(shown)
            else:  # no terminal: one line per epoch instead of a bar that prints nothing until the end
                done = training.epoch - (cfg.epochs - remaining)
                print(
                    epoch_line(
                        training.epoch,
                        cfg.epochs,
                        metrics,
                        images_per_s,
                        now - clock["start"],
                        cfg.epochs - training.epoch,
                        (now - clock["start"]) / done,
                    ),
                    file=sys.stderr,
                    flush=True,
                )

        steps = remaining * math.ceil(len(train.labels) / cfg.batch_size)

        def start(training: Training) -> None:
            if training.privacy is not None:
                print(training.privacy.budget.describe(cfg.dp_max_grad_norm))
                if state is None:
                    mlflow.log_param("dp_noise_multiplier", training.privacy.budget.noise_multiplier)

        bar = tqdm(total=steps, desc="train", unit="batch", file=sys.stderr) if in_terminal() else None
        try:
            result = fit(
                params,
                card,
                train,
                val,
                device,
                resume=state,
                on_start=start,
                on_step=lambda _: bar.update() if bar is not None else None,
                on_epoch=end_of_epoch,
                world=world,
            )
            refuse_nonfinite(result.model, "at the end of training")
        except (Diverged, ModelError) as exc:
            raise SystemExit(f"error: {exc}") from None
        finally:
            if bar is not None:
                bar.close()
        if remaining == 0:  # every epoch was in the checkpoint
            write_bytes(history_file, history_csv(result.history))
        if state is None:
            mlflow.log_param("num_parameters", sum(p.numel() for p in result.model.parameters()))
        logger.flush(final=True)
        save_model(result.model, card, cfg.model_dir)
        tag_weights(Path(cfg.model_dir) / WEIGHTS_FILE)  # how evaluate and register find this run
        final = {k: round(v, 6) for k, v in result.history[-1].items() if k not in ("epoch", "lr")}
        if result.training.privacy is not None:  # the epsilon spent (in the history) and its delta
            final["dp_delta"] = result.training.privacy.budget.delta
        write_json(Path(cfg.metrics_dir) / "train.json", final)
    print(
        f"train: {cfg.model}, {cfg.epochs} epochs on {device}: val_accuracy {final['val_accuracy']:.4f} "
        f"(MLflow run {run_id})"
    )


if __name__ == "__main__":
    run_stage(main)  # a failing store or disk: one line, not a traceback (IMGCLF_DEBUG=1 shows it)
