"""How many CPUs this process may use, shared by training's threads and prepare's decoding workers.

Kept apart from devices.py (torch) so that prepare, which never imports torch, can ask too.
"""

from __future__ import annotations

import os


def available_cpus() -> int:
    """The cores this process may run on (its affinity mask, on Linux); every core where there is no such
    call (macOS, Windows)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
