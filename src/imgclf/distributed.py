"""Data-parallel training in several processes: PyTorch's DistributedDataParallel (DDP), launched by torchrun.

    torchrun --standalone --nproc_per_node=2 -m imgclf.train --params params.yaml

or `train.processes: 2`, with which the train stage launches the same itself through torchrun's own code
(torch.distributed.run). gloo on CPUs, NCCL on CUDA GPUs (one per process, cuda:LOCAL_RANK).

Every process (rank) holds the whole training set, draws the same global batches (train.batch_size) in
the same seeded order and augments each one identically, then trains on its own rows of it. Each rank's
loss is weighted by its share of the batch, so the gradients DDP averages are those of the whole batch:
N processes take the same steps, with the same learning-rate schedule, as one. Rank 0 alone opens the
MLflow run, logs, and writes checkpoints and the stage's outputs; the others receive the checkpoint to
resume from and the run's id from it, and never touch the store or the files.

BatchNorm normalises over each rank's rows (as it does over micro-batches with train.micro_batch), and its
running statistics are rank 0's (DDP copies them to every rank before each forward pass). Not
SyncBatchNorm: torch's runs on GPUs only (CPU tensors are refused), and it adds an all-reduce to every
BatchNorm layer in the forward and the backward pass; torchvision's reference scripts leave it off by
default too. With train.micro_batch dividing batch_size / N, the ranks' BatchNorm batches are exactly the
single process's micro-batches.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterator, Mapping

import torch
import torch.distributed as dist
from torch import nn

from imgclf.cpus import available_cpus

# What torchrun sets in each process it starts (torch.distributed.run's docs).
_RANK, _WORLD_SIZE, _LOCAL_RANK, _LOCAL_WORLD_SIZE = "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"


@dataclass(frozen=True)
class World:
    """This process's place among the training processes: rank 0 of 1 when training alone."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1  # processes on this machine, which share its cores

    @property
    def main(self) -> bool:
        """Rank 0: the one that logs and writes."""
        return self.rank == 0

    def threads(self, requested: int) -> int:
        """CPU threads per process: train.threads, or this machine's cores shared out (at least one)."""
        return requested or max(1, available_cpus() // self.local_size)

    def replicate(self, model: nn.Module, device: torch.device, compile: bool) -> Callable[..., torch.Tensor]:
        """The forward pass to train with: the model (compiled with train.compile) alone, else in DDP."""
        if self.size == 1:
            return torch.compile(model) if compile else model
        return Replicas(model, device, compile)

    def accumulating(self, forward: Callable[..., torch.Tensor], last: bool) -> ContextManager:
        """Around the forward and backward pass of a micro-batch: DDP averages the gradients once, at the
        batch's last micro-batch (every rank makes exactly one such pass per step, however many rows)."""
        return forward.no_sync() if isinstance(forward, Replicas) and not last else nullcontext()

    def shard(
        self, images: torch.Tensor, target: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, float]:
        """This rank's rows of a global batch: (images, target, labels, weight, share). `share` is its
        part of the batch (the batch's mean loss is the sum of each rank's mean loss times its share);
        `weight` scales its gradient, share times the number of ranks, since DDP averages over them."""
        if self.size == 1:
            return images, target, labels, 1.0, 1.0
        rows = torch.arange(len(images)).tensor_split(self.size)[self.rank]
        if len(rows) == 0:
            # More ranks than images (an epoch's short last batch): one image that weighs and counts
            # nothing (no label is -1), since DDP needs a backward pass from every rank.
            return images[:1], target[:1], torch.full_like(labels[:1], -1), 0.0, 0.0
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        share = (hi - lo) / len(images)
        return images[lo:hi], target[lo:hi], labels[lo:hi], share * self.size, share

    def sum(self, loss: torch.Tensor, correct: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A step's loss and correct count summed over the ranks (the same values on every rank)."""
        if self.size == 1:
            return loss, correct
        both = torch.stack([loss.double(), correct.double()])
        dist.all_reduce(both)
        return both[0].to(loss.dtype), both[1].round().to(correct.dtype)

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` (any picklable object), on every rank."""
        if self.size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def from_environment(environ: Mapping[str, str] = os.environ) -> World:
    """The rank torchrun (or any launcher setting RANK and WORLD_SIZE) gave this process; rank 0 of 1
    when none did."""
    if not launched(environ):
        return World()
    size = int(environ[_WORLD_SIZE])
    return World(
        rank=int(environ[_RANK]),
        size=size,
        local_rank=int(environ.get(_LOCAL_RANK, 0)),
        local_size=int(environ.get(_LOCAL_WORLD_SIZE, size)),
    )


def launched(environ: Mapping[str, str] = os.environ) -> bool:
    return _RANK in environ and _WORLD_SIZE in environ


class DistributedError(RuntimeError):
    """Training cannot run in several processes as asked."""


@contextmanager
def process_group(world: World, device: torch.device) -> Iterator[torch.device]:
    """Join the other ranks (gloo on a CPU, NCCL on CUDA) for the block; yields this rank's device
    (cuda:LOCAL_RANK on GPUs). A single process joins nothing."""
    if world.size == 1:
        yield device
        return
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise DistributedError(f"train.device: {device.type} cannot train in several processes (DDP: cpu or cuda)")
    die_with_parent()
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=world.rank, world_size=world.size)
    try:
        yield device
    finally:
        dist.destroy_process_group()


def die_with_parent() -> None:
    """On Linux, be killed when the launcher that started this process dies: torchrun starts its workers
    in sessions of their own, so a killed launcher would leave them training, and rank 0 writing."""
    if sys.platform != "linux":
        return
    pr_set_pdeathsig = 1  # <linux/prctl.h>
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL))


class Replicas:
    """The model in DDP, wrapped anew whenever the set of parameters that learn changes: DDP fixes, when
    it wraps a model, whose gradients it averages (train.freeze_epochs and whiten_bias_epochs change
    that between epochs). DDP's constructor copies rank 0's weights and buffers to every rank."""

    def __init__(self, model: nn.Module, device: torch.device, compile: bool) -> None:
        self.model, self.device, self.compile = model, device, compile
        self.learning: tuple[bool, ...] | None = None

    def _wrap(self) -> None:
        learning = tuple(p.requires_grad for p in self.model.parameters())
        if learning == self.learning:
            return
        device_ids = [self.device] if self.device.type == "cuda" else None
        self.ddp = nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        self.forward = torch.compile(self.ddp) if self.compile else self.ddp
        self.learning = learning

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self._wrap()
        return self.forward(images)

    def no_sync(self) -> ContextManager:
        self._wrap()
        return self.ddp.no_sync()


def launch(processes: int, args: list[str]) -> int:
    """`python -m imgclf.train *args` in `processes` ranks on this machine, through torchrun's own code
    (`torchrun --standalone`: a free port on this host); returns the exit code, having said which rank
    failed and how when one did (torchrun then stops the others)."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    # torchrun sets 1 thread per process otherwise, and warns; training sets its own (World.threads).
    os.environ.setdefault("OMP_NUM_THREADS", str(World(local_size=processes).threads(0)))
    try:
        torchrun.main(["--standalone", f"--nproc_per_node={processes}", "-m", "imgclf.train", *args])
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        if failure.exitcode < 0:
            how = f"was killed by {failure.signal_name()}"
        else:
            how = f"failed with exit code {failure.exitcode}"
        print(
            f"error: train: training process {rank} of {processes} {how} (its output is above); "
            "torchrun stopped the others. The last epoch's checkpoint is kept: run the stage again to resume.",
            file=sys.stderr,
        )
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0
