"""Progress of the long steps, in a terminal and out of one.

In a terminal a tqdm bar; elsewhere (a pipe, `nohup`, a log file, CI) a bar would print nothing until it
ends, so `Progress` prints a plain line instead: at most every `every_s` seconds and when it ends. Both go
to stderr, like tqdm's.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm


def in_terminal(stream: TextIO = sys.stderr) -> bool:
    return stream.isatty()


def duration(seconds: float) -> str:
    """12 s, 3 min 05 s, 1 h 02 min."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Progress:
    """`with Progress("decode", total, "img") as p: p.update(n)`."""

    def __init__(self, desc: str, total: int, unit: str, every_s: float = 30.0, stream: TextIO | None = None) -> None:
        self.desc, self.total, self.unit, self.every_s = desc, total, unit, every_s
        self.stream = stream or sys.stderr
        self.done = 0
        self.bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream) if in_terminal(self.stream) else None
        self.start = self.last = time.monotonic()

    def __enter__(self) -> Progress:
        return self

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last >= self.every_s and self.done < self.total:
            self.last = now
            self._line(now)

    def _line(self, now: float) -> None:
        elapsed = now - self.start
        share = self.done / self.total if self.total else 1.0
        eta = f", ETA {duration(elapsed / share - elapsed)}" if 0 < share < 1 else ""
        print(
            f"{self.desc}: {self.done:,}/{self.total:,} {self.unit} ({share:.0%}), {duration(elapsed)}{eta}",
            file=self.stream,
            flush=True,
        )

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()
        elif exc[0] is None and self.total:
            self._line(time.monotonic())


def epoch_line(
    epoch: int,
    epochs: int,
    metrics: dict[str, float],
    images_per_s: float,
    elapsed: float,
    remaining_epochs: int,
    epoch_s: float,
) -> str:
    """`train: epoch 3/20, loss 0.412 / 0.388 (train / val), accuracy 0.871 / 0.902, 9,412 img/s, 12 s, ETA 1 min 08 s`;
    after an epoch whose validation was skipped (train.val_every), `... loss 0.412 (train), accuracy 0.871 (train), ...`."""
    if "val_loss" in metrics:
        losses = f"loss {metrics['train_loss']:.4f} / {metrics['val_loss']:.4f} (train / val)"
        accuracies = f"accuracy {metrics['train_accuracy']:.4f} / {metrics['val_accuracy']:.4f}"
    else:
        losses = f"loss {metrics['train_loss']:.4f} (train)"
        accuracies = f"accuracy {metrics['train_accuracy']:.4f} (train)"
    return (
        f"train: epoch {epoch}/{epochs}, {losses}, {accuracies}, "
        f"{images_per_s:,.0f} img/s, {duration(elapsed)}, ETA {duration(remaining_epochs * epoch_s)}"
        + (f", epsilon {metrics['dp_epsilon']:.3f}" if "dp_epsilon" in metrics else "")  # DP-SGD's, spent so far
    )
