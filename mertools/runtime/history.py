"""Routing history, the learning cache: which experts a workload used, kept in a small file beside the layout,
so that a new process preloads them and its cache policy ranks them from the first token instead of
starting cold.

The file holds one decayed count per (layer, expert) and the token positions behind them: bounded by the
model's shape, whatever the number of runs. Each run's counts are added to the file's, which are first
halved for every HALF_LIFE tokens the run processed, so the history follows a workload that changes.
It is written atomically (a temporary file renamed over it): two processes saving at once leave one of
their versions, never a torn file. A history belongs to one layout (the xxh3 of its expert files'
checksums): another layout's is refused, naming both.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from ..errors import RuntimeConfigError

FORMAT = "mertools-routing-history"
VERSION = 1
HALF_LIFE = 20_000  # token positions of new use that halve the weight of what the file held
SEED_VISITS = 64.0  # layer visits the cache policy's estimates start with: real routing outweighs them soon
# an expert is loaded at open only if chosen at least this many times as often as under uniform routing: loads at
# open compete with the prompt's own reads, which on balanced routing touch most experts anyway (bench_history.py)
HOT = 2.0


def layout_id(manifest: Any) -> str:  # noqa: ANN401 - a Manifest
    """The identity a history is tied to: changes whenever any expert file's bytes do."""
    h = xxhash.xxh3_64()
    for e in manifest.experts:
        h.update(f"{e.layer}:{e.expert}:{e.xxh3};".encode())
    return h.hexdigest()


@dataclass
class RoutingHistory:
    path: Path
    layout: str
    counts: np.ndarray  # float64 (n_layers, n_experts): decayed choices of each expert, before this run
    tokens: float  # decayed token positions behind `counts`
    run: np.ndarray = field(init=False)  # this run's choices, (n_layers, n_experts)
    run_rows: np.ndarray = field(init=False)  # this run's positions per layer, (n_layers,)

    def __post_init__(self) -> None:
        self.run = np.zeros_like(self.counts)
        self.run_rows = np.zeros(self.counts.shape[0], np.int64)

    @classmethod
    def open(cls, path: str | Path, layout: Any) -> RoutingHistory:  # noqa: ANN401 - a Layout
        """The history at `path` for this layout, or an empty one if there is no file yet."""
        path, manifest = Path(path), layout.manifest
        cfg = manifest.config
        shape = (cfg.n_layers + cfg.nextn_layers, cfg.n_experts)  # MTP blocks (a drafter's) route too
        ident = layout_id(manifest)
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            # checked now, not when the run ends: a history that cannot be written would lose the run's routing
            raise RuntimeConfigError(f"{path}: cannot write a routing history in {parent} (not a writable directory)")
        if not path.exists():
            return cls(path, ident, np.zeros(shape), 0.0)
        try:
            doc = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RuntimeConfigError(f"{path}: not a routing history ({e})") from None

        def bad(what: str) -> RuntimeConfigError:
            return RuntimeConfigError(f"{path}: routing history field {what}")

        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise bad(f"'format': expected {FORMAT!r}, got {doc.get('format') if isinstance(doc, dict) else doc!r}")
        if doc.get("version") != VERSION:
            raise bad(f"'version': expected {VERSION}, got {doc.get('version')!r}")
        if doc.get("layout") != ident:
            raise RuntimeConfigError(f"{path}: routing history of another layout ({doc.get('layout')!r}; this one is "
                                     f"{ident!r}, {layout.root}): delete it or name another file")
        tokens = doc.get("tokens")
        if not isinstance(tokens, (int, float)) or isinstance(tokens, bool) or not np.isfinite(tokens) or tokens < 0:
            raise bad(f"'tokens': expected a finite number >= 0, got {tokens!r}")
        try:
            counts = np.asarray(doc.get("counts"), np.float64)
        except (TypeError, ValueError):
            raise bad("'counts': expected a list of lists of numbers") from None
        if counts.shape != shape:
            raise bad(f"'counts': expected shape {shape} (layers x experts), got {counts.shape}")
        if not np.isfinite(counts).all() or (counts < 0).any():
            raise bad("'counts': expected finite numbers >= 0")
        return cls(path, ident, counts, float(tokens))

    # ------------------------------------------------------------------ this run
    def record(self, layer: int, chosen: np.ndarray, live: np.ndarray | None = None) -> None:
        """One layer's routing of a step: chosen (n, k) expert ids; `live` (n, k) bool marks the slots computed
        (approximate routing pads rows it shortened)."""
        np.add.at(self.run[layer], chosen if live is None else chosen[live], 1.0)
        self.run_rows[layer] += chosen.shape[0]

    @property
    def run_tokens(self) -> int:
        return int(self.run_rows.max(initial=0))

    def merged(self) -> tuple[np.ndarray, float]:
        """(counts, tokens) with this run added: what `save` writes."""
        keep = 0.5 ** (self.run_tokens / HALF_LIFE)
        return self.counts * keep + self.run, self.tokens * keep + self.run_tokens

    # ------------------------------------------------------------------ use
    def hot(self, n: int, k: int) -> list[tuple[int, int]]:
        """Up to `n` (layer, expert) keys chosen at least HOT times as often as uniform top-`k` routing would, the
        most often chosen first."""
        if self.tokens <= 0:
            return []
        n_experts = self.counts.shape[1]
        rate = (self.counts / self.tokens).ravel()  # choices per token
        order = np.argsort(-rate, kind="stable")[:n]
        return [(int(i) // n_experts, int(i) % n_experts) for i in order if rate[i] >= HOT * k / n_experts]

    def seed(self) -> tuple[list[list[float]], list[float]] | None:
        """Starting estimates for the cache policy (`ExpertCache.seed`), or None when the history is empty: per
        (layer, expert) the choices per token worth SEED_VISITS visits, and per layer the experts chosen per token."""
        if self.tokens <= 0:
            return None
        per_visit = self.counts / self.tokens  # expected choices of each expert per token
        return (per_visit * SEED_VISITS).tolist(), np.round(per_visit.sum(axis=1)).tolist()

    def save(self) -> None:
        """Write the history with this run added, atomically (a temporary file in the same directory, renamed)."""
        counts, tokens = self.merged()
        doc = {"format": FORMAT, "version": VERSION, "layout": self.layout, "tokens": round(tokens, 6),
               "half_life_tokens": HALF_LIFE, "counts": [[round(float(c), 6) for c in row] for row in counts]}
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException as e:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            if isinstance(e, OSError):
                raise RuntimeConfigError(f"{self.path}: cannot write the routing history ({e.strerror or e})") from None
            raise
        self.counts, self.tokens = counts, tokens  # saved: the next save adds only what comes after
        self.run[:] = 0
        self.run_rows[:] = 0

