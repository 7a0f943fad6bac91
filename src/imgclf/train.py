"""train stage: prepared arrays -> trained classifier, resumable after a crash, metrics in MLflow.

    python -m imgclf.train --params params.yaml

Reads `prepare.out_dir` (and `train.pretrained` when set); writes `train.model_dir`/{model.safetensors,
model.json}, `train.metrics_dir`/{train.json, train_history.csv} and, after every epoch,
`train.checkpoint_dir`/last.pt (kept across failed runs: `persist` in dvc.yaml). Starts the MLflow run
that evaluate and register continue: every resolved param, per-epoch train/val loss and accuracy, the git
commit and the data version. A checkpoint of the same params, data and code is resumed from, in the
same MLflow run, and ends with the same weights as an uninterrupted run.

The whole training set lives on the device as one uint8 tensor: batches are gathered by index,
augmented as whole batches and normalised inside the model; no per-sample Python, no DataLoader.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from imgclf import checkpoint
from imgclf.allocator import keep_freed_memory
from imgclf.augment import AlternatingFlip, Augment
from imgclf.config import Params, TrainConfig, as_flat_dict, stage_params
from imgclf.files import write_bytes, write_json
from imgclf.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TORCHVISION,
    Classifier,
    build,
    head_parameters,
    make_deterministic,
    resolve_device,
    save_checkpoint,
    to_nchw,
)
from imgclf.optim import make_optimizer, make_scheduler

# How often (in steps) the device is asked whether the loss went non-finite: asking syncs a GPU.
DIVERGENCE_CHECK_EVERY = 50
# With train.lookahead, the weights are reset to their EMA every this many steps (airbench: 5).
LOOKAHEAD_EVERY = 5


@dataclass(frozen=True)
class Arrays:
    """One split of the prepared data: uint8 images (N, H, W, C) and int64 labels (N,)."""

    images: np.ndarray
    labels: np.ndarray


class Diverged(FloatingPointError):
    """The training loss became NaN or infinite."""


def load_split(prepared: Path, split: str) -> Arrays:
    return Arrays(np.load(prepared / f"{split}_images.npy", mmap_mode="r"),
                  np.load(prepared / f"{split}_labels.npy"))


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512_BF16 or AMX): there, bf16 autocast trains the
    fast preset about 1.6x faster than fp32; without them, bf16 is emulated and about 3x slower."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch's own CPU feature queries
    return any(getattr(torch.cpu, check, lambda: False)() for check in checks)


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of train.precision on `device`; None for fp32. `auto` takes bf16 on CUDA GPUs
    (fp16 on those without bf16) and on CPUs with bf16 units, else fp32. Weights, optimizer state, the
    loss and evaluation stay fp32 whatever the choice."""
    if cfg.precision == "fp32":
        return None
    if device.type == "cuda":
        if cfg.precision == "fp16":
            return torch.float16
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    native_bf16 = device.type == "cpu" and cpu_has_bf16()
    if cfg.precision == "auto":
        return torch.bfloat16 if native_bf16 else None
    if cfg.precision == "bf16" and native_bf16:
        return torch.bfloat16
    if cfg.precision == "fp16":
        raise ValueError(f"train.precision: fp16 autocast is for CUDA devices; on {device.type} use auto, fp32, "
                         "or bf16 on a CPU with bf16 units (AVX512_BF16 or AMX)")
    if device.type == "cpu":
        raise ValueError("train.precision: bf16 on cpu: this cpu has no bf16 units (AVX512_BF16 or AMX), where "
                         "bf16 runs about 3x slower than fp32: use auto or fp32")
    raise ValueError(f"train.precision: bf16 autocast is for CUDA devices and CPUs with bf16 units, not "
                     f"{device.type}: use auto or fp32")


def configure_torch(cfg: TrainConfig) -> None:
    threads = cfg.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)  # more threads than cores slows small nets a lot
    keep_freed_memory()  # ~1.2x the images/s on the CPU for nets with large activations
    if cfg.deterministic:
        # cuBLAS needs this workspace setting for deterministic results (read when CUDA starts).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    else:
        torch.use_deterministic_algorithms(False)
    # On a GPU, cuDNN times its convolution kernels once per input shape and keeps the fastest: the
    # choice can differ between runs, so not when results must repeat. (No effect on a CPU.)
    torch.backends.cudnn.benchmark = not cfg.deterministic


