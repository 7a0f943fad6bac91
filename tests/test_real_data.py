"""Real images: the CIFAR-10 JPEG slice from the shared datasets folder, through `dvc exp run`.

The archives live beside the project (`../shared/datasets`, or the folder named by IMGCLF_DATASETS);
a user who cloned only the project has none, and these tests then skip.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow
import pytest
import yaml

from conftest import REPO, fresh_copy, run

pytestmark = pytest.mark.integration

DATASETS = Path(os.environ.get("IMGCLF_DATASETS", REPO.parent / "shared" / "datasets"))
MINI = DATASETS / "cifar10-jpg-mini.tar.gz"


@pytest.fixture(scope="module")
def mini_experiment(tmp_path_factory):
    if not MINI.is_file():
        pytest.skip(f"{MINI} is absent (set IMGCLF_DATASETS to the folder holding cifar10-jpg-mini.tar.gz)")
    root = fresh_copy(tmp_path_factory.mktemp("real") / "project")
    proc = run(
        ["dvc", "exp", "run", "-S", "data.dataset=imagefolder", "-S", f"data.path={MINI}", "-S", "data.image_size=32"],
        root,
    )
    return root, proc


def test_image_folder_experiment_runs_end_to_end(mini_experiment):
    root, proc = mini_experiment
    for stage in ("download", "prepare", "train", "evaluate", "register"):
        assert f"Running stage '{stage}'" in proc.stdout
    meta = json.loads((root / "data/prepared/meta.json").read_text())
    assert meta["classes"] == sorted(
        ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    )
    assert meta["counts"]["test"] == {name: 20 for name in meta["classes"]}  # the archive's test/ folder
    assert meta["channels"] == 3 and meta["image_size"] == 32
    metrics = json.loads((root / "metrics/test.json").read_text())
    assert metrics["accuracy"] > 0.15  # 10 classes, 850 training images: above chance, far from good


def test_the_run_records_the_data_version(mini_experiment):
    root, _ = mini_experiment
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    raw_md5 = lock["stages"]["download"]["outs"][0]["md5"]
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    receipt = json.loads((root / "models/registration.json").read_text())
    assert receipt["model_name"] == "cifar10-jpg-mini-lenet"  # auto: not competing with digits models
    run_record = client.get_run(receipt["run_id"])
    assert run_record.data.tags["dvc.raw.md5"] == raw_md5
    (dataset_input,) = run_record.inputs.dataset_inputs
    assert dataset_input.dataset.digest == raw_md5 and dataset_input.dataset.name == "cifar10-jpg-mini"
    artifacts = {a.path for a in client.list_artifacts(receipt["run_id"], "data")}
    assert "data/report.json" in artifacts


def test_readme_fast_cifar_command_runs_the_preset(tmp_path):
    """The README's fast-cifar line, on the 1,200-image slice and for one epoch (the full run takes
    about 14 minutes on 2 cores with bf16 units: bench/training.py measures it), with the README's
    settings for GPUs and for fp32."""
    if not MINI.is_file():
        pytest.skip(f"{MINI} is absent (set IMGCLF_DATASETS to the folder holding cifar10-jpg-mini.tar.gz)")
    from conftest import readme_command

    root = fresh_copy(tmp_path / "project")
    command = readme_command("dvc exp run -S train.preset=fast-cifar")
    command = command.replace("../shared/datasets/cifar10-png.tar.gz", str(MINI))
    assert str(MINI) in command
    # A key given with the preset wins over it; here the README's advice for GPUs, whole batches (on the
    # CPU), and its fp32 setting.
    # (One epoch of 850 images is one step: register would refuse a model so close to chance.)
    overrides = " -S train.epochs=1 -S train.micro_batch=0 -S train.precision=fp32 -S register.refuse_chance=false"
    proc = run(command + overrides, root)
    assert "Overriding: train.epochs = 1 (preset fast-cifar: 8)" in proc.stdout
    receipt = json.loads((root / "models/registration.json").read_text())
    assert receipt["model_name"] == "cifar10-jpg-mini-fastnet"
    params = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}").get_run(receipt["run_id"]).data.params
    preset = yaml.safe_load((root / "presets" / "fast-cifar.yaml").read_text())
    for key in ("model", "lr", "batch_size", "norm_bias_lr_scale"):
        assert params[f"train.{key}"] == str(preset[key]), key
    assert params["train.lookahead"] == "False"  # from its base, the default preset
    assert params["train.preset"] == "fast-cifar" and params["train.epochs"] == "1"
    assert params["train.micro_batch"] == "0" and params["train.precision"] == "fp32"


def test_training_bench_prints_its_tables(tmp_path):
    """bench/training.py end to end on the 1,200-image slice, one repeat (the figures are not tested:
    on so few images the target accuracy may not be reached, which the table shows as nan)."""
    if not MINI.is_file():
        pytest.skip(f"{MINI} is absent (set IMGCLF_DATASETS to the folder holding cifar10-jpg-mini.tar.gz)")
    proc = run(
        [
            "python",
            str(REPO / "bench" / "training.py"),
            "--archive",
            str(MINI),
            "--repeats",
            "1",
            "--tutorial-batches",
            "20",
            "--parts",
            "throughput,target,flops",
        ],
        tmp_path,
    )
    for line in (
        "throughput, LeNet",
        "tutorial ",
        "ours, batch 256",
        "ours, batch 1024",
        "time to 54.5% test accuracy",
        "ours (lenet-bn, muon, test-time flip)",
        "achieved training FLOP/s",
        "lenet, batch 256",
        "lenet, batch 1024",
    ):
        assert line in proc.stdout, line
    if "bf16 (this CPU has bf16 units)" in proc.stdout:  # then what the same cores give in fp32, beside it
        assert "ours, batch 256, fp32" in proc.stdout and "ours, batch 1024, fp32" in proc.stdout


def test_training_bench_trains_a_preset_scoring_validation_only_where_val_every_says(tmp_path):
    """bench/training.py's `fast` part, fast-cifar for 2 epochs on the 1,200-image slice with
    `--set val_every=0`: the first epoch's line has no validation accuracy, the last one has, and the
    test accuracy is printed."""
    if not MINI.is_file():
        pytest.skip(f"{MINI} is absent (set IMGCLF_DATASETS to the folder holding cifar10-jpg-mini.tar.gz)")
    bench = [str(REPO / "bench" / "training.py"), "--archive", str(MINI), "--parts", "fast", "--seeds", "1"]
    proc = run(["python", *bench, "--set", "epochs=2", "--set", "val_every=0", "--set", "micro_batch=0"], tmp_path)
    lines = proc.stdout.splitlines()
    first = next(line for line in lines if "seed 0 epoch 1:" in line)
    last = next(line for line in lines if "seed 0 epoch 2:" in line)
    assert "val accuracy" not in first and "val accuracy" in last
    assert "seed 0: test accuracy" in proc.stdout


def test_readme_gpu_bench_command_runs_on_the_cpu(tmp_path):
    """The README's bench/gpu.py line on the 1,200-image slice with `--device cpu`, its ladder cut to one
    2-epoch rung and runs to 1 epoch (its compiled variant included): the tables print, the target is
    judged, and two deterministic runs end with identical weights."""
    if not MINI.is_file():
        pytest.skip(f"{MINI} is absent (set IMGCLF_DATASETS to the folder holding cifar10-jpg-mini.tar.gz)")
    from conftest import readme_command

    command = readme_command("python bench/gpu.py").replace("python bench/", f"python {REPO}/bench/")
    proc = run(
        command + f" --device cpu --archive {MINI} --seeds 1 --ladder 2 --ladder-seeds 1 --set micro_batch=0,epochs=1",
        tmp_path,
    )
    assert "determinism: two deterministic runs of 2 epochs are bit-identical" in proc.stdout
    summary = proc.stdout.split("\nsummary (CPU")[1]
    rows = [line.split() for line in summary.splitlines()[1:] if line.startswith("  fastnet")]
    assert [(r[0], r[1], r[-1]) for r in rows] == [
        ("fastnet", "1", "fast-cifar"),
        ("fastnet", "2", "epochs"),
        ("fastnet", "1", "compile=true"),
    ]
    assert "time to 94%: not reached; best mean" in summary  # 980 training images: far from 94%


def test_prepare_bench_prints_its_table(tmp_path):
    """bench/prepare.py on the 1,200-image slice, one run of each method (the figures are not tested)."""
    if not MINI.is_file():
        pytest.skip(f"{MINI} is absent (set IMGCLF_DATASETS to the folder holding cifar10-jpg-mini.tar.gz)")
    proc = run(["python", str(REPO / "bench" / "prepare.py"), "--archive", str(MINI), "--runs", "1"], tmp_path)
    assert "1200 images from cifar10-jpg-mini.tar.gz" in proc.stdout
    medians = proc.stdout.split("\nmedians\n")[1]
    assert "prepare" in medians and "x ImageFolder" in medians
