"""A routing trace (`mertools run --trace-out`, runtime/trace.py) loaded into typed numpy arrays for the figures.

Checked as it is read: a trace that is missing, not zstd, not JSON lines, or whose records lack or mistype a field
raises TraceError naming the file, the record and what was expected; optional fields ("t", "held", the reads
record) are whatever the writer recorded: an older trace has none of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zstandard

from ..errors import MertoolsError
from ..runtime.stats import estimate_percentile
from ..runtime.trace import TraceCutShort, trace_lines


class TraceError(MertoolsError, ValueError):
    """A routing trace is missing, corrupt, empty, or does not fit the layout it is plotted with."""


@dataclass(frozen=True)
class Reads:
    """The store's expert reads over the run: counts[i] per latency bucket of `bounds` (seconds; the last count
    above them), their number, total, min and max seconds, and the bytes read."""

    bounds: np.ndarray  # (B,) float64, increasing upper bounds
    counts: np.ndarray  # (B + 1,) int64
    count: int
    sum: float
    min: float
    max: float
    bytes_read: int

    def percentile(self, p: float) -> float:
        """Estimated p-th percentile in seconds, as the runtime estimates it from its own histogram."""
        return estimate_percentile(self.counts.tolist(), self.bounds.tolist(), self.count, self.min, self.max, p)


@dataclass(frozen=True)
class Trace:
    """R routing records of at most k choices each (rows of fewer choices padded with expert -1, weight 0)."""

    path: Path
    token: np.ndarray  # (R,) int64: the record's position in its sequence
    layer: np.ndarray  # (R,) int64
    experts: np.ndarray  # (R, k) int64, -1 padding
    weights: np.ndarray  # (R, k) float32
    t: np.ndarray | None  # (R,) float64: seconds since the writer was created; None in older traces
    held: np.ndarray | None  # (R, k) bool: the expert cache held the choice at routing time; None when not recorded
    reads: Reads | None  # None when the writer followed no store (or an older trace)
    n_layers: int
    n_experts: int

    @property
    def records(self) -> int:
        return len(self.token)

    def frequency(self) -> np.ndarray:
        """(n_layers, n_experts) int64: how often each expert was chosen."""
        out = np.zeros((self.n_layers, self.n_experts), np.int64)
        ok = self.experts >= 0
        np.add.at(out, (np.broadcast_to(self.layer[:, None], self.experts.shape)[ok], self.experts[ok]), 1)
        return out

    def lookups(self) -> tuple[np.ndarray, np.ndarray]:
        """(hits, misses), each (R,) int64: per record, its distinct chosen experts the cache held and did not, as
        the cache counts a one-position step's lookups (a batch of positions looks each expert up once)."""
        if self.held is None:
            raise ValueError(f"{self.path}: the trace has no \"held\" field")
        order = np.argsort(self.experts, axis=1, kind="stable")
        e = np.take_along_axis(self.experts, order, axis=1)
        h = np.take_along_axis(self.held, order, axis=1)
        first = np.ones_like(e, bool)  # each distinct expert of a row once (top-k never repeats one; be sure)
        first[:, 1:] = e[:, 1:] != e[:, :-1]
        real = first & (e >= 0)
        return (real & h).sum(axis=1), (real & ~h).sum(axis=1)


def _fail(path: Path, what: str) -> TraceError:
    return TraceError(f"{path}: {what}")


def _ints(path: Path, n: int, rec: dict, key: str) -> list[int]:
    v = rec.get(key)
    if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v):
        raise _fail(path, f"record {n}: {key!r} must be a list of non-negative integers, found {v!r:.80}")
    return v


def _reads(path: Path, n: int, rec: dict) -> Reads:
    try:
        bounds = np.asarray(rec["bounds"], np.float64)
        counts = np.asarray(rec["counts"], np.int64)
        count, total, bytes_read = int(rec["count"]), float(rec["sum"]), int(rec["bytes_read"])
        lo = float(rec["min"]) if rec["min"] is not None else 0.0
        hi = float(rec["max"])
    except (KeyError, TypeError, ValueError) as e:
        raise _fail(path, f"record {n}: a reads record needs bounds, counts, count, sum, min, max and bytes_read "
                          f"({type(e).__name__}: {e})") from None
    if bounds.ndim != 1 or counts.shape != (len(bounds) + 1,) or int(counts.sum()) != count or (counts < 0).any() \
            or (np.diff(bounds) <= 0).any():
        raise _fail(path, f"record {n}: a reads record's counts must be len(bounds) + 1 = {len(bounds) + 1} "
                          f"non-negative numbers summing to count {count} over increasing bounds, found "
                          f"{len(counts)} summing to {int(counts.sum())}")
    return Reads(bounds, counts, count, total, lo, hi, bytes_read)


