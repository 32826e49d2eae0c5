"""q4_1: blocks of 32 weights in 20 bytes, x = d * q + m with q a 4-bit quant, d and m f16.

Block: d (f16, bytes 0-1), m (f16, bytes 2-3), then 16 bytes whose low nibbles are weights 0-15 and
high nibbles 16-31. Quantizer and dequantizer are bit-exact with ggml (quantize_row_q4_1_ref, what
ggml_quantize_chunk writes without an importance matrix) and gguf-py, except that gguf-py's m may
differ in the sign of a zero min (C keeps the first of equal zeros, numpy's min either); the
dequantizer rounds d * q, then adds m.

Decode (matvec): a 16-entry table d * k + m (k = 0..15, the reference's two roundings) per block,
indexed by the nibbles with `vlut16`, so the weights are exactly `dequantize`'s.
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
from mertools.kernels.simd import half_splat, nib16, vadd, vfma, vhsum, viota, vload, vlut16, vshr4, vstore, vzero

from ._blocks32 import c_int8, min_scale, put_f16, vaffine
from .base import DType, Thresholds, cast_low_byte, f16_bytes, f16_from_bytes

BYTES = 20
_F32 = np.float32


# ---------------------------------------------------------------- numpy references


def signed_byte_reference(v: np.ndarray) -> np.ndarray:
    """float32 (...) -> int64 (...): C's (int8_t)v on x86, -128..127 (NaN/Inf/out of range: 0)."""
    b = cast_low_byte(v)
    return np.where(b >= 128, b - 256, b)


