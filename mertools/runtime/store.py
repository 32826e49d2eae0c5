"""Expert store: reads whole expert files with O_DIRECT into page-aligned slots of one arena.

The arena is mapped once (anonymous mmap: page-aligned, committed lazily), so the cache's byte
budget is a hard bound and nothing is allocated per token. Filesystems that refuse O_DIRECT (tmpfs,
some network filesystems) get buffered reads followed by POSIX_FADV_DONTNEED, and one notice. Buffered
reads asked for (`direct=False, keep_pages=True`: a layout that fits in memory beside everything else)
keep their pages, so a second process starts warm, as mmap readers do. Mapped slots (`mapped=True`, `--io
mmap`: a layout that fits in memory) read nothing: a slot is the expert file's own page-cache pages, mapped
read-only, so there is no arena to fill and a second process finds the pages where the first left them.
"""

from __future__ import annotations

import errno
import mmap
import os
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np
import xxhash

from ..errors import ChecksumError, ExpertReadError
from ..layout.buffers import anonymous
from ..layout.constants import ALIGNMENT
from ..layout.manifest import ExpertEntry
from ..layout.reader import Layout
from .cache import LoadCancelled
from .mapped import map_file, populate
from .packed import PackedCopies
from .stats import LatencyHistogram

# pread-like: (fd, buffer view, offset) -> bytes read. Tests inject faults through this seam.
ReadFn = Callable[[int, memoryview, int], int]
# One expert is read as several chunks in flight: the disk wants queue depth > 1. An expert smaller
# than a chunk is one read; splitting it further is only an option (`chunk_bytes`): docs/BENCHMARKS.md,
# "Small experts", has the measurements.
CHUNK = 4 << 20
# descriptors kept open, least recently used closed first: a layout may hold more expert files than
# the process may open (RLIMIT_NOFILE), and reopening costs one open() per read of a closed file
MAX_OPEN_FILES = 256
PREFAULT_STEP = 2 << 20  # bytes faulted in per call by `prefault`


def _preadv(fd: int, view: memoryview, offset: int) -> int:
    return os.preadv(fd, [view], offset)


