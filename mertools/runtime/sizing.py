"""How much a layout takes and what fits beside it: the sizing rules Engine.open and the server share."""

from __future__ import annotations

from typing import Any

from ..layout.reader import Layout
from .memory import available_bytes

# left for activations, Python and numba when cache_mb is not given (the KV cache is counted apart): the overhead
# tests/test_memory.py holds a run to (README "Memory"; a 512-token prefill chunk's activations included)
MARGIN = 512 << 20


def model_bytes(m: Any) -> int:  # noqa: ANN401 - a Manifest
    """A layout's expert and dense bytes: what holding the whole model in memory takes."""
    return sum(e.nbytes for e in m.experts) + sum(t.nbytes for t in m.dense.values())


def draft_footprint(spec: str | None) -> int:
    """The bytes a draft model (`--draft LAYOUT`) holds beside the target: its dense weights and every expert
    (0 for "ngram", "mtp" or none); the target's automatic budget leaves them out (`Engine.open(reserve_bytes=...)`)."""
    return 0 if spec in (None, "ngram", "mtp") else model_bytes(Layout.open(spec).manifest)


def fits_beside(m: Any, cache_bytes: int, kv_bytes: int) -> bool:  # noqa: ANN401 - a Manifest
    """Whether the layout's expert and dense bytes fit in the page cache beside this process (its expert cache,
    KV cache and margin), within what is available (cgroup limits included): then the expert files can be
    mapped (or read buffered) and their pages stay for the next process."""
    return model_bytes(m) + cache_bytes + kv_bytes + MARGIN <= available_bytes()


def one_blas_thread() -> None:
    """numpy's BLAS (a prompt's attention, routers of the exact mode and of prefetch guesses) on one thread: the
    kernels' numba threads spin for a while after each parallel region, and BLAS threads started meanwhile fight them
    for the cores (a small product right after a region took a hundred times longer: docs/BENCHMARKS.md, "Decode:
    notes"). Process-wide, as BLAS's thread count is."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")
