"""Benchmark: our training loop against the classic PyTorch tutorial loop, and the fast CIFAR-10 preset.

    python bench/training.py --parts throughput,target,flops       # about 10 minutes
    python bench/training.py --parts fast --seeds 3                 # the fast preset: about 14 minutes a seed
    python bench/training.py --parts fast --seeds 1 --preset accurate-cifar
    python bench/training.py --parts fast --archive ../shared/datasets/cifar10-jpg.tar.gz --set epochs=7
    python bench/training.py --parts augment                          # about 2 minutes

All on CIFAR-10's original pixels (`--archive`, default ../shared/datasets/cifar10-png.tar.gz), on the CPU,
with the model classes and training loop of this package; the tutorial loop is written out below as
the reference. Parts:
  throughput  images/s training LeNet: the tutorial loop (ImageFolder with PIL transforms, DataLoader
              with 2 workers, batch 4, SGD lr 0.001 momentum 0.9) over a slice, against our loop (uint8
              tensors, batched on-device preprocessing) at the tutorial's batch 4 and at batches 256 and
              1024, in the precision `train.precision: auto` picks (bf16 on a CPU with bf16 units: then
              batches 256 and 1024 also in fp32, what a CPU of the same cores without them would run)
  target      wall time for our fastest recipe to reach the tutorial's 54.5% test accuracy, one run per seed (test
              accuracy checked every few steps, with the clock stopped), against the tutorial's 2
              epochs (its throughput from `throughput`, scaled to 100,000 images)
  flops       achieved training FLOP/s (forward + backward FLOPs counted by torch's FlopCounterMode, times
              images/s) as a share of the fp32 matrix-multiply rate measured beside it in each repeat (and
              of the bf16 rate, on a CPU with bf16 units)
  fast        a preset (`--preset`, default fast-cifar), training from scratch per seed: test accuracy
              and wall time (training, with the per-epoch validation pass), as the README's command runs it
  augment     images/s of each augmentation (train keys) alone on batches of 256 training images, at
              32 px and upsampled to 96 px, beside today's flip, translate and cutout: what each adds to
              a training step on this device (compare with the loop's images/s above)
Throughputs are medians of --repeats runs, measured side by side in one process.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms as transforms
import yaml
from shipped import committed_params, copy_presets  # bench/shipped.py: the project as git holds it
from torch.utils.flop_counter import FlopCounterMode
from torchvision.datasets import ImageFolder

from imgclf import download
from imgclf import prepare as prepare_stage
from imgclf.allocator import keep_freed_memory
from imgclf.augment import Augment, Mix
from imgclf.card import CARD_VERSION, ModelCard
from imgclf.config import RUN_KEYS, Params, load_params
from imgclf.cpus import available_cpus
from imgclf.devices import cpu_has_bf16
from imgclf.models import TutorialLeNet, build, to_nchw
from imgclf.train import Arrays, Training, fit, new_card, score

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ARCHIVE = REPO.parent / "shared" / "datasets" / "cifar10-png.tar.gz"
TUTORIAL_ACCURACY = 0.545  # the tutorial loop's 2-epoch test accuracy on this data (datasets README)
TUTORIAL_IMAGES = 100_000  # its 2 epochs
CPU = torch.device("cpu")

# Our fastest way to the tutorial's accuracy, among the recipes tried (LeNet, LeNet with batch norm and
# fastnet-s; Adam, SGD and Muon; batch 64 to 1024; with and without test-time flip): LeNet with batch norm,
# Muon for its two convolutions and SGD for the rest (33,280 images to the target against Adam's 41,600,
# medians over seeds 3-7), batch 128, a one-cycle schedule sized for 1 epoch (30,720 images against 35,200
# when sized for 2 epochs, and 33,280 at batch 256: medians over seeds 3-7, measured side by side), scored
# with test-time flip (as `train.tta_flip` makes evaluation and serving do); measured as the time until
# test accuracy first reaches the target, within that one epoch.
TARGET_RECIPE = dict(
    model="lenet-bn",
    optimizer="muon",
    lr=0.05,
    momentum=0.9,
    nesterov=True,
    muon_lr=0.1,
    muon_momentum=0.6,
    batch_size=128,
    epochs=1,
    schedule="onecycle",
    warmup_fraction=0.05,
    final_lr_fraction=0.1,
    tta_flip=True,
)


def log(*args) -> None:
    print(*args, flush=True)


# ---- data ---------------------------------------------------------------------------------------


def prepare(archive: Path, work: Path, extract: bool = True) -> tuple[Path, Path | None, Params]:
    """Our prepared arrays (the prepare stage, as the README's fast-cifar command makes them: 2% of the
    training images held out for validation) and, with `extract`, the archive extracted to a folder."""
    params = committed_params()
    params["data"].update(dataset="imagefolder", path=str(archive), image_size=32)
    params["prepare"].update(val_fraction=0.02)
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    copy_presets(work / "presets")
    cwd = os.getcwd()
    os.chdir(work)
    try:
        download.main(["--params", "params.yaml"])
        prepare_stage.main(["--params", "params.yaml"])
    finally:
        os.chdir(cwd)
    if not extract:
        return work / "data" / "prepared", None, load_params(work / "params.yaml")
    folder = work / "folder"
    with tarfile.open(archive) as tar:
        tar.extractall(folder, filter="data")
    top = folder if (folder / "train").exists() else next(folder.iterdir())
    return work / "data" / "prepared", top, load_params(work / "params.yaml")


def arrays(prepared: Path, *splits: str) -> Arrays:
    return Arrays(
        np.concatenate([np.load(prepared / f"{s}_images.npy") for s in splits]),
        np.concatenate([np.load(prepared / f"{s}_labels.npy") for s in splits]),
    )


# ---- the reference: the PyTorch tutorial's training loop ------------------------------------------


def tutorial_throughput(train_dir: Path, batches: int) -> float:
    """Images/s of the "Training a Classifier" tutorial loop over `batches` batches of 4."""
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    trainset = ImageFolder(str(train_dir), transform=transform)
    loader = torch.utils.data.DataLoader(trainset, batch_size=4, shuffle=True, num_workers=2)
    net = TutorialLeNet(3, 32, 10)  # the tutorial's net as it writes it: ReLU, then max-pool
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.001, momentum=0.9)
    it = iter(loader)
    for _ in range(50):  # warm-up: workers started, first batches loaded
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        inputs, labels = next(it)
        optimizer.zero_grad()
        loss = criterion(net(inputs), labels)
        loss.backward()
        optimizer.step()
    return batches * 4 / (time.perf_counter() - start)


# ---- ours -----------------------------------------------------------------------------------------


def with_train(params: Params, **keys) -> Params:
    """`params` with these train keys replaced (a recipe's, a preset's)."""
    return dataclasses.replace(params, train=dataclasses.replace(params.train, **keys))


def card(params: Params) -> ModelCard:
    """The model card of params' recipe for the prepared data."""
    return new_card(params, json.loads((Path(params.prepare.out_dir) / "meta.json").read_text()))


