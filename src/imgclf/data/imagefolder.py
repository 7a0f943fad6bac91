"""Image folders: `train/<class>/<image>` plus an optional held-out split, in a folder or an archive.

The download stage turns the user's `data.path` into one archive under `data.raw_dir` (a folder is
packed into an uncompressed, reproducible tar; an archive is copied), so DVC versions one file rather
than thousands. The prepare stage lists the archive, then streams it once: each image's bytes go to a
pool of worker processes that decode and resize them, and the results are written straight into
memory-mapped arrays, so memory does not grow with the dataset.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from imgclf.data.archives import Archive, hidden_parts, pack_folder
from imgclf.data.archives import parts as archive_parts
from imgclf.data.types import ARCHIVE_SUFFIXES, DataError, archive_suffix
from imgclf.images import ImageError, decode

TRAIN = "train"
HELD_OUT = ("test", "val", "valid", "validation")  # the first present is the held-out test split
VAL_NAMES = HELD_OUT[1:]
PACKED_NAME = "images"


# ---- download: one archive under data.raw_dir -------------------------------------------------


def stage_source(path: str | None, dest_dir: Path) -> Path:
    """Copy an archive, or pack a folder, from `data.path` into `dest_dir`."""
    if path is None:
        raise DataError(
            "data.path: required for data.dataset imagefolder (a folder or an archive holding train/<class>/<image>)"
        )
    source = Path(path)
    if source.is_dir():
        dest = dest_dir / f"{PACKED_NAME}.tar"
        pack_folder(source, dest)
        return dest
    if not source.is_file():
        raise DataError(f"data.path: no such file or folder: {source}")
    suffix = archive_suffix(source)
    if suffix is None:
        raise DataError(f"data.path: {source} is neither a folder nor a {', '.join(ARCHIVE_SUFFIXES)} archive")
    dest = dest_dir / f"{PACKED_NAME}{suffix}"
    shutil.copyfile(source, dest)
    return dest


def find_archive(raw_dir: Path) -> Path:
    found = [p for p in sorted(raw_dir.iterdir()) if p.name.startswith(PACKED_NAME) and archive_suffix(p)]
    if len(found) != 1:
        raise DataError(
            f"{raw_dir}: expected one {PACKED_NAME}.* archive from the download stage, "
            f"found {len(found)}: re-run it (dvc repro -f download)"
        )
    return found[0]


# ---- listing: which file goes to which split and class ----------------------------------------


@dataclass(frozen=True)
class Entry:
    name: str  # path inside the archive
    split: str  # "train", "test" or "val" (the held-out folders mapped to these)
    label: str  # class name


@dataclass
class Listing:
    classes: list[str]
    entries: list[Entry]
    has_test: bool
    has_val: bool
    problems: list[tuple[str, str]] = field(default_factory=list)  # (file or folder, what is wrong)
    ignored: list[tuple[str, str]] = field(default_factory=list)
    unsafe: list[tuple[str, str]] = field(default_factory=list)  # links, devices, .. paths: never read


def list_entries(files: list[str], folders: list[str], unsafe: list[tuple[str, str]] = ()) -> Listing:
    """Map archive paths to (split, class); collect what cannot be used. Entries keep the names as
    the archive spells them, sorted. `unsafe`: the entries the archive reader skipped, and why."""
    paths = [(name, parts) for name in sorted(set(files)) if (parts := archive_parts(name)) and not hidden_parts(parts)]
    dirs = [parts for d in folders if (parts := archive_parts(d)) and not hidden_parts(parts)]
    # An archive often wraps everything in one top folder (cifar10-jpg/train/...): look inside it.
    tops = {parts[0] for _, parts in paths}
    if len(tops) == 1 and all(len(parts) > 1 for _, parts in paths) and not tops & {TRAIN, *HELD_OUT}:
        paths = [(name, parts[1:]) for name, parts in paths]
        dirs = [parts[1:] for parts in dirs if len(parts) > 1]
        prefix = f"{next(iter(tops))}/"
    else:
        prefix = ""
    present = {parts[0] for _, parts in paths} | {parts[0] for parts in dirs}
    if TRAIN not in present:
        raise DataError(
            f"no {TRAIN}/ folder in the image folder: expected {TRAIN}/<class>/<image> "
            f"(found top-level: {', '.join(sorted(present)) or 'nothing'})"
        )
    test_name = next((n for n in HELD_OUT if n in present), None)
    val_name = next((n for n in VAL_NAMES if n in present), None) if test_name == "test" else None
    role = {TRAIN: "train", **({test_name: "test"} if test_name else {}), **({val_name: "val"} if val_name else {})}

    listing = Listing(classes=[], entries=[], has_test=test_name is not None, has_val=val_name is not None)
    listing.unsafe = sorted(unsafe)
    by_class: dict[str, int] = {}
    for name, parts in paths:
        if parts[0] not in role:
            listing.ignored.append((name, f"not under {TRAIN}/ or a held-out split folder"))
        elif len(parts) < 3:
            listing.ignored.append((name, "not inside a class folder"))
        else:
            if parts[0] == TRAIN:
                by_class[parts[1]] = by_class.get(parts[1], 0) + 1
            listing.entries.append(Entry(name, role[parts[0]], parts[1]))
    class_dirs = {parts[1] for parts in dirs if len(parts) >= 2 and parts[0] == TRAIN}
    for empty in sorted(class_dirs - set(by_class)):
        listing.problems.append((f"{prefix}{TRAIN}/{empty}/", "empty class folder"))
    listing.classes = sorted(by_class)
    known = set(listing.classes)
    kept = []
    for entry in listing.entries:
        if entry.label in known:
            kept.append(entry)
        else:
            listing.problems.append((entry.name, f"class {entry.label!r} is not in {TRAIN}/"))
    listing.entries = kept
    return listing


# ---- decoding in parallel into memory-mapped arrays -------------------------------------------


PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _die_with_parent(parent: int) -> None:
    """Pool initializer: a decoding worker ends when prepare ends, however it ends (SIGKILL included),
    instead of living on with the output files open and mapped.

    On Linux the kernel sends the worker SIGKILL when its parent dies (PR_SET_PDEATHSIG: nothing to run in
    the worker, so it also fires in the middle of a decode). It fires when the thread that forked the
    worker ends; ProcessPoolExecutor forks from the thread that submits, prepare's main thread, which
    ends only with the process. Elsewhere a thread watches for the worker being orphaned. The check of
    getppid() after either covers a parent that died before the worker got this far."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is prepare's to handle: it stops the pool
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not prepare's handler, inherited through fork
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    else:
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    if os.getppid() != parent:
        os._exit(1)


