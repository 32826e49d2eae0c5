"""The small per-row operations of a decode step, compiled, for the 8-bit mode and its one-call decode step.

    pairwise_sum(a, s, n)            a[s:s+n] summed in numpy's order (float32 `np.add.reduce`), bit for bit
    rms_norm_into(x, w, eps, out)    `runtime.ops.rms_norm` of one row, bit for bit
    dense_rows(x2, a)                float32 (n, rows) = x2 @ a.T for float32 a (routers): 16-lane sums, fixed order
    softmax_rows(x2)                 softmax over each row: max-subtracted, exp, the pairwise sum
    top_k_into(scores, k, norm, scaling, chosen, weights)
                                     `families.pieces.top_k` of one row (stable order, numpy's sum), bit for bit
    rotate_into(x, heads, hd, rd, cos, sin)
                                     `families.pieces.rotary` of one row's heads, in place, bit for bit

`rms_norm_into`, `top_k_into` and `rotate_into` equal the numpy the general path runs (tests hold them to it);
numpy's float32 exp and its BLAS product have no compiled twin, so the 8-bit mode's router runs `dense_rows` and
`softmax_rows` on both paths (`runtime.ops.RuntimeOps(compiled=True)`), which keeps a compiled step and a step
taken piece by piece the same bits. No fastmath anywhere: every sum is in the order written.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .common import MATVEC_JIT
from .simd import vadd, vhsum, vload, vmul, vzero

__all__ = ["dense_rows", "pairwise_sum", "rms_norm_into", "rotate_into", "softmax_rows", "top_k_into"]

BLOCK = 128  # numpy's PW_BLOCKSIZE: the unrolled 8-accumulator sum up to this many values, halves above


@njit(**MATVEC_JIT)
def _block(a, s, n):
    """numpy's pairwise_sum of at most BLOCK values: sequential below 8, else 8 running sums combined as a tree,
    then the rest."""
    if n < 8:
        r = np.float32(0.0)
        for i in range(n):
            r += a[s + i]
        return r
    r0, r1, r2, r3 = a[s], a[s + 1], a[s + 2], a[s + 3]
    r4, r5, r6, r7 = a[s + 4], a[s + 5], a[s + 6], a[s + 7]
    i = 8
    while i < n - n % 8:
        r0 += a[s + i]
        r1 += a[s + i + 1]
        r2 += a[s + i + 2]
        r3 += a[s + i + 3]
        r4 += a[s + i + 4]
        r5 += a[s + i + 5]
        r6 += a[s + i + 6]
        r7 += a[s + i + 7]
        i += 8
    r = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        r += a[s + i]
        i += 1
    return r


@njit(**MATVEC_JIT)
def pairwise_sum(a, s, n):
    """a[s:s+n] (float32 C) summed as numpy's pairwise_sum does for a contiguous float32 reduction: `_block` up to
    BLOCK values, else the sum of the two halves' sums (split at a multiple of 8). The halving walked with an
    explicit stack (a numba function calling itself types its result as float64)."""
    if n <= BLOCK:
        return _block(a, s, n)
    starts, counts = np.empty(64, np.int64), np.empty(64, np.int64)
    state = np.zeros(64, np.int64)  # 0: new, 1: left half summed, 2: both halves summed
    sums = np.empty(64, np.float32)
    top, done = 0, 0
    starts[0], counts[0] = s, n
    while top >= 0:
        cs, cn = starts[top], counts[top]
        half = cn // 2
        half -= half % 8
        if cn <= BLOCK:
            sums[done] = _block(a, cs, cn)
            done += 1
            top -= 1
        elif state[top] == 2:
            sums[done - 2] = sums[done - 2] + sums[done - 1]
            done -= 1
            top -= 1
        else:
            state[top] += 1
            top += 1
            state[top] = 0
            starts[top], counts[top] = (cs, half) if state[top - 1] == 1 else (cs + half, cn - half)
    return sums[0]


@njit(**MATVEC_JIT)
def rms_norm_into(x, w, eps, out):
    """out = (x / sqrt(mean(x * x) + eps)) * w for float32 rows x, w, out (d,): `ops.rms_norm`'s operations."""
    d = x.size
    sq = np.empty(d, np.float32)
    for i in range(d):
        sq[i] = x[i] * x[i]
    s = np.sqrt(pairwise_sum(sq, 0, d) / np.float32(d) + np.float32(eps))
    for i in range(d):
        out[i] = (x[i] / s) * w[i]


