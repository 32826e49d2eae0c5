"""Seconds numba spends compiling kernels on the calling thread, so that a run's figures can leave them out.

numba compiles a kernel at its first call on a machine (a miss in its on-disk cache) and loads it after.
`mertools run` used to run every kernel path before the prompt (`Engine.warmup`: 20 tokens of forward steps) so that
compiling never landed in the prefill and decode figures; on a machine whose cache is warm that was work done for
nothing at every start (README, "warm-up"). Generation now times the compiles themselves (numba's
"numba:compile" event: the outermost compile on this thread, not a loader thread's, which overlaps the steps) and
takes them out of the phase they fell in. Loading a cached kernel is not compiling: it stays in the figures, as
the time it takes.

    compile_seconds()     this thread's compiling so far (seconds, monotonic)
    announce_compiling(fn)   fn() once, when numba next starts compiling (any thread): `mertools run` says why a
                          first run is silent for minutes
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from numba.core import event

__all__ = ["announce_compiling", "compile_seconds"]


class _Clock(event.Listener):
    def __init__(self) -> None:
        self._local = threading.local()  # per thread: nesting depth, start of the outermost compile, total
        self.announce: Callable[[], None] | None = None  # called once at the next compile's start, then dropped

    def _state(self) -> Any:  # noqa: ANN401 - the thread's namespace
        s = self._local
        if not hasattr(s, "depth"):
            s.depth, s.start, s.total = 0, 0.0, 0.0
        return s

    def on_start(self, ev: event.Event) -> None:
        s = self._state()
        if s.depth == 0:
            s.start = time.perf_counter()
            fn, self.announce = self.announce, None
            if fn is not None:
                fn()
        s.depth += 1

    def on_end(self, ev: event.Event) -> None:
        s = self._state()
        s.depth -= 1
        if s.depth == 0:
            s.total += time.perf_counter() - s.start

    def seconds(self) -> float:
        s = self._state()
        return s.total + (time.perf_counter() - s.start if s.depth else 0.0)


_CLOCK = _Clock()
event.register("numba:compile", _CLOCK)  # once per process, at import


def announce_compiling(fn: Callable[[], None] | None) -> None:
    """Call fn() once when numba next starts compiling a kernel, on any thread (None: no longer)."""
    _CLOCK.announce = fn


def compile_seconds() -> float:
    """Seconds numba has spent compiling on this thread since the process started (an ongoing compile included)."""
    return _CLOCK.seconds()