def _watch_parent(parent: int, every_s: float = 0.5) -> None:
    while os.getppid() == parent:
        time.sleep(every_s)
    os._exit(1)


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """Decoding processes that die with this one. Forked on Linux (PR_SET_PDEATHSIG and the parent
    check above need prepare itself as the parent, which the forkserver default of newer Pythons is not)."""
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else None)
    return ProcessPoolExecutor(workers, mp_context=context, initializer=_die_with_parent, initargs=(os.getpid(),))


def _stop_now(pool: ProcessPoolExecutor) -> None:
    """Kill the workers mid-chunk (ProcessPoolExecutor.terminate_workers of Python 3.14, by hand before)."""
    if hasattr(pool, "terminate_workers"):
        pool.terminate_workers()
        return
    for process in list((pool._processes or {}).values()):  # before shutdown, which forgets them
        process.kill()
    pool.shutdown(wait=False, cancel_futures=True)


def _decode_chunk(
    chunk: list[tuple[str, int, str, bytes]], size: int, channels: int, max_pixels: int
) -> tuple[list[tuple[str, int]], np.ndarray, list[tuple[str, str]]]:
    """Worker: decode a chunk of (split, row, name, bytes); returns the rows done, their pixels
    stacked, and (name, error) for the files that failed."""
    rows, arrays, errors = [], [], []
    for split, row, name, data in chunk:
        try:
            arrays.append(decode(data, size, channels, max_pixels))
            rows.append((split, row))
        except ImageError as exc:
            errors.append((name, str(exc)))
    stacked = np.stack(arrays) if arrays else np.zeros((0, size, size, channels), np.uint8)
    return rows, stacked, errors


def decode_into(
    archive: Archive,
    plan: dict[str, tuple[str, int]],
    arrays: dict[str, np.ndarray],
    size: int,
    channels: int,
    max_pixels: int,
    workers: int,
    chunk_size: int = 256,
    on_progress: Callable[[int], None] = lambda n: None,
) -> list[tuple[str, str]]:
    """Decode every file of `plan` (archive name -> (split, row)) exactly once, in `workers`
    processes, into `arrays[split][row]`; returns (file, error) for each file that failed.

    At most 2 x `workers` chunks are in flight, so memory stays bounded whatever the dataset size."""
    errors: list[tuple[str, str]] = []
    in_flight: list[Future] = []
    chunk: list[tuple[str, int, str, bytes]] = []
    seen: set[str] = set()

    def collect(future: Future) -> None:
        rows, pixels, failed = future.result()
        for split in {split for split, _ in rows}:
            mine = [i for i, (s, _) in enumerate(rows) if s == split]
            arrays[split][[rows[i][1] for i in mine]] = pixels[mine]
        errors.extend(failed)
        on_progress(len(rows) + len(failed))

    with worker_pool(workers) as pool:

        def submit() -> None:
            nonlocal chunk
            in_flight.append(pool.submit(_decode_chunk, chunk, size, channels, max_pixels))
            chunk = []
            while len(in_flight) > 2 * workers:
                collect(in_flight.pop(0))

        try:
            for name, data in archive.read(set(plan)):
                if name in seen:  # a tar may hold the same name twice; the listing counted it once
                    continue
                seen.add(name)
                chunk.append((*plan[name], name, data))
                if len(chunk) >= chunk_size:
                    submit()
            if chunk:
                submit()
            while in_flight:
                collect(in_flight.pop(0))
        except BaseException:  # a bad archive, Ctrl-C, SIGTERM: stop at once, not after the queued chunks
            _stop_now(pool)
            raise
    if len(seen) != len(plan):
        raise DataError(f"{archive.path}: {len(plan) - len(seen)} listed files could not be read back")
    return errors
