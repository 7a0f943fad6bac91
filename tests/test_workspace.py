"""The tests and benchmarks test the project's defaults, whatever experiment the user left applied.

`dvc exp run` leaves an experiment's params (and its dvc.lock and metrics) in the workspace, DVC's
default: the suite must not then test the experiment instead of the project.
"""

from __future__ import annotations

import sys

import pytest
import yaml

from conftest import DATASETS, fresh_copy, run

pytestmark = pytest.mark.integration

MINI = DATASETS / "cifar10-jpg-mini.tar.gz"


@pytest.fixture(scope="module")
def after_an_experiment(tmp_path_factory):
    """A fresh clone in which the user ran an experiment with another preset, and it stayed applied."""
    root = fresh_copy(tmp_path_factory.mktemp("workspace") / "project")
    proc = run(
        [
            "dvc",
            "exp",
            "run",
            "-S",
            "train.preset=fast-cifar",
            "-S",
            "train.epochs=1",
            "-S",
            "prepare.val_fraction=0.3",
            # One epoch of fastnet on digits scores near chance, which register refuses by default.
            "-S",
            "register.refuse_chance=false",
        ],
        root,
    )
    assert "Overriding: train.epochs = 1 (preset fast-cifar: 8)" in proc.stdout
    applied = yaml.safe_load((root / "params.yaml").read_text())
    assert applied["train"]["preset"] == "fast-cifar" and applied["prepare"]["val_fraction"] == 0.3
    return root


def test_the_unit_tests_still_test_the_defaults(after_an_experiment):
    """These assert the shipped params (LeNet, 20 epochs) and run every stage on them in process."""
    proc = run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_config.py",
            "tests/test_stages.py",
            "tests/test_dvc_yaml.py",
        ],
        after_an_experiment,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]


def test_the_training_bench_still_finds_its_presets(after_an_experiment):
    if not MINI.is_file():
        pytest.skip(f"{MINI} is absent (set IMGCLF_DATASETS to the folder holding cifar10-jpg-mini.tar.gz)")
    proc = run(
        [
            sys.executable,
            "bench/training.py",
            "--archive",
            str(MINI),
            "--parts",
            "throughput",
            "--repeats",
            "1",
            "--tutorial-batches",
            "20",
        ],
        after_an_experiment,
    )
    assert "throughput, LeNet" in proc.stdout