def committed(preset: str = "default") -> Params:
    """The committed params (see committed_params) with `train.preset: preset`, loaded as the pipeline
    loads them."""
    with tempfile.TemporaryDirectory() as tmp:
        params = committed_params()
        params["train"].update(preset=preset)
        (Path(tmp) / "params.yaml").write_text(yaml.safe_dump(params))
        copy_presets(Path(tmp) / "presets")
        return load_params(Path(tmp) / "params.yaml")


def preset_keys(name: str) -> dict:
    """The recipe keys of a preset, resolved through its bases as the pipeline resolves them."""
    return {k: v for k, v in dataclasses.asdict(committed(name).train).items() if k not in RUN_KEYS}


def with_settings(recipe: dict, settings: list[str]) -> dict:
    """A recipe (train keys) with `--set` KEY=VALUE pairs over it, each VALUE read as YAML (as `dvc exp run
    -S` reads it); a key the recipe does not have (or a run key, e.g. seed) stops the benchmark."""
    pairs = [setting.partition("=") for setting in settings]
    bad = [key + eq + value for key, eq, value in pairs if not eq or key not in recipe]
    if bad:
        raise SystemExit(f"--set wants KEY=VALUE with a recipe key of train: {', '.join(bad)}")
    return recipe | {key: yaml.safe_load(value) for key, _, value in pairs}


def our_throughput(params: Params, train: Arrays, batch_size: int, images: int, precision: str = "auto") -> float:
    """Images/s of our loop training LeNet with the tutorial's optimizer, over `images` images: the second
    of two epochs (the first warms up)."""
    subset = Arrays(train.images[:images], train.labels[:images])
    tiny_val = Arrays(train.images[:1], train.labels[:1])
    run = with_train(
        params,
        model="lenet",
        optimizer="sgd",
        lr=0.001,
        momentum=0.9,
        batch_size=batch_size,
        epochs=2,
        precision=precision,
    )
    ends: list[float] = []
    fit(run, card(run), subset, tiny_val, CPU, on_epoch=lambda training, metrics: ends.append(time.perf_counter()))
    return len(subset.labels) / (ends[1] - ends[0])  # fewer than `images` on a small archive


