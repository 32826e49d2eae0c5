"""numba pieces shared by the tensor type modules (`mertools.dtypes`) and the kernels that run them.

- the jit options of each kind of kernel, so that every type's code gets exactly the same flags;
- half <-> float32 conversions (exact, NaN payloads kept) and the NaN/Inf scan of `quantize`;
- the prefill tile's geometry (RB x KC) and the decode kernels' groups of R rows, with their helpers;
- the decode row loop of the float types (f16 and f32 share it; `fsize` picks the load).

numba's on-disk cache is keyed on each function's own source file: after editing this file, touch
the modules whose kernels call into it (the type modules, `dispatch`), or delete their __pycache__/*.nbi.
"""

from __future__ import annotations

import numpy as np
from numba import get_num_threads, njit, prange

from mertools.kernels.simd import (
    bits_f32,
    f32_at,
    f32_bits,
    f32x16_at,
    half16,
    half_at,
    prefetch,
    vadd,
    vfma,
    vhsum,
    vload,
    vzero,
)

# Start numba's thread pool now: a cached compiled caller of a parallel region (int8's `_quantized_matmul8`), loaded
# in a process that had not started the pool, segfaulted on its first call (`mertools run` after `make test`).
get_num_threads()

# Quantizers and dequantizers: every intermediate float32 as in ggml-quants.c, fastmath off so LLVM
# never fuses a multiply-add, error_model="numpy" for IEEE division by zero.
EXACT_JIT = {"cache": True, "error_model": "numpy"}
EXACT_PJIT = {**EXACT_JIT, "parallel": True}
# The prefill tile and its dot products: reassociation lets LLVM vectorise the reductions, while
# leaving out nnan/ninf keeps inf/NaN weights propagating. Every kernel releases the GIL.
TILE_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}
TILE_JIT = {"nogil": True, "cache": True, "fastmath": TILE_FASTMATH}
# The decode kernels: no fastmath, every rounding an IEEE operation in a fixed order.
MATVEC_JIT = {"nogil": True, "cache": True}

RB = 16  # weight rows per prefill task (a multiple of 4, the dot's row blocking)
KC = 512  # columns per prefill tile: RB x KC float32 = 32 KiB; a multiple of every block size
R = 4  # rows per decode group


# ---------------------------------------------------------------- halves


@njit(**EXACT_JIT)
def f32_to_f16_bits(f):
    """float32 -> IEEE half bits, round to nearest even (GGML_FP32_TO_FP16, numpy astype)."""
    x = np.int64(f32_bits(f)) & 0xFFFFFFFF
    sign = (x >> 16) & 0x8000
    a = x & 0x7FFFFFFF
    if a > 0x7F800000:  # NaN: keep the top payload bits, never turn it into inf (numpy's rule)
        p = (a >> 13) & 0x3FF
        return np.uint16(sign | 0x7C00 | (p if p else 1))
    if a >= 0x477FF000:  # >= 65520 rounds to inf
        return np.uint16(sign | 0x7C00)
    if a >= 0x38800000:  # normal half: rebias the exponent, round the 13 dropped bits
        r = a - 0x38000000
        h = r >> 13
        rem = r & 0x1FFF
        if rem > 0x1000 or (rem == 0x1000 and (h & 1) == 1):
            h += 1
        return np.uint16(sign | h)
    if a <= 0x33000000:  # <= 2^-25 (exactly half the smallest subnormal) rounds to zero
        return np.uint16(sign)
    shift = 126 - (a >> 23)  # 14..24: value = mant * 2^-shift in units of 2^-24
    mant = (a & 0x7FFFFF) | 0x800000
    h = mant >> shift
    rem = mant & ((np.int64(1) << shift) - 1)
    half = np.int64(1) << (shift - 1)
    if rem > half or (rem == half and (h & 1) == 1):
        h += 1
    return np.uint16(sign | h)


