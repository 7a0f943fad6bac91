"""Tar and zip archives: packing a folder reproducibly, listing one, and one pass over its bytes."""

from __future__ import annotations

import stat
import tarfile
import zipfile
from pathlib import Path
from typing import IO, Iterator, NamedTuple

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


# Tar headers that hold metadata (a long name, PAX records), not a file: tarfile reads each one whole
# into memory, so one claiming gigabytes is refused before it is read. Real ones hold a path or a few
# key=value records.
MAX_TAR_HEADER_BYTES = 1 << 20
_METADATA_TYPES = (
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
)


class ArchiveTooLarge(DataError):
    """An archive that expands to more than its limit: a decompression bomb, or a limit to raise."""


class _HeaderTooLarge(Exception):
    pass


class _TarInfo(tarfile.TarInfo):
    """tarfile's header parsing (`TarFile(tarinfo=...)`, its extension point), metadata sizes checked first."""

    def _proc_member(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _METADATA_TYPES and self.size > MAX_TAR_HEADER_BYTES:
            raise _HeaderTooLarge(
                f"a tar metadata header ({self.name}) of {self.size:,} bytes: refused as a likely "
                f"decompression bomb (real ones hold a file name or a few PAX records, under {MAX_TAR_HEADER_BYTES:,})"
            )
        return super()._proc_member(tar)


class Contents(NamedTuple):
    files: list[str]
    folders: list[str]
    skipped: list[tuple[str, str]]  # (entry, why it is not read): links, devices, names with ..


def _unsafe_name(name: str) -> str | None:
    if ".." in name.split("/"):
        return "its path climbs out of the archive (..)"
    return None


def _tar_skip_reason(member: tarfile.TarInfo) -> str | None:
    if member.issym():
        return f"a symbolic link (to {member.linkname}): links are not followed"
    if member.islnk():
        return f"a hard link (to {member.linkname}): links are not followed"
    if member.ischr() or member.isblk():
        return "a device file, not a regular file"
    if member.isfifo():
        return "a FIFO, not a regular file"
    if not (member.isfile() or member.isdir()):
        return f"an entry of tar type {member.type!r}, not a regular file"
    return _unsafe_name(member.name)


def _zip_skip_reason(info: zipfile.ZipInfo) -> str | None:
    kind = stat.S_IFMT(info.external_attr >> 16)  # the Unix mode, when a Unix zip wrote one
    if kind == stat.S_IFLNK:
        return "a symbolic link: links are not followed"
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        return "a device file or FIFO, not a regular file"
    return _unsafe_name(info.filename)


class Archive:
    """Uniform access to a tar or zip archive: names of files and folders, and a single pass over
    the bytes of chosen files (in archive order, which is fast for compressed tars).

    The files may expand to `max_bytes` in all: their sizes are checked as declared in the headers
    (listing, before a byte is inflated) and as counted while reading, so a small archive that would
    inflate to gigabytes is refused in seconds, naming the entry."""

    def __init__(self, path: Path, max_bytes: int, limit_name: str = "data.max_archive_bytes") -> None:
        self.path = path
        self.is_zip = archive_suffix(path) == ".zip"
        self.max_bytes = max_bytes
        self.limit_name = limit_name

    def _too_large(self, name: str, size: str, total: int | None) -> ArchiveTooLarge:
        what = f"{name} expands to {size} bytes"
        if total is not None:
            what += f", which takes the archive's files to {total:,}"
        return ArchiveTooLarge(
            f"{self.path}: {what}, over {self.limit_name} ({self.max_bytes:,} bytes uncompressed): refused as "
            f"a likely decompression bomb (raise {self.limit_name} if the archive is genuine)"
        )

    def listing(self) -> Contents:
        """Files, folders, and the entries skipped with the reason; raises ArchiveTooLarge when the
        files' declared sizes add up to more than `max_bytes`."""
        contents = Contents([], [], [])
        total = 0

        def add_file(name: str, size: int) -> None:
            nonlocal total
            total += size
            if total > self.max_bytes:
                raise self._too_large(name, f"{size:,}", total if size <= self.max_bytes else None)
            contents.files.append(name)

        try:
            if self.is_zip:
                with zipfile.ZipFile(self.path) as z:
                    for info in z.infolist():
                        if (why := _zip_skip_reason(info)) is not None:
                            contents.skipped.append((info.filename, why))
                        elif info.is_dir():
                            contents.folders.append(info.filename.rstrip("/"))
                        else:
                            add_file(info.filename, info.file_size)
                return contents
            with tarfile.open(self.path, "r:*", tarinfo=_TarInfo) as tar:
                for member in tar:  # one header at a time: a bomb is refused before its data is inflated
                    if (why := _tar_skip_reason(member)) is not None:
                        contents.skipped.append((member.name, why))
                    elif member.isdir():
                        contents.folders.append(member.name)
                    else:
                        add_file(member.name, member.size)
            return contents
        except _HeaderTooLarge as exc:
            raise ArchiveTooLarge(f"{self.path}: {exc}") from None
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
            raise DataError(f"{self.path}: not a readable archive ({exc})") from None

    def read(self, wanted: set[str]) -> Iterator[tuple[str, bytes]]:
        """(name, bytes) of the files in `wanted`, in archive order; at most `max_bytes` in all are read."""
        total = 0

        def capped(f: IO[bytes], name: str, declared: int) -> bytes:
            nonlocal total
            # One byte more than the header declares (and than the limit leaves) shows a lie.
            data = f.read(min(declared, self.max_bytes - total) + 1)
            if len(data) > declared:
                raise DataError(f"{self.path}: {name} holds more than the {declared:,} bytes its header declares")
            total += len(data)
            if total > self.max_bytes:
                raise self._too_large(name, f"{len(data):,}", total)
            return data

        try:
            if self.is_zip:
                with zipfile.ZipFile(self.path) as z:
                    for info in z.infolist():
                        if info.filename in wanted and not info.is_dir():
                            with z.open(info) as f:
                                yield info.filename, capped(f, info.filename, info.file_size)
                return
            # Stream mode: one sequential pass.
            with tarfile.open(self.path, "r|*", tarinfo=_TarInfo) as tar:
                for member in tar:
                    if member.isfile() and member.name in wanted:
                        yield member.name, capped(tar.extractfile(member), member.name, member.size)
        except _HeaderTooLarge as exc:
            raise ArchiveTooLarge(f"{self.path}: {exc}") from None
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
