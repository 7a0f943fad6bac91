"""Where training and evaluation run, in which precision, with how many threads."""

from __future__ import annotations

import torch

from imgclf.config import TrainConfig
from imgclf.cpus import available_cpus


class PrecisionError(ValueError):
    """train.precision asks for a dtype this device cannot train in usefully."""


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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
        raise PrecisionError(
            f"train.precision: fp16 autocast is for CUDA devices; on {device.type} use auto, "
            "fp32, or bf16 on a CPU with bf16 units (AVX512_BF16 or AMX)"
        )
    if device.type == "cpu":
        raise PrecisionError(
            "train.precision: bf16 on cpu: this cpu has no bf16 units (AVX512_BF16 or AMX), "
            "where bf16 runs about 3x slower than fp32: use auto or fp32"
        )
    raise PrecisionError(
        f"train.precision: bf16 autocast is for CUDA devices and CPUs with bf16 units, not "
        f"{device.type}: use auto or fp32"
    )


def configure_torch(cfg: TrainConfig, threads: int | None = None) -> None:
    """Threads and determinism for a training run. (cuBLAS's deterministic mode also needs
    CUBLAS_WORKSPACE_CONFIG, read when CUDA starts, and glibc's allocator is tuned process-wide: the
    command-line entry points do both, with `deterministic_environment` and `keep_freed_memory`.)"""
    # More threads than cores slows small nets a lot; `threads`: a DDP rank's share of the cores.
    torch.set_num_threads(threads or cfg.threads or available_cpus())
    torch.use_deterministic_algorithms(cfg.deterministic)
    # On a GPU, cuDNN times its convolution kernels once per input shape and keeps the fastest: the
    # choice can differ between runs, so not when results must repeat. (No effect on a CPU.)
    torch.backends.cudnn.benchmark = not cfg.deterministic


def deterministic_environment(environ: dict[str, str], cfg: TrainConfig) -> None:
    """cuBLAS needs this workspace setting for deterministic results; set it before CUDA starts."""
    if cfg.deterministic:
        environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
