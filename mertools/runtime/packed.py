"""Packed copies: a layout's experts and dense matrices as the 8-bit kernels take them, kept in files beside the layout
(`LAYOUT/packed/<format>/`), so that a later process maps them from the page cache instead of reading and packing
them again: a second run starts as mmap readers do, with nothing to copy, pack or fault in.

Each copy is one file: a 4 KiB header (magic, then JSON: the pack format, the xxh3 of the source bytes it was packed
from, the xxh3 and size of the packed bytes) and the packed bytes from offset 4096. A copy is used only when its
header names the manifest's checksum of its source and the format of this checkout's packing code (a hash of the
sources that define it: any edit to them makes every copy stale), and, when the engine verifies, when the xxh3 of the
mapped bytes matches the header; otherwise it is ignored and written anew. Copies are written whole to a temporary
name and renamed (two processes writing at once leave one of theirs, never a torn file), never into the last
`RESERVE` bytes of the disk; a directory that cannot be written turns them off with one notice.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from .mapped import map_file

DIR = "packed"
MAGIC = b"mertools-packed\n"
HEADER = 4096  # the packed bytes start on a page, so they map as they are
RESERVE = 1 << 30  # free disk a copy never takes
DENSE_COPY = "dense.bin"  # the dense arena's copy (model.py); experts' copies take their files' names


ENV = "MERTOOLS_PACKED_COPIES"  # "0" / "off": no copies unless Engine.open asks (the CLI's --packed-copies)


def copies_wanted() -> bool:
    """Engine.open's default: on unless the environment turns copies off."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "off", "no", "false")


@functools.cache
def pack_format() -> str:
    """The packing code's identity: the 8-bit kernels' packed layouts are defined by these sources (int8.py's group
    packing, _k8packed.py's K types, simd8x.py's copies) and each packed type's `Int8Pack` spec."""
    from ..dtypes import DTYPES, _k8packed
    from ..kernels import int8, simd8x

    specs = sorted((name, dt.int8_pack) for name, dt in DTYPES.items() if dt.int8_pack is not None)
    return format_of([Path(m.__file__) for m in (int8, _k8packed, simd8x)], repr(specs))


def format_of(sources: list[Path], specs: str) -> str:
    """`pack_format` of these source files' bytes and the packed types' specs."""
    h = xxhash.xxh3_64()
    for path in sources:
        h.update(path.read_bytes())
    h.update(specs.encode())
    return f"int8-{h.hexdigest()}"


