"""q5_1: blocks of 32 weights in 24 bytes, x = d * q + m with q a 5-bit quant, d and m f16.

Block: d (f16, bytes 0-1), m (f16, bytes 2-3), qh (4 bytes, a little-endian uint32 whose bit j is
the high bit of weight j), then 16 bytes whose low nibbles are the low 4 bits of weights 0-15 and
high nibbles those of 16-31. Quantizer and dequantizer are bit-exact with ggml (quantize_row_q5_1_ref,
what ggml_quantize_chunk writes without an importance matrix) and gguf-py (but for the sign of a zero
min, see q4_1); the dequantizer rounds d * q, then adds m.

Decode (matvec): the 5-bit quants are assembled in int32 lanes (`q5_lo16`/`q5_hi16`), converted
(exact), then d * q + m with the reference's two roundings (`vaffine`): exactly `dequantize`'s.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from mertools.kernels.common import (
    EXACT_JIT,
    EXACT_PJIT,
    KC,
    MATVEC_JIT,
    TILE_JIT,
    R,
    f16_bits_to_f32,
    group_rows,
    group_store,
    prefetch_lines,
)
from mertools.kernels.simd import half_splat, vadd, vfma, vhsum, vload, vstore, vtof, vzero

from ._blocks32 import c_byte, min_scale, put_f16, q5_hi16, q5_lo16, vaffine
from .base import DType, Thresholds, cast_low_byte, f16_bytes, f16_from_bytes
from .q4_1 import min_max_reference
from .q5_0 import pack5_reference, put_q5, put_u32, quants5_reference

BYTES = 24
_F32 = np.float32


# ---------------------------------------------------------------- numpy references


def quantize_reference(x: np.ndarray) -> np.ndarray:
    """x: float32 (..., cols) with cols % 32 == 0 -> uint8 (n_blocks, 24)."""
    xb = np.asarray(x, dtype=np.float32).reshape(-1, 32)  # (nb, 32)
    mn, mx = min_max_reference(xb)  # (nb, 1) each
    with np.errstate(all="ignore"):
        d = (mx - mn) / _F32(31.0)
        inv = np.where(d != 0, _F32(1.0) / np.where(d != 0, d, _F32(1.0)), _F32(0.0)).astype(np.float32)
        q = cast_low_byte((xb - mn) * inv + _F32(0.5))  # C: (uint8_t)(v + 0.5f), no clamp
    return np.concatenate([f16_bytes(d.ravel()), f16_bytes(mn.ravel()), pack5_reference(q)], axis=1)


def dequantize_reference(raw: np.ndarray) -> np.ndarray:
    """raw: uint8 (n_blocks*24,) -> float32 (n_blocks*32,). x = d * q + m."""
    b = np.asarray(raw, dtype=np.uint8).reshape(-1, BYTES)
    d = f16_from_bytes(b[:, 0:2])  # (nb, 1)
    m = f16_from_bytes(b[:, 2:4])
    q = quants5_reference(b[:, 4:8], b[:, 8:]).astype(np.float32)  # (nb, 32)
    with np.errstate(invalid="ignore", over="ignore"):  # 0 * inf, inf - inf: NaN as in C
        return (d * q + m).reshape(-1)


# ---------------------------------------------------------------- numba quantizer and dequantizer


@njit(**EXACT_PJIT)
def quantize(x):
    """x: float32 (n_blocks*32,) -> uint8 (n_blocks*24,)."""
    nb = x.size // 32
    out = np.empty(nb * BYTES, dtype=np.uint8)
    for b in prange(nb):
        base = b * 32
        mn, d, inv = min_scale(x, base, np.float32(31.0))
        o = b * BYTES
        put_f16(out, o, d)
        put_f16(out, o + 2, mn)
        qh = np.int64(0)
        for j in range(16):
            q0 = c_byte((x[base + j] - mn) * inv + np.float32(0.5))
            q1 = c_byte((x[base + 16 + j] - mn) * inv + np.float32(0.5))
            qh = put_q5(out, o + 8, q0, q1, j, qh)
        put_u32(out, o + 4, qh)
    return out


@njit(**EXACT_JIT)
def _plus(p, m, m_first):
    """p + m with numpy's (gguf-py's) NaN payload: LLVM may commute an fadd, so the order is explicit.
    numpy's d * q + m keeps p's payload when both are NaN, but m's for a lone block (m_first: its
    broadcast m then takes the first operand's place)."""
    if m_first and m != m:
        return m + m  # m, made quiet
    return p if p != p else p + m


