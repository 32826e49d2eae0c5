"""Decode kernels (n == 1): y = W @ x with W in a GGML block layout, near the memory bandwidth.

One parallel region per call, `prange` over groups of R = 4 consecutive rows. A group streams its 4
rows block by block and shares every load of x between them (x of a 14336-wide row is 57 KB, more
than L1: loaded once per row, as the first kernels did, it came from L2 at 7x the weight traffic).

Blocks are dequantized in 16-lane vectors (`simd`):
- Q4_0: a 16-entry table (k - 8) * d is built per block (one multiply) and indexed by the nibbles
  with vpermps (`vlut16`: the low nibble is the byte itself, the high one the byte >> 4), so each
  weight costs a shuffle instead of mask, convert and multiply. The weights are exactly `dequantize`'s.
- Q4_K: the same with a table fma(k, d*sc, -dmin*m) per 32-weight sub-block: one rounding where the
  reference rounds (d*sc)*k and then the difference, so a weight may differ from `dequantize`'s in
  its last bit (well inside the matmul tolerance; inf/NaN scales give inf/NaN alike). 5% faster.
- Q8_0: sign-extend, convert, times d. F16: vcvtph2ps. F32: a load. All exact.
The 4 bits -> table lookup needs AVX-512 for one instruction; AVX2 takes two 8-entry vpermps and a
blend, other CPUs a select chain (same values, slower).
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

from mertools.kernels.matmul_kernels import F16, Q4_0, Q4_K, Q8_0  # dtype codes (F32 otherwise)
from mertools.kernels.simd import (
    f32_at,
    f32x16_at,
    half16,
    half_at,
    half_splat,
    nib16,
    prefetch,
    q4k_scales,
    sbyte16,
    vadd,
    vfma,
    vhsum,
    viota,
    viota_minus8,
    vlane,
    vload,
    vlut16,
    vmul,
    vshr4,
    vtof,
    vzero,
)

_JIT = {"nogil": True, "cache": True}
R = 4  # rows per group


@njit(**_JIT)
def _rows(w, r0):
    """The group's 4 rows; past the last row, the last row again (its results are not stored)."""
    last = w.shape[0] - 1
    return w[min(r0, last)], w[min(r0 + 1, last)], w[min(r0 + 2, last)], w[min(r0 + 3, last)]


@njit(**_JIT)
def _store(out, r0, s0, s1, s2, s3):
    n = out.size
    out[r0] = s0
    if r0 + 1 < n:
        out[r0 + 1] = s1
    if r0 + 2 < n:
        out[r0 + 2] = s2
    if r0 + 3 < n:
        out[r0 + 3] = s3


@njit(**_JIT)
def _prefetch_lines(w, p, nbytes):
    """Prefetch the lines covering w's flat bytes [p, p + nbytes) that exist."""
    end = min(p + nbytes, w.size)
    while p < end:
        prefetch(w, p)
        p += 64


# ---------------------------------------------------------------- one row's share of a block


@njit(**_JIT)
def _q4_0(wr, o, base, xl, xh, a, b):
    t = vmul(base, half_splat(wr, o))  # (k - 8) * d, k = 0..15
    q = nib16(wr, o + 2)
    return vfma(vlut16(t, q), xl, a), vfma(vlut16(t, vshr4(q)), xh, b)


@njit(**_JIT)
def _q8_0(wr, o, xl, xh, a, b):
    d = half_splat(wr, o)
    lo = vmul(vtof(sbyte16(wr, o + 2)), d)  # q * d
    hi = vmul(vtof(sbyte16(wr, o + 18)), d)
    return vfma(lo, xl, a), vfma(hi, xh, b)


@njit(**_JIT)
def _q4_k(wr, o, c, dm, iota, xa, xb, xc, xd, a, b):
    """Chunk c (64 weights: sub-block 2c in the low nibbles of 32 bytes, 2c+1 in the high ones) of
    the super-block at o, whose scales dm = q4k_scales(wr, o); tables fma(k, d*sc, -dmin*m)."""
    t0 = vfma(iota, vlane(dm, 2 * c), vlane(dm, 8 + 2 * c))
    t1 = vfma(iota, vlane(dm, 2 * c + 1), vlane(dm, 9 + 2 * c))
    qa = nib16(wr, o + 16 + 32 * c)
    qb = nib16(wr, o + 32 + 32 * c)
    a = vfma(vlut16(t0, qa), xa, a)
    b = vfma(vlut16(t0, qb), xb, b)
    a = vfma(vlut16(t1, vshr4(qa)), xc, a)
    b = vfma(vlut16(t1, vshr4(qb)), xd, b)
    return a, b


