"""Page-aligned byte buffers to read files into.

A large numpy array (or bytearray) starts 16 bytes into a page: glibc serves it from its own mapping, behind a 16-byte
chunk header. A read of a page-aligned file range (every tensor and expert file of a layout starts on 4 KiB) into
such a buffer copies with the destination 16 bytes ahead of the source modulo 4 KiB, where each load waits on the
store just before it (4K aliasing): on an AMD EPYC a pread from the page cache ran at 1.5 GB/s into it against 6.4
into a page-aligned buffer (docs/BENCHMARKS.md, "A second run right after a first").
"""

from __future__ import annotations

import mmap

import numpy as np

# below this, np.empty: the copy is short, and a mapping per small tensor would take a system call and a page each
MIN_MAPPED = 64 << 10


def anonymous(nbytes: int) -> mmap.mmap:
    """nbytes of fresh memory starting on a page: private (Python's default, shared, is shmem, which gets no
    transparent huge pages), 2 MiB pages asked for as numpy asks for its large arrays (the kernels stream them
    faster: docs/BENCHMARKS.md); committed as pages are first written."""
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        m.madvise(mmap.MADV_HUGEPAGE)
    return m


def page_aligned(nbytes: int) -> np.ndarray:
    """A writable uint8 array of nbytes starting on a page (`anonymous`, given back when its last view goes), or
    np.empty below MIN_MAPPED."""
    return np.empty(nbytes, np.uint8) if nbytes < MIN_MAPPED else np.frombuffer(anonymous(nbytes), np.uint8)