@njit(**EXACT_PJIT)
def dequantize(raw):
    """raw: uint8 (n_blocks*24,) -> float32 (n_blocks*32,). x = d * q + m."""
    nb = raw.size // BYTES
    out = np.empty(nb * 32, dtype=np.float32)
    single = nb == 1  # see _plus
    for b in prange(nb):
        o = b * BYTES
        d = f16_bits_to_f32(np.int64(raw[o]) | (np.int64(raw[o + 1]) << 8))
        m = f16_bits_to_f32(np.int64(raw[o + 2]) | (np.int64(raw[o + 3]) << 8))
        qh = np.int64(raw[o + 4]) | (np.int64(raw[o + 5]) << 8) | (np.int64(raw[o + 6]) << 16) | (np.int64(raw[o + 7]) << 24)
        for j in range(16):
            q = np.int64(raw[o + 8 + j])
            lo = (q & 0xF) | (((qh >> j) & 1) << 4)
            hi = (q >> 4) | (((qh >> (j + 16)) & 1) << 4)
            out[b * 32 + j] = _plus(np.float32(lo) * d, m, single)
            out[b * 32 + 16 + j] = _plus(np.float32(hi) * d, m, single)
    return out


# ---------------------------------------------------------------- matmul decoders


@njit(inline="always", **TILE_JIT)  # numba inlines it: LLVM may leave a call in decode_tile's row loop
def tile_row(wr, k0, kc, buf, r):
    """buf[r, :kc] = the row's weights k0:k0+kc (wr: the row's uint8 bytes), exactly `dequantize`'s."""
    at = r * KC  # flat offset of buf row r
    for b in range(kc // 32):
        o = (k0 // 32 + b) * BYTES
        d = half_splat(wr, o)
        m = half_splat(wr, o + 2)
        vstore(buf, at + 32 * b, vaffine(vtof(q5_lo16(wr, o + 4)), d, m))
        vstore(buf, at + 32 * b + 16, vaffine(vtof(q5_hi16(wr, o + 4)), d, m))


@njit(**MATVEC_JIT)
def _block(wr, o, xl, xh, a, b):
    """One row's share of the block at byte o: (a, b) += its weights 0-15 * xl, 16-31 * xh."""
    d = half_splat(wr, o)
    m = half_splat(wr, o + 2)
    lo = vaffine(vtof(q5_lo16(wr, o + 4)), d, m)
    hi = vaffine(vtof(q5_hi16(wr, o + 4)), d, m)
    return vfma(lo, xl, a), vfma(hi, xh, b)


@njit(**MATVEC_JIT)
def matvec_group(x, w, r0, out):
    """out[r0:r0+4] = W[r0:r0+4] @ x, prefetching the next group's bytes at the same pace."""
    w0, w1, w2, w3 = group_rows(w, r0)
    a0 = b0 = a1 = b1 = a2 = b2 = a3 = b3 = vzero()
    ahead = (r0 + R) * w.shape[1]  # the next group's first byte
    for blk in range(x.size // 32):
        o = BYTES * blk
        prefetch_lines(w, ahead + 4 * o, 4 * BYTES)
        xl = vload(x, 32 * blk)
        xh = vload(x, 32 * blk + 16)
        a0, b0 = _block(w0, o, xl, xh, a0, b0)
        a1, b1 = _block(w1, o, xl, xh, a1, b1)
        a2, b2 = _block(w2, o, xl, xh, a2, b2)
        a3, b3 = _block(w3, o, xl, xh, a3, b3)
    group_store(out, r0, vhsum(vadd(a0, b0)), vhsum(vadd(a1, b1)), vhsum(vadd(a2, b2)), vhsum(vadd(a3, b3)))


TYPE = DType(
    "q5_1", 7, 32, BYTES, scale_offsets=(0, 2),
    # calibrated on the trained fixture (benchmarks/bench_types.py; figures and rule in docs/BENCHMARKS.md)
    verify=Thresholds(kl_mean=0.02, top1=0.88, ppl_ratio=1.066),
    quantize=quantize, dequantize=dequantize,
    quantize_reference=quantize_reference, dequantize_reference=dequantize_reference,
)
