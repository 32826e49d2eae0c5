"""xxh3_64 checksums, as lowercase hex, of buffers and files."""

from __future__ import annotations

import os
from pathlib import Path

import xxhash

from .buffers import page_aligned

CHUNK = 8 << 20


def xxh3_hex(data: bytes | memoryview) -> str:
    return xxhash.xxh3_64(data).hexdigest()


def file_xxh3(path: str | Path, chunk: int = CHUNK) -> tuple[int, str]:
    """(size, xxh3) of a whole file, read in chunks so memory stays flat."""
    h = xxhash.xxh3_64()
    n = 0
    buf = page_aligned(chunk)  # a bytearray of this size would start 16 bytes into a page: slow copies (buffers.py)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            got = f.readinto(buf)
            if not got:
                break
            h.update(view[:got])
            n += got
    return n, h.hexdigest()


def range_xxh3(fd: int, offset: int, nbytes: int, chunk: int = CHUNK) -> str:
    """xxh3 of bytes [offset, offset + nbytes) of an open file."""
    h = xxhash.xxh3_64()
    pos, end = offset, offset + nbytes
    while pos < end:
        data = os.pread(fd, min(chunk, end - pos), pos)
        if not data:
            raise EOFError(f"file ends at {pos}, expected {end} bytes")
        h.update(data)
        pos += len(data)
    return h.hexdigest()
