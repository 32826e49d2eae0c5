"""mxfp4: blocks of 32 weights in 17 bytes (OCP microscaling FP4), x = K[q] * 2^(e - 128).

Block: e (one E8M0 exponent byte, byte 0), then 16 bytes whose low nibbles index weights 0-15 and
high nibbles 16-31 into ggml's doubled E2M1 table K = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, ..., -12}; the
halving is folded into the scale (ggml_e8m0_to_fp32_half: 2^(e - 128), subnormal for e < 2). Every
weight is exact (a small integer times a power of two); e >= 253 can overflow to inf, and no byte
gives NaN (ggml ignores OCP's NaN at e = 255). Quantizer and dequantizer are bit-exact with ggml
(quantize_row_mxfp4_ref) and gguf-py. Blocks are 17 bytes: rows are unaligned.

Quantizer: e = (uint8_t)(floor(log2f(amax)) + 125) (so amax < 2^-125 wraps to a large e, as in C), each
weight the table entry nearest to it (first of equal errors). log2f is taken as log2 in double rounded
to float32: checked against ggml on every float32 amax at the top of its binade (where log2f rounds up
to the next integer), the double result is never within a relative 2e-10 of a float32 rounding
boundary, so any faithful double log2 gives ggml's bytes.

Decode (matvec): the table K * 2^(e - 128) per block (exact), indexed by the nibbles with `vlut16`.
8-bit kernels (`kernels.int8`): packed by groups of 4 rows like Q4_0 (4 exponent bytes, then the rows' nibbles),
each nibble turned into K + 16 by a byte table, times the activation quants in integers, 2^(e - 128) * d_x per block.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from mertools.kernels.common import EXACT_JIT, EXACT_PJIT, KC, MATVEC_JIT, TILE_JIT, R, group_rows, group_store, prefetch_lines
from mertools.kernels.simd import bits_f32, nib16, vadd, vfma, vhsum, vload, vlut16, vshr4, vsplat, vstore, vzero

from ._blocks32 import const16, vexact_mul
from .base import DType, Int8Pack, Thresholds, cast_low_byte

BYTES = 17
KVALUES = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)  # E2M1 values doubled (kvalues_mxfp4)
_K = np.array(KVALUES, dtype=np.float32)
_F32 = np.float32
_table = const16(KVALUES)


# ---------------------------------------------------------------- numpy reference


def e8m0_half_reference(e: np.ndarray) -> np.ndarray:
    """uint8 (...) -> float32 (...): 2^(e - 128), ggml_e8m0_to_fp32_half."""
    e = np.asarray(e).astype(np.uint32)
    bits = np.where(e < 2, np.uint32(0x00200000) << e, (e - np.uint32(1)) << np.uint32(23)).astype(np.uint32)
    return bits.view(np.float32)


def quantize_reference(x: np.ndarray) -> np.ndarray:
    """x: float32 (..., cols) with cols % 32 == 0 -> uint8 (n_blocks, 17)."""
    xb = np.asarray(x, dtype=np.float32).reshape(-1, 32)  # (nb, 32)
    amax = np.abs(xb).max(axis=1)  # (nb,)
    with np.errstate(all="ignore"):
        lg = np.floor(np.log2(amax.astype(np.float64)).astype(np.float32))  # floorf(log2f(amax))
        e = np.where(amax > 0, cast_low_byte(lg - _F32(2.0) + _F32(127.0)), 0).astype(np.uint8)
        d = e8m0_half_reference(e)[:, None, None]  # (nb, 1, 1)
        err = np.abs(d * _K - xb[:, :, None])  # (nb, 32, 16): fabsf(K[i]*d - x)
    q = err.argmin(axis=2).astype(np.uint8)  # the first of equal errors, as C's strict `<`
    return np.concatenate([e[:, None], q[:, :16] | (q[:, 16:] << 4)], axis=1)


def dequantize_reference(raw: np.ndarray) -> np.ndarray:
    """raw: uint8 (n_blocks*17,) -> float32 (n_blocks*32,). x = 2^(e - 128) * K[q]."""
    b = np.asarray(raw, dtype=np.uint8).reshape(-1, BYTES)
    d = e8m0_half_reference(b[:, 0:1])  # (nb, 1)
    qs = b[:, 1:]
    q = np.concatenate([qs & 0xF, qs >> 4], axis=1)  # (nb, 32)
    with np.errstate(over="ignore"):
        return (d * _K[q]).reshape(-1)


def int_blocks(w2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (rows, nb*17) -> the weights' doubled E2M1 values K[q], int32 (rows, nb, 32), and scales 2^(e - 128),
    float32 (rows, nb): weight = value * scale, exactly."""
    b = np.asarray(w2, dtype=np.uint8).reshape(w2.shape[0], -1, BYTES)
    qs = b[:, :, 1:].astype(np.int32)  # (rows, nb, 16)
    return np.array(KVALUES, np.int32)[np.concatenate([qs & 0xF, qs >> 4], axis=2)], e8m0_half_reference(b[:, :, 0])


# ---------------------------------------------------------------- numba dequantizer


@njit(**EXACT_JIT)
def e8m0_half(e):
    """An E8M0 byte -> float32 2^(e - 128) (ggml_e8m0_to_fp32_half)."""
    e = np.int64(e)
    bits = (np.int64(0x00200000) << e) if e < 2 else ((e - 1) << 23)
    return bits_f32(np.int32(bits))