# ---------------------------------------------------------------- a group of 4 rows


@njit(**_JIT)
def _group_q4_0(x, w, r0, out):
    w0, w1, w2, w3 = _rows(w, r0)
    base = viota_minus8()
    a0 = b0 = a1 = b1 = a2 = b2 = a3 = b3 = vzero()
    ahead = (r0 + R) * w.shape[1]  # the next group's first byte
    for blk in range(x.size // 32):
        o = 18 * blk
        _prefetch_lines(w, ahead + 4 * o, 72)
        xl = vload(x, 32 * blk)
        xh = vload(x, 32 * blk + 16)
        a0, b0 = _q4_0(w0, o, base, xl, xh, a0, b0)
        a1, b1 = _q4_0(w1, o, base, xl, xh, a1, b1)
        a2, b2 = _q4_0(w2, o, base, xl, xh, a2, b2)
        a3, b3 = _q4_0(w3, o, base, xl, xh, a3, b3)
    _store(out, r0, vhsum(vadd(a0, b0)), vhsum(vadd(a1, b1)), vhsum(vadd(a2, b2)), vhsum(vadd(a3, b3)))


@njit(**_JIT)
def _group_q8_0(x, w, r0, out):
    w0, w1, w2, w3 = _rows(w, r0)
    a0 = b0 = a1 = b1 = a2 = b2 = a3 = b3 = vzero()
    ahead = (r0 + R) * w.shape[1]
    for blk in range(x.size // 32):
        o = 34 * blk
        _prefetch_lines(w, ahead + 4 * o, 136)
        xl = vload(x, 32 * blk)
        xh = vload(x, 32 * blk + 16)
        a0, b0 = _q8_0(w0, o, xl, xh, a0, b0)
        a1, b1 = _q8_0(w1, o, xl, xh, a1, b1)
        a2, b2 = _q8_0(w2, o, xl, xh, a2, b2)
        a3, b3 = _q8_0(w3, o, xl, xh, a3, b3)
    _store(out, r0, vhsum(vadd(a0, b0)), vhsum(vadd(a1, b1)), vhsum(vadd(a2, b2)), vhsum(vadd(a3, b3)))


@njit(**_JIT)
def _group_q4_k(x, w, r0, out):
    w0, w1, w2, w3 = _rows(w, r0)
    iota = viota()
    a0 = b0 = a1 = b1 = a2 = b2 = a3 = b3 = vzero()
    ahead = (r0 + R) * w.shape[1]
    for blk in range(x.size // 256):
        o = 144 * blk
        _prefetch_lines(w, ahead + 4 * o, 576)
        dm0, dm1, dm2, dm3 = q4k_scales(w0, o), q4k_scales(w1, o), q4k_scales(w2, o), q4k_scales(w3, o)
        for c in range(4):
            xo = 256 * blk + 64 * c
            xa = vload(x, xo)
            xb = vload(x, xo + 16)
            xc = vload(x, xo + 32)
            xd = vload(x, xo + 48)
            a0, b0 = _q4_k(w0, o, c, dm0, iota, xa, xb, xc, xd, a0, b0)
            a1, b1 = _q4_k(w1, o, c, dm1, iota, xa, xb, xc, xd, a1, b1)
            a2, b2 = _q4_k(w2, o, c, dm2, iota, xa, xb, xc, xd, a2, b2)
            a3, b3 = _q4_k(w3, o, c, dm3, iota, xa, xb, xc, xd, a3, b3)
    _store(out, r0, vhsum(vadd(a0, b0)), vhsum(vadd(a1, b1)), vhsum(vadd(a2, b2)), vhsum(vadd(a3, b3)))


@njit(**_JIT)
def _float16(wr, fsize, k):
    """16 weights from column k of an f16 (fsize 2) or f32 (fsize 4) row."""
    if fsize == 2:
        return half16(wr, 2 * k)
    return f32x16_at(wr, 4 * k)


@njit(**_JIT)
def _float1(wr, fsize, k):
    if fsize == 2:
        return half_at(wr, 2 * k)
    return f32_at(wr, 4 * k)


@njit(**_JIT)
def _group_float(x, w, r0, out, fsize):
    """f16 (fsize 2) or f32 (fsize 4) rows; any width (a scalar tail past the last 16 columns)."""
    w0, w1, w2, w3 = _rows(w, r0)
    a0 = b0 = a1 = b1 = a2 = b2 = a3 = b3 = vzero()
    cols = x.size
    ahead = (r0 + R) * w.shape[1]
    k = 0
    while k + 32 <= cols:
        _prefetch_lines(w, ahead + 4 * fsize * k, 4 * 32 * fsize)
        xl = vload(x, k)
        xh = vload(x, k + 16)
        a0 = vfma(_float16(w0, fsize, k), xl, a0)
        b0 = vfma(_float16(w0, fsize, k + 16), xh, b0)
        a1 = vfma(_float16(w1, fsize, k), xl, a1)
        b1 = vfma(_float16(w1, fsize, k + 16), xh, b1)
        a2 = vfma(_float16(w2, fsize, k), xl, a2)
        b2 = vfma(_float16(w2, fsize, k + 16), xh, b2)
        a3 = vfma(_float16(w3, fsize, k), xl, a3)
        b3 = vfma(_float16(w3, fsize, k + 16), xh, b3)
        k += 32
    if k + 16 <= cols:
        xl = vload(x, k)
        a0 = vfma(_float16(w0, fsize, k), xl, a0)
        a1 = vfma(_float16(w1, fsize, k), xl, a1)
        a2 = vfma(_float16(w2, fsize, k), xl, a2)
        a3 = vfma(_float16(w3, fsize, k), xl, a3)
        k += 16
    s0, s1, s2, s3 = vhsum(vadd(a0, b0)), vhsum(vadd(a1, b1)), vhsum(vadd(a2, b2)), vhsum(vadd(a3, b3))
    for j in range(k, cols):
        s0 += _float1(w0, fsize, j) * x[j]
        s1 += _float1(w1, fsize, j) * x[j]
        s2 += _float1(w2, fsize, j) * x[j]
        s3 += _float1(w3, fsize, j) * x[j]
    _store(out, r0, s0, s1, s2, s3)


@njit(**_JIT)
def matvec_group(kind, x, w, r0, out):
    """out[r0:r0+4] = W[r0:r0+4] @ x (fewer rows past the end). w: uint8 (rows, row_bytes)."""
    if kind == Q4_0:
        _group_q4_0(x, w, r0, out)
    elif kind == Q4_K:
        _group_q4_k(x, w, r0, out)
    elif kind == Q8_0:
        _group_q8_0(x, w, r0, out)
    elif kind == F16:
        _group_float(x, w, r0, out, 2)
    else:
        _group_float(x, w, r0, out, 4)


@njit(parallel=True, **_JIT)
def matvec(kind, x, w, out):
    """out (rows,) = W @ x. x: float32 (cols,); w: uint8 (rows, row_bytes) of dtype code `kind`."""
    for g in prange((w.shape[0] + R - 1) // R):
        matvec_group(kind, x, w, R * g, out)


@njit(**_JIT)
def silu_mul_scalar(g, u):
    """silu(g) * u as `matmul.silu_mul` computes it: g / (1 + exp(-g)) * u (exp(-g) = inf -> -0)."""
    return g / (np.float32(1.0) + np.exp(-g)) * u


@njit(parallel=True, **_JIT)
def matvec_swiglu(kind_g, kind_u, x, wg, wu, h, u):
    """h (d_ff,) = silu(G @ x) * (U @ x); u (d_ff,) is scratch. One parallel region reads x once
    per group for both matrices and applies the activation to each group as it completes."""
    for g in prange((wg.shape[0] + R - 1) // R):
        r0 = R * g
        matvec_group(kind_g, x, wg, r0, h)
        matvec_group(kind_u, x, wu, r0, u)
        for r in range(r0, min(r0 + R, h.size)):
            h[r] = silu_mul_scalar(h[r], u[r])
