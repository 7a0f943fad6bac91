"""Atomic outputs: a stage's results appear complete or not at all, never half-written."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

try:
    import fcntl
except ImportError:  # Windows: no flock, and no clean-up of stale staging folders
    fcntl = None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def staged_dir(out: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `out`; on success it replaces `out`, on error it goes.

    The folder is locked while in use (flock, which the kernel releases when its holders die), so the
    folders a killed run left behind are told from a running one's and removed first."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)
    staging, lock = _locked_staging(out)
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it private; the result should not be
    try:
        yield staging
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if lock is not None:
            os.close(lock)


def _lock(folder: Path) -> int | None:
    """An open descriptor of `folder` holding an exclusive flock on it, or None when another process
    holds it (or the system has no flock)."""
    if fcntl is None:
        return None
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _locked_staging(out: Path) -> tuple[Path, int | None]:
    while True:
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
        if fcntl is None:
            return staging, None
        lock = None
        with contextlib.suppress(FileNotFoundError):
            lock = _lock(staging)
            # Another run's clean-up may have taken the new folder for a stale one before it was locked.
            if lock is not None and os.path.samestat(os.fstat(lock), os.stat(staging)):
                return staging, lock
        if lock is not None:
            os.close(lock)


def remove_stale_staging(out: Path) -> list[Path]:
    """Remove the staging folders of `out` (`.<name>-*` beside it) that no live process holds: those of
    a run that was killed (SIGKILL, power loss) before it could clean up. Returns them."""
    removed = []
    for folder in sorted(out.parent.glob(f".{out.name}-*")):
        if folder.is_symlink() or not folder.is_dir() or fcntl is None:
            continue
        lock = _lock(folder)
        if lock is None:
            continue  # a running stage's
        try:
            shutil.rmtree(folder, ignore_errors=True)
        finally:
            os.close(lock)
        print(f"removed {folder}, left by an interrupted run", file=sys.stderr)
        removed.append(folder)
    return removed


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write through a temporary file in the same folder, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it private; the result should not be
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)  # make the rename itself durable
    except OSError as exc:  # a full disk names no file by itself: name the one being written
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if exc.filename is None:
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: str | Path, value: Any) -> None:
    write_bytes(path, (json.dumps(value, indent=2) + "\n").encode())
