"""Benchmark: training images/s in 1 and N processes (DDP through train.processes), the stage as it runs.

    python bench/ddp.py                                          # digits, default recipe, 1 and 2 processes
    python bench/ddp.py --processes 1,2 --repeats 3 --set model=fastnet-s --set batch_size=256

Each run is the real train stage (`python -m imgclf.train`) in a temporary folder, on digits prepared once
there, with its own SQLite MLflow store. A run's images/s is the median over its epochs, the first left out
(start-up), of the `train/images_per_s` it logs: training images per second of wall time, all processes
together, the per-epoch validation pass included. Runs alternate between the process counts, --repeats
times, so that a busy machine slows them alike; the table gives each count's median and range. With C
cores, N processes get C/N threads each (train.threads: 0).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow
import yaml
from shipped import committed_params, copy_presets  # bench/shipped.py: the project as git holds it

from imgclf.config import parse_value
from imgclf.cpus import available_cpus

REPO = Path(__file__).resolve().parents[1]


def stage(root: Path, name: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'store.db'}"
    subprocess.run(
        [sys.executable, "-m", f"imgclf.{name}", "--params", "params.yaml"],
        cwd=root,
        env=env,
        check=True,
        capture_output=True,
    )


def write_params(root: Path, train: dict) -> None:
    params = committed_params()
    params["train"].update(train)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    copy_presets(root / "presets")


def images_per_s(root: Path) -> float:
    client = mlflow.MlflowClient(f"sqlite:///{root / 'store.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], order_by=["start_time DESC"])
    history = sorted(client.get_metric_history(runs[0].info.run_id, "train/images_per_s"), key=lambda m: m.step)
    return statistics.median(m.value for m in history[1:] or history)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", default="1,2", help="process counts to compare (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a train key, e.g. model=lenet")
    args = parser.parse_args()
    counts = [int(n) for n in args.processes.split(",")]
    train = {"epochs": args.epochs, **{k: parse_value(v) for k, v in (s.split("=", 1) for s in args.set)}}
    results: dict[int, list[float]] = {n: [] for n in counts}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_params(root, train)
        stage(root, "download")
        stage(root, "prepare")
        for repeat in range(args.repeats):
            for n in counts:
                # A folder (and store) per run: MLflow keeps a store's connection open, keyed by its URI.
                run_root = root / f"run{repeat}-{n}"
                run_root.mkdir()
                (run_root / "data").symlink_to(root / "data")
                write_params(run_root, {**train, "processes": n})
                stage(run_root, "train")
                results[n].append(images_per_s(run_root))
    recipe = ", ".join(f"{k}={v}" for k, v in train.items())
    print(f"digits, default preset with {recipe}; {available_cpus()} CPU cores; {args.repeats} runs each")
    print(f"{'processes':>9}  {'threads each':>12}  {'images/s median':>15}  {'range':>17}  {'vs 1':>5}")
    base = statistics.median(results[counts[0]])
    for n in counts:
        values = results[n]
        median = statistics.median(values)
        threads = train.get("threads") or max(1, available_cpus() // n)
        spread = f"{min(values):,.0f}-{max(values):,.0f}"
        print(f"{n:>9}  {threads:>12}  {median:>15,.0f}  {spread:>17}  {median / base:>5.2f}")
    print("each run: " + "; ".join(f"{n}: " + ", ".join(f"{v:,.1f}" for v in results[n]) for n in counts))


if __name__ == "__main__":
    main()