@njit(**EXACT_JIT)
def _nearest(v, d, k):
    """best_index_mxfp4: the first i with the least fabsf(K[i]*d - v). Only 8 entries can win: for
    v >= 0 a negative entry's error |K|d + v is never below the positive one's, which comes first; for
    v < 0 the positive entries' errors K d + |v| are never below entry 0's |v|, and entry 8 (also 0)
    ties with it, so the scan covers 0..7 or 0, 9..15."""
    s = 0 if v >= np.float32(0.0) else 8
    best = 0
    best_err = abs(k[0] * d - v)
    for i in range(1, 8):
        err = abs(k[s + i] * d - v)
        if err < best_err:
            best = s + i
            best_err = err
    return best


@njit(**EXACT_PJIT)
def quantize(x):
    """x: float32 (n_blocks*32,) -> uint8 (n_blocks*17,)."""
    nb = x.size // 32
    out = np.empty(nb * BYTES, dtype=np.uint8)
    k = _K
    for b in prange(nb):
        base = b * 32
        amax = np.float32(0.0)
        for j in range(32):
            if amax < abs(x[base + j]):
                amax = abs(x[base + j])
        e = 0
        if amax > np.float32(0.0):
            lg = np.floor(np.float32(math.log2(np.float64(amax))))  # an integer, -149..128
            e = (np.int64(lg) + 125) & 0xFF  # (uint8_t)(lg - 2 + 127): gcc's cast keeps the low byte
        d = e8m0_half(e)
        o = b * BYTES
        out[o] = e
        for j in range(16):
            out[o + 1 + j] = _nearest(x[base + j], d, k) | (_nearest(x[base + 16 + j], d, k) << 4)
    return out


@njit(**EXACT_PJIT)
def dequantize(raw):
    """raw: uint8 (n_blocks*17,) -> float32 (n_blocks*32,). x = 2^(e - 128) * K[q]."""
    nb = raw.size // BYTES
    out = np.empty(nb * 32, dtype=np.float32)
    k = _K
    for b in prange(nb):
        o = b * BYTES
        d = e8m0_half(raw[o])
        for j in range(16):
            q = np.int64(raw[o + 1 + j])
            out[b * 32 + j] = d * k[q & 0xF]
            out[b * 32 + 16 + j] = d * k[q >> 4]
    return out


# ---------------------------------------------------------------- matmul decoders


@njit(inline="always", **TILE_JIT)  # numba inlines it: LLVM may leave a call in decode_tile's row loop
def tile_row(wr, k0, kc, buf, r):
    """buf[r, :kc] = the row's weights k0:k0+kc (wr: the row's uint8 bytes), exactly `dequantize`'s."""
    at = r * KC  # flat offset of buf row r
    kv = _table()
    for b in range(kc // 32):
        o = (k0 // 32 + b) * BYTES
        t = vexact_mul(kv, vsplat(e8m0_half(wr[o])))
        q = nib16(wr, o + 1)
        vstore(buf, at + 32 * b, vlut16(t, q))
        vstore(buf, at + 32 * b + 16, vlut16(t, vshr4(q)))


@njit(**MATVEC_JIT)
def _block(wr, o, kv, xl, xh, a, b):
    """One row's share of the block at byte o: (a, b) += its weights 0-15 * xl, 16-31 * xh."""
    t = vexact_mul(kv, vsplat(e8m0_half(wr[o])))
    q = nib16(wr, o + 1)
    return vfma(vlut16(t, q), xl, a), vfma(vlut16(t, vshr4(q)), xh, b)


@njit(**MATVEC_JIT)
def matvec_group(x, w, r0, out):
    """out[r0:r0+4] = W[r0:r0+4] @ x, prefetching the next group's bytes at the same pace."""
    w0, w1, w2, w3 = group_rows(w, r0)
    kv = _table()
    a0 = b0 = a1 = b1 = a2 = b2 = a3 = b3 = vzero()
    ahead = (r0 + R) * w.shape[1]  # the next group's first byte
    for blk in range(x.size // 32):
        o = BYTES * blk
        prefetch_lines(w, ahead + 4 * o, 4 * BYTES)
        xl = vload(x, 32 * blk)
        xh = vload(x, 32 * blk + 16)
        a0, b0 = _block(w0, o, kv, xl, xh, a0, b0)
        a1, b1 = _block(w1, o, kv, xl, xh, a1, b1)
        a2, b2 = _block(w2, o, kv, xl, xh, a2, b2)
        a3, b3 = _block(w3, o, kv, xl, xh, a3, b3)
    group_store(out, r0, vhsum(vadd(a0, b0)), vhsum(vadd(a1, b1)), vhsum(vadd(a2, b2)), vhsum(vadd(a3, b3)))


TYPE = DType(
    "mxfp4", 39, 32, BYTES, scale_offsets=(0,), scale_format="e8m0",
    # calibrated on the trained fixture (benchmarks/bench_types.py; figures and rule in docs/BENCHMARKS.md)
    verify=Thresholds(kl_mean=0.2, top1=0.72, ppl_ratio=1.745),
    quantize=quantize, dequantize=dequantize,
    quantize_reference=quantize_reference, dequantize_reference=dequantize_reference,
    int8_pack=Int8Pack(parts=1, offset=16, flip=0, blocks=int_blocks, codes=tuple(k + 16 for k in KVALUES)),
)
