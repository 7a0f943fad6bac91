"""Decompression bombs for tests, written in milliseconds without ever holding their expanded bytes.

Zeros compress to the same 1,037 bytes per MiB once the compressor is flushed with Z_FULL_FLUSH (which
forgets all history), so a deflate stream of N MiB of zeros is one such block repeated N times. The
CRC-32 of the expanded bytes comes from zlib's crc32_combine algorithm (absent from Python's zlib),
so the archives are valid: a reader that inflates them finds nothing wrong but their size.
"""

from __future__ import annotations

import struct
import tarfile
import zlib
from pathlib import Path

MiB = 1 << 20
GiB = 1 << 30
STORED, DEFLATED = 0, 8  # zip compression methods


def _gf2_times(matrix: list[int], vector: int) -> int:
    total, i = 0, 0
    while vector:
        if vector & 1:
            total ^= matrix[i]
        vector >>= 1
        i += 1
    return total


def _gf2_square(matrix: list[int]) -> list[int]:
    return [_gf2_times(matrix, row) for row in matrix]


def crc32_combine(crc1: int, crc2: int, length2: int) -> int:
    """CRC-32 of A + B from crc32(A), crc32(B) and len(B) (zlib's crc32_combine, in Python)."""
    if length2 == 0:
        return crc1
    odd = [0xEDB88320] + [1 << n for n in range(31)]  # the operator for one zero bit
    even = _gf2_square(odd)  # two zero bits
    odd = _gf2_square(even)  # four
    while True:
        even = _gf2_square(odd)
        if length2 & 1:
            crc1 = _gf2_times(even, crc1)
        length2 >>= 1
        if not length2:
            break
        odd = _gf2_square(even)
        if length2 & 1:
            crc1 = _gf2_times(odd, crc1)
        length2 >>= 1
        if not length2:
            break
    return crc1 ^ crc2


def zeros_crc(mebibytes: int) -> int:
    """CRC-32 of `mebibytes` MiB of zeros, by doubling: a few combines instead of a pass over them."""
    crc, length = 0, 0
    piece, piece_length = zlib.crc32(bytes(MiB)), MiB
    while mebibytes:
        if mebibytes & 1:
            crc, length = crc32_combine(crc, piece, piece_length), length + piece_length
        piece, piece_length = crc32_combine(piece, piece, piece_length), 2 * piece_length
        mebibytes >>= 1
    return crc


def _flushed(data: bytes) -> bytes:
    """`data` as non-final raw deflate blocks ending on a byte boundary, concatenable with others."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    return compressor.compress(data) + compressor.flush(zlib.Z_FULL_FLUSH)


_FINAL = b"\x03\x00"  # an empty final block: ends a raw deflate stream


def deflate_parts(head: bytes, zeros: int, tail: bytes) -> tuple[bytes, int, int]:
    """(raw deflate stream, CRC-32, length) of head + `zeros` zero bytes (a multiple of 1 MiB) + tail."""
    assert zeros % MiB == 0
    block = _flushed(bytes(MiB))
    stream = _flushed(head) + block * (zeros // MiB) + _flushed(tail) + _FINAL
    crc = crc32_combine(zlib.crc32(head), zeros_crc(zeros // MiB), zeros)
    crc = crc32_combine(crc, zlib.crc32(tail), len(tail))
    return stream, crc, len(head) + zeros + len(tail)


def zip_bomb(path: Path, name: str, size: int = 2 * GiB, others: dict[str, bytes] | None = None) -> Path:
    """A zip (zip64 sizes) holding `name`: `size` zero bytes deflated, plus `others` stored as they are."""
    entries = []  # (name, method, crc, compressed, size, offset)
    with open(path, "wb") as f:

        def local(entry: str, method: int, data: bytes, crc: int, length: int) -> None:
            encoded = entry.encode()
            extra = struct.pack("<HHQQ", 1, 16, length, len(data))
            entries.append((encoded, method, crc, len(data), length, f.tell()))
            header = (0x04034B50, 45, 0, method, 0, 0x21, crc, 0xFFFFFFFF, 0xFFFFFFFF, len(encoded), len(extra))
            f.write(struct.pack("<IHHHHHIIIHH", *header) + encoded + extra + data)

        for other, data in (others or {}).items():
            local(other, STORED, data, zlib.crc32(data), len(data))
        stream, crc, length = deflate_parts(b"", size, b"")
        local(name, DEFLATED, stream, crc, length)
        start = f.tell()
        for encoded, method, crc, compressed, length, offset in entries:
            extra = struct.pack("<HHQQ", 1, 16, length, compressed)
            f.write(
                struct.pack(
                    "<IHHHHHHIIIHHHHHII",
                    0x02014B50,
                    45,
                    45,
                    0,
                    method,
                    0,
                    0x21,
                    crc,
                    0xFFFFFFFF,
                    0xFFFFFFFF,
                    len(encoded),
                    len(extra),
                    0,
                    0,
                    0,
                    0o100644 << 16,
                    offset,
                )
                + encoded
                + extra
            )
        directory = f.tell() - start
        f.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(entries), len(entries), directory, start, 0))
    return path


def tar_gz_bomb(
    path: Path, name: str, size: int = 2 * GiB, others: dict[str, bytes] | None = None, kind: bytes = tarfile.REGTYPE
) -> Path:
    """A .tar.gz whose member `name` of tar type `kind` (a file; or a GNU long name, a PAX header: the
    metadata tarfile reads whole) holds `size` zero bytes, after the members `others`."""
    head = b""
    for other, data in (others or {}).items():
        info = tarfile.TarInfo(other)
        info.size = len(data)
        head += info.tobuf(tarfile.USTAR_FORMAT) + data + bytes(-len(data) % 512)
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    head += info.tobuf(tarfile.USTAR_FORMAT)
    stream, crc, length = deflate_parts(head, size, bytes(2 * 512))  # two zero blocks end a tar
    gzip_header = b"\x1f\x8b\x08\x00" + bytes(4) + b"\x00\xff"
    path.write_bytes(gzip_header + stream + struct.pack("<II", crc, length & 0xFFFFFFFF))
    return path
