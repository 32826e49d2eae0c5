"""Validating layout reader: the manifest is checked against the schema and against the files
on disk before anything else reads a byte of tensor data."""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import LayoutError
from .buffers import page_aligned
from .checksum import range_xxh3
from .constants import MANIFEST_NAME
from .manifest import ExpertEntry, Manifest, ManifestError, TensorEntry
from .writer import PARTIAL_MARKER

# A manifest of the largest MoE models (thousands of expert files) is a few MB; beyond this it is hostile or broken.
MAX_MANIFEST_BYTES = 64 << 20


@dataclass(frozen=True)
class ChecksumProblem:
    what: str  # e.g. "expert (layer 3, expert 5) gate" or "file dense.bin"
    file: str
    expected: str
    actual: str

    def __str__(self) -> str:
        return f"{self.what} in {self.file}: xxh3 {self.actual}, manifest says {self.expected}"


def read_manifest_json(root: Path) -> object:
    """The manifest's JSON; LayoutError when there is none or it is not JSON (not a layout at all)."""
    mpath = root / MANIFEST_NAME
    if not root.is_dir():
        raise LayoutError(f"{root}: not a directory (a layout is a directory holding {MANIFEST_NAME})")
    if (root / PARTIAL_MARKER).exists():
        raise LayoutError(f"{root}: holds {PARTIAL_MARKER}: an interrupted conversion, not a layout; run convert again")
    try:
        # O_NONBLOCK: a FIFO planted as the manifest must not block the open; fstat then refuses it
        fd = os.open(mpath, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        raise LayoutError(f"{mpath}: missing; {root} is not a mertools layout") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # /dev/zero behind a symlink would never end
            raise LayoutError(f"{mpath}: not a regular file")
        real_root = os.path.realpath(root)
        if os.path.commonpath([real_root, os.path.realpath(mpath)]) != real_root:
            raise LayoutError(f"{mpath}: resolves to {os.path.realpath(mpath)}, outside the layout {real_root}")
        if st.st_size > MAX_MANIFEST_BYTES:
            raise LayoutError(f"{mpath}: {st.st_size} bytes is larger than any real manifest ({MAX_MANIFEST_BYTES})")
        with os.fdopen(os.dup(fd), "rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)  # bounded even if the file grows under us
    except OSError as e:
        raise LayoutError(f"{mpath}: cannot read ({e.strerror})") from None
    finally:
        os.close(fd)
    if len(raw) > MAX_MANIFEST_BYTES:
        raise LayoutError(f"{mpath}: larger than any real manifest ({MAX_MANIFEST_BYTES} bytes)")
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise LayoutError(f"{mpath}: not valid UTF-8 JSON ({e})") from None


def _load_manifest(root: Path) -> Manifest:
    data = read_manifest_json(root)
    try:
        return Manifest.from_dict(data)
    except (ManifestError, RecursionError) as e:
        raise LayoutError(f"{root / MANIFEST_NAME}: {e}") from None


class Layout:
    def __init__(self, root: Path, manifest: Manifest) -> None:
        self.root = root
        self.manifest = manifest

    @property
    def config(self):  # noqa: ANN201 - ModelConfig
        return self.manifest.config

    @classmethod
    def open(cls, path: str | Path) -> Layout:
        root = Path(path)
        layout = cls(root, _load_manifest(root))
        layout._check_files()
        return layout

    def path(self, rel: str) -> Path:
        return self.root / rel

    def _check_files(self) -> None:
        problems = self.file_problems()
        if problems:
            raise LayoutError(problems[0])

    def file_problems(self) -> list[str]:
        """Every file the manifest names must be a regular file inside the layout with the stated
        size; one message per file that is not (each naming the file)."""
        real_root = os.path.realpath(self.root)
        want = {p: f.nbytes for p, f in self.manifest.files.items()}
        want.update({e.file: e.nbytes for e in self.manifest.experts})
        want.update({e.file: e.nbytes for e in self.manifest.standins})
        problems = []
        for rel, nbytes in want.items():
            full = self.root / rel
            real = os.path.realpath(full)
            if os.path.commonpath([real_root, real]) != real_root:
                problems.append(f"{full}: resolves to {real}, outside the layout {real_root}")
                continue
            try:
                st = os.stat(real)
            except OSError:
                problems.append(f"{full}: missing (listed in {MANIFEST_NAME})")
                continue
            if not stat.S_ISREG(st.st_mode):
                problems.append(f"{full}: not a regular file")
            elif st.st_size != nbytes:
                problems.append(f"{full}: {st.st_size} bytes, {MANIFEST_NAME} says {nbytes} (truncated or replaced?)")
        return problems

    @classmethod
    def open_unchecked(cls, path: str | Path) -> Layout:
        """Parse and validate the manifest but not the files (for `verify`, which reports them all)."""
        layout = cls.__new__(cls)
        layout.root = Path(path)
        layout.manifest = _load_manifest(layout.root)
        return layout

    # ------------------------------------------------------------ reading tensors
    def read_tensor(self, file: str, entry: TensorEntry, out: np.ndarray | None = None) -> np.ndarray:
        """Raw bytes of one tensor (uint8, flat; into `out`, uint8 of its size, if given), read with plain pread.
        The runtime's expert store reads with O_DIRECT instead; this is for conversion checks, inspection and dense
        loading."""
        path = self.root / file
        if out is not None and (out.dtype != np.uint8 or out.size != entry.nbytes or not out.flags.c_contiguous):
            raise ValueError(f"{path}: a buffer for {entry.nbytes} bytes must be uint8 C of that size, got "
                             f"{out.dtype} {out.shape}")
        fd = os.open(path, os.O_RDONLY)
        try:
            buf = page_aligned(entry.nbytes) if out is None else out.reshape(-1)
            got = os.preadv(fd, [buf], entry.offset)
        finally:
            os.close(fd)
        if got != entry.nbytes:
            raise LayoutError(f"{path}: short read of {got} of {entry.nbytes} bytes at offset {entry.offset}")
        return buf

    def read_dense(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
        try:
            entry = self.manifest.dense[name]
        except KeyError:
            raise LayoutError(f"{self.root / MANIFEST_NAME}: no dense tensor {name!r}") from None
        return self.read_tensor(entry.file, entry, out)

    def read_expert(self, layer: int, expert: int, role: str) -> np.ndarray:
        e = self.manifest.expert(layer, expert)
        return self.read_tensor(e.file, e.tensors[role])

    # ------------------------------------------------------------ checksums
    def checksum_jobs(self) -> list[tuple[str, str, int, int, str]]:
        """(what, file, offset, nbytes, expected xxh3) for every file and every tensor."""
        jobs: list[tuple[str, str, int, int, str]] = []
        for rel, f in self.manifest.files.items():
            jobs.append((f"file {rel}", rel, 0, f.nbytes, f.xxh3))
        for name, t in self.manifest.dense.items():
            jobs.append((f"dense tensor {name}", t.file, t.offset, t.nbytes, t.xxh3))
        for kind, entries in (("expert", self.manifest.experts), ("stand-in", self.manifest.standins)):
            for e in entries:
                jobs.extend(_expert_jobs(kind, e))
        return jobs

    def verify_checksums(self) -> list[ChecksumProblem]:
        problems = []
        for what, rel, offset, nbytes, expected in self.checksum_jobs():
            fd = os.open(self.root / rel, os.O_RDONLY)
            try:
                actual = range_xxh3(fd, offset, nbytes)
            except EOFError as e:
                actual = f"unreadable ({e})"
            finally:
                os.close(fd)
            if actual != expected:
                problems.append(ChecksumProblem(what, rel, expected, actual))
        return problems


def _expert_jobs(kind: str, e: ExpertEntry) -> list[tuple[str, str, int, int, str]]:
    """Layout.checksum_jobs' entries of one expert (or stand-in) file: the file, then each tensor."""
    where = f"{kind} (layer {e.layer}, expert {e.expert})"
    return [(f"{where} file", e.file, 0, e.nbytes, e.xxh3),
            *((f"{where} {role}", e.file, t.offset, t.nbytes, t.xxh3) for role, t in e.tensors.items())]