def min_max_reference(xb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 (nb, 32) -> min, max float32 (nb, 1) as C's `if (v < min)` scan finds them (the first
    of equal values wins, which fixes the sign of a zero; numpy's min/max may pick either)."""
    mn = xb[:, 0].copy()  # C starts from +-FLT_MAX: the same for finite x
    mx = xb[:, 0].copy()
    for j in range(1, xb.shape[1]):
        mn = np.where(xb[:, j] < mn, xb[:, j], mn)
        mx = np.where(xb[:, j] > mx, xb[:, j], mx)
    return mn[:, None], mx[:, None]


def quantize_reference(x: np.ndarray) -> np.ndarray:
    """x: float32 (..., cols) with cols % 32 == 0 -> uint8 (n_blocks, 20)."""
    xb = np.asarray(x, dtype=np.float32).reshape(-1, 32)  # (nb, 32)
    mn, mx = min_max_reference(xb)
    with np.errstate(all="ignore"):
        d = (mx - mn) / _F32(15.0)  # may overflow to inf: then id = 0 and x - min = inf gives NaN, byte 0
        inv = np.where(d != 0, _F32(1.0) / np.where(d != 0, d, _F32(1.0)), _F32(0.0)).astype(np.float32)
        # C: MIN(15, (int8_t)(v + 0.5f)), a signed comparison (negative bytes cannot occur: v <= ~15)
        q = np.minimum(signed_byte_reference((xb - mn) * inv + _F32(0.5)), 15) & 0xFF  # (nb, 32)
    qs = (q[:, :16] | (q[:, 16:] << 4)).astype(np.uint8)  # byte j: element j low, element j+16 high
    return np.concatenate([f16_bytes(d.ravel()), f16_bytes(mn.ravel()), qs], axis=1)


def dequantize_reference(raw: np.ndarray) -> np.ndarray:
    """raw: uint8 (n_blocks*20,) -> float32 (n_blocks*32,). x = d * q + m."""
    b = np.asarray(raw, dtype=np.uint8).reshape(-1, BYTES)
    d = f16_from_bytes(b[:, 0:2])  # (nb, 1)
    m = f16_from_bytes(b[:, 2:4])
    qs = b[:, 4:]  # (nb, 16)
    q = np.concatenate([qs & 0xF, qs >> 4], axis=1).astype(np.float32)  # (nb, 32)
    with np.errstate(invalid="ignore", over="ignore"):  # 0 * inf, inf - inf: NaN as in C
        return (d * q + m).reshape(-1)


# ---------------------------------------------------------------- numba quantizer and dequantizer


@njit(**EXACT_PJIT)
def quantize(x):
    """x: float32 (n_blocks*32,) -> uint8 (n_blocks*20,)."""
    nb = x.size // 32
    out = np.empty(nb * BYTES, dtype=np.uint8)
    for b in prange(nb):
        base = b * 32
        mn, d, inv = min_scale(x, base, np.float32(15.0))
        o = b * BYTES
        put_f16(out, o, d)
        put_f16(out, o + 2, mn)
        for j in range(16):
            q0 = min(c_int8((x[base + j] - mn) * inv + np.float32(0.5)), 15) & 0xFF
            q1 = min(c_int8((x[base + 16 + j] - mn) * inv + np.float32(0.5)), 15) & 0xFF
            out[o + 4 + j] = (q0 | (q1 << 4)) & 0xFF
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
    """raw: uint8 (n_blocks*20,) -> float32 (n_blocks*32,). x = d * q + m."""
    nb = raw.size // BYTES
    out = np.empty(nb * 32, dtype=np.float32)
    single = nb == 1  # see _plus
    for b in prange(nb):
        o = b * BYTES
        d = f16_bits_to_f32(np.int64(raw[o]) | (np.int64(raw[o + 1]) << 8))
        m = f16_bits_to_f32(np.int64(raw[o + 2]) | (np.int64(raw[o + 3]) << 8))
        for j in range(16):
            q = np.int64(raw[o + 4 + j])
            out[b * 32 + j] = _plus(np.float32(q & 0xF) * d, m, single)
            out[b * 32 + 16 + j] = _plus(np.float32(q >> 4) * d, m, single)
    return out


# ---------------------------------------------------------------- matmul decoders


@njit(inline="always", **TILE_JIT)  # numba inlines it: LLVM may leave a call in decode_tile's row loop
def tile_row(wr, k0, kc, buf, r):
    """buf[r, :kc] = the row's weights k0:k0+kc (wr: the row's uint8 bytes), exactly `dequantize`'s."""
    at = r * KC  # flat offset of buf row r
    iota = viota()
    for b in range(kc // 32):
        o = (k0 // 32 + b) * BYTES
        t = vaffine(iota, half_splat(wr, o), half_splat(wr, o + 2))  # d * k + m, k = 0..15
        q = nib16(wr, o + 4)
        vstore(buf, at + 32 * b, vlut16(t, q))
        vstore(buf, at + 32 * b + 16, vlut16(t, vshr4(q)))


@njit(**MATVEC_JIT)
def _block(wr, o, iota, xl, xh, a, b):
    """One row's share of the block at byte o: (a, b) += its weights 0-15 * xl, 16-31 * xh."""
    t = vaffine(iota, half_splat(wr, o), half_splat(wr, o + 2))
    q = nib16(wr, o + 4)
    return vfma(vlut16(t, q), xl, a), vfma(vlut16(t, vshr4(q)), xh, b)


@njit(**MATVEC_JIT)
def matvec_group(x, w, r0, out):
    """out[r0:r0+4] = W[r0:r0+4] @ x, prefetching the next group's bytes at the same pace."""
    w0, w1, w2, w3 = group_rows(w, r0)
    iota = viota()
    a0 = b0 = a1 = b1 = a2 = b2 = a3 = b3 = vzero()
    ahead = (r0 + R) * w.shape[1]  # the next group's first byte
    for blk in range(x.size // 32):
        o = BYTES * blk
        prefetch_lines(w, ahead + 4 * o, 4 * BYTES)
        xl = vload(x, 32 * blk)
        xh = vload(x, 32 * blk + 16)
        a0, b0 = _block(w0, o, iota, xl, xh, a0, b0)
        a1, b1 = _block(w1, o, iota, xl, xh, a1, b1)
        a2, b2 = _block(w2, o, iota, xl, xh, a2, b2)
        a3, b3 = _block(w3, o, iota, xl, xh, a3, b3)
    group_store(out, r0, vhsum(vadd(a0, b0)), vhsum(vadd(a1, b1)), vhsum(vadd(a2, b2)), vhsum(vadd(a3, b3)))


TYPE = DType(
    "q4_1", 3, 32, BYTES, scale_offsets=(0, 2),
    # calibrated on the trained fixture (benchmarks/bench_types.py; figures and rule in docs/BENCHMARKS.md)
    verify=Thresholds(kl_mean=0.04, top1=0.84, ppl_ratio=1.153),
    quantize=quantize, dequantize=dequantize,
    quantize_reference=quantize_reference, dequantize_reference=dequantize_reference,
)
