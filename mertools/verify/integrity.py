"""Integrity of a layout: manifest schema, files, tensor bounds and alignment, dense shapes against
the architecture, and every xxh3 recomputed. Every failure is collected, not just the first."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash

from ..errors import LayoutError
from ..families import FAMILIES
from ..families.base import fmt, resolve_shape
from ..layout.constants import FORMAT_NAME, MANIFEST_NAME
from ..layout.reader import Layout, read_manifest_json

CHUNK = 8 << 20


@dataclass
class IntegrityReport:
    path: str
    problems: list[str] = field(default_factory=list)
    files_checked: int = 0
    tensors_checked: int = 0
    bytes_hashed: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def verdict(self) -> str:
        if self.ok:
            return (f"OK: {self.path} is intact ({self.files_checked} files, {self.tensors_checked} tensors, "
                    f"{self.bytes_hashed / 1e9:.2f} GB hashed in {self.seconds:.1f} s)")
        return f"FAILED: {self.path}: {len(self.problems)} problem(s)"

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "ok": self.ok, "problems": self.problems, "files_checked": self.files_checked,
                "tensors_checked": self.tensors_checked, "bytes_hashed": self.bytes_hashed,
                "seconds": round(self.seconds, 3)}


def _is_layout(root: Path) -> bool:
    """A directory whose manifest claims to be a mertools layout (else: unusable input, exit 2)."""
    data = read_manifest_json(root)  # raises LayoutError when there is no JSON manifest at all
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise LayoutError(f"{root / MANIFEST_NAME}: not a mertools layout manifest (format {FORMAT_NAME!r} expected)")
    return True


def dense_shape_problems(layout: Layout) -> list[str]:
    m = layout.manifest
    arch = FAMILIES.get(m.arch)
    if arch is None:
        return [f"{layout.root / MANIFEST_NAME}: unknown arch {m.arch!r} (known: {', '.join(FAMILIES)})"]
    problems = []
    want = {}
    for spec, layer in arch.dense_names(m.config):
        want[fmt(spec.name, layer)] = (spec, resolve_shape(spec.shape, m.config))
    for name, (spec, shape) in want.items():
        t = m.dense.get(name)
        if t is None:
            if not spec.optional:
                problems.append(f"{layout.root / MANIFEST_NAME}: dense tensor {name} is missing")
        elif tuple(t.shape) != shape:
            problems.append(
                f"{layout.root / t.file}: dense tensor {name} has shape {list(t.shape)}, config implies {list(shape)}"
            )
    for name in sorted(set(m.dense) - set(want)):
        problems.append(f"{layout.root / MANIFEST_NAME}: unexpected dense tensor {name} for arch {m.arch}")
    return problems


def _whole(what: str) -> bool:
    """Is this checksum job a whole file (rather than one tensor inside it)?"""
    return what.startswith("file ") or what.endswith(" file")


def _hash_file(root: Path, rel: str, ranges: list[tuple[str, int, int, str]], bar: Any) -> list[str]:
    """Hash a whole file once, checking the file's and each tensor's xxh3 on the way."""
    path = root / rel
    problems = []
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        return [f"{path}: cannot open ({e.strerror})"]
    try:
        for what, offset, nbytes, expected in ranges:
            h = xxhash.xxh3_64()
            pos, end = offset, offset + nbytes
            while pos < end:
                data = os.pread(fd, min(CHUNK, end - pos), pos)
                if not data:
                    break
                h.update(data)
                pos += len(data)
                if _whole(what):
                    bar.update(len(data))
            if pos < end:
                problems.append(f"{path}: {what}: file ends at byte {pos}, expected {end}")
            elif h.hexdigest() != expected:
                problems.append(f"{path}: {what}: xxh3 {h.hexdigest()}, manifest says {expected}")
    finally:
        os.close(fd)
    return problems


def check_integrity(path: str | Path, *, workers: int = 4, progress: bool = True) -> IntegrityReport:
    """LayoutError when `path` is not a layout at all; otherwise a report listing every problem."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    root = Path(path)
    report = IntegrityReport(str(root))
    _is_layout(root)
    try:
        layout = Layout.open_unchecked(root)
    except LayoutError as e:  # a layout manifest, but broken: schema, paths, bounds, overlaps, shapes
        report.problems.append(str(e))
        report.seconds = time.perf_counter() - t0
        return report
    report.problems += dense_shape_problems(layout)
    bad_files = layout.file_problems()
    report.problems += bad_files
    skip = {p.split(":", 1)[0] for p in bad_files}  # no point hashing a missing or escaping file
    by_file: dict[str, list[tuple[str, int, int, str]]] = {}
    for what, rel, offset, nbytes, expected in layout.checksum_jobs():
        if str(root / rel) not in skip:
            by_file.setdefault(rel, []).append((what, offset, nbytes, expected))
    total = sum(r[2] for ranges in by_file.values() for r in ranges if _whole(r[0]))
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="verify", disable=not progress,
              dynamic_ncols=True) as bar, ThreadPoolExecutor(max_workers=workers) as pool:
        # a file's whole-file hash comes first, so each file is read once from disk and its
        # tensors' ranges come from the page cache
        futures = {rel: pool.submit(_hash_file, root, rel, sorted(ranges, key=lambda r: not _whole(r[0])), bar)
                   for rel, ranges in by_file.items()}
        for rel in sorted(futures):
            report.problems += futures[rel].result()
    report.files_checked = len(by_file)
    report.tensors_checked = sum(1 for ranges in by_file.values() for r in ranges if not _whole(r[0]))
    report.bytes_hashed = total
    report.seconds = time.perf_counter() - t0
    return report