def dense_source(manifest: Any) -> str:  # noqa: ANN401 - a Manifest
    """What a dense arena is packed from: every dense tensor's name, type, shape and checksum."""
    h = xxhash.xxh3_64()
    for name, t in sorted(manifest.dense.items()):
        h.update(f"{name}:{t.dtype}:{list(t.shape)}:{t.xxh3};".encode())
    return h.hexdigest()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def lowest_priority() -> None:
    """The calling thread at nice 19: it runs when the compute leaves a core idle (Linux: a thread's own niceness)."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


@dataclass(frozen=True)
class Header:
    format: str
    source: str  # xxh3 of the bytes this copy was packed from (the manifest's)
    xxh3: str  # of the packed bytes
    nbytes: int
    plan: str = ""  # the dense arena's: the pieces it holds, where (DenseArena.plan)

    def encode(self) -> bytes:
        body = MAGIC + json.dumps(self.__dict__, sort_keys=True).encode() + b"\n"
        if len(body) > HEADER:
            raise ValueError(f"packed copy header of {len(body)} bytes exceeds {HEADER}")
        return body.ljust(HEADER, b"\0")

    @classmethod
    def decode(cls, raw: bytes) -> Header | None:
        """The header in `raw` (a file's first HEADER bytes), or None for anything else."""
        if len(raw) < HEADER or not raw.startswith(MAGIC):
            return None
        try:
            d = json.loads(raw[len(MAGIC):].split(b"\n", 1)[0])
            return cls(str(d["format"]), str(d["source"]), str(d["xxh3"]), int(d["nbytes"]), str(d.get("plan", "")))
        except (ValueError, KeyError, TypeError):
            return None


@dataclass(frozen=True)
class Copy:
    data: np.ndarray  # uint8 (nbytes,): the packed bytes, mapped read-only
    plan: str


class PackedCopies:
    """The packed copies of one layout for one pack format. `open` maps a valid copy (or returns None), `write` keeps
    one; both are safe from several threads."""

    def __init__(self, root: Path, fmt: str, *, notice: Callable[[str], None] | None = None,
                 reserve: int = RESERVE) -> None:
        self.root, self.format, self.reserve = root, fmt, reserve
        self.notice = notice or (lambda msg: print(f"mertools: {msg}", file=sys.stderr))
        self.writable = True  # until a write fails or the disk runs short: then off for this process, said once
        self._lock = threading.Lock()
        self.mapped = self.written = self.refused = 0  # copies mapped, written, found stale or corrupt
        self.queued = 0  # copies `keep` was given: written, or being written until `close`
        self._pruned = False
        self._writer: ThreadPoolExecutor | None = None  # `keep`'s

    @classmethod
    def of(cls, layout_root: Path, *, notice: Callable[[str], None] | None = None,
           reserve: int = RESERVE) -> PackedCopies:
        fmt = pack_format()
        return cls(layout_root / DIR / fmt, fmt, notice=notice, reserve=reserve)

    def any(self) -> bool:
        """Whether any copy of this format exists (a first run's engine has none to map)."""
        try:
            with os.scandir(self.root) as it:
                return next(it, None) is not None
        except OSError:
            return False

    def path(self, rel: str) -> Path:
        return self.root / rel

    def open(self, rel: str, source: str, nbytes: int, verify: bool) -> Copy | None:
        """The packed bytes of `rel` (uint8 (nbytes,), read-only pages of the page cache) if a copy packed from
        `source` in this format exists and, with `verify`, its bytes match its header's xxh3; else None."""
        try:
            fd = os.open(self.path(rel), os.O_RDONLY)
        except OSError:
            return None
        try:
            header = Header.decode(os.pread(fd, HEADER, 0))
            if header is None or (header.format, header.source, header.nbytes) != (self.format, source, nbytes):
                self._refuse()
                return None
            view = map_file(fd, nbytes, offset=HEADER)
        except OSError:
            self._refuse()
            return None
        finally:
            os.close(fd)
        if verify and xxhash.xxh3_64(view).hexdigest() != header.xxh3:
            self._refuse()
            return None
        with self._lock:
            self.mapped += 1
        return Copy(view, header.plan)

    def _refuse(self) -> None:
        with self._lock:
            self.refused += 1

    def keep(self, rel: str, source: str, data: np.ndarray, plan: str = "") -> None:
        """`write` on a thread of its own at the lowest priority, so that the run's compute keeps the cores (a first
        run would otherwise wait ~1 s per GB here: writes into the page cache ran at 0.3-1.4 GB/s); `close` waits for
        what is queued. `data` must stay as it is: its xxh3, taken now, is checked again once written (a slot the cache
        reused meanwhile is not kept)."""
        if not self.writable:
            return
        expect = xxhash.xxh3_64(data).hexdigest()
        with self._lock:
            if self._writer is None:
                self._writer = ThreadPoolExecutor(1, thread_name_prefix="mertools-copies", initializer=lowest_priority)
            self._writer.submit(self.write, rel, source, data, plan, expect)
            self.queued += 1

    def close(self) -> None:
        """Wait for the copies `keep` queued."""
        with self._lock:
            writer, self._writer = self._writer, None
        if writer is not None:
            writer.shutdown(wait=True)

    def prune(self) -> None:
        """Remove what no run of this code will map: other pack formats' directories beside this one (an upgrade's
        leftovers) and temporary files of processes that are gone (killed mid-write). Once per process, at its first
        write."""
        with self._lock:
            if self._pruned:
                return
            self._pruned = True
        with contextlib.suppress(OSError):
            for other in self.root.parent.iterdir():
                if other.name.startswith("int8-") and other.name != self.root.name and other.is_dir():
                    shutil.rmtree(other, ignore_errors=True)
        for tmp in self.root.rglob("*.tmp*"):
            pid = tmp.name.rpartition(".tmp")[2].partition(".")[0]
            if pid.isdigit() and not _alive(int(pid)):
                with contextlib.suppress(OSError):
                    tmp.unlink()

    def write(self, rel: str, source: str, data: np.ndarray, plan: str = "", expect: str | None = None) -> None:
        """Keep `data` (the packed bytes of `rel`, packed from `source`) as its copy: whole or not at all; with
        `expect`, only if data's xxh3 is still that once written."""
        if not self.writable:
            return
        path = self.path(rel)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}.{threading.get_ident()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.prune()
            if shutil.disk_usage(path.parent).free < data.nbytes + HEADER + self.reserve:
                self._stop(f"{path.parent}: fewer than {(data.nbytes + HEADER + self.reserve) / 2**30:.1f} GiB free")
                return
            header = Header(self.format, source, expect or xxhash.xxh3_64(data).hexdigest(), data.nbytes, plan)
            with open(tmp, "wb") as f:
                f.write(header.encode())
                f.write(memoryview(data))
            if expect is not None and xxhash.xxh3_64(data).hexdigest() != expect:
                tmp.unlink()
                return
            os.replace(tmp, path)
        except OSError as e:
            with contextlib.suppress(OSError):  # nothing to remove where the directory could not be made
                tmp.unlink()
            self._stop(f"{e.filename or path}: {e.strerror or e}")
            return
        with self._lock:
            self.written += 1

    def _stop(self, why: str) -> None:
        with self._lock:
            if not self.writable:
                return
            self.writable = False
        self.notice(f"packed copies are not kept ({why}); every run packs its experts after reading them")
