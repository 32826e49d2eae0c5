"""runtime/compile_clock.py: the seconds numba compiles on this thread, which generation leaves out of its figures."""

from __future__ import annotations

import threading
import time

import numpy as np
from numba import njit

from mertools.runtime.compile_clock import announce_compiling, compile_seconds


def _fresh():  # noqa: ANN202 - a kernel no one has compiled (not cached: each call makes a new one)
    @njit
    def total(x):
        s = 0.0
        for v in x:
            s += np.sin(v) * np.cos(v)
        return s
    return total


def test_a_compile_counts_and_a_compiled_call_does_not() -> None:
    f, x = _fresh(), np.ones(8)
    c0, t0 = compile_seconds(), time.perf_counter()
    f(x)
    took, compiled = time.perf_counter() - t0, compile_seconds() - c0
    assert 0 < compiled <= took
    c1 = compile_seconds()
    for _ in range(100):
        f(x)
    assert compile_seconds() == c1


def test_another_threads_compile_is_not_this_threads() -> None:
    f, x = _fresh(), np.ones(8)
    c0 = compile_seconds()
    seen: list[float] = []

    def other() -> None:
        before = compile_seconds()
        f(x)
        seen.append(compile_seconds() - before)

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert seen[0] > 0 and compile_seconds() == c0


def test_the_announcement_comes_once_at_a_compile_and_never_for_a_compiled_call() -> None:
    f, g, x = _fresh(), _fresh(), np.ones(8)
    f(x)
    calls: list[float] = []
    announce_compiling(lambda: calls.append(compile_seconds()))
    f(x)  # compiled already
    assert calls == []
    t = threading.Thread(target=g, args=(x,))  # a loader thread's compile counts too
    t.start()
    t.join()
    assert len(calls) == 1
    _fresh()(x)
    assert len(calls) == 1  # once
