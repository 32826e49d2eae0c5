"""Expert store: reads whole expert files with O_DIRECT into page-aligned slots of one arena.

The arena is mapped once (anonymous mmap: page-aligned, committed lazily), so the cache's byte
budget is a hard bound and nothing is allocated per token. Filesystems that refuse O_DIRECT (tmpfs,
some network filesystems) get buffered reads followed by POSIX_FADV_DONTNEED, and one notice.
"""

from __future__ import annotations

import errno
import mmap
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import xxhash

from ..errors import ChecksumError, ExpertReadError
from ..layout.constants import ALIGNMENT
from ..layout.reader import Layout
from .cache import LoadCancelled

# pread-like: (fd, buffer view, offset) -> bytes read. Tests inject faults through this seam.
ReadFn = Callable[[int, memoryview, int], int]
# One expert is read as several chunks in flight: the disk wants queue depth > 1. A small expert
# (Qwen3-MoE: 2.65 MB in q4_0) is then one read; splitting it further did not measurably help on our
# disk (docs/BENCHMARKS.md, "Small experts"), so `chunk_bytes` is only an option.
CHUNK = 4 << 20


def _preadv(fd: int, view: memoryview, offset: int) -> int:
    return os.preadv(fd, [view], offset)


class ExpertStore:
    def __init__(self, layout: Layout, n_slots: int, *, direct: bool = True, verify: bool = True,
                 retries: int = 3, io_depth: int = 8, read_fn: ReadFn = _preadv,
                 notice: Callable[[str], None] | None = None, chunk_bytes: int | None = None) -> None:
        self.layout = layout
        self.manifest = layout.manifest
        self.slot_bytes = max(e.nbytes for e in self.manifest.experts)
        if n_slots < 1:
            raise ValueError("the store needs at least one slot")
        self.n_slots = n_slots
        self.arena = mmap.mmap(-1, n_slots * self.slot_bytes)
        self.buffers = [  # (slot_bytes,) uint8 each, 4 KiB-aligned
            np.frombuffer(self.arena, np.uint8, self.slot_bytes, i * self.slot_bytes) for i in range(n_slots)
        ]
        self.want_direct, self.verify, self.retries, self.read_fn = direct, verify, retries, read_fn
        self.notice = notice or (lambda msg: print(f"mertools: {msg}", file=sys.stderr))
        self.o_direct: bool | None = None  # known after the first open
        self._fds: dict[str, int] = {}
        self._fd_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=io_depth, thread_name_prefix="mertools-read")
        if chunk_bytes is not None and (chunk_bytes <= 0 or chunk_bytes % ALIGNMENT):
            raise ValueError(f"chunk_bytes must be a positive multiple of {ALIGNMENT}, got {chunk_bytes}")
        self.io_depth, self.chunk_bytes = io_depth, chunk_bytes
        self._stat_lock = threading.Lock()
        self.bytes_read = 0
        self.read_seconds: list[float] = []  # per expert load
        self.retried = 0

    # ------------------------------------------------------------------ files
    def _open(self, rel: str) -> int:
        with self._fd_lock:
            fd = self._fds.get(rel)
            if fd is not None:
                return fd
            path = self.layout.root / rel
            fd = -1
            if self.want_direct and self.o_direct is not False:
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
                    self.o_direct = True
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise ExpertReadError(f"{path}: cannot open ({e.strerror})") from None
                    self.o_direct = False
                    self.notice(f"{self.layout.root}: the filesystem refuses O_DIRECT; using buffered reads "
                                "with POSIX_FADV_DONTNEED (the page cache is not used as a second cache)")
            if fd < 0:
                if self.o_direct is None:
                    self.o_direct = False
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError as e:
                    raise ExpertReadError(f"{path}: cannot open ({e.strerror})") from None
            self._fds[rel] = fd
            return fd

    def fd_flags(self, rel: str) -> int:
        """fcntl flags of the descriptor the store reads `rel` with (tests check O_DIRECT on it)."""
        import fcntl

        return fcntl.fcntl(self._open(rel), fcntl.F_GETFL)

    def _forget(self, rel: str) -> None:
        with self._fd_lock:
            fd = self._fds.pop(rel, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        with self._fd_lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    # ------------------------------------------------------------------ reads
    def _read_range(self, fd: int, buf: memoryview, offset: int) -> None:
        done = 0
        while done < len(buf):
            got = self.read_fn(fd, buf[done:], offset + done)
            if got <= 0:
                raise OSError(errno.EIO, f"short read: {done + max(got, 0)} of {len(buf)} bytes at offset {offset}")
            if got % ALIGNMENT and done + got < len(buf) and self.o_direct:
                # O_DIRECT needs aligned continuations; a short unaligned read means the file changed
                raise OSError(errno.EIO, f"unaligned short read of {got} bytes at offset {offset + done}")
            done += got

    def _read_chunk(self, fd: int, buf: memoryview, offset: int, cancel: threading.Event | None) -> int:
        """One chunk of a load; skipped (0 bytes) once the load is cancelled."""
        if cancel is not None and cancel.is_set():
            return 0
        self._read_range(fd, buf, offset)
        return len(buf)

    def load(self, key: tuple[int, int], slot: int, cancel: threading.Event | None = None) -> None:
        """Read expert `key` into `slot`, verify its xxh3, retry a bounded number of times. A speculative
        load can be called off with `cancel`: chunks not yet started are skipped and LoadCancelled
        raised, so a wrong guess costs the disk only what was read before the routing proved it wrong."""
        layer, expert = key
        entry = self.manifest.expert(layer, expert)
        view = memoryview(self.buffers[slot])[: entry.nbytes]
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            t0 = time.perf_counter()
            try:
                fd = self._open(entry.file)
                step = self.chunk_size(entry.nbytes)
                chunks = [(o, min(step, entry.nbytes - o)) for o in range(0, entry.nbytes, step)]
                if len(chunks) == 1:
                    self._read_range(fd, view, 0)
                else:
                    futures = [self._pool.submit(self._read_chunk, fd, view[o:o + n], o, cancel) for o, n in chunks]
                    done = sum(f.result() for f in futures)
                    if done < entry.nbytes:  # called off: count what the disk really delivered
                        with self._stat_lock:
                            self.bytes_read += done
                        raise LoadCancelled(key)
                if self.o_direct is False:
                    os.posix_fadvise(fd, 0, entry.nbytes, os.POSIX_FADV_DONTNEED)
                if self.verify and xxhash.xxh3_64(view).hexdigest() != entry.xxh3:
                    raise ChecksumError(
                        f"{self.layout.root / entry.file}: layer {layer} expert {expert}: xxh3 "
                        f"{xxhash.xxh3_64(view).hexdigest()} differs from the manifest's {entry.xxh3}"
                    )
            except (OSError, ChecksumError, ExpertReadError) as e:
                last = e
                self._forget(entry.file)  # reopen: the file may have been replaced
                if attempt < self.retries:
                    with self._stat_lock:
                        self.retried += 1
                    time.sleep(0.01 * 2**attempt)
                continue
            with self._stat_lock:
                self.bytes_read += entry.nbytes
                self.read_seconds.append(time.perf_counter() - t0)
            return
        path = self.layout.root / entry.file
        if isinstance(last, ChecksumError):
            raise last
        detail = last.strerror if isinstance(last, OSError) and last.strerror else str(last)
        raise ExpertReadError(
            f"{path}: layer {layer} expert {expert}: read failed after {self.retries + 1} attempts ({detail})"
        )

    def chunk_size(self, nbytes: int) -> int:
        """Bytes per read of an expert file of `nbytes` (the same for every file today)."""
        return self.chunk_bytes or CHUNK

    def tensor(self, slot: int, key: tuple[int, int], role: str) -> np.ndarray:
        """View (no copy) of one tensor's bytes in a loaded slot: uint8 (nbytes,)."""
        t = self.manifest.expert(*key).tensors[role]
        return self.buffers[slot][t.offset:t.offset + t.nbytes]
