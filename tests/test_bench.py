"""The benchmark scripts run end to end (tiny sizes: the figures themselves are not tested)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import DATASETS, REPO


def test_allocator_bench_prints_its_table():
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "allocator.py"), "--images", "64", "--repeats", "1"],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    ).stdout
    lines = out.splitlines()
    assert any(line.split()[:1] == ["default"] for line in lines)
    assert any(line.split()[:1] == ["kept"] for line in lines)
    assert "train: kept / default = " in out and "score: kept / default = " in out


def test_ddp_bench_prints_its_table():
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "ddp.py"), "--epochs", "2", "--repeats", "1"],
        check=True,
        capture_output=True,
        text=True,
        timeout=900,
    ).stdout
    rows = [line.split() for line in out.splitlines()]
    assert [row[0] for row in rows if row and row[0].isdigit()] == ["1", "2"]
    assert any(row[:1] == ["2"] and float(row[2].replace(",", "")) > 0 for row in rows)


def test_privacy_bench_prints_its_table():
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "privacy.py"), "--epsilons", "8", "0", "--epochs", "1"],
        check=True,
        capture_output=True,
        text=True,
        timeout=900,
    ).stdout
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["8"], ["off"])]
    assert [row[0] for row in rows] == ["8", "off"] and len(rows[0]) == 7
    assert 0 < float(rows[0][2]) <= 8  # the epsilon spent
    assert "test accuracy per target epsilon" in out


@pytest.mark.integration
def test_compress_bench_prints_its_table():
    archive = DATASETS / "cifar10-jpg-mini.tar.gz"
    if not archive.is_file():
        pytest.skip(f"{archive} is absent")
    command = [sys.executable, str(REPO / "bench" / "compress.py"), "--archives", str(archive), "--models", "lenet"]
    out = subprocess.run(
        [*command, "--epochs", "1", "--finetune-epochs", "0", "--single", "3", "--batches", "1", "--pt2e"],
        check=True,
        capture_output=True,
        text=True,
        timeout=900,
    ).stdout
    rows = [line.split() for line in out.splitlines() if line.startswith("cifar10-jpg-mini.tar.gz ")]
    assert [row[2] for row in rows] == ["float", "onnx-fp32", "int8", "pruned", "int8-pt2e"]
    assert abs(float(rows[4][3]) - float(rows[0][3])) < 0.1  # torchao's int8 classifies as the float model does
    assert float(rows[2][5]) < 0.5  # int8: LeNet measured 0.38x its float bytes (the graph and scales add to 1/4)
