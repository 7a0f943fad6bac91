"""A local SQLite MLflow store that existed is never silently re-created.

MLflow creates an SQLite store wherever its file is missing, and creates its tables afresh in an empty
file: the history, the versions and the champion would be gone without a word, and the next model,
however weak, would become champion. So before a stage opens an SQLite store (the default `mlflow.db`,
or a `sqlite:///` MLFLOW_TRACKING_URI) its file is checked: empty, not SQLite, shorter than its header
says (truncated), failing SQLite's `PRAGMA quick_check`, or holding no MLflow tables: the stage stops
with StoreDamaged, saying how to restore it.

How "it existed" is known: once a store is found sound, a marker file `.<name>.created` (`.mlflow.db.created`)
is written beside it. A missing store with its marker present is an error too; a missing store without
one is the first run: MLflow creates it, and this says so. (Deleting the marker is how to start a new,
empty store on purpose.)
"""

from __future__ import annotations

import contextlib
import sqlite3
import struct
import time
from pathlib import Path

SQLITE_HEADER = b"SQLite format 3\x00"
# Tables every MLflow SQL store has (and the migration record MLflow checks its schema by).
MLFLOW_TABLES = {"alembic_version", "experiments", "runs"}
BUSY_TIMEOUT_S = 20  # as MLflow's own SQLite connections wait for a lock


class StoreDamaged(RuntimeError):
    """A store that existed is missing, empty or damaged: raised before MLflow would re-create it."""


def sqlite_path(uri: str) -> Path | None:
    """The file of a `sqlite:///` tracking URI (relative to the working folder, or absolute with four
    slashes), or None for other stores."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def marker(path: Path) -> Path:
    return path.with_name(f".{path.name}.created")


def check(uri: str) -> None:
    """Stop (StoreDamaged) when the SQLite store `uri` names existed and is now missing, empty or damaged;
    say so when it is created for the first time. Other stores pass."""
    path = sqlite_path(uri)
    if path is None:
        return
    if not path.exists():
        if marker(path).exists():
            raise StoreDamaged(
                f"the MLflow store {path} is missing, but it existed ({marker(path)} says so): {_restore(path)}"
            )
        print(f"creating the MLflow store {path} (the first run here)")
        return
    problem = damage(path)
    if problem:
        raise StoreDamaged(f"the MLflow store {path} {problem}: {_restore(path)}")
    mark(uri)


def mark(uri: str) -> None:
    """Record that the SQLite store `uri` names exists (see the module docstring), once it does."""
    path = sqlite_path(uri)
    if path is None or not path.is_file() or marker(path).exists():
        return
    # A folder that cannot be written leaves no marker; writing the store itself will then say why.
    with contextlib.suppress(OSError):
        marker(path).write_text(f"{path.name} existed at {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n")


def _restore(path: Path) -> str:
    return (
        f"nothing was changed. Restore it from a backup (a copy made while no stage runs: cp {path.name} "
        f"{path.name}.bak), or, to start a new, empty store and lose what it held, move it aside and delete "
        f"{marker(path)}"
    )


def damage(path: Path) -> str | None:
    """What is wrong with an existing store file, or None. A store locked by another process is not
    damaged: sqlite3.OperationalError ("database is locked") is raised after BUSY_TIMEOUT_S."""
    size = path.stat().st_size
    if size == 0:
        return "is empty (0 bytes)"
    with open(path, "rb") as f:
        header = f.read(100)
    if not header.startswith(SQLITE_HEADER) or len(header) < 100:
        return "is not an SQLite database (its first bytes are not SQLite's header)"
    (page_size,) = struct.unpack(">H", header[16:18])
    page_size = 65536 if page_size == 1 else page_size
    (pages,) = struct.unpack(">I", header[28:32])
    if header[24:28] == header[92:96] and size < pages * page_size:  # the page count is valid (SQLite 3.7+)
        return f"is truncated ({size} bytes of the {pages * page_size} its header counts)"
    try:
        connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S)
        try:
            verdict = connection.execute("PRAGMA quick_check").fetchone()[0]
            tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            connection.close()
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc):
            raise
        return f"cannot be read by SQLite ({exc})"
    except sqlite3.DatabaseError as exc:
        return f"is damaged (SQLite: {exc})"
    if verdict != "ok":
        return f"is damaged (SQLite's quick_check: {verdict})"
    if not MLFLOW_TABLES <= tables:
        return f"holds no MLflow store (missing tables: {', '.join(sorted(MLFLOW_TABLES - tables))})"
    return None
