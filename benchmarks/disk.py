"""Raw disk figures for the beyond-RAM and small-experts benchmarks: O_DIRECT reads at queue depths 1-16,
dd, the expert store's own load throughput, and the first-touch cost of fresh cache memory. The callers
drop the page cache (benchmarks._common.drop_caches) before each."""

from __future__ import annotations

import mmap
import os
import re
import subprocess
import threading
import time
from pathlib import Path

CHUNK = 4 << 20


def odirect_read(files: list[Path], depth: int, chunk: int = CHUNK) -> float:
    """GB/s reading every file whole with O_DIRECT, `depth` reads in flight (one thread each)."""
    jobs = [(f, off, min(chunk, f.stat().st_size - off)) for f in files for off in range(0, f.stat().st_size, chunk)]
    lock = threading.Lock()
    total = 0

    def worker() -> None:
        nonlocal total
        buf = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT needs
        view = memoryview(buf)
        fds: dict[Path, int] = {}
        while True:
            with lock:
                if not jobs:
                    break
                f, off, n = jobs.pop()
            fd = fds.get(f)
            if fd is None:
                fd = fds[f] = os.open(f, os.O_RDONLY | os.O_DIRECT)
            got = os.preadv(fd, [view[:n]], off)
            with lock:
                total += got
        for fd in fds.values():
            os.close(fd)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(depth)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return total / 1e9 / (time.perf_counter() - t0)


def dd_read(path: Path) -> float | None:
    """dd's own figure for one file read with iflag=direct, GB/s."""
    try:
        res = subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=4M", "iflag=direct"], capture_output=True,
                             text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"copied, ([\d.]+) s, ([\d.]+) ([KMG])B/s", res.stderr)
    if not m:
        return None
    return float(m.group(2)) * {"K": 1e-6, "M": 1e-3, "G": 1.0}[m.group(3)]


def store_load(layout_dir: Path, concurrent: int) -> float:
    """GB/s of ExpertStore.load over every expert, `concurrent` experts in flight (as the cache's
    loader pool issues them), each expert read in chunks by the store's own reader threads."""
    return store_load_stats(layout_dir, concurrent)[0]


def store_load_stats(layout_dir: Path, concurrent: int, **store_options: int | None) -> tuple[float, float]:
    """(GB/s, mean ms per expert load) of store_load; `store_options` go to ExpertStore (io_depth,
    chunk_bytes)."""
    import queue
    from concurrent.futures import ThreadPoolExecutor

    from mertools.layout import Layout
    from mertools.runtime.store import ExpertStore

    layout = Layout.open(layout_dir)
    store = ExpertStore(layout, concurrent, **store_options)
    keys = [(e.layer, e.expert) for e in layout.manifest.experts]
    free: queue.Queue[int] = queue.Queue()
    for slot in range(concurrent):
        free.put(slot)

    def load(key: tuple[int, int]) -> None:
        slot = free.get()  # each load in flight has a slot of its own, as in the cache
        try:
            store.load(key, slot)
        finally:
            free.put(slot)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrent) as pool:
        for f in [pool.submit(load, k) for k in keys]:
            f.result()
    dt = time.perf_counter() - t0
    lat = store.read_latency  # per complete expert load
    gbs, ms = store.bytes_read / 1e9 / dt, 1e3 * lat.sum / max(1, lat.count)
    store.close()
    return gbs, ms


def first_touch_s_per_gib(gib: int = 1) -> float:
    """Seconds per GiB to fault in fresh anonymous memory, one write per 4 KiB page: what the cache's
    slots cost the kernel the first time an expert is read into them."""
    import numpy as np

    m = mmap.mmap(-1, gib << 30)
    v = np.frombuffer(m, np.uint8)
    t0 = time.perf_counter()
    v[::4096] = 1
    dt = time.perf_counter() - t0
    del v
    m.close()
    return dt / gib
