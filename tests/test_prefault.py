"""ExpertStore.prefault: the arena's first slots faulted in before any read (the cache fills slots from the first up),
their reads then as before; a closing store, or a mapped one, faults nothing in."""

from __future__ import annotations

import ctypes
import mmap
from pathlib import Path

import numpy as np

from mertools.layout import Layout
from mertools.runtime.engine import Engine
from mertools.runtime.store import ExpertStore

_libc = ctypes.CDLL(None, use_errno=True)


def _resident(a: np.ndarray) -> np.ndarray:
    """Per page of `a` (page-aligned, whole pages), whether it is mapped in now (mincore)."""
    pages = a.nbytes // mmap.PAGESIZE
    vec = (ctypes.c_ubyte * pages)()
    if _libc.mincore(ctypes.c_void_p(a.ctypes.data), ctypes.c_size_t(a.nbytes), vec) != 0:
        raise OSError(ctypes.get_errno(), "mincore")
    return np.frombuffer(vec, np.uint8) & 1 == 1


def test_the_first_slots_are_faulted_in_and_read_as_before(tiny_q4_0: Path) -> None:
    lay = Layout.open(tiny_q4_0)
    keys = [(e.layer, e.expert) for e in lay.manifest.experts][:4]
    store = ExpertStore(lay, 4)
    try:
        assert store.slot_bytes * 4 < 2 << 20  # no 2 MiB page can span slots: residency is per slot
        assert not _resident(store.arena_bytes).any()
        assert store.prefault(2) == 2
        for slot in range(4):
            assert _resident(store.buffers[slot]).all() == (slot < 2), slot
        assert not store.buffers[0].any()  # faulted in as zeros: nothing written
        for slot, key in enumerate(keys):
            store.load(key, slot)  # checked against the manifest's xxh3
            e = lay.manifest.expert(*key)
            assert store.buffers[slot][:e.nbytes].tobytes() == (tiny_q4_0 / e.file).read_bytes()[:e.nbytes]
        assert store.prefault(9) == 4  # never past the cache's slots
    finally:
        store.close()
    assert store.prefault(2) == 0  # closing: nothing more faulted in


def test_a_mapped_store_faults_nothing_in(tiny_q4_0: Path) -> None:
    store = ExpertStore(Layout.open(tiny_q4_0), 4, mapped=True)
    try:
        assert store.prefault(4) == 0
    finally:
        store.close()


def test_an_engine_faults_in_what_a_first_token_fills(tiny_q4_0: Path) -> None:
    with Engine.open(tiny_q4_0, kernels="int8", io="buffered") as eng:
        cfg = eng.config
        want = min(eng.store.n_slots, cfg.n_experts_used * cfg.n_layers)
        eng.store._prefaulting.join()
        arena = eng.store.arena_bytes
        assert _resident(arena[:want * eng.store.slot_bytes]).all()
