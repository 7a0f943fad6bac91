"""One line, not a traceback, when the store or the disk fails under a stage.

A stage run as `python -m imgclf.<stage>` goes through `run_stage(main)`: an error of the environment (the
MLflow store unreachable, damaged, locked or read-only; a full disk, a read-only file system, a
permission or file-size limit) ends it with one line on stderr naming the file and the cause, and exit
code 1. Any other error keeps its traceback, and `IMGCLF_DEBUG=1` shows the traceback of these too.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
from pathlib import Path
from typing import Callable

DEBUG_ENV = "IMGCLF_DEBUG"

# What SQLite says (through sqlalchemy and MLflow) -> the cause, in words.
SQLITE_CAUSES = {
    "database is locked": "it is locked by another process (another stage, or an `mlflow ui` writing to it)",
    "readonly database": "it is read-only (its file, its folder or the file system)",
    "database or disk is full": "the disk holding it is full",
    "disk i/o error": "a disk I/O error (a full disk, or a file size limit)",
    "unable to open database file": "it cannot be opened (its folder is missing or not writable)",
}
OS_CAUSES = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EFBIG: "the file is larger than this process may write (a file size limit)",
}


def chain(exc: BaseException) -> list[BaseException]:
    """The exception and those it was raised from or during, outermost first."""
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def store_file() -> str:
    import mlflow

    from imgclf.store import sqlite_path

    uri = mlflow.get_tracking_uri()
    path = sqlite_path(uri)
    return str(path) if path is not None else uri


def explain(exc: BaseException) -> str | None:
    """One line for an environment error (see the module docstring), or None for any other error."""
    from imgclf.tracking import StoreUnavailable

    for error in chain(exc):
        if isinstance(error, StoreUnavailable):
            return str(error)
    for error in chain(exc):
        text = str(error).lower()
        for phrase, cause in SQLITE_CAUSES.items():
            if phrase in text:
                return f"the MLflow store {store_file()}: {cause}"
    for error in chain(exc):
        if isinstance(error, OSError) and error.errno in OS_CAUSES:
            where = error.filename or "a file"
            return f"cannot write {where}: {OS_CAUSES[error.errno]} ({error.strerror})"
    return None


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's main() with the errors of the environment said in one line (exit code 1)."""
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    if not debug:  # MLflow logs each SQL error with its traceback before raising it: said below instead
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    try:
        main()
    except Exception as exc:
        line = explain(exc)
        if line is None or debug:
            raise
        stage = Path(sys.argv[0]).stem if sys.argv and sys.argv[0] else "imgclf"
        print(f"error: {stage}: {line} (set {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        raise SystemExit(1) from None