@njit(**MATVEC_JIT)
def dense_row(x, a, e):
    """Row e of a (rows, d) float32 C times x (d,): 16 lanes of products summed in order, the lanes as a fixed
    tree, then the tail."""
    d = x.size
    at = e * d
    af = a.reshape(-1)
    acc = vzero()
    d16 = d - d % 16
    for j in range(0, d16, 16):
        acc = vadd(acc, vmul(vload(x, j), vload(af, at + j)))
    r = vhsum(acc)
    for j in range(d16, d):
        r += x[j] * af[at + j]
    return r


@njit(**MATVEC_JIT)
def _dense_rows(x2, a, out):
    for i in range(x2.shape[0]):
        for e in range(a.shape[0]):
            out[i, e] = dense_row(x2[i], a, e)


def dense_rows(x2: np.ndarray, a: np.ndarray) -> np.ndarray:
    """float32 (n, rows) = x2 @ a.T for float32 C x2 (n, d) and a (rows, d), in `dense_row`'s order."""
    out = np.empty((x2.shape[0], a.shape[0]), np.float32)
    _dense_rows(np.ascontiguousarray(x2, np.float32), np.ascontiguousarray(a, np.float32), out)
    return out


@njit(**MATVEC_JIT)
def softmax_into(x, out):
    """out = exp(x - max x) / their pairwise sum, float32 (n,) (out may be x)."""
    m = x[0]
    for i in range(1, x.size):
        m = max(m, x[i])
    for i in range(x.size):
        out[i] = np.exp(x[i] - m)
    s = pairwise_sum(out, 0, out.size)
    for i in range(x.size):
        out[i] = out[i] / s


@njit(**MATVEC_JIT)
def _softmax_rows(x2, out):
    for i in range(x2.shape[0]):
        softmax_into(x2[i], out[i])


def softmax_rows(x2: np.ndarray) -> np.ndarray:
    """`softmax_into` over each row of float32 (n, m)."""
    x2 = np.ascontiguousarray(x2, np.float32).reshape(-1, x2.shape[-1])
    out = np.empty_like(x2)
    _softmax_rows(x2, out)
    return out


@njit(**MATVEC_JIT)
def top_k_into(scores, k, norm, scaling, chosen, weights):
    """The k best of scores (float32 (m,)), best first, ties to the lower index (a stable sort of -scores); their
    scores over their pairwise sum + 1e-20 when `norm`, then times `scaling` (float32) unless it is 1."""
    taken = np.zeros(scores.size, np.bool_)
    for j in range(k):
        best = -1
        for e in range(scores.size):
            if not taken[e] and (best < 0 or scores[e] > scores[best]):
                best = e
        taken[best] = True
        chosen[j] = best
        weights[j] = scores[best]
    if norm:
        s = pairwise_sum(weights, 0, k) + np.float32(1e-20)
        for j in range(k):
            weights[j] = weights[j] / s
    if scaling != np.float32(1.0):
        for j in range(k):
            weights[j] = weights[j] * scaling


@njit(**MATVEC_JIT)
def rotate_into(x, heads, hd, rd, cos, sin):
    """Rotate-half rotary of x (heads * hd,) in place over each head's first rd dims: (a, b) -> (a cos - b sin,
    b cos + a sin), cos and sin float32 (rd / 2,) at the row's position."""
    half = rd // 2
    for h in range(heads):
        o = h * hd
        for i in range(half):
            a, b = x[o + i], x[o + half + i]
            x[o + i] = a * cos[i] - b * sin[i]
            x[o + half + i] = b * cos[i] + a * sin[i]