def _rows(experts: list[list[int]], weights: list[list[float]], held: list[list[int]]
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The records' lists as (R, k) arrays, rows of fewer than k choices padded (expert -1, weight 0, not held)."""
    k = max(len(e) for e in experts)
    if all(len(e) == k for e in experts):  # every trace the runtime writes: one conversion, no Python loop
        return (np.asarray(experts, np.int64), np.asarray(weights, np.float32),
                np.asarray(held, bool) if held else None)
    ex = np.full((len(experts), k), -1, np.int64)
    wt = np.zeros((len(experts), k), np.float32)
    hd = np.zeros((len(experts), k), bool) if held else None
    for i, (e, w) in enumerate(zip(experts, weights, strict=True)):
        ex[i, :len(e)], wt[i, :len(w)] = e, w
        if hd is not None:
            hd[i, :len(e)] = held[i]
    return ex, wt, hd


def load_trace(path: str | Path, n_layers: int | None = None, n_experts: int | None = None) -> Trace:
    """The trace at `path`; n_layers / n_experts from a layout's manifest (checked against the trace), else the
    largest layer and expert the trace names, plus one."""
    path = Path(path)
    token, layer, t, experts, weights, held = [], [], [], [], [], []
    reads: Reads | None = None
    n = 0
    try:
        if path.is_file() and path.stat().st_size == 0:
            raise _fail(path, "is empty (0 bytes): expected a zstd-compressed routing trace")
        for n, line in enumerate(trace_lines(path), 1):
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise _fail(path, f"record {n}: expected a JSON object, found {type(rec).__name__}")
            if "experts" not in rec:
                if rec.get("kind") == "reads":
                    reads = _reads(path, n, rec)
                continue  # a kind of record this reader does not draw
            ex, w = _ints(path, n, rec, "experts"), rec.get("weights")
            if not ex:
                raise _fail(path, f"record {n}: 'experts' is empty: expected the step's chosen experts")
            if not isinstance(w, list) or len(w) != len(ex) or not all(isinstance(x, int | float) for x in w):
                raise _fail(path, f"record {n}: 'weights' must be {len(ex)} numbers like 'experts', found {w!r:.80}")
            tok, lay = rec.get("token"), rec.get("layer")
            if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in (tok, lay)):
                raise _fail(path, f"record {n}: 'token' and 'layer' must be non-negative integers, found "
                                  f"{tok!r:.40} and {lay!r:.40}")
            token.append(tok)
            layer.append(lay)
            experts.append(ex)
            weights.append(w)
            if "t" in rec:
                if not isinstance(rec["t"], int | float):
                    raise _fail(path, f"record {n}: 't' must be seconds, found {rec['t']!r:.40}")
                t.append(rec["t"])
            if "held" in rec:
                h = _ints(path, n, rec, "held")
                if len(h) != len(ex) or any(x > 1 for x in h):
                    raise _fail(path, f"record {n}: 'held' must be {len(ex)} flags 0 or 1, found {h!r:.80}")
                held.append(h)
    except FileNotFoundError:
        raise _fail(path, "no such file") from None
    except IsADirectoryError:
        raise _fail(path, "is a directory, not a trace file") from None
    except PermissionError:
        raise _fail(path, "permission denied") from None
    except TraceCutShort:
        raise _fail(path, f"cut short after {n} records (its writer did not close it: the run was killed?)") from None
    except zstandard.ZstdError as e:
        raise _fail(path, f"not a zstd-compressed trace ({e})") from None
    except UnicodeDecodeError:
        raise _fail(path, f"record {n + 1}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise _fail(path, f"record {n}: not a JSON line ({e.msg} at column {e.colno})") from None
    if not token:
        raise _fail(path, "holds no routing records (expected JSON lines with \"token\", \"layer\", \"experts\", "
                          "\"weights\", as `mertools run --trace-out` writes)")
    for name, got in (("t", t), ("held", held)):
        if got and len(got) != len(token):
            raise _fail(path, f"{len(got)} of its {len(token)} routing records have {name!r}: expected all or none")
    ex, wt, hd = _rows(experts, weights, held)
    lay = np.asarray(layer, np.int64)
    seen_layers, seen_experts = int(lay.max()) + 1, int(ex.max()) + 1
    if n_layers is not None and seen_layers > n_layers:
        raise _fail(path, f"routes layer {seen_layers - 1}, but the layout has {n_layers} layers: a trace of another model?")
    if n_experts is not None and seen_experts > n_experts:
        raise _fail(path, f"chooses expert {seen_experts - 1}, but the layout has {n_experts} experts per layer: "
                          "a trace of another model?")
    return Trace(path, np.asarray(token, np.int64), lay, ex, wt, np.asarray(t, np.float64) if t else None, hd, reads,
                 n_layers or seen_layers, n_experts or seen_experts)
