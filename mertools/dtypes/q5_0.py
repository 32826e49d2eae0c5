"""q5_0: blocks of 32 weights in 22 bytes, x = (q - 16) * d with q a 5-bit quant and d an f16 scale.

Block: d (f16, bytes 0-1), qh (4 bytes, a little-endian uint32 whose bit j is the high bit of weight
j), then 16 bytes whose low nibbles are the low 4 bits of weights 0-15 and high nibbles those of
16-31. Quantizer and dequantizer are bit-exact with ggml (quantize_row_q5_0_ref, what
ggml_quantize_chunk writes without an importance matrix); gguf-py agrees except for the sign of d in a
block of zeros whose first one is -0.0 (C starts from +0.0 and stores d = -0.0; q4_0 follows gguf-py).

Decode (matvec): the 5-bit quants are assembled in int32 lanes (`q5_lo16`/`q5_hi16`: nibbles or'd
with the qh bits), converted (exact) and multiplied by d: exactly `dequantize`'s weights.
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

from ._blocks32 import c_int8, put_f16, q5_hi16_signed, q5_lo16_signed, vexact_mul
from .base import DType, Thresholds, f16_bytes, f16_from_bytes
from .q4_1 import signed_byte_reference

BYTES = 22
_F32 = np.float32


# ---------------------------------------------------------------- numpy references


def pack5_reference(q: np.ndarray) -> np.ndarray:
    """q: int64 (nb, 32) 5-bit quants -> uint8 (nb, 20): qh (bit j = bit 4 of q_j, little-endian
    uint32), then the nibbles (byte j: q_j's low 4 bits, q_(j+16)'s in the high nibble)."""
    qh = ((q >> 4) & 1) << np.arange(32)  # (nb, 32)
    qh = qh.sum(axis=1).astype("<u4").view(np.uint8).reshape(-1, 4)  # distinct bits: the sum is an or
    qs = ((q[:, :16] & 0xF) | ((q[:, 16:] & 0xF) << 4)).astype(np.uint8)
    return np.concatenate([qh, qs], axis=1)


def quantize_reference(x: np.ndarray) -> np.ndarray:
    """x: float32 (..., cols) with cols % 32 == 0 -> uint8 (n_blocks, 22)."""
    xb = np.asarray(x, dtype=np.float32).reshape(-1, 32)  # (nb, 32)
    # the signed element of largest magnitude, first wins; C starts from +0.0, which a block of zeros
    # keeps (so d = -0.0 even when its first zero is -0.0)
    pick = np.take_along_axis(xb, np.abs(xb).argmax(axis=1)[:, None], axis=1)  # (nb, 1)
    mx = np.where(np.abs(pick) > 0, pick, _F32(0.0)).astype(np.float32)
    with np.errstate(all="ignore"):
        d = mx / _F32(-16.0)
        inv = np.where(d != 0, _F32(1.0) / np.where(d != 0, d, _F32(1.0)), _F32(0.0)).astype(np.float32)
        # C: MIN(31, (int8_t)(x*id + 16.5f)), signed; an infinite id (|d| < 2^-128) gives byte 0
        q = np.minimum(signed_byte_reference(xb * inv + _F32(16.5)), 31) & 0xFF  # (nb, 32)
    return np.concatenate([f16_bytes(d.ravel()), pack5_reference(q)], axis=1)


def quants5_reference(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """qh: uint8 (nb, 4), qs: uint8 (nb, 16) -> int64 (nb, 32), the 5-bit quants 0..31."""
    h = np.ascontiguousarray(qh).view("<u4").astype(np.int64)  # (nb, 1)
    hi = (h >> np.arange(32)) & 1  # (nb, 32)
    lo = np.concatenate([qs & 0xF, qs >> 4], axis=1).astype(np.int64)
    return lo | (hi << 4)


def dequantize_reference(raw: np.ndarray) -> np.ndarray:
    """raw: uint8 (n_blocks*22,) -> float32 (n_blocks*32,). x = (q - 16) * d."""
    b = np.asarray(raw, dtype=np.uint8).reshape(-1, BYTES)
    d = f16_from_bytes(b[:, 0:2])  # (nb, 1)
    q = quants5_reference(b[:, 2:6], b[:, 6:]) - 16  # (nb, 32)
    with np.errstate(invalid="ignore"):  # 0 * inf = NaN, as in C
        return (d * q.astype(np.float32)).reshape(-1)


# ---------------------------------------------------------------- numba quantizer and dequantizer


@njit(**EXACT_JIT)
def put_q5(out, o, q0, q1, j, qh):
    """Nibble byte j of the block whose qs start at out[o] (q0: weight j, q1: weight j+16); returns qh
    with their 5th bits or'd in at bits j and j+16."""
    out[o + j] = (q0 & 0xF) | ((q1 & 0xF) << 4)
    return qh | (((q0 >> 4) & 1) << j) | (((q1 >> 4) & 1) << (j + 16))


