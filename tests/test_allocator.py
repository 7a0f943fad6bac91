"""The training process keeps freed memory (no fresh zero-filled pages every step); each case runs in
its own interpreter, since the setting lasts for the life of the process."""

from __future__ import annotations

import subprocess
import sys

import pytest

# How much of a freed 256 MiB tensor the process still holds, in MiB: glibc returns it to the kernel
# by default; after keep_freed_memory (which the train and evaluate stages call) it stays in the heap.
SCRIPT = """
import os, sys, torch
from imgclf.allocator import keep_freed_memory

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

if sys.argv[1] == "configured":
    keep_freed_memory()
before = rss()
x = torch.ones(64 * 2**20)
del x
print((rss() - before) / 2**20)
"""

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")


def retained_mib(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], check=True, capture_output=True, text=True).stdout
    return float(out.split()[-1])


def test_freed_activations_return_to_the_kernel_by_default():
    assert retained_mib("default") < 64


def test_keep_freed_memory_keeps_it_for_the_next_step():
    assert retained_mib("configured") > 192
