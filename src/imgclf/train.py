"""train stage: prepared arrays -> trained classifier checkpoint, per-epoch metrics in MLflow.

    python -m imgclf.train --params params.yaml

Reads `prepare.out_dir`; writes `train.model_dir`/{model.safetensors, model.json} and
`train.metrics_dir`/{train.json, train_history.csv}. Starts the MLflow run that evaluate and register
continue: all params, per-epoch train/val loss and accuracy, the git commit.

The whole training set lives on the device as one uint8 tensor; batches are gathered by index and
normalised inside the model, so the hot loop runs no per-sample Python and no DataLoader.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from imgclf.config import Params, TrainConfig, as_flat_dict, stage_params
from imgclf.files import write_bytes, write_json
from imgclf.models import Classifier, build, resolve_device, save_checkpoint, to_nchw


@dataclass(frozen=True)
class Arrays:
    """One split of the prepared data: uint8 images (N, H, W, C) and int64 labels (N,)."""

    images: np.ndarray
    labels: np.ndarray


def load_split(prepared: Path, split: str) -> Arrays:
    return Arrays(np.load(prepared / f"{split}_images.npy", mmap_mode="r"),
                  np.load(prepared / f"{split}_labels.npy"))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = model.parameters()
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":  # Adam has its own momentum (betas); train.momentum does not apply
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ValueError(f"train.optimizer: unknown optimizer {cfg.optimizer!r}")


@torch.inference_mode()
def score(model: Classifier, images: torch.Tensor, labels: torch.Tensor,
          batch_size: int = 1024) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over a whole split held on the device."""
    model.eval()
    loss = torch.zeros((), device=images.device)
    correct = torch.zeros((), device=images.device, dtype=torch.long)
    for start in range(0, len(images), batch_size):
        logits = model(images[start:start + batch_size])
        target = labels[start:start + batch_size]
        loss += nn.functional.cross_entropy(logits, target, reduction="sum")
        correct += (logits.argmax(1) == target).sum()
    n = max(len(images), 1)
    return loss.item() / n, correct.item() / n


def fit(model: Classifier, train: Arrays, val: Arrays, cfg: TrainConfig, device: torch.device,
        on_epoch: Callable[[int, dict[str, float]], None] = lambda epoch, metrics: None) -> list[dict]:
    """Train `model` in place; returns one dict of metrics per epoch (also passed to `on_epoch`)."""
    model.to(device)
    x_train, y_train = to_nchw(train.images, device), torch.from_numpy(train.labels).to(device)
    x_val, y_val = to_nchw(val.images, device), torch.from_numpy(val.labels).to(device)
    optimizer = make_optimizer(model, cfg)
    loss_fn = nn.CrossEntropyLoss()
    # Shuffling draws from its own generator, so the order depends on train.seed alone.
    order = torch.Generator().manual_seed(cfg.seed)
    steps = math.ceil(len(x_train) / cfg.batch_size)
    history = []
    from tqdm import tqdm

    with tqdm(total=cfg.epochs * steps, desc="train", unit="batch", disable=not sys.stderr.isatty(),
              file=sys.stderr) as bar:
        for epoch in range(1, cfg.epochs + 1):
            model.train()
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.long)
            for index in torch.randperm(len(x_train), generator=order).to(device).split(cfg.batch_size):
                images, target = x_train[index], y_train[index]
                logits = model(images)
                loss = loss_fn(logits, target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += loss.detach() * len(index)
                correct += (logits.argmax(1) == target).sum()
                bar.update()
            train_loss = loss_sum.item() / len(x_train)
            if not math.isfinite(train_loss):
                raise FloatingPointError(f"training diverged: the loss is {train_loss} in epoch {epoch}; "
                                         "lower train.lr")
            val_loss, val_accuracy = score(model, x_val, y_val)
            metrics = {"train_loss": train_loss, "train_accuracy": correct.item() / len(x_train),
                       "val_loss": val_loss, "val_accuracy": val_accuracy}
            bar.set_postfix(loss=f"{train_loss:.3f}", val_acc=f"{val_accuracy:.3f}")
            history.append({"epoch": epoch, **metrics})
            on_epoch(epoch, metrics)
    return history


def history_csv(history: list[dict]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(history[0]), lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()})
    return buffer.getvalue().encode()


def main(argv: list[str] | None = None) -> None:
    params: Params = stage_params(argv, __doc__)
    cfg = params.train
    prepared = Path(params.prepare.out_dir)
    data_meta = json.loads((prepared / "meta.json").read_text())
    train, val = load_split(prepared, "train"), load_split(prepared, "val")
    meta = {"model": cfg.model, **{k: data_meta[k] for k in ("classes", "image_size", "channels", "mean", "std")}}
    torch.manual_seed(cfg.seed)
    try:
        model = build(meta)
    except ValueError as exc:
        raise SystemExit(f"error: train.model: {exc}") from None
    device = resolve_device(cfg.device)

    import mlflow

    from imgclf.tracking import log_data_lineage, start_pipeline_run

    with start_pipeline_run(params.mlflow.experiment_name) as run:
        mlflow.log_params(as_flat_dict(params))
        log_data_lineage(params.data.name, params.data.raw_dir, params.prepare.out_dir)
        mlflow.log_artifact(str(prepared / "report.json"), artifact_path="data")
        mlflow.log_params({"device_used": str(device), "num_parameters": sum(p.numel() for p in model.parameters())})
        history = fit(model, train, val, cfg, device,
                      on_epoch=lambda epoch, metrics: mlflow.log_metrics(metrics, step=epoch))
        meta["mlflow_run_id"] = run.info.run_id
        save_checkpoint(model, meta, cfg.model_dir)
        final = {k: round(v, 6) for k, v in history[-1].items() if k != "epoch"}
        write_json(Path(cfg.metrics_dir) / "train.json", final)
        write_bytes(Path(cfg.metrics_dir) / "train_history.csv", history_csv(history))
    print(f"train: {cfg.model}, {cfg.epochs} epochs on {device}: val_accuracy {final['val_accuracy']:.4f} "
          f"(MLflow run {run.info.run_id})")


if __name__ == "__main__":
    main()