class Training:
    """Everything that changes while training, with a state dict to checkpoint and resume it."""

    def __init__(self, model: Classifier, train: Arrays, val: Arrays, cfg: TrainConfig,
                 device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.model = model.to(device, memory_format=self.memory_format)
        self.x_train, self.y_train = to_nchw(train.images, device), torch.from_numpy(train.labels).to(device)
        self.x_val, self.y_val = to_nchw(val.images, device), torch.from_numpy(val.labels).to(device)
        self.steps_per_epoch = math.ceil(len(self.x_train) / cfg.batch_size)
        self.optimizer = make_optimizer(model, cfg)
        self.scheduler = make_scheduler(self.optimizer, cfg, cfg.epochs * self.steps_per_epoch)
        self.dtype = autocast_dtype(cfg, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.ema = None
        if cfg.ema_decay:
            from torch.optim.swa_utils import AveragedModel

            self.ema = AveragedModel(model, multi_avg_fn=self._average, use_buffers=True)
        # Shuffling and augmentation draw from their own generators, seeded by train.seed alone.
        self.order = torch.Generator().manual_seed(cfg.seed)
        self.augment_rng = torch.Generator().manual_seed(cfg.seed + 1)
        self.augment = Augment(flip=cfg.flip, translate=cfg.translate, cutout=cfg.cutout)
        self.alternating_flip = AlternatingFlip(len(self.x_train), cfg.seed + 2, device) if cfg.alternate_flip else None
        # fastnet's whitening bias, trained for the first train.whiten_bias_epochs epochs only.
        whiten = getattr(model.net, "whiten", None)
        self.whiten_bias = whiten.bias if cfg.whiten_bias_epochs and whiten is not None else None
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.head = {id(p) for p in head_parameters(model.net)} if cfg.freeze_epochs else set()
        self.forward = torch.compile(self.model) if cfg.compile else self.model
        self.epoch = 0
        self.history: list[dict[str, float]] = []

    def _ema_decay_now(self) -> float:
        """train.ema_decay per step. With lookahead the average is updated every LOOKAHEAD_EVERY steps,
        so its decay is that of as many steps, ramped up as progress^3 (move fast early, average
        strongly late), as in airbench (K. Jordan, 2024)."""
        if not self.cfg.lookahead:
            return self.cfg.ema_decay
        done = self.scheduler.last_epoch / (self.cfg.epochs * self.steps_per_epoch)
        return self.cfg.ema_decay**LOOKAHEAD_EVERY * done**3

    @torch.no_grad()
    def _average(self, averaged: list[torch.Tensor], current: list[torch.Tensor], count) -> None:
        pairs = [(a, c) for a, c in zip(averaged, current) if a.is_floating_point()]
        if pairs:
            torch._foreach_lerp_([a for a, _ in pairs], [c for _, c in pairs], 1.0 - self._ema_decay_now())
        for a, c in zip(averaged, current):
            if not a.is_floating_point():  # counters such as BatchNorm's num_batches_tracked
                a.copy_(c)

    @property
    def final_model(self) -> Classifier:
        """The model evaluation and serving get: the EMA of the weights when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def state_dict(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state(), "order": self.order.get_state(),
               "augment": self.augment_rng.get_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {"epoch": self.epoch, "history": self.history, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "ema": self.ema.state_dict() if self.ema else None,
                "rng": rng}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.history = state["epoch"], list(state["history"])
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        torch.set_rng_state(state["rng"]["torch"])
        self.order.set_state(state["rng"]["order"])
        self.augment_rng.set_state(state["rng"]["augment"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])

    def _set_frozen(self, frozen: bool) -> None:
        for p in self.trainable:
            if id(p) not in self.head:
                p.requires_grad_(not frozen)

    def run_epoch(self, on_step=lambda: None) -> dict[str, float]:
        """Train one epoch, then score the validation split; returns the epoch's metrics."""
        cfg, device = self.cfg, self.device
        self.epoch += 1
        if self.head:
            self._set_frozen(self.epoch <= cfg.freeze_epochs)
        if self.whiten_bias is not None:
            self.whiten_bias.requires_grad_(self.epoch <= cfg.whiten_bias_epochs)
        self.model.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        first_bad = torch.full((), -1, device=device, dtype=torch.long)
        batches = torch.randperm(len(self.x_train), generator=self.order).to(device).split(cfg.batch_size)
        for step, index in enumerate(batches, start=1):
            images, target = self.x_train[index], self.y_train[index]
            if self.augment.active:
                flips = self.alternating_flip.mask(self.epoch, index) if self.alternating_flip else None
                images = self.augment(images, self.augment_rng, flip_mask=flips)
            self.optimizer.zero_grad(set_to_none=True)
            # Gradients of the whole batch, accumulated over micro-batches of train.micro_batch images.
            loss = torch.zeros((), device=device)
            size = cfg.micro_batch or len(index)
            for start in range(0, len(index), size):
                part = images[start:start + size].contiguous(memory_format=self.memory_format)
                part_target = target[start:start + size]
                with torch.autocast(device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
                    logits = self.forward(part)
                    part_loss = self.loss_fn(logits.float(), part_target) * (len(part) / len(index))
                self.scaler.scale(part_loss).backward()
                loss += part_loss.detach()
                correct += (logits.argmax(1) == part_target).sum()
            if cfg.grad_clip:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.trainable, cfg.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            if self.ema is not None and not cfg.lookahead:
                self.ema.update_parameters(self.model)
            elif self.ema is not None and self.scheduler.last_epoch % LOOKAHEAD_EVERY == 0:
                # Lookahead: the average takes a step towards the weights being trained, which then
                # jump back to it.
                self.ema.update_parameters(self.model)
                self.model.load_state_dict(self.ema.module.state_dict())
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
            loss_sum += loss * len(index)
            if step % DIVERGENCE_CHECK_EVERY == 0 or step == len(batches):
                if (bad := int(first_bad)) >= 0:
                    raise Diverged(f"training diverged: the loss is not finite at epoch {self.epoch}, step {bad} "
                                   f"of {len(batches)}; nothing was saved for this epoch (lower train.lr, or "
                                   "set train.grad_clip)")
            on_step()
        if self.ema is not None and cfg.lookahead and int(self.ema.n_averaged) == 0:
            self.ema.update_parameters(self.model)  # fewer steps than LOOKAHEAD_EVERY so far: start the average
        val_loss, val_accuracy = score(self.final_model, self.x_val, self.y_val, self.memory_format)
        metrics = {"train_loss": loss_sum.item() / len(self.x_train),
                   "train_accuracy": correct.item() / len(self.x_train),
                   "val_loss": val_loss, "val_accuracy": val_accuracy, "lr": self.scheduler.get_last_lr()[0]}
        self.history.append({"epoch": self.epoch, **metrics})
        return metrics


@torch.inference_mode()
def score(model: Classifier, images: torch.Tensor, labels: torch.Tensor,
          memory_format: torch.memory_format = torch.contiguous_format, batch_size: int = 1024) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over a whole split held on the device (eval mode)."""
    was_training = model.training
    model.eval()
    loss = torch.zeros((), device=images.device)
    correct = torch.zeros((), device=images.device, dtype=torch.long)
    for start in range(0, len(images), batch_size):
        logits = model(images[start:start + batch_size].contiguous(memory_format=memory_format)).float()
        target = labels[start:start + batch_size]
        loss += nn.functional.cross_entropy(logits, target, reduction="sum")
        correct += (logits.argmax(1) == target).sum()
    model.train(was_training)
    n = max(len(images), 1)
    return loss.item() / n, correct.item() / n


def history_csv(history: list[dict]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(history[0]), lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()})
    return buffer.getvalue().encode()


def model_meta(params: Params, data_meta: dict) -> dict:
    """What travels with the checkpoint: architecture, classes, input shape, normalisation."""
    cfg = params.train
    meta = {"model": cfg.model, **{k: data_meta[k] for k in ("classes", "image_size", "channels", "mean", "std")},
            "tta_flip": cfg.tta_flip, "tta_translate": cfg.tta_translate}
    if cfg.model.startswith(TORCHVISION) and cfg.pretrained is not None:
        # Fine-tuning keeps the normalisation the pretrained weights were trained with.
        meta["mean"], meta["std"] = IMAGENET_MEAN, IMAGENET_STD
    return meta


def new_training(params: Params, meta: dict, train: Arrays, val: Arrays, device: torch.device) -> Training:
    cfg = params.train
    torch.manual_seed(cfg.seed)
    model = build(meta, pretrained=cfg.pretrained)
    if cfg.deterministic:
        make_deterministic(model)
    if hasattr(model.net, "init_from_data"):  # e.g. FastNet's patch whitening, from training images
        # A random sample: prepared splits are sorted by class, so the first rows are one class.
        sample = torch.randperm(len(train.labels), generator=torch.Generator().manual_seed(cfg.seed))[:5000]
        with torch.no_grad():
            images = to_nchw(train.images[np.sort(sample.numpy())], torch.device("cpu"))
            model.net.init_from_data(model.normalise(images))
    return Training(model, train, val, cfg, device)


def main(argv: list[str] | None = None) -> None:
    params: Params = stage_params(argv, __doc__)
    cfg = params.train
    prepared = Path(params.prepare.out_dir)
    data_meta = json.loads((prepared / "meta.json").read_text())
    train, val = load_split(prepared, "train"), load_split(prepared, "val")
    meta = model_meta(params, data_meta)
    configure_torch(cfg)
    device = resolve_device(cfg.device)
    try:
        training = new_training(params, meta, train, val, device)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None

    fingerprint = checkpoint.fingerprint(params, prepared)
    state = checkpoint.load(cfg.checkpoint_dir)
    resume_run = None
    if state is not None and state.get("fingerprint") == fingerprint:
        training.load_state_dict(state)
        resume_run = state["mlflow_run_id"]
        print(f"train: resuming from the checkpoint of epoch {training.epoch} of {cfg.epochs}")
    elif state is not None:
        print(f"train: not resuming from {Path(cfg.checkpoint_dir) / checkpoint.FILE}: it was written for "
              "other params, data or code; starting fresh")

    # A store that hiccups during training must not stall it for minutes (MLflow's default retries).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    import mlflow

    from imgclf.tracking import EpochLogger, StoreUnavailable, log_data_lineage, start_pipeline_run

    try:
        run = start_pipeline_run(params.mlflow.experiment_name, resume_run_id=resume_run)
    except StoreUnavailable as exc:
        raise SystemExit(f"error: {exc}") from None
    with run:
        run_id = run.info.run_id
        if resume_run is None:
            mlflow.log_params(as_flat_dict(params))
            mlflow.log_params({"device_used": str(device),
                               "num_parameters": sum(p.numel() for p in training.model.parameters())})
        log_data_lineage(params.data.name, params.data.raw_dir, params.prepare.out_dir)
        mlflow.log_artifact(str(prepared / "report.json"), artifact_path="data")
        logger = EpochLogger(run_id)
        for row in training.history:  # a resumed run logs what the store does not hold yet
            logger.add(row["epoch"], {k: v for k, v in row.items() if k != "epoch"})
        fit(training, cfg, logger, fingerprint, run_id)
        logger.flush(final=True)
        meta["mlflow_run_id"] = run_id
        save_checkpoint(training.final_model, meta, cfg.model_dir)
        final = {k: round(v, 6) for k, v in training.history[-1].items() if k not in ("epoch", "lr")}
        write_json(Path(cfg.metrics_dir) / "train.json", final)
    print(f"train: {cfg.model}, {cfg.epochs} epochs on {device}: val_accuracy {final['val_accuracy']:.4f} "
          f"(MLflow run {run_id})")


def fit(training: Training, cfg: TrainConfig, logger, fingerprint: str, run_id: str) -> None:
    """Run the remaining epochs; after each, checkpoint, write the history and log the metrics."""
    from tqdm import tqdm

    remaining = cfg.epochs - training.epoch
    with tqdm(total=remaining * training.steps_per_epoch, desc="train", unit="batch",
              disable=not sys.stderr.isatty(), file=sys.stderr) as bar:
        while training.epoch < cfg.epochs:
            try:
                metrics = training.run_epoch(on_step=bar.update)
            except Diverged as exc:
                raise SystemExit(f"error: {exc}") from None
            checkpoint.save({**training.state_dict(), "fingerprint": fingerprint, "mlflow_run_id": run_id},
                            cfg.checkpoint_dir)
            write_bytes(Path(cfg.metrics_dir) / "train_history.csv", history_csv(training.history))
            logger.add(training.epoch, metrics)
            bar.set_postfix(loss=f"{metrics['train_loss']:.3f}", val_acc=f"{metrics['val_accuracy']:.3f}")
    if not (Path(cfg.metrics_dir) / "train_history.csv").exists():  # all epochs were in the checkpoint
        write_bytes(Path(cfg.metrics_dir) / "train_history.csv", history_csv(training.history))


if __name__ == "__main__":
    main()
