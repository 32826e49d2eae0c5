"""`--io`: mapped expert files (mmap), buffered reads that keep their pages, and auto's choice between mmap
and O_DIRECT; every mode gives the O_DIRECT engine's logits bit for bit."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from mertools.errors import ChecksumError, ExpertReadError
from mertools.layout import Layout
from mertools.runtime.engine import Engine, RuntimeConfigError
from mertools.runtime.store import ExpertStore

PROMPT = [1, 45, 300, 22, 17, 99, 250, 3, 7, 400, 12, 88, 5, 260, 31, 77]


@pytest.fixture(scope="module")
def layout(tiny_dtypes: dict[str, Path]) -> Path:
    return tiny_dtypes["q4_0"]


def _slot_mb(layout: Path) -> float:
    return max(e.nbytes for e in Layout.open(layout).manifest.experts) / 2**20


def _logits(layout: Path, **kw) -> tuple[np.ndarray, dict]:
    with Engine.open(layout, prefetch="lookahead", kv_dtype="f32", **kw) as eng:
        out = np.concatenate([eng.forward(PROMPT[:5]), *(eng.forward([t]) for t in PROMPT[5:])])
        return out, eng.stats()


@pytest.fixture(scope="module")
def direct(layout: Path) -> np.ndarray:
    return _logits(layout, io="direct")[0]


@pytest.mark.parametrize("slots", [2, 3, 8])  # 2: one layer's choices, every token maps again; 8: all experts
def test_mapped_slots_give_the_direct_engines_logits(layout: Path, direct: np.ndarray, slots: int) -> None:
    got, s = _logits(layout, io="mmap", cache_mb=slots * _slot_mb(layout))
    np.testing.assert_array_equal(got, direct)
    assert s["mapped"] and not s["o_direct"] and s["cache_slots"] == slots
    assert s["bytes_read"] > 0 and (slots == 8 or s["expert_misses"] > 8)


def test_a_mapped_slot_is_the_files_pages(layout: Path) -> None:
    with Engine.open(layout, io="mmap", prefetch="none") as eng:
        assert eng.store.arena is None  # no anonymous memory for experts
        eng.forward(PROMPT[:8])
        resident = eng.cache.resident()
        assert resident
        for key in resident:
            e = eng.store.entries[key]
            buf = eng.store.buffers[eng.cache.entries[key].slot]
            assert buf.size == e.nbytes and buf.tobytes() == (layout / e.file).read_bytes()[: e.nbytes]


def _mapped_files(root: Path) -> set[str]:
    with open("/proc/self/maps") as f:
        return {line.split(maxsplit=5)[-1].strip() for line in f if str(root) in line}


def test_close_unmaps_the_files_and_refuses_further_steps(layout: Path, tmp_path: Path) -> None:
    """A closed engine lets go of its mappings at once, not when it is collected (until then its pages could not
    leave the page cache), and a step on it is an error naming the layout rather than a read of unmapped slots.
    On a copy of its own: no other engine of this process maps its files."""
    lay = Path(shutil.copytree(layout, tmp_path / "lay"))
    eng = Engine.open(lay, io="mmap", prefetch="none")
    eng.forward(PROMPT[:8])
    assert _mapped_files(lay)
    eng.close()
    assert not _mapped_files(lay)
    with pytest.raises(RuntimeConfigError, match=f"{lay}: the engine is closed"):
        eng.forward(PROMPT[:2])
    eng.close()  # a second close does nothing


def test_mappings_hold_no_descriptors(layout: Path) -> None:
    """Thousands of expert files can be mapped at once: a mapping keeps no descriptor of its own (Python's mmap
    would keep a duplicate each), so open descriptors stay within the store's bound however many are mapped."""
    lay = Layout.open(layout)
    keys = [(e.layer, e.expert) for e in lay.manifest.experts]
    store = ExpertStore(lay, len(keys), mapped=True, max_open_files=1)
    before = len(os.listdir("/proc/self/fd"))
    try:
        for slot, key in enumerate(keys):
            store.load(key, slot)
        assert len(os.listdir("/proc/self/fd")) - before <= 1
        for slot, key in enumerate(keys):
            assert store.tensor(slot, key, "down").tobytes() == lay.read_expert(*key, "down").tobytes()
    finally:
        store.close()


def test_mapped_expert_changed_on_disk_is_an_error_naming_it(layout: Path, tmp_path: Path) -> None:
    lay = Path(shutil.copytree(layout, tmp_path / "lay"))
    with Engine.open(lay, io="mmap", cache_mb=2 * _slot_mb(lay), prefetch="none") as eng:
        eng.forward(PROMPT[:2])
        m = eng.layout.manifest
        for e in range(m.config.n_experts):  # corrupt every expert of layer 1: new files (same size, other bytes)
            path = lay / m.expert(1, e).file
            data = bytearray(path.read_bytes())
            data[100] ^= 0xFF
            path.unlink()
            path.write_bytes(bytes(data))
        eng.reset()
        with pytest.raises(ChecksumError, match=r"layer 1 expert \d.*xxh3"):
            eng.forward(PROMPT)


def test_mapped_expert_shorter_than_its_entry_is_refused_not_a_crash(layout: Path, tmp_path: Path) -> None:
    """Touching a mapped page past a file's end kills the process (SIGBUS): a file truncated after the layout
    was opened is refused at mapping time, naming it."""
    lay = Path(shutil.copytree(layout, tmp_path / "lay"))
    with Engine.open(lay, io="mmap", cache_mb=2 * _slot_mb(lay), prefetch="none") as eng:
        e = eng.layout.manifest.expert(0, 0)
        os.truncate(lay / e.file, e.nbytes - 4096)
        eng.store.retries = 0
        with pytest.raises(ExpertReadError, match=r"expert_000\.bin.*layer 0 expert 0.*holds"):
            eng.store.load((0, 0), 0)


