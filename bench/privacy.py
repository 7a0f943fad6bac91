"""Benchmark: test accuracy against the privacy budget of DP-SGD (train.dp_epsilon).

    python bench/privacy.py --epsilons 1 3 8 0
    python bench/privacy.py --archive ../shared/datasets/cifar10-jpg.tar.gz --epochs 3 --batch-size 256

Trains the shipped params' recipe (presets/default.yaml: LeNet, Adam; `--preset`, `--epochs`,
`--batch-size`, `--lr` change it) once per target epsilon (0 = an ordinary, non-private run) and seed,
on the digits (default) or on an image-folder archive (`--archive`, at `--image-size` px), prepared by the
download and prepare stages in a temporary folder. Prints, per run, the epsilon the accountant spent, the
noise multiplier it chose, the validation and test accuracy and the training time, on the CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
from pathlib import Path

import numpy as np
from finetune import fit_and_score, prepared_params  # bench/finetune.py: the stages that make the data, one run

from imgclf.config import Params


def run(params: Params, epsilon: float, seed: int) -> dict[str, float]:
    params = dataclasses.replace(params, train=dataclasses.replace(params.train, dp_epsilon=epsilon, seed=seed))
    result, test_accuracy, seconds = fit_and_score(params)
    private = result.training.privacy
    return {
        "spent": result.history[-1].get("dp_epsilon", 0.0),
        "noise": private.budget.noise_multiplier if private else 0.0,
        "val": result.history[-1]["val_accuracy"],
        "test": test_accuracy,
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0, 0.0])
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--archive", type=Path, help="an image-folder archive (default: the digits)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--model")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (train.threads; 0 = one per core)")
    args = parser.parse_args()
    given = {"model": args.model, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr}
    train = {"threads": args.threads, **{k: v for k, v in given.items() if v is not None}}
    archive = args.archive.resolve() if args.archive else None
    with tempfile.TemporaryDirectory() as tmp:
        params = prepared_params(archive, Path(tmp), args.image_size, args.preset, **train)
        cfg = params.train
        num_train = len(np.load(Path(params.prepare.out_dir) / "train_labels.npy"))
        print(
            f"\n{params.data.name}: {num_train} training images; {cfg.model}, {cfg.optimizer} lr {cfg.lr:g}, "
            f"{cfg.epochs} epochs of batches of {cfg.batch_size}, dp_max_grad_norm {cfg.dp_max_grad_norm:g}, "
            f"delta {1 / num_train:.3g}"
        )
        print(
            f"{'target eps':>10} {'seed':>4} {'spent eps':>9} {'noise':>7} {'val acc':>7} {'test acc':>8} {'train s':>8}"
        )
        tests: dict[float, list[float]] = {}
        for epsilon in args.epsilons:
            for seed in range(args.seeds):
                r = run(params, epsilon, seed)
                tests.setdefault(epsilon, []).append(r["test"])
                target, spent = (f"{epsilon:g}", f"{r['spent']:.3f}") if epsilon else ("off", "-")
                print(
                    f"{target:>10} {seed:>4} {spent:>9} {r['noise']:>7.3f} {r['val']:>7.4f} "
                    f"{r['test']:>8.4f} {r['seconds']:>8.1f}",
                    flush=True,
                )
        print("\ntest accuracy per target epsilon: mean (min-max) over seeds")
        for epsilon, values in tests.items():
            spread = f" ({min(values):.4f}-{max(values):.4f})" if len(values) > 1 else ""
            print(f"  {f'{epsilon:g}' if epsilon else 'off'}: {statistics.mean(values):.4f}{spread}")


if __name__ == "__main__":
    main()
