"""Numba kernels for x @ W.T with W in a GGML block layout, dequantizing on the fly: prefill (n > 1).

Decode (n == 1) has its own kernels in `matvec_kernels`; n >= GEMM_MIN_N the GEMM of `gemm_kernels`.

Prefill: one tiled kernel for every dtype. Each parallel task owns RB weight rows, decodes an
RB x KC tile into a float32 buffer that stays in L1 (`dispatch.decode_tile`: each type module's
vector-IR decoder, bit-identical to `dequantize`), and dots it with the KC-wide slices of all n
inputs, so each block is decoded once per call whatever n is and the weights are read once.

The dot products use fastmath without `nnan`/`ninf`: reassociation lets LLVM vectorise the
reductions, while inf/NaN weights still propagate. Every kernel releases the GIL (nogil).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from mertools.kernels.common import KC, RB, TILE_JIT
from mertools.kernels.dispatch import decode_tile

# numba caches `dispatch`'s branches inside this file's kernels, keyed on this file's contents: a type added there
# (last: IQ2_XXS) changes this file too, so that a cache made before it is not used

__all__ = ["KC", "RB", "decode_tile", "get_rows", "matmul_tiled", "tile_dot"]


# ---------------------------------------------------------------- dot products and the kernel


@njit(**TILE_JIT)
def _dot(a, b, kc):
    s = np.float32(0.0)
    for k in range(kc):
        s += a[k] * b[k]
    return s


@njit(**TILE_JIT)
def _dot_4x1(x, k0, kc, buf, r, acc, i):
    """acc[i, r:r+4] += buf[r:r+4, :kc] @ x[i, k0:k0+kc]."""
    xa = x[i, k0 : k0 + kc]
    w0, w1, w2, w3 = buf[r], buf[r + 1], buf[r + 2], buf[r + 3]
    s0 = s1 = s2 = s3 = np.float32(0.0)
    for k in range(kc):
        a = xa[k]
        s0 += w0[k] * a
        s1 += w1[k] * a
        s2 += w2[k] * a
        s3 += w3[k] * a
    acc[i, r] += s0
    acc[i, r + 1] += s1
    acc[i, r + 2] += s2
    acc[i, r + 3] += s3


@njit(**TILE_JIT)
def _dot_4x2(x, k0, kc, buf, r, acc, i):
    """acc[i:i+2, r:r+4] += x[i:i+2, k0:k0+kc] @ buf[r:r+4, :kc].T: 6 loads feed 8 FMAs."""
    xa = x[i, k0 : k0 + kc]
    xb = x[i + 1, k0 : k0 + kc]
    w0, w1, w2, w3 = buf[r], buf[r + 1], buf[r + 2], buf[r + 3]
    s0 = s1 = s2 = s3 = t0 = t1 = t2 = t3 = np.float32(0.0)
    for k in range(kc):
        a = xa[k]
        b = xb[k]
        s0 += w0[k] * a
        s1 += w1[k] * a
        s2 += w2[k] * a
        s3 += w3[k] * a
        t0 += w0[k] * b
        t1 += w1[k] * b
        t2 += w2[k] * b
        t3 += w3[k] * b
    acc[i, r] += s0
    acc[i, r + 1] += s1
    acc[i, r + 2] += s2
    acc[i, r + 3] += s3
    acc[i + 1, r] += t0
    acc[i + 1, r + 1] += t1
    acc[i + 1, r + 2] += t2
    acc[i + 1, r + 3] += t3


@njit(**TILE_JIT)
def tile_dot(x, k0, kc, buf, rb, acc):
    """acc[i, r] += x[i, k0:k0+kc] . buf[r, :kc] for all n inputs i and the tile's rb rows."""
    n = x.shape[0]
    n2 = n - n % 2
    rb4 = rb - rb % 4
    for i in range(0, n2, 2):  # an input pair (4 KiB) and the tile (32 KiB) stay in L1
        for r in range(0, rb4, 4):
            _dot_4x2(x, k0, kc, buf, r, acc, i)
    if n2 < n:
        for r in range(0, rb4, 4):
            _dot_4x1(x, k0, kc, buf, r, acc, n2)
    for r in range(rb4, rb):  # only in the last tile, when rows % 4 != 0
        for i in range(n):
            acc[i, r] += _dot(buf[r], x[i, k0 : k0 + kc], kc)


@njit(parallel=True, **TILE_JIT)
def matmul_tiled(kind, x, w, out):
    """x: float32 (n, cols); w: uint8 (rows, row_bytes) of dtype code `kind`; out: float32 (n, rows)."""
    n, cols = x.shape
    rows = w.shape[0]
    for t in prange((rows + RB - 1) // RB):
        r0 = t * RB
        rb = min(RB, rows - r0)
        buf = np.empty((RB, KC), dtype=np.float32)  # (RB, KC) decoded weights
        acc = np.zeros((n, RB), dtype=np.float32)  # (n, RB) partial sums
        for k0 in range(0, cols, KC):
            kc = min(KC, cols - k0)  # a multiple of the block size, as cols and KC are
            decode_tile(kind, w, r0, rb, k0, kc, buf)
            tile_dot(x, k0, kc, buf, rb, acc)
        for i in range(n):
            for r in range(rb):
                out[i, r0 + r] = acc[i, r]


@njit(**TILE_JIT)
def get_rows(kind, w, ids, out):
    """out[i] = W[ids[i]] decoded (bit-identical to `dequantize`), serially: an embedding lookup is a
    few rows, too little work for a parallel region. out: float32 (len(ids), cols)."""
    buf = np.empty((RB, KC), dtype=np.float32)
    cols = out.shape[1]
    for i in range(ids.size):
        for k0 in range(0, cols, KC):
            kc = min(KC, cols - k0)
            decode_tile(kind, w, ids[i], 1, k0, kc, buf)
            out[i, k0 : k0 + kc] = buf[0, :kc]
