"""The benchmark scripts run end to end (tiny sizes: the figures themselves are not tested)."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


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
