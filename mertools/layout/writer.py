"""Atomic layout writer: everything goes into `OUT.partial/`, the manifest last, then one rename.

A directory without `manifest.json` is never a layout, and the partial directory has another name,
so an interrupted conversion (Ctrl-C, SIGKILL, disk full) can never be mistaken for a valid one.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from ..errors import ConversionError
from .config import ModelConfig
from .constants import (
    ALIGNMENT,
    DENSE_FILE,
    DTYPES,
    EXPERTS_DIR,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    STANDINS_DIR,
    align_up,
)
from .manifest import ALL_EXPERT_ROLES, EXPERT_BIAS_ROLES, EXPERT_ROLES, ExpertEntry, FileEntry, Manifest, TensorEntry

PARTIAL_MARKER = ".mertools-partial"
_ZEROS = bytes(ALIGNMENT)


@dataclass(frozen=True)
class EncodedTensor:
    """Bytes of one tensor in a layout dtype, ready to be written."""

    data: np.ndarray  # uint8 (rows, row_bytes) or flat, C-contiguous
    dtype: str
    shape: tuple[int, ...]  # logical shape in weights, HF orientation (rows, cols)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}")
        want = DTYPES[self.dtype].nbytes(self.shape)
        if self.data.nbytes != want:
            raise ValueError(f"{self.dtype} {list(self.shape)} needs {want} bytes, got {self.data.nbytes}")


def expert_path(layer: int, expert: int) -> str:
    return f"{EXPERTS_DIR}/layer_{layer:03d}/expert_{expert:03d}.bin"


def standin_path(dtype: str, layer: int, expert: int) -> str:
    """Stand-ins of each dtype in a directory of their own: a new set is written beside the old and the
    manifest switched in one rename, so no reader ever sees a manifest naming half-written files."""
    return f"{STANDINS_DIR}/{dtype}/layer_{layer:03d}/expert_{expert:03d}.bin"


def is_layout_dir(path: Path) -> bool:
    try:
        return json.loads((path / MANIFEST_NAME).read_text()).get("format") == FORMAT_NAME
    except (OSError, ValueError, AttributeError):
        return False


class AlignedFile:
    """Appends tensors at 4 KiB-aligned offsets, hashing each tensor and the whole file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.pos = 0
        self.hash = xxhash.xxh3_64()

    def _write(self, data: bytes | memoryview) -> None:
        try:
            self.f.write(data)
        except OSError as e:  # ENOSPC, EIO: a write error has no filename of its own; give it ours
            raise OSError(e.errno, e.strerror, str(self.path)) from None
        self.hash.update(data)
        self.pos += len(data)

    def pad(self) -> None:
        n = align_up(self.pos) - self.pos
        if n:
            self._write(_ZEROS[:n])

    def add(self, t: EncodedTensor, file: str = "") -> TensorEntry:
        self.pad()
        offset = self.pos
        view = memoryview(np.ascontiguousarray(t.data)).cast("B")
        self._write(view)
        return TensorEntry(offset, len(view), t.dtype, tuple(t.shape), xxhash.xxh3_64(view).hexdigest(), file)

    def close(self) -> FileEntry:
        try:
            self.pad()
            self.f.flush()
            os.fsync(self.f.fileno())
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(self.path)) from None
        finally:
            self.f.close()
        return FileEntry(self.pos, self.hash.hexdigest())


