"""Tar and zip archives: packing a folder reproducibly, listing one, and one pass over its bytes."""

from __future__ import annotations

import tarfile
import zipfile
from pathlib import Path
from typing import Iterator

from imgclf.data.types import DataError, archive_suffix


def pack_folder(source: Path, dest: Path) -> None:
    """A tar of `source` that depends on its contents only: sorted names, no owners, no times."""

    def clean(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = 0
        info.mode = 0o755 if info.isdir() else 0o644
        return info

    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(source.rglob("*")):
            if path.is_symlink() or not (path.is_file() or path.is_dir()):
                continue
            tar.add(path, arcname=path.relative_to(source).as_posix(), recursive=False, filter=clean)


class Archive:
    """Uniform access to a tar or zip archive: names of files and folders, and a single pass over
    the bytes of chosen files (in archive order, which is fast for compressed tars)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.is_zip = archive_suffix(path) == ".zip"

    def listing(self) -> tuple[list[str], list[str]]:
        """(files, folders); links and special files are left out."""
        try:
            if self.is_zip:
                with zipfile.ZipFile(self.path) as z:
                    infos = z.infolist()
                return (
                    [i.filename for i in infos if not i.is_dir()],
                    [i.filename.rstrip("/") for i in infos if i.is_dir()],
                )
            with tarfile.open(self.path, "r:*") as tar:
                members = tar.getmembers()
            return [m.name for m in members if m.isfile()], [m.name for m in members if m.isdir()]
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
            raise DataError(f"{self.path}: not a readable archive ({exc})") from None

    def read(self, wanted: set[str]) -> Iterator[tuple[str, bytes]]:
        try:
            if self.is_zip:
                with zipfile.ZipFile(self.path) as z:
                    for name in z.namelist():
                        if name in wanted:
                            yield name, z.read(name)
                return
            with tarfile.open(self.path, "r|*") as tar:  # stream mode: one sequential pass
                for member in tar:
                    if member.isfile() and member.name in wanted:
                        yield member.name, tar.extractfile(member).read()
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
            raise DataError(f"{self.path}: the archive is truncated or corrupt ({exc})") from None


def parts(name: str) -> tuple[str, ...]:
    """Path components of an archive name; "./train/a.png" and "train/a.png" are the same file."""
    return tuple(p for p in name.split("/") if p not in ("", "."))


def hidden_parts(parts: tuple[str, ...]) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def hidden(name: str) -> bool:
    """Whether a relative path or archive name is a hidden file or system metadata (`.DS_Store`,
    `__MACOSX/...`), which is never data."""
    return hidden_parts(parts(name))
