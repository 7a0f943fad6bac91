"""Benchmark: the default pipeline end to end (`dvc repro` on a fresh clone) and a no-op `dvc repro`.

    python bench/pipeline.py --runs 3

Each run clones the repository's HEAD into a temporary folder and times, as wall-clock seconds, the
first `dvc repro` (every stage, everything included: process start-up, imports, training, MLflow
logging and registration) and then `--noop-runs` repeats of `dvc repro` with nothing to do.
Prints one row per run and the median, min and max.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--noop-runs", type=int, default=3)
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    full, noop = [], []
    print(f"{'run':>4} {'dvc repro (s)':>14} {'no-op repro (s), each':>30}")
    for i in range(1, args.runs + 1):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "project"
            subprocess.run(["git", "clone", "--quiet", str(REPO), str(root)], check=True)
            full.append(timed(["dvc", "repro"], root, env))
            these = [timed(["dvc", "repro"], root, env) for _ in range(args.noop_runs)]
            noop.extend(these)
            print(f"{i:>4} {full[-1]:>14.1f} {', '.join(f'{t:.2f}' for t in these):>30}")
    for name, values in (("dvc repro, every stage", full), ("dvc repro, nothing to do", noop)):
        print(
            f"{name}: median {statistics.median(values):.2f} s, min {min(values):.2f}, max {max(values):.2f} "
            f"(n={len(values)})"
        )


if __name__ == "__main__":
    main()
