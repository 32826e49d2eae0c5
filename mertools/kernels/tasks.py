"""Parallel loops whose threads claim their tasks as they go: each its own share first, then what the others left.

numba's OpenMP `prange` gives every thread one contiguous share of the iterations, fixed before the loop starts
(a static schedule; `numba.set_parallel_chunksize` did not change that here). When one thread runs slower (on a
shared host its core also runs someone else's work, or its sibling does), the whole region waits for it in
libgomp's barrier (measured: docs/BENCHMARKS.md "Decode: notes"). Here a thread still walks its own contiguous
share (one stream of weights, which the hardware prefetcher follows, as with the static split), claiming one task
at a time from its atomic counter, and when its share is done it claims from the others' counters. Each task
writes outputs of its own, so a result is the same bits whichever thread runs it.

    threads()                   numba's thread count, callable from cached kernels
    counters(nt)                the claim counters of one loop: one cache line per thread
    next_task(ctr, me, nt, n)   thread me's next task of n (its share first, then the others'), or -1: none left

A loop over n tasks (name the thread index so that it shadows nothing of the kernel's: numba then mistypes it):

    nt = threads()
    ctr = counters(nt)
    for me in prange(nt):       # one iteration per thread
        while True:
            t = next_task(ctr, me, nt, n)
            if t < 0:
                break
            ...task t...
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import get_num_threads, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from mertools.kernels.simd import ptr_at

__all__ = ["LINE", "counters", "fetch_add", "next_task", "threads"]

LINE = 8  # int64 counters per cache line: each thread's counter on a line of its own (no false sharing)
_I64 = ir.IntType(64)

get_num_threads()  # numba's threading layer started: `threads` calls its symbol


@intrinsic
def fetch_add(typingctx, a, i):
    """a[i] += 1 atomically (int64 C array); the value before."""
    if not (isinstance(a, types.Array) and a.layout == "C" and a.dtype == types.int64 and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        p = ptr_at(context, builder, sig.args[0], args[0], args[1], _I64)
        return builder.atomic_rmw("add", p, ir.Constant(_I64, 1), "monotonic")

    return types.int64(a, i), codegen


@intrinsic
def threads(typingctx):
    """numba's current thread count (`numba.get_num_threads()`, which compiled code calls through a pointer numba's
    cache cannot keep: the threading layer's own symbol, as numba's parallel loops call it)."""

    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_I64, []), "get_num_threads")
        return builder.call(fn, [])

    return types.int64(), codegen


@njit(inline="always", nogil=True, cache=True)
def counters(nt):
    """The claim counters of one loop over nt threads (zeros)."""
    return np.zeros(LINE * nt, np.int64)


@njit(inline="always", nogil=True, cache=True)
def next_task(claims, me, nt, n_tasks):
    """Thread `me`'s next task of n_tasks: the next of its share (tasks me * share ..), else the next another thread
    has not claimed of its own; -1 when every task is claimed. Claims past a share's end only count up (harmless)."""
    share = (n_tasks + nt - 1) // nt
    for j in range(nt):
        other = (me + j) % nt
        k = fetch_add(claims, LINE * other)
        task = other * share + k
        if k < share and task < n_tasks:
            return task
    return -1