@njit(**EXACT_JIT)
def put_u32(out, o, v):
    """out[o:o+4] = v as a little-endian uint32."""
    for k in range(4):
        out[o + k] = (v >> (8 * k)) & 0xFF


@njit(**EXACT_PJIT)
def quantize(x):
    """x: float32 (n_blocks*32,) -> uint8 (n_blocks*22,)."""
    nb = x.size // 32
    out = np.empty(nb * BYTES, dtype=np.uint8)
    for b in prange(nb):
        base = b * 32
        amax = np.float32(0.0)
        mx = np.float32(0.0)
        for j in range(32):
            v = x[base + j]
            if amax < abs(v):
                amax = abs(v)
                mx = v
        d = mx / np.float32(-16.0)
        inv = np.float32(1.0) / d if d != np.float32(0.0) else np.float32(0.0)
        o = b * BYTES
        put_f16(out, o, d)
        qh = np.int64(0)
        for j in range(16):
            q0 = min(c_int8(x[base + j] * inv + np.float32(16.5)), 31) & 0xFF
            q1 = min(c_int8(x[base + 16 + j] * inv + np.float32(16.5)), 31) & 0xFF
            qh = put_q5(out, o + 6, q0, q1, j, qh)
        put_u32(out, o + 2, qh)
    return out


@njit(**EXACT_PJIT)
def dequantize(raw):
    """raw: uint8 (n_blocks*22,) -> float32 (n_blocks*32,). x = (q - 16) * d."""
    nb = raw.size // BYTES
    out = np.empty(nb * 32, dtype=np.float32)
    for b in prange(nb):
        o = b * BYTES
        d = f16_bits_to_f32(np.int64(raw[o]) | (np.int64(raw[o + 1]) << 8))
        qh = np.int64(raw[o + 2]) | (np.int64(raw[o + 3]) << 8) | (np.int64(raw[o + 4]) << 16) | (np.int64(raw[o + 5]) << 24)
        for j in range(16):
            q = np.int64(raw[o + 6 + j])
            lo = (q & 0xF) | (((qh >> j) & 1) << 4)
            hi = (q >> 4) | (((qh >> (j + 16)) & 1) << 4)
            out[b * 32 + j] = np.float32(lo - 16) * d
            out[b * 32 + 16 + j] = np.float32(hi - 16) * d
    return out


# ---------------------------------------------------------------- matmul decoders


@njit(inline="always", **TILE_JIT)  # numba inlines it: LLVM may leave a call in decode_tile's row loop
def tile_row(wr, k0, kc, buf, r):
    """buf[r, :kc] = the row's weights k0:k0+kc (wr: the row's uint8 bytes), exactly `dequantize`'s."""
    at = r * KC  # flat offset of buf row r
    for b in range(kc // 32):
        o = (k0 // 32 + b) * BYTES
        d = half_splat(wr, o)
        vstore(buf, at + 32 * b, vexact_mul(vtof(q5_lo16_signed(wr, o + 2)), d))
        vstore(buf, at + 32 * b + 16, vexact_mul(vtof(q5_hi16_signed(wr, o + 2)), d))


@njit(**MATVEC_JIT)
def _block(wr, o, xl, xh, a, b):
    """One row's share of the block at byte o: (a, b) += its weights 0-15 * xl, 16-31 * xh."""
    d = half_splat(wr, o)
    lo = vexact_mul(vtof(q5_lo16_signed(wr, o + 2)), d)
    hi = vexact_mul(vtof(q5_hi16_signed(wr, o + 2)), d)
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
    "q5_0", 6, 32, BYTES, scale_offsets=(0,),
    # calibrated on the trained fixture (benchmarks/bench_types.py; figures and rule in docs/BENCHMARKS.md)
    verify=Thresholds(kl_mean=0.02, top1=0.89, ppl_ratio=1.138),
    quantize=quantize, dequantize=dequantize,
    quantize_reference=quantize_reference, dequantize_reference=dequantize_reference,
)