def test_auto_maps_a_layout_that_fits_and_streams_one_that_does_not_or_a_smaller_budget(layout: Path, direct: np.ndarray,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import mertools.runtime.engine as engine_mod

    got, s = _logits(layout, io="auto")
    assert s["mapped"] and s["cache_slots"] == 8
    np.testing.assert_array_equal(got, direct)
    got, s = _logits(layout, io="auto", cache_mb=3 * _slot_mb(layout))  # a budget below the experts: a bound, kept
    assert not s["mapped"] and s["cache_slots"] == 3
    np.testing.assert_array_equal(got, direct)
    monkeypatch.setattr(engine_mod, "available_bytes", lambda: 64 << 20)  # now the layout does not fit beside us
    got, s = _logits(layout, io="auto", cache_mb=2 * _slot_mb(layout))
    assert not s["mapped"] and s["o_direct"] in (True, False)  # O_DIRECT asked for (tmpfs-like filesystems refuse)
    np.testing.assert_array_equal(got, direct)


def test_buffered_reads_keep_their_pages(layout: Path, direct: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    dropped: list[int] = []
    real_fadvise = os.posix_fadvise
    monkeypatch.setattr(os, "posix_fadvise",
                        lambda fd, off, n, advice: dropped.append(advice) or real_fadvise(fd, off, n, advice))
    got, s = _logits(layout, io="buffered", cache_mb=2 * _slot_mb(layout))
    np.testing.assert_array_equal(got, direct)
    assert s["o_direct"] is False and s["keep_pages"] and not s["mapped"] and s["bytes_read"] > 0
    assert os.POSIX_FADV_DONTNEED not in dropped


def test_unknown_io_mode_is_refused(layout: Path) -> None:
    with pytest.raises(RuntimeConfigError, match="io must be one of direct, buffered, mmap, auto"):
        Engine.open(layout, io="mapped")


def _evict(files: list[Path]) -> None:
    """Drop the files' clean pages from the page cache (not on tmpfs). A page under I/O or mapped by anyone stays:
    tried again for a while, then the files still cached named with whoever maps them here."""
    import gc

    from mertools.runtime.memory import cached_shares

    gc.collect()  # an engine left unclosed in a reference cycle maps its slots until collected
    for _ in range(50):
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        shares = [share for _, share in cached_shares(files)]
        if max(shares) < 0.5 or min(shares) > 0.99:  # evicted, or a filesystem that keeps every page
            return
        time.sleep(0.1)
    still = [f for f, share in zip(files, shares, strict=True) if share >= 0.5]
    pytest.fail(f"{len(still)} of {len(files)} files stayed in the page cache: {[str(f) for f in still]}; mapped "
                f"here: {sorted(_mapped_files(Path(os.path.commonpath(files))))}")


def test_auto_with_packing_kernels_reads_buffered_then_maps_what_the_page_cache_holds(layout: Path) -> None:
    """The 8-bit kernels pack q4_0 slots after their read, which a mapping cannot take: `auto` reads the files
    buffered while they are not in the page cache (keeping their pages), and maps them once they are (a second run);
    without AVX-512, where the exact kernels a mapped q4_0 expert runs on trail the packed ones, it reads them again."""
    from mertools.kernels.simd import AVX512
    from mertools.runtime.engine import WARM, auto_io
    from mertools.runtime.memory import cached_shares

    def cached_share(files: list[Path]) -> float:
        shares = cached_shares(files)
        return sum(size * share for size, share in shares) / sum(size for size, _ in shares)

    files = [layout / e.file for e in Layout.open(layout).manifest.experts]
    ids = list(range(1, 12))
    _evict(files)
    cold = cached_share(files)  # ~0 on a disk; tmpfs keeps every page
    with Engine.open(layout, kernels="int8", io="auto") as eng:
        assert eng.store.mapped == (cold >= WARM and AVX512)
        if not eng.store.mapped:
            assert eng.store.prepare is not None and not eng.store.want_direct and eng.store.keep_pages
        first = eng.forward(ids)
    assert any(share >= WARM for _, share in cached_shares(files))  # the files it read, whole, for the next process
    assert auto_io(Layout.open(layout), True, True) == "mmap"  # what the page cache holds is mapped,
    with Engine.open(layout, kernels="int8", io="auto") as eng:  # a second run: the experts on exact kernels, unless
        assert eng.store.mapped == AVX512 and (eng.store.prepare is None) == AVX512  # those trail the packed ones
        second = eng.forward(ids)
    assert (first.argmax(-1) == second.argmax(-1)).mean() >= 0.9
    with Engine.open(layout, kernels="int8", io="auto", long_lived=True) as eng:  # a server packs whatever is cached
        assert not eng.store.mapped and eng.store.prepare is not None and eng.store.keep_pages
        served = eng.forward(ids)
    with Engine.open(layout, kernels="int8", io="direct") as eng:  # read and packed, as the server's
        np.testing.assert_array_equal(eng.forward(ids), served)
    _evict(files)
    for f in files:  # stray pages (a file's first page, no readahead) are not an earlier run's reads
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            os.pread(fd, 4096, 0)
        finally:
            os.close(fd)
    shares = cached_shares(files)
    assert all(share < WARM for _, share in shares) or min(share for _, share in shares) >= WARM  # (tmpfs: all pages)
    if all(share < WARM for _, share in shares):
        with Engine.open(layout, kernels="int8", io="auto") as eng:
            assert not eng.store.mapped and eng.store.prepare is not None
    with Engine.open(layout, kernels="exact", io="auto") as eng:  # nothing to pack: mapped, cached or not
        assert eng.store.mapped
