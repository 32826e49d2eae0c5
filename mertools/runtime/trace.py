"""Routing traces: one JSON line per (position, layer), zstd-compressed, for cache/prefetch studies."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import zstandard


class TraceWriter:
    """Callable as the model's trace hook: (positions (n,), layer, experts (n, k), weights (n, k))."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._raw = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._z = zstandard.ZstdCompressor(level=3).stream_writer(self._raw)
        self._text = io.TextIOWrapper(self._z, encoding="utf-8")
        self.records = 0

    def __call__(self, pos: np.ndarray, layer: int, chosen: np.ndarray, weights: np.ndarray) -> None:
        for p, experts, w in zip(pos.tolist(), chosen.tolist(), weights.tolist(), strict=True):
            self._text.write(json.dumps({"token": p, "layer": layer, "experts": experts,
                                         "weights": [round(x, 6) for x in w]}) + "\n")
            self.records += 1

    def close(self) -> None:
        self._text.close()  # closes the zstd stream and the file


def read_trace(path: str | Path) -> Iterator[dict]:
    with open(path, "rb") as f, zstandard.ZstdDecompressor().stream_reader(f) as r:
        for line in io.TextIOWrapper(r, encoding="utf-8"):
            yield json.loads(line)


def routing_summary(records: list[dict], n_layers: int, n_experts: int) -> list[dict]:
    """Per layer: distinct experts used and the entropy (bits) of the expert-choice distribution."""
    counts = np.zeros((n_layers, n_experts))
    for r in records:
        for e in r["experts"]:
            counts[r["layer"], e] += 1
    out = []
    for layer in range(n_layers):
        c = counts[layer]
        p = c[c > 0] / c.sum() if c.sum() else np.zeros(0)
        out.append({"layer": layer, "distinct": int((c > 0).sum()), "entropy_bits": float(-(p * np.log2(p)).sum())})
    return out