class ExpertStore:
    def __init__(self, layout: Layout, n_slots: int, *, direct: bool = True, keep_pages: bool = False, verify: bool = True,
                 retries: int = 3, io_depth: int = 8, read_fn: ReadFn = _preadv,
                 notice: Callable[[str], None] | None = None, chunk_bytes: int | None = None,
                 max_open_files: int = MAX_OPEN_FILES, entries: list[ExpertEntry] | None = None,
                 mapped: bool = False, prepare: Callable[[ExpertEntry, np.ndarray], None] | None = None,
                 capacity: int | None = None, copies: PackedCopies | None = None) -> None:
        self.layout = layout
        self.manifest = layout.manifest
        # the files this store reads: the experts, or their stand-ins (`entries`, manifest.standins)
        self.entries = {(e.layer, e.expert): e for e in (self.manifest.experts if entries is None else entries)}
        if not self.entries:
            raise ValueError("the store needs expert entries to read")
        self.slot_bytes = max(e.nbytes for e in self.entries.values())
        if n_slots < 1:
            raise ValueError("the store needs at least one slot")
        # the arena is reserved for `capacity` slots (address space only: a page costs memory when first written), so a
        # cache resized at run time (ExpertCache.resize) can grow into it; `discard` gives slots' memory back
        capacity = n_slots if capacity is None else capacity
        if capacity < n_slots:
            raise ValueError(f"capacity {capacity} is below the {n_slots} slots asked for")
        self.n_slots, self.capacity = n_slots, capacity
        self.mapped = mapped
        if mapped and prepare is not None:
            raise ValueError("a mapped slot is the file's own pages: it cannot be prepared (packed) in place")
        # applied to a slot's bytes once read and checked, before the load completes (the 8-bit kernels' packing)
        self.prepare = prepare
        if copies is not None and prepare is None:
            raise ValueError("packed copies hold prepared slots: the store needs `prepare` to keep them")
        # prepared slots kept as files (packed.py): a load maps an expert's copy where one is valid, else reads, packs
        # and writes it
        self.copies = copies
        # each slot's first byte's address, for compiled code that reaches every slot at once (runtime/fused.py)
        self.slot_addr = np.zeros(capacity, np.int64)
        if mapped:  # a slot is the mapping of the file loaded into it (empty until then)
            self.arena = self.arena_bytes = None
            self.buffers = [np.empty(0, np.uint8)] * capacity
        else:
            self.arena = anonymous(capacity * self.slot_bytes)
            self.arena_bytes = np.frombuffer(self.arena, np.uint8)  # every slot: kernels that take several at once
            self.buffers = [  # (slot_bytes,) uint8 each, 4 KiB-aligned
                np.frombuffer(self.arena, np.uint8, self.slot_bytes, i * self.slot_bytes) for i in range(capacity)
            ]
            self.slot_addr[:] = [b.ctypes.data for b in self.buffers]
        self._own = list(self.buffers)  # each slot's arena bytes, for a slot that held a packed copy's mapping
        direct = direct and not mapped
        self.want_direct, self.verify, self.retries, self.read_fn = direct, verify, retries, read_fn
        # buffered reads chosen (not forced by the filesystem) may leave their pages in the page cache, where the
        # next process finds them; a forced fallback drops them (the page cache is not a second cache)
        self.keep_pages = keep_pages and not direct
        self.notice = notice or (lambda msg: print(f"mertools: {msg}", file=sys.stderr))
        self.o_direct: bool | None = None  # known after the first open
        if max_open_files < 1:
            raise ValueError(f"max_open_files must be >= 1, got {max_open_files}")
        self.max_open_files = max_open_files
        self._fds: OrderedDict[str, int] = OrderedDict()  # least recently used first
        self._fd_users: dict[str, int] = {}  # files being read now: their descriptors are never closed
        self._fd_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=io_depth, thread_name_prefix="mertools-read")
        if chunk_bytes is not None and (chunk_bytes <= 0 or chunk_bytes % ALIGNMENT):
            raise ValueError(f"chunk_bytes must be a positive multiple of {ALIGNMENT}, got {chunk_bytes}")
        self.io_depth, self.chunk_bytes = io_depth, chunk_bytes
        self._stat_lock = threading.Lock()
        self.bytes_read = 0
        self.read_latency = LatencyHistogram()  # per complete expert load: fixed size, whatever the reads
        self.retried = 0
        self._closing = threading.Event()
        self._prefaulting: threading.Thread | None = None

    def discard(self, slots: list[int]) -> None:
        """Give the memory of slots the cache no longer uses back to the system (their contents are gone): the arena's
        pages dropped, mapped slots unmapped. The slots stay reserved and can be filled again."""
        for slot in slots:
            if self.arena is not None:
                self.arena.madvise(mmap.MADV_DONTNEED, slot * self.slot_bytes, self.slot_bytes)
                if hasattr(mmap, "MADV_NOHUGEPAGE"):  # else khugepaged may refill a 2 MiB page shared with a slot in use
                    self.arena.madvise(mmap.MADV_NOHUGEPAGE, slot * self.slot_bytes, self.slot_bytes)
            self._set(slot, self._own[slot])  # the last view of a mapping: unmapped with it

    def start_prefault(self, n_slots: int) -> None:
        """Fault in the arena's first `n_slots` slots on a thread of its own, one by one (`close` stops it): the cache
        fills slots from the first up, and a page's first touch is costly (zeroed; on a VM also faulted in by the
        host), so done on an idle core while the engine opens, the reads into them copy without faulting
        (docs/BENCHMARKS.md, "A second run right after a first"). Nothing for a mapped store."""
        if self.arena_bytes is not None and self._prefaulting is None:
            self._prefaulting = threading.Thread(target=self.prefault, args=(n_slots,), name="mertools-prefault")
            self._prefaulting.start()

    def prefault(self, n_slots: int) -> int:
        """`start_prefault`'s work, on the calling thread: the slots faulted in (fewer once `close` began, or none where
        the kernel lacks MADV_POPULATE_WRITE)."""
        base = self.arena_bytes.ctypes.data if self.arena_bytes is not None else 0
        for slot in range(n_slots):  # the cache's size read at each slot: `discard`ed slots stay given back
            if self._closing.is_set() or slot >= self.n_slots or not base:
                return slot
            # by 2 MiB: the call holds the process's mmap lock, which every other thread's mmap and munmap waits for
            for o in range(0, self.slot_bytes, PREFAULT_STEP):
                if not populate(base + slot * self.slot_bytes + o, min(PREFAULT_STEP, self.slot_bytes - o)):
                    return slot
        return n_slots

    def use_slots(self, n_slots: int) -> None:
        """The cache uses slots 0..n_slots-1 from now on (ExpertCache.resize): slots taken back after a `discard` ask
        for huge pages again."""
        if not 1 <= n_slots <= self.capacity:
            raise ValueError(f"the store holds 1 to {self.capacity} slots, not {n_slots}")
        if self.arena is not None and n_slots > self.n_slots and hasattr(mmap, "MADV_HUGEPAGE"):
            self.arena.madvise(mmap.MADV_HUGEPAGE, self.n_slots * self.slot_bytes, (n_slots - self.n_slots) * self.slot_bytes)
        self.n_slots = n_slots

    # ------------------------------------------------------------------ files
    def _open(self, rel: str) -> int:
        """A descriptor of `rel`, held until `_release(rel)`."""
        with self._fd_lock:
            fd = self._fds.get(rel)
            if fd is None:
                fd = self._open_new(rel)
                self._fds[rel] = fd
                self._close_idle()
            else:
                self._fds.move_to_end(rel)
            self._fd_users[rel] = self._fd_users.get(rel, 0) + 1
            return fd

    def _release(self, rel: str) -> None:
        with self._fd_lock:
            n = self._fd_users.pop(rel, 0) - 1
            if n > 0:
                self._fd_users[rel] = n
            self._close_idle()

    def _close_idle(self) -> None:
        """Under the lock: close least recently used descriptors nobody reads from, down to the bound."""
        if len(self._fds) <= self.max_open_files:
            return
        idle = [rel for rel in self._fds if rel not in self._fd_users]
        for rel in idle[:len(self._fds) - self.max_open_files]:
            os.close(self._fds.pop(rel))

    def _open_new(self, rel: str) -> int:
        """Under the lock: open `rel`, with O_DIRECT unless the filesystem refuses it."""
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
        return fd

    def fd_flags(self, rel: str) -> int:
        """fcntl flags of the descriptor the store reads `rel` with (tests check O_DIRECT on it)."""
        import fcntl

        try:
            return fcntl.fcntl(self._open(rel), fcntl.F_GETFL)
        finally:
            self._release(rel)

    def _forget(self, rel: str) -> None:
        with self._fd_lock:
            fd = self._fds.pop(rel, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        """Stop the readers, close the files, unmap mapped slots and give the arena's memory back now (views of it may
        outlive the store, as zeros: a server that switched layouts must not wait for the old engine's last reference)."""
        self._closing.set()
        if self._prefaulting is not None:
            self._prefaulting.join()  # no page faulted in after the memory is given back
        self._pool.shutdown(wait=True)
        if self.copies is not None:  # the packed copies still being written read the arena
            self.copies.close()
        if self.arena is not None:
            self.arena.madvise(mmap.MADV_DONTNEED)
        for slot in range(len(self.buffers)):  # mapped files and packed copies unmapped now, not when the engine is
            self._set(slot, self._own[slot])  # collected (their pages would stay pinned in the page cache until then)
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
        entry = self.entries[key]
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            t0 = time.perf_counter()
            try:
                if self.mapped:
                    self._map_once(key, entry, slot)
                elif self.copies is not None and (copy := self.copies.open(entry.file, entry.xxh3, entry.nbytes,
                                                                            self.verify)) is not None:
                    self._set(slot, copy.data)
                    self.read_latency.observe(time.perf_counter() - t0)
                    return
                else:
                    self._set(slot, self._own[slot])
                    self._read_once(key, entry, memoryview(self.buffers[slot])[: entry.nbytes], cancel)
                    if self.prepare is not None:
                        self.prepare(entry, self.buffers[slot])
                    if self.copies is not None:
                        self.copies.keep(entry.file, entry.xxh3, self.buffers[slot][:entry.nbytes])
            except (OSError, ChecksumError, ExpertReadError) as e:
                last = e
                self._forget(entry.file)  # reopen: the file may have been replaced
                if attempt < self.retries:
                    with self._stat_lock:
                        self.retried += 1
                    time.sleep(0.01 * 2**attempt)
                continue
            self.read_latency.observe(time.perf_counter() - t0)
            with self._stat_lock:
                self.bytes_read += entry.nbytes
            return
        path = self.layout.root / entry.file
        if isinstance(last, ChecksumError):
            raise last
        detail = last.strerror if isinstance(last, OSError) and last.strerror else str(last)
        raise ExpertReadError(
            f"{path}: layer {layer} expert {expert}: read failed after {self.retries + 1} attempts ({detail})"
        )

    def _read_once(self, key: tuple[int, int], entry: ExpertEntry, view: memoryview, cancel: threading.Event | None) -> None:
        """One attempt at a load: read every chunk, then check the xxh3."""
        fd = self._open(entry.file)
        try:
            step = self.chunk_size(entry.nbytes)
            chunks = [(o, min(step, entry.nbytes - o)) for o in range(0, entry.nbytes, step)]
            if len(chunks) == 1:
                self._read_range(fd, view, 0)
            else:
                futures = [self._pool.submit(self._read_chunk, fd, view[o:o + n], o, cancel) for o, n in chunks]
                wait(futures)  # no chunk may still use the descriptor or the slot once this attempt ends
                done = sum(f.result() for f in futures)
                if done < entry.nbytes:  # called off: count what the disk really delivered
                    with self._stat_lock:
                        self.bytes_read += done
                    raise LoadCancelled(key)
            if self.o_direct is False and not self.keep_pages:
                os.posix_fadvise(fd, 0, entry.nbytes, os.POSIX_FADV_DONTNEED)
            self._check(key, entry, view)
        finally:
            self._release(entry.file)

    def _map_once(self, key: tuple[int, int], entry: ExpertEntry, slot: int) -> None:
        """One attempt at a mapped load: map the file (the old mapping of the slot goes with its last view), check
        the xxh3 over the mapped pages."""
        fd = self._open(entry.file)
        try:
            view = map_file(fd, entry.nbytes)
        finally:
            self._release(entry.file)
        self._check(key, entry, view)
        self._set(slot, view)

    def _set(self, slot: int, buf: np.ndarray) -> None:
        """Slot `slot` is now `buf`: its arena bytes, a file's mapping, or empty."""
        self.buffers[slot] = buf
        self.slot_addr[slot] = buf.ctypes.data if buf.size else 0

    def _check(self, key: tuple[int, int], entry: ExpertEntry, view: memoryview | np.ndarray) -> None:
        if self.verify and (got := xxhash.xxh3_64(view).hexdigest()) != entry.xxh3:
            raise ChecksumError(f"{self.layout.root / entry.file}: layer {key[0]} expert {key[1]}: xxh3 {got} "
                                f"differs from the manifest's {entry.xxh3}")

    def chunk_size(self, nbytes: int) -> int:
        """Bytes per read of an expert file of `nbytes` (the same for every size, for now)."""
        return self.chunk_bytes or CHUNK

    def tensor(self, slot: int, key: tuple[int, int], role: str) -> np.ndarray:
        """View (no copy) of one tensor's bytes in a loaded slot: uint8 (nbytes,)."""
        t = self.entries[key].tensors[role]
        return self.buffers[slot][t.offset:t.offset + t.nbytes]
