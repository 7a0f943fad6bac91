"""Benchmark: the prepare stage on an image-folder archive against torchvision's ImageFolder + DataLoader.

    python bench/prepare.py [--archive ../shared/datasets/cifar10-png.tar.gz] [--runs 3]

Both decode the same image files (PNG or JPEG) to uint8 tensors of the same size, side by side in one run,
alternating:
  prepare      `python -m imgclf.prepare` on the archive (download stage done beforehand): lists it,
               decodes every image once in parallel and writes memory-mapped arrays; whole process timed
  ImageFolder  the archive extracted to a folder (not timed), then torchvision.datasets.ImageFolder +
               DataLoader(num_workers=2, batch_size=256) with Resize + PILToTensor, every image once
Peak memory is the largest resident set of the whole process tree (sampled every 10 ms with psutil).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import psutil
import yaml
from shipped import committed_params, copy_presets  # bench/shipped.py: the project as git holds it

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ARCHIVE = REPO.parent / "shared" / "datasets" / "cifar10-png.tar.gz"

IMAGEFOLDER = textwrap.dedent("""
    import sys, torch
    from torchvision import datasets, transforms
    size = int(sys.argv[2])
    transform = transforms.Compose([transforms.Resize((size, size)), transforms.PILToTensor()])
    n = 0
    for split in ("train", "test"):
        folder = datasets.ImageFolder(f"{sys.argv[1]}/{split}", transform=transform)
        loader = torch.utils.data.DataLoader(folder, batch_size=256, num_workers=2)
        for images, labels in loader:
            n += len(images)
    print(n)
""")


def measure(cmd: list[str], cwd: Path) -> tuple[float, float, str]:
    """(seconds, peak MiB of the process tree, stdout) of one command."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                tree = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    elapsed = time.perf_counter() - start
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{cmd} failed:\n{err}")
    return elapsed, peak / 2**20, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", type=Path, default=DEFAULT_ARCHIVE)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=32)
    args = parser.parse_args()
    if not args.archive.is_file():
        raise SystemExit(f"{args.archive} is absent")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "work"
        work.mkdir()
        params = committed_params()
        params["data"].update(dataset="imagefolder", path=str(args.archive.resolve()), image_size=args.image_size)
        (work / "params.yaml").write_text(yaml.safe_dump(params))
        copy_presets(work / "presets")
        subprocess.run([sys.executable, "-m", "imgclf.download"], cwd=work, check=True, stdout=subprocess.DEVNULL)
        folder = Path(tmp) / "folder"
        with tarfile.open(args.archive) as tar:
            tar.extractall(folder, filter="data")
        (top,) = [p for p in folder.iterdir()] if not (folder / "train").exists() else [folder]
        n_images = sum(1 for p in top.rglob("*") if p.is_file())
        results: dict[str, list[tuple[float, float]]] = {"prepare": [], "ImageFolder + DataLoader": []}
        print(f"{n_images} images from {args.archive.name}, {os.cpu_count()} CPUs, {args.runs} runs each\n")
        print(f"{'run':>3}  {'method':<26} {'seconds':>8} {'images/s':>9} {'peak MiB':>9}")
        for run in range(1, args.runs + 1):
            for name in results:
                if name == "prepare":
                    cmd = [sys.executable, "-m", "imgclf.prepare"]
                else:
                    cmd = [sys.executable, "-c", IMAGEFOLDER, str(top), str(args.image_size)]
                seconds, peak, out = measure(cmd, work)
                if name != "prepare":
                    assert int(out.strip()) == n_images, out
                results[name].append((seconds, peak))
                print(f"{run:>3}  {name:<26} {seconds:>8.2f} {n_images / seconds:>9.0f} {peak:>9.0f}")
        print("\nmedians")
        base = statistics.median(s for s, _ in results["ImageFolder + DataLoader"])
        for name, rows in results.items():
            seconds = statistics.median(s for s, _ in rows)
            spread = f"{min(s for s, _ in rows):.2f}-{max(s for s, _ in rows):.2f}"
            print(
                f"     {name:<26} {seconds:>8.2f} ({spread}) {n_images / seconds:>9.0f} images/s, "
                f"peak {statistics.median(p for _, p in rows):.0f} MiB, {base / seconds:.2f}x ImageFolder"
            )


if __name__ == "__main__":
    main()
