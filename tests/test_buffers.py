"""layout/buffers.py: buffers that files are read into start on a page (a read into a buffer 16 bytes into a page
copies several times slower: the module's docstring), and the readers use them."""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np

from mertools.layout.buffers import MIN_MAPPED, page_aligned
from mertools.layout.reader import Layout
from mertools.runtime.fused import DenseArena


def test_a_large_buffer_starts_on_a_page_and_is_writable() -> None:
    for n in (MIN_MAPPED, MIN_MAPPED + 1, 3 * MIN_MAPPED + 4095):
        a = page_aligned(n)
        assert a.dtype == np.uint8 and a.shape == (n,) and a.ctypes.data % mmap.PAGESIZE == 0
        a[:] = 7
        assert int(a[-1]) == 7
    small = page_aligned(100)
    assert small.shape == (100,) and small.flags.writeable


def test_readers_read_into_page_aligned_buffers(tiny_q4_0: Path) -> None:
    layout = Layout.open(tiny_q4_0)
    big = [n for n, t in layout.manifest.dense.items() if t.nbytes >= MIN_MAPPED]
    assert big  # the fixture's embedding and output matrices
    for name in big:
        got = layout.read_dense(name)
        assert got.ctypes.data % mmap.PAGESIZE == 0, name
        entry = layout.manifest.dense[name]
        with open(tiny_q4_0 / entry.file, "rb") as f:
            f.seek(entry.offset)
            assert got.tobytes() == f.read(entry.nbytes), name
    assert DenseArena(5 * MIN_MAPPED).buf.ctypes.data % mmap.PAGESIZE == 0