@njit(**EXACT_JIT)
def f16_bits_to_f32(h):
    """IEEE half bits -> float32 (exact; NaN payloads are kept, like numpy)."""
    h = np.int64(h)
    sign = (h & 0x8000) << 16
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 0:  # zero or subnormal: m * 2^-24 is exact in float32
        v = np.float32(m) * np.float32(5.960464477539063e-08)
        return -v if sign else v
    if e == 31:
        bits = sign | 0x7F800000 | (m << 13)
    else:
        bits = sign | ((e + 112) << 23) | (m << 13)
    return bits_f32(np.int32(np.uint32(bits)))


@njit(**EXACT_PJIT)
def first_not_below(x, limit):
    """x: float32 (n,) -> index of the first value with NOT |x| < limit (so NaN too), or -1.

    limit=inf finds the first NaN/Inf; a finite limit also finds values too large for a type.
    """
    n = x.size
    chunk = 1 << 16
    n_chunks = (n + chunk - 1) // chunk
    firsts = np.full(n_chunks, -1, dtype=np.int64)
    for c in prange(n_chunks):
        for i in range(c * chunk, min(n, (c + 1) * chunk)):
            if not abs(x[i]) < limit:
                firsts[c] = i
                break
    for c in range(n_chunks):
        if firsts[c] >= 0:
            return firsts[c]
    return -1


# ---------------------------------------------------------------- decode groups of R rows


@njit(**MATVEC_JIT)
def group_rows(w, r0):
    """The group's 4 rows; past the last row, the last row again (its results are not stored)."""
    last = w.shape[0] - 1
    return w[min(r0, last)], w[min(r0 + 1, last)], w[min(r0 + 2, last)], w[min(r0 + 3, last)]


@njit(**MATVEC_JIT)
def group_store(out, r0, s0, s1, s2, s3):
    n = out.size
    out[r0] = s0
    if r0 + 1 < n:
        out[r0 + 1] = s1
    if r0 + 2 < n:
        out[r0 + 2] = s2
    if r0 + 3 < n:
        out[r0 + 3] = s3


@njit(**MATVEC_JIT)
def group_store_row(out, io, r0, s0, s1, s2, s3):
    """group_store into row io of a 2-D out (the 8-bit kernels: a row view per call cost its reference counts)."""
    n = out.shape[1]
    out[io, r0] = s0
    if r0 + 1 < n:
        out[io, r0 + 1] = s1
    if r0 + 2 < n:
        out[io, r0 + 2] = s2
    if r0 + 3 < n:
        out[io, r0 + 3] = s3


@njit(**MATVEC_JIT)
def prefetch_lines(w, p, nbytes):
    """Prefetch the lines covering w's flat bytes [p, p + nbytes) that exist."""
    end = min(p + nbytes, w.size)
    while p < end:
        prefetch(w, p)
        p += 64


@njit(**MATVEC_JIT)
def _float16(wr, fsize, k):
    """16 weights from column k of an f16 (fsize 2) or f32 (fsize 4) row."""
    if fsize == 2:
        return half16(wr, 2 * k)
    return f32x16_at(wr, 4 * k)


@njit(**MATVEC_JIT)
def _float1(wr, fsize, k):
    if fsize == 2:
        return half_at(wr, 2 * k)
    return f32_at(wr, 4 * k)


@njit(**MATVEC_JIT)
def group_float(x, w, r0, out, fsize):
    """out[r0:r0+4] = W[r0:r0+4] @ x for f16 (fsize 2) or f32 (fsize 4) rows; any width (a scalar
    tail past the last 16 columns)."""
    w0, w1, w2, w3 = group_rows(w, r0)
    a0 = b0 = a1 = b1 = a2 = b2 = a3 = b3 = vzero()
    cols = x.size
    ahead = (r0 + R) * w.shape[1]
    k = 0
    while k + 32 <= cols:
        prefetch_lines(w, ahead + 4 * fsize * k, 4 * 32 * fsize)
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
    group_store(out, r0, s0, s1, s2, s3)