class Reached(Exception):
    pass


def time_to_target(
    params: Params, train: Arrays, test: Arrays, target: float, seed: int, check_every: int = 5
) -> tuple[float, int]:
    """Training seconds (clock stopped while checking) until test accuracy >= target; and images seen."""
    run = with_train(params, **TARGET_RECIPE, seed=seed)
    x_test, y_test = to_nchw(test.images, CPU), torch.from_numpy(test.labels)
    state = {"steps": 0, "elapsed": 0.0, "t0": time.perf_counter()}

    def on_step(training: Training) -> None:
        state["steps"] += 1
        if state["steps"] % check_every:
            return
        state["elapsed"] += time.perf_counter() - state["t0"]
        _, accuracy = score(training.final_model, x_test, y_test, training.memory_format)
        if accuracy >= target:
            raise Reached(accuracy)
        state["t0"] = time.perf_counter()

    try:
        fit(run, card(run), train, test, CPU, on_step=on_step)
    except Reached:
        return state["elapsed"], state["steps"] * run.train.batch_size
    return float("nan"), state["steps"] * run.train.batch_size


def matmul_rate(n: int = 2048, repeats: int = 10, dtype: torch.dtype = torch.float32) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def flops_per_image(model_name: str) -> float:
    model = build(
        ModelCard(
            card_version=CARD_VERSION,
            model=model_name,
            classes=tuple("0123456789"),
            image_size=32,
            channels=3,
            mean=(0.5,) * 3,
            std=(0.25,) * 3,
            tta_flip=False,
            tta_translate=0,
            train={},
        )
    )
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    with FlopCounterMode(display=False) as counter:
        model(images).sum().backward()
    return counter.get_total_flops() / 16


def fast_preset(
    params: Params, train: Arrays, val: Arrays, test: Arrays, values: dict, seed: int, device: torch.device = CPU
) -> tuple[float, float, float]:
    """(test accuracy, training wall seconds, test-evaluation seconds) of a recipe (train keys, e.g. a
    preset's) from scratch. Every epoch ends by reading its metrics, which waits for the device."""
    start = time.perf_counter()
    run = with_train(params, **{**values, "seed": seed})

    def on_epoch(training: Training, metrics: dict) -> None:
        scored = f", val accuracy {metrics['val_accuracy']:.4f}" if "val_accuracy" in metrics else ""  # val_every
        log(
            f"    seed {seed} epoch {training.epoch}: {time.perf_counter() - start:.1f} s, "
            f"train loss {metrics['train_loss']:.3f}{scored}"
        )

    result = fit(run, card(run), train, val, device, on_epoch=on_epoch)
    elapsed = time.perf_counter() - start
    _, accuracy = score(
        result.model,
        to_nchw(test.images, device),
        torch.from_numpy(test.labels).to(device),
        result.training.memory_format,
    )
    evaluation = time.perf_counter() - start - elapsed  # with the recipe's test-time augmentation
    log(f"    seed {seed}: test accuracy {accuracy:.4f}")
    return accuracy, elapsed, evaluation


# name -> the augmentation (train keys) measured alone by the `augment` part.
AUGMENTATIONS = {
    "flip": Augment(flip=True),
    "translate 2": Augment(translate=2),
    "cutout 8": Augment(cutout=8),
    "resized_crop 0.35": Augment(resized_crop=0.35),
    "random_erase 0.25": Augment(random_erase=0.25),
    "auto_augment randaugment": Augment(auto_augment="randaugment"),
    "auto_augment trivialaugment": Augment(auto_augment="trivialaugment"),
    "auto_augment autoaugment": Augment(auto_augment="autoaugment"),
    "mixup_alpha 0.2": Mix(10, mixup_alpha=0.2),
    "cutmix_alpha 1.0": Mix(10, cutmix_alpha=1.0),
}


