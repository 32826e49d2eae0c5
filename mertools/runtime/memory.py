"""How much memory this process may use: MemAvailable, or a tighter cgroup (v1 or v2) limit."""

from __future__ import annotations

import functools
import os
import resource
from pathlib import Path
from typing import Any


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_room(proc: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Room left below this process's cgroup memory limit (v1 or v2), or None without one."""
    try:
        lines = proc.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        rel = rel.lstrip("/")
        if "memory" in controllers.split(","):  # cgroup v1
            mount, names = root / "memory", ("memory.limit_in_bytes", "memory.usage_in_bytes")
        elif controllers == "":  # cgroup v2
            mount, names = root, ("memory.max", "memory.current")
        else:
            continue
        base = mount / rel
        if not base.is_dir():  # a container sharing the host's cgroup namespace: the path is the host's, and the
            base = mount       # container's own group is what is mounted at the root
        limit, usage = _read_int(base / names[0]), _read_int(base / names[1])
        if limit is not None and limit < 1 << 60:
            return max(0, limit - (usage or 0))
    return None


def _field_kb(path: str, name: str) -> int | None:
    """`name:` of a /proc file that lists "Name: N kB" lines, in bytes; None if absent or unreadable."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def total_bytes() -> int:
    """The memory this process could ever have: MemTotal, or a tighter cgroup limit (what a cache may grow to)."""
    total = _field_kb("/proc/meminfo", "MemTotal")
    room = _cgroup_room()  # what is left below the limit: this process's own use is part of the usage
    if room is not None:
        room += rss_bytes()
    candidates = [x for x in (total, room) if x is not None]
    return min(candidates) if candidates else 2 << 30


def rss_bytes() -> int:
    """This process's resident set now (VmRSS), 0 where /proc cannot tell."""
    return _field_kb("/proc/self/status", "VmRSS") or 0


@functools.cache
def _libc() -> Any:  # noqa: ANN401 - a ctypes.CDLL, looked up once (find_library runs ldconfig: tenths of a second)
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)  # glibc's name first: no search
    except OSError:
        pass
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so", use_errno=True)
    except OSError:
        return None


def resident_bytes(address: int, length: int) -> int | None:
    """How many bytes of [address, address + length) (page-aligned, mapped by this process) are in memory now,
    by mincore(2); None where libc cannot be asked."""
    import ctypes

    libc = _libc()
    if libc is None:
        return None
    page = os.sysconf("SC_PAGE_SIZE")
    vec = (ctypes.c_ubyte * ((length + page - 1) // page))()
    if libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(length), vec) != 0:
        return None
    import numpy as np

    return int(np.count_nonzero(np.frombuffer(vec, np.uint8) & 1)) * page


def cached_shares(paths: list[Path]) -> list[tuple[int, float]]:
    """(size, share of it in the page cache now) of each file, by mincore(2) on a private mapping (no read, no
    readahead): what a process that maps them would find without touching the disk. Share 0.0 where it cannot be told."""
    import ctypes
    import mmap

    out = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                mm = mmap.mmap(f.fileno(), size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE) if size else None
        except (OSError, ValueError):
            out.append((0, 0.0))
            continue
        if mm is None:
            out.append((0, 0.0))
            continue
        try:
            view = (ctypes.c_char * size).from_buffer(mm)  # its address; private, so writable, and nothing is written
            got = resident_bytes(ctypes.addressof(view), size)
            del view  # the mapping cannot close while a view holds it
        finally:
            mm.close()
        out.append((size, min(got, size) / size if got else 0.0))
    return out


def available_bytes() -> int:
    avail = _field_kb("/proc/meminfo", "MemAvailable")
    room = _cgroup_room()
    candidates = [x for x in (avail, room) if x is not None]
    return min(candidates) if candidates else 2 << 30


def peak_rss_bytes() -> int:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux keeps ru_maxrss across execve, so a
    process started from a big parent (a test runner, a server) would report the parent's peak."""
    peak = _field_kb("/proc/self/status", "VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
