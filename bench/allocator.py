"""Benchmark: training and scoring on the CPU with glibc's default malloc against the memory-keeping
settings train and evaluate apply (imgclf.allocator.keep_freed_memory).

    python bench/allocator.py                      # fast-cifar preset, about 5 minutes on 2 cores
    python bench/allocator.py --preset accurate-cifar --images 4096 --repeats 5

Each measurement runs in a fresh interpreter (the setting lasts for the life of a process), the two
settings alternating, on random uint8 images (speed does not depend on the pixels): one warm-up epoch,
then one timed training epoch over --images images and one timed scoring pass (the preset's test-time
augmentation) over the same images. Prints medians over --repeats, the ratio, peak memory and page faults.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = ("default", "kept")


def measure(mode: str, preset: str, images: int) -> dict[str, float]:
    """One process's figures: training and scoring images/s, peak RSS (MiB), minor page faults."""
    # Imported in the measuring child only: the parent just starts children and prints their figures.
    import resource

    import numpy as np
    import torch
    from training import committed, preset_keys, with_train  # the sibling script: bench/ is on sys.path

    from imgclf.allocator import keep_freed_memory
    from imgclf.cpus import available_cpus
    from imgclf.models import predict_proba
    from imgclf.train import Arrays, fit, new_card

    torch.set_num_threads(available_cpus())
    if mode == "kept":
        keep_freed_memory()
    params = with_train(committed(), **{**preset_keys(preset), "epochs": 2})
    rng = np.random.default_rng(0)
    data = Arrays(
        rng.integers(0, 256, (images, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, images).astype(np.int64)
    )
    card = new_card(
        params,
        {"classes": [str(i) for i in range(10)], "image_size": 32, "channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3},
    )
    ends: list[float] = []
    result = fit(
        params,
        card,
        data,
        Arrays(data.images[:1], data.labels[:1]),
        torch.device("cpu"),
        on_epoch=lambda training, metrics: ends.append(time.perf_counter()),
    )
    train_rate = images / (ends[1] - ends[0])  # the second epoch; the first warms up
    start = time.perf_counter()
    predict_proba(result.model, data.images, 512, torch.device("cpu"))
    score_rate = images / (time.perf_counter() - start)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"train": train_rate, "score": score_rate, "peak_mib": usage.ru_maxrss / 1024, "faults": usage.ru_minflt}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="fast-cifar")
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.preset, args.images)))
        return
    results: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    for r in range(args.repeats):
        for mode in MODES:
            out = subprocess.run(
                [sys.executable, __file__, "--child", mode, "--preset", args.preset, "--images", str(args.images)],
                check=True,
                capture_output=True,
                text=True,
            )
            results[mode].append(json.loads(out.stdout.splitlines()[-1]))
            print(
                f"  repeat {r + 1}, {mode}: " + ", ".join(f"{k} {v:.0f}" for k, v in results[mode][-1].items()),
                flush=True,
            )
    print(f"\n{args.preset}, {args.images} images, median of {args.repeats} (min-max)")
    print(f"  {'malloc':<10}{'train img/s':>22}{'score img/s':>22}{'peak MiB':>10}{'page faults':>13}")
    for mode in MODES:
        row = {k: [x[k] for x in results[mode]] for k in results[mode][0]}
        cells = "".join(
            f"{statistics.median(row[k]):>9.0f} ({min(row[k]):.0f}-{max(row[k]):.0f})" for k in ("train", "score")
        )
        print(
            f"  {mode:<10}{cells}{statistics.median(row['peak_mib']):>10.0f}{statistics.median(row['faults']):>13.0f}"
        )
    for k in ("train", "score"):
        ratio = statistics.median(x[k] for x in results["kept"]) / statistics.median(x[k] for x in results["default"])
        print(f"  {k}: kept / default = {ratio:.2f}x")


if __name__ == "__main__":
    main()