def augment_throughput(images: torch.Tensor, labels: torch.Tensor, augment: Augment | Mix, batch: int = 256) -> float:
    """Images/s of one augmentation over `images` (uint8, N C H W) in batches of `batch`."""
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for i in range(0, len(images), batch):
        if isinstance(augment, Mix):
            augment(images[i : i + batch], labels[i : i + batch], generator)
        else:
            augment(images[i : i + batch], generator)
    return len(images) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", type=Path, default=DEFAULT_ARCHIVE)
    parser.add_argument("--parts", default="throughput,target,flops")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds run are first-seed, first-seed + 1, ...")
    parser.add_argument("--preset", default="fast-cifar")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fast: a train key over the preset's (YAML value)",
    )
    parser.add_argument("--tutorial-batches", type=int, default=1500, help="batches of 4 timed per repeat")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    recipe = with_settings(preset_keys(args.preset), args.set)  # before any work: a bad --set stops at once
    if not args.archive.is_file():
        raise SystemExit(f"{args.archive} is absent")
    torch.set_num_threads(available_cpus())
    keep_freed_memory()  # as the train stage does
    with tempfile.TemporaryDirectory() as tmp:
        prepared, folder, params = prepare(args.archive.resolve(), Path(tmp), extract="throughput" in parts)
        params = dataclasses.replace(params, prepare=dataclasses.replace(params.prepare, out_dir=str(prepared)))
        train, test = arrays(prepared, "train"), arrays(prepared, "test")
        bf16 = cpu_has_bf16()  # train.precision auto then trains in bf16
        log(
            f"{args.archive.name}: {len(train.labels)} training, {len(test.labels)} test images; "
            f"{available_cpus()} CPU threads; torch {torch.__version__}; "
            f"train.precision auto: {'bf16 (this CPU has bf16 units)' if bf16 else 'fp32'}\n"
        )
        rates: dict[str, list[float]] = {
            "tutorial": [],
            "ours, batch 4": [],
            "ours, batch 256": [],
            "ours, batch 1024": [],
        }
        if bf16:  # what bf16 gains, side by side
            rates["ours, batch 256, fp32"] = []
            rates["ours, batch 1024, fp32"] = []
        matmul: list[float] = []
        matmul_bf16: list[float] = []
        if parts & {"throughput", "target", "flops"}:
            for r in range(args.repeats):
                rates["tutorial"].append(tutorial_throughput(folder / "train", args.tutorial_batches))
                rates["ours, batch 4"].append(our_throughput(params, train, 4, 20_000))
                rates["ours, batch 256"].append(our_throughput(params, train, 256, 50_000))
                rates["ours, batch 1024"].append(our_throughput(params, train, 1024, 50_000))
                if bf16:
                    for batch in (256, 1024):
                        rates[f"ours, batch {batch}, fp32"].append(our_throughput(params, train, batch, 50_000, "fp32"))
                if "flops" in parts:  # this machine's matrix rate drifts: measure it beside each repeat
                    matmul.append(matmul_rate())
                    if bf16:
                        matmul_bf16.append(matmul_rate(dtype=torch.bfloat16))
                log(f"  repeat {r + 1}: " + ", ".join(f"{k} {v[-1]:.0f} img/s" for k, v in rates.items()))
            tutorial = statistics.median(rates["tutorial"])
            log("\nthroughput, LeNet (median of %d; min-max)" % args.repeats)
            for name, values in rates.items():
                log(
                    f"  {name:<22} {statistics.median(values):>8.0f} img/s ({min(values):.0f}-{max(values):.0f})"
                    f"  {statistics.median(values) / tutorial:>6.1f}x the tutorial"
                )
        if "target" in parts:
            tutorial_time = TUTORIAL_IMAGES / statistics.median(rates["tutorial"])
            results = [time_to_target(params, train, test, TUTORIAL_ACCURACY, seed) for seed in range(args.repeats)]
            seconds = [s for s, _ in results]
            log(f"\ntime to {TUTORIAL_ACCURACY:.1%} test accuracy (median of {args.repeats} seeds)")
            log(f"  tutorial, 2 epochs (scaled from its throughput)  {tutorial_time:8.1f} s")
            log(
                f"  ours ({TARGET_RECIPE['model']}, {TARGET_RECIPE['optimizer']}, test-time flip) {statistics.median(seconds):8.1f} s "
                f"({min(seconds):.1f}-{max(seconds):.1f}; {statistics.median(i for _, i in results):.0f} images seen)"
                f"  1/{tutorial_time / statistics.median(seconds):.0f} of the tutorial's time"
            )
        if "flops" in parts:
            log(
                f"\nachieved training FLOP/s against torch.matmul fp32, measured beside it (median of "
                f"{args.repeats}; matmul {statistics.median(matmul) / 1e9:.0f} GFLOP/s, "
                f"{min(matmul) / 1e9:.0f}-{max(matmul) / 1e9:.0f})"
            )
            lenet_flops = flops_per_image("lenet")
            for batch in (256, 1024):
                lenet = [lenet_flops * r for r in rates[f"ours, batch {batch}"]]
                shares = [f / m for f, m in zip(lenet, matmul)]
                line = (
                    f"  lenet, batch {batch:<4}     {statistics.median(lenet) / 1e9:8.1f} GFLOP/s  "
                    f"{statistics.median(shares):6.1%}  ({min(shares):.1%}-{max(shares):.1%})"
                )
                if matmul_bf16:  # our loop trained in bf16: its share of the bf16 matrix rate too
                    shares = [f / m for f, m in zip(lenet, matmul_bf16)]
                    line += f"; {statistics.median(shares):.1%} of bf16's ({min(shares):.1%}-{max(shares):.1%})"
                log(line)
            if matmul_bf16:
                log(
                    f"  (torch.matmul bf16: {statistics.median(matmul_bf16) / 1e9:.0f} GFLOP/s, "
                    f"{min(matmul_bf16) / 1e9:.0f}-{max(matmul_bf16) / 1e9:.0f})"
                )
            subset = Arrays(train.images[:10240], train.labels[:10240])
            run = with_train(params, **{**preset_keys("fast-cifar"), "epochs": 2})
            dtypes = [torch.float32] + ([torch.bfloat16] if bf16 else [])
            marks: dict[str, object] = {}

            def around_second_epoch(training: Training, metrics: dict) -> None:
                # The matrix rates just before and just after the timed (second) epoch.
                if training.epoch == 1:
                    marks["before"] = [matmul_rate(dtype=d) for d in dtypes]
                    marks["start"] = time.perf_counter()
                else:
                    marks["end"] = time.perf_counter()
                    marks["after"] = [matmul_rate(dtype=d) for d in dtypes]

            fit(run, card(run), subset, Arrays(test.images[:1], test.labels[:1]), CPU, on_epoch=around_second_epoch)
            fast_rate = len(subset.labels) / (marks["end"] - marks["start"])
            around = [(b + a) / 2 for b, a in zip(marks["before"], marks["after"])]
            fast = flops_per_image(run.train.model) * fast_rate
            bf16_share = f"; {fast / around[1]:.1%} of bf16's {around[1] / 1e9:.0f} GFLOP/s" if len(around) > 1 else ""
            log(
                f"  {run.train.model}, fast preset {fast / 1e9:8.1f} GFLOP/s  {fast / around[0]:6.1%}  ({fast_rate:.0f} "
                f"img/s; matmul {around[0] / 1e9:.0f} GFLOP/s around it{bf16_share})"
            )
        if "augment" in parts:
            x = to_nchw(train.images[:2048], CPU)
            y = torch.from_numpy(train.labels[:2048])
            sizes = {32: x, 96: torch.nn.functional.interpolate(x.float(), size=96, mode="bilinear").round().byte()}
            speeds = {(name, size): [] for name in AUGMENTATIONS for size in sizes}
            for _ in range(args.repeats):
                for (name, size), values in speeds.items():
                    values.append(augment_throughput(sizes[size], y, AUGMENTATIONS[name]))
            log(f"\naugmentation alone, images/s on batches of 256 (median of {args.repeats}; {len(x)} images)")
            log(f"  {'train key':<28} {'32 px':>10} {'96 px':>10}")
            for name in AUGMENTATIONS:
                log(f"  {name:<28} " + " ".join(f"{statistics.median(speeds[name, size]):>10.0f}" for size in sizes))
        if "fast" in parts:
            log(f"\n{args.preset} preset, from scratch")
            val = arrays(prepared, "val")
            seeds = range(args.first_seed, args.first_seed + args.seeds)
            if args.set:
                log(f"  with {', '.join(args.set)}")
            results = [fast_preset(params, train, val, test, recipe, seed) for seed in seeds]
            for seed, (accuracy, seconds, evaluation) in zip(seeds, results):
                log(
                    f"  seed {seed}: test accuracy {accuracy:.4f}, {seconds / 60:.1f} min training "
                    f"+ {evaluation:.0f} s scoring the 10,000 test images"
                )
            accuracies, times = [a for a, _, _ in results], [t for _, t, _ in results]
            log(
                f"  test accuracy: mean {statistics.mean(accuracies):.4f}, min {min(accuracies):.4f}, "
                f"max {max(accuracies):.4f} (n={len(results)}); wall time: median {statistics.median(times) / 60:.1f} min "
                f"({min(times) / 60:.1f}-{max(times) / 60:.1f})"
            )


if __name__ == "__main__":
    main()