class LayoutWriter:
    """Use as a context manager; call `commit()` at the end. Any exception (or KeyboardInterrupt)
    before the commit removes the partial directory."""

    def __init__(self, out: str | Path, *, force: bool = False) -> None:
        self.out = Path(out)
        self.partial = self.out.with_name(self.out.name + ".partial")
        self.force = force
        self._dense: AlignedFile | None = None
        self._dense_entries: dict[str, TensorEntry] = {}
        self._experts: dict[tuple[int, int], ExpertEntry] = {}
        self._files: dict[str, FileEntry] = {}
        self.bytes_written = 0

    # -------------------------------------------------------------- lifecycle
    def __enter__(self) -> LayoutWriter:
        if (self.out / PARTIAL_MARKER).exists() and not self.out.is_symlink():
            # killed between the final rename and the marker's removal: our own leftover, never a layout
            shutil.rmtree(self.out)
        if self.out.exists() or self.out.is_symlink():
            if not self.force:
                raise ConversionError(f"{self.out}: output exists; pass --force to replace it")
            if not (self.out.is_dir() and (is_layout_dir(self.out) or not any(self.out.iterdir()))):
                raise ConversionError(f"{self.out}: exists and is not a mertools layout; not replacing it even with --force")
        if self.partial.exists():
            # a leftover of an interrupted run of ours (it carries the marker) is safe to remove
            if not (self.partial / PARTIAL_MARKER).exists():
                raise ConversionError(f"{self.partial}: exists and was not made by mertools; remove it first")
            shutil.rmtree(self.partial)
        try:
            self.partial.mkdir(parents=True)
            (self.partial / PARTIAL_MARKER).write_text(f"{os.getpid()}\n")
        except OSError as e:
            self.__exit__(OSError, e, None)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()
            if isinstance(exc, OSError):
                # disk full, read-only or failing target: one clear line, and nothing left behind
                where = exc.filename or self.partial
                raise ConversionError(
                    f"{where}: cannot write ({exc.strerror or exc}); {self.out} was not written and "
                    f"{self.partial.name} was removed"
                ) from None

    def abort(self) -> None:
        if self._dense is not None and not self._dense.f.closed:
            self._dense.f.close()
        shutil.rmtree(self.partial, ignore_errors=True)

    # -------------------------------------------------------------- content
    def write_expert(self, layer: int, expert: int, tensors: dict[str, EncodedTensor]) -> ExpertEntry:
        roles = ALL_EXPERT_ROLES if len(tensors) > len(EXPERT_ROLES) else EXPERT_ROLES  # with biases or without
        if sorted(tensors) != sorted(roles):
            raise ValueError(f"expert tensors must be {EXPERT_ROLES} (and {EXPERT_BIAS_ROLES}), got {sorted(tensors)}")
        rel = expert_path(layer, expert)
        f = AlignedFile(self.partial / rel)
        try:
            entries = {role: f.add(tensors[role]) for role in roles}
        finally:
            fe = f.close()
        entry = ExpertEntry(layer, expert, rel, fe.nbytes, fe.xxh3, entries)
        self._experts[(layer, expert)] = entry
        self.bytes_written += fe.nbytes
        return entry

    def write_dense(self, name: str, t: EncodedTensor) -> TensorEntry:
        if name in self._dense_entries:
            raise ValueError(f"dense tensor {name!r} written twice")
        if self._dense is None:
            self._dense = AlignedFile(self.partial / DENSE_FILE)
        entry = self._dense.add(t, DENSE_FILE)
        self._dense_entries[name] = entry
        return entry

    def add_file(self, rel: str, data: bytes) -> None:
        """A small auxiliary file (tokenizer), checksummed in the manifest."""
        path = self.partial / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self._files[rel] = FileEntry(len(data), xxhash.xxh3_64(data).hexdigest())
        self.bytes_written += len(data)

    def commit(self, config: ModelConfig, tokenizer: dict[str, Any], source: dict[str, Any]) -> Manifest:
        if self._dense is not None:
            self._files[DENSE_FILE] = fe = self._dense.close()
            self.bytes_written += fe.nbytes
        want = [(la, e) for la in config.expert_layers for e in range(config.n_experts)]
        missing = [k for k in want if k not in self._experts]
        if missing:
            raise ConversionError(f"{self.out}: experts {missing[:4]} were never written")
        manifest = Manifest(
            arch=config.arch, config=config, tokenizer=tokenizer, dense=self._dense_entries,
            experts=[self._experts[k] for k in want], files=self._files, source=source,
            version=FORMAT_VERSION if config.uses_extensions else 1,  # a layout that needs no version-2 field stays version 1
        )
        extra = sorted(set(self._experts) - set(want))
        if extra:
            raise ConversionError(f"{self.out}: experts {extra[:4]} were written for layers that have none")
        write_manifest(self.partial, manifest)
        old = None
        if self.out.exists():
            old = self.out.with_name(f"{self.out.name}.old-{os.getpid()}")
            os.replace(self.out, old)
        os.replace(self.partial, self.out)
        # the marker goes last: a directory that still carries it is refused by every reader, so a kill
        # anywhere above leaves no layout (and the next run removes what is left)
        (self.out / PARTIAL_MARKER).unlink()
        _fsync_dir(self.out)
        _fsync_dir(self.out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return manifest


def write_manifest(root: Path, manifest: Manifest) -> None:
    """Replace root/manifest.json in one rename, after a round-trip through the parser: never publish a
    manifest our own reader would refuse, and never a half-written one."""
    Manifest.from_dict(json.loads(manifest.to_json()))
    tmp = root / (MANIFEST_NAME + ".tmp")
    with open(tmp, "w") as f:
        f.write(manifest.to_json())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / MANIFEST_NAME)
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
