"""Decode kernels (n == 1): y = W @ x with W in a GGML block layout, near the memory bandwidth.

One parallel region per call over groups of R = 4 consecutive rows, claimed by the threads as they go
(`tasks`). A group streams its 4 rows block by block and shares every load of x between them (x of a
14336-wide row is 57 KB, more than L1: loaded once per row, as the first kernels did, it came from L2 at
7x the weight traffic).

Each type module's `matvec_group` (picked by `dispatch.matvec_group`) dequantizes its blocks in
16-lane vectors (`simd`): 4-bit types through a 16-entry table per block indexed by the nibbles
with vpermps, 8-bit ones by sign-extend, convert and scale, f16 by vcvtph2ps, f32 by a load. The
table lookup needs AVX-512 for one instruction; AVX2 takes two 8-entry vpermps and a blend, other
CPUs a select chain (same values, slower).
Each dequantized weight then meets x in a fused multiply-add; two accumulators per row, summed as
a fixed tree at the end. There is no fastmath: every rounding is an IEEE operation in a fixed
order, inf/NaN weights propagate as in the reference, and a row's result does not depend on the
thread count.

Software prefetch: while a group is computed, the next group's bytes are prefetched at the same
pace (one group ahead). Without it the hardware prefetcher fell behind on rows 14336 wide, whose
x streams through L1 beside the weights, and those matvecs ran at half the speed of 4096-wide ones
from DRAM though both cost the same with the matrix in cache (see docs/BENCHMARKS.md).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from mertools.kernels.common import MATVEC_JIT, R
from mertools.kernels.dispatch import matvec_group
from mertools.kernels.tasks import counters, next_task, threads

# numba caches `dispatch`'s branches inside this file's kernels, keyed on this file's contents: a type added there
# (last: IQ2_XXS, then Q4_0 off AVX-512) changes this file too, so that a cache made before it is not used

__all__ = ["R", "matvec", "matvec_group", "matvec_rows", "matvec_swiglu", "silu_mul_scalar"]


@njit(parallel=True, **MATVEC_JIT)
def matvec(kind, x, w, out):
    """out (rows,) = W @ x. x: float32 (cols,); w: uint8 (rows, row_bytes) of type code `kind`."""
    n, nt = (w.shape[0] + R - 1) // R, threads()
    ctr = counters(nt)
    for me in prange(nt):  # the groups claimed as the threads go (`tasks`)
        while True:
            g = next_task(ctr, me, nt, n)
            if g < 0:
                break
            matvec_group(kind, x, w, R * g, out)


@njit(parallel=True, **MATVEC_JIT)
def matvec_rows(kind, x, w, out):
    """out (n, rows) = x @ W.T for a few rows of x (n = 2..MATVEC_ROWS_MAX), each row exactly as `matvec`
    computes it: a group's weight bytes come from memory once and are decoded again per row from cache."""
    n, nt = (w.shape[0] + R - 1) // R, threads()
    ctr = counters(nt)
    for me in prange(nt):
        while True:
            g = next_task(ctr, me, nt, n)
            if g < 0:
                break
            for i in range(x.shape[0]):
                matvec_group(kind, x[i], w, R * g, out[i])


@njit(**MATVEC_JIT)
def silu_mul_scalar(g, u):
    """silu(g) * u as `matmul.silu_mul` computes it: g / (1 + exp(-g)) * u (exp(-g) = inf -> -0)."""
    return g / (np.float32(1.0) + np.exp(-g)) * u


@njit(parallel=True, **MATVEC_JIT)
def matvec_swiglu(kind_g, kind_u, x, wg, wu, h, u):
    """h (n, d_ff) = silu(x @ G.T) * (x @ U.T) for one or a few rows of x (n, d_model); u (n, d_ff) is scratch.
    One parallel region reads each row of x once per group for both matrices and applies the activation to each
    group as it completes; every row is computed alone, the same bits whatever n."""
    n, nt = (wg.shape[0] + R - 1) // R, threads()
    ctr = counters(nt)
    for me in prange(nt):
        while True:
            g = next_task(ctr, me, nt, n)
            if g < 0:
                break
            r0 = R * g
            for i in range(x.shape[0]):
                matvec_group(kind_g, x[i], wg, r0, h[i])
                matvec_group(kind_u, x[i], wu, r0, u[i])
                for r in range(r0, min(r0 + R, h.shape[1])):
                    h[i, r] = silu_mul_scalar(h[i, r], u[i, r])
