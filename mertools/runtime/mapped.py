"""Read-only file mappings without a descriptor each: `--io mmap`'s expert slots.

Python 3.11's `mmap.mmap` keeps a duplicate descriptor per mapping, and a layout that fits in memory may
hold thousands of expert files (Qwen3-30B-A3B: 6,144), past a process's descriptor limit. So libc's mmap
is called directly and the mapping is undone when the last numpy view of it is gone, as mmap objects do.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import weakref

import numpy as np

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
MADV_POPULATE_WRITE = 23  # Linux 5.14: fault every page of a range in, writable, in one call
_MAP_FAILED = ctypes.c_void_p(-1).value


def map_file(fd: int, nbytes: int, offset: int = 0) -> np.ndarray:
    """`nbytes` of the open file `fd` from `offset` (a multiple of the page size) as a uint8 array backed by the page
    cache (shared, read-only pages: writing to it faults instead of changing the file; MAP_POPULATE maps every page
    now, reading what the page cache lacks, so the kernels never stop on a page fault). The file must hold them: touching a
    page past its end would kill the process (SIGBUS), so a shorter file is refused here."""
    size = os.fstat(fd).st_size
    if size < offset + nbytes:
        raise OSError(f"file holds {size} bytes, {offset + nbytes} expected")
    addr = _libc.mmap(None, nbytes, mmap.PROT_READ, mmap.MAP_SHARED | mmap.MAP_POPULATE, fd, offset)
    if addr is None or addr == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    buf = (ctypes.c_uint8 * nbytes).from_address(addr)
    weakref.finalize(buf, _libc.munmap, addr, nbytes)  # every view keeps `buf` alive through its base
    return np.frombuffer(buf, np.uint8)


def populate(addr: int, nbytes: int) -> bool:
    """Fault in the pages of [addr, addr + nbytes) of a private writable mapping now, as a first write would (their
    contents unchanged if present); False where the kernel lacks MADV_POPULATE_WRITE. Through ctypes, which lets go of
    the GIL for the call: other threads run while the pages are zeroed."""
    return _libc.madvise(addr, nbytes, MADV_POPULATE_WRITE) == 0
