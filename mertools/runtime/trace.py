"""Routing traces: one JSON line per (position, layer), zstd-compressed, for cache/prefetch studies and `mertools plot`.

A routing record is {"token", "layer", "experts", "weights", "t"} and, when the writer follows an expert cache,
"held": per chosen expert 1 if a lookup at routing time would count as a hit. A writer that follows a store ends the
trace with one {"kind": "reads", ...} record: the store's read-latency histogram and bytes read. Older traces have only
the first four fields of routing records: readers take the fields they find and skip records without "experts".
"""

from __future__ import annotations

import codecs
import io
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import zstandard

from .stats import BOUNDS

if TYPE_CHECKING:
    from .cache import ExpertCache
    from .store import ExpertStore


class TraceWriter:
    """Callable as the model's trace hook: (positions (n,), layer, experts (n, k), weights (n, k))."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._raw = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._z = zstandard.ZstdCompressor(level=3).stream_writer(self._raw)
        self._text = io.TextIOWrapper(self._z, encoding="utf-8")
        self.records = 0
        self._t0 = time.perf_counter()
        self._cache: ExpertCache | None = None
        self._store: ExpertStore | None = None
        self._closed = False

    def follow(self, cache: ExpertCache, store: ExpertStore) -> None:
        """Record, from now on, which chosen experts `cache` holds at routing time ("held"), and `store`'s reads at
        close. Only for a cache that serves the lookups (not an expert-sharded engine's driver, which holds none)."""
        self._cache, self._store = cache, store

    def __call__(self, pos: np.ndarray, layer: int, chosen: np.ndarray, weights: np.ndarray) -> None:
        t = round(time.perf_counter() - self._t0, 6)  # one time per call: a batch's rows share it (a prefill chunk)
        # called before the step's lookups (moe.py `_observe`, fused.py): what the cache holds now is what they hit
        held = set(self._cache.held(layer)) if self._cache is not None else None
        for p, experts, w in zip(pos.tolist(), chosen.tolist(), weights.tolist(), strict=True):
            rec = {"token": p, "layer": layer, "experts": experts, "weights": [round(x, 6) for x in w], "t": t}
            if held is not None:
                rec["held"] = [int(e in held) for e in experts]
            self._text.write(json.dumps(rec) + "\n")
            self.records += 1

    def close(self) -> None:
        """Write the reads record (when following a store) and close the file; a second call does nothing."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._store is not None:
                s = self._store.read_latency.snapshot()
                self._text.write(json.dumps({
                    "kind": "reads", "t": round(time.perf_counter() - self._t0, 6), "bounds": list(BOUNDS),
                    "counts": list(s.counts), "count": s.count, "sum": s.sum,
                    "min": s.min if math.isfinite(s.min) else None,  # no reads: JSON has no infinity
                    "max": s.max, "bytes_read": self._store.bytes_read}) + "\n")
        finally:
            self._text.close()  # closes the zstd stream and the file


class TraceCutShort(ValueError):
    """A trace's zstd frame ends before its end mark: the process writing it died before closing it."""


def trace_lines(path: str | Path) -> Iterator[str]:
    """The decompressed lines of the trace at `path` (zstd frames one after the other), read as they come. Raises
    TraceCutShort for a frame that stops short (zstd's stream reader would just end there, quietly losing up to a
    whole block of records), zstandard.ZstdError for bytes that are no zstd, UnicodeDecodeError for text no UTF-8."""
    text = codecs.getincrementaldecoder("utf-8")()
    frame, fed, rest = zstandard.ZstdDecompressor().decompressobj(), False, ""
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            while chunk:
                rest += text.decode(frame.decompress(chunk))
                fed, chunk = True, b""
                if frame.eof:  # the frame is complete: what follows is another one
                    frame, fed, chunk = zstandard.ZstdDecompressor().decompressobj(), False, frame.unused_data
            *lines, rest = rest.split("\n")
            yield from lines
    if fed:
        raise TraceCutShort(f"{path}: the trace is cut short (its writer did not close it: the run was killed?)")
    rest += text.decode(b"", final=True)
    if rest:
        yield rest


def read_trace(path: str | Path) -> Iterator[dict]:
    """Every record as written, routing records and others ("kind"); see `routing_records`."""
    for line in trace_lines(path):
        if line.strip():
            yield json.loads(line)


def routing_records(path: str | Path) -> Iterator[dict]:
    """The routing records only (those with "experts"), skipping the others (the closing reads record)."""
    return (r for r in read_trace(path) if "experts" in r)


def routing_summary(records: list[dict], n_layers: int, n_experts: int) -> list[dict]:
    """Per layer: distinct experts used and the entropy (bits) of the expert-choice distribution."""
    counts = np.zeros((n_layers, n_experts))
    for r in records:
        if "experts" not in r:  # a trace's closing reads record
            continue
        for e in r["experts"]:
            counts[r["layer"], e] += 1
    out = []
    for layer in range(n_layers):
        c = counts[layer]
        p = c[c > 0] / c.sum() if c.sum() else np.zeros(0)
        out.append({"layer": layer, "distinct": int((c > 0).sum()), "entropy_bits": float(-(p * np.log2(p)).sum())})
    return out
