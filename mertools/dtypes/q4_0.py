"""q4_0: blocks of 32 weights in 18 bytes, x = (q - 8) * d with q a 4-bit quant and d an f16 scale.

Block: d (f16, bytes 0-1), then 16 bytes whose low nibbles are weights 0-15 and high nibbles 16-31.
Quantizer and dequantizer are bit-exact with ggml's reference C (quantize_row_q4_0_ref) and gguf-py.

Decode (matvec): a 16-entry table (k - 8) * d is built per block (one multiply) and indexed by the
nibbles with vpermps (`vlut16`: the low nibble is the byte itself, the high one the byte >> 4), so
each weight costs a shuffle instead of mask, convert and multiply; the weights are exactly
`dequantize`'s.
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
    f32_to_f16_bits,
    group_rows,
    group_store,
    prefetch_lines,
)
from mertools.kernels.simd import (
    AVX512,
    decode_nibbles16,
    half_at,
    half_splat,
    nib16,
    vadd,
    vand15,
    vfma,
    vhsum,
    viota_minus8,
    vload,
    vlut16,
    vmul,
    vshr4,
    vtof,
    vzero,
)
from mertools.kernels.simd8 import isub

from .base import DType, Int8Pack, Thresholds, cast_low_byte, f16_bytes, f16_from_bytes

BYTES = 18
_F32 = np.float32


# ---------------------------------------------------------------- numpy references


def quantize_reference(x: np.ndarray) -> np.ndarray:
    """x: float32 (..., cols) with cols % 32 == 0 -> uint8 (n_blocks, 18)."""
    xb = np.asarray(x, dtype=np.float32).reshape(-1, 32)  # (nb, 32)
    # Largest magnitude keeping its sign, first one wins (argmax); for a block of zeros this takes
    # x[0] like gguf-py, whereas C keeps its initial +0.0 (they differ only when x[0] is -0.0).
    mx = np.take_along_axis(xb, np.abs(xb).argmax(axis=1)[:, None], axis=1)  # (nb, 1)
    with np.errstate(all="ignore"):
        d = mx / _F32(-8.0)
        inv = np.where(d != 0, _F32(1.0) / np.where(d != 0, d, _F32(1.0)), _F32(0.0)).astype(np.float32)
        # C: MIN(15, (int8_t)(x*id + 8.5f)). x*id is within [-8, 8] whenever id is finite, so the
        # byte is never negative; an infinite id (|d| < 2^-128) gives NaN/Inf and x86 casts give 0.
        q = np.minimum(cast_low_byte(xb * inv + _F32(8.5)), 15).astype(np.uint8)  # (nb, 32)
    qs = q[:, :16] | (q[:, 16:] << 4)  # byte j: element j low, element j+16 high
    return np.concatenate([f16_bytes(d.ravel()), qs], axis=1)


def dequantize_reference(raw: np.ndarray) -> np.ndarray:
    """raw: uint8 (n_blocks*18,) -> float32 (n_blocks*32,). x = (q - 8) * d."""
    b = np.asarray(raw, dtype=np.uint8).reshape(-1, BYTES)
    d = f16_from_bytes(b[:, :2])  # (nb, 1)
    qs = b[:, 2:]  # (nb, 16)
    q = np.concatenate([qs & 0xF, qs >> 4], axis=1).astype(np.int32) - 8  # (nb, 32)
    with np.errstate(invalid="ignore"):  # 0 * inf = NaN, as in C
        return (q.astype(np.float32) * d).reshape(-1)


def int_blocks(w2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (rows, nb*18) -> signed quants q - 8, int32 (rows, nb, 32), and scales d, float32 (rows, nb)."""
    b = np.asarray(w2, dtype=np.uint8).reshape(w2.shape[0], -1, BYTES)
    qs = b[:, :, 2:].astype(np.int32)  # (rows, nb, 16)
    d = np.ascontiguousarray(b[:, :, :2]).view("<f2").astype(np.float32)[..., 0]
    return np.concatenate([qs & 0xF, qs >> 4], axis=2) - 8, d


# ---------------------------------------------------------------- numba quantizer and dequantizer


@njit(**EXACT_JIT)
def _cast_low_byte(v):
    """numpy's float32 -> uint8/int8 cast on x86: via int32, NaN/Inf/out-of-range give 0x80000000."""
    if v != v or v >= np.float32(2147483648.0) or v < np.float32(-2147483648.0):
        return 0
    return np.int64(v) & 0xFF  # truncates toward zero


@njit(**EXACT_PJIT)
def quantize(x):
    """x: float32 (n_blocks*32,) -> uint8 (n_blocks*18,)."""
    nb = x.size // 32
    out = np.empty(nb * BYTES, dtype=np.uint8)
    for b in prange(nb):
        base = b * 32
        # the signed element of largest magnitude, first wins; starting from x[0] (not 0.0) is how
        # gguf-py picks it, which differs from C only for a block of zeros whose first zero is -0.0
        mx = x[base]
        amax = abs(mx)
        for j in range(1, 32):
            v = x[base + j]
            if amax < abs(v):
                amax = abs(v)
                mx = v
        d = mx / np.float32(-8.0)
        inv = np.float32(1.0) / d if d != np.float32(0.0) else np.float32(0.0)
        h = f32_to_f16_bits(d)
        o = b * BYTES
        out[o] = h & 0xFF
        out[o + 1] = h >> 8
        for j in range(16):
            q0 = min(_cast_low_byte(x[base + j] * inv + np.float32(8.5)), 15)
            q1 = min(_cast_low_byte(x[base + 16 + j] * inv + np.float32(8.5)), 15)
            out[o + 2 + j] = q0 | (q1 << 4)
    return out


@njit(**EXACT_PJIT)
def dequantize(raw):
    """raw: uint8 (n_blocks*18,) -> float32 (n_blocks*32,). x = (q - 8) * d."""
    nb = raw.size // 18
    out = np.empty(nb * 32, dtype=np.float32)
    for b in prange(nb):
        o = b * 18
        d = f16_bits_to_f32(np.int64(raw[o]) | (np.int64(raw[o + 1]) << 8))
        for j in range(16):
            q = np.int64(raw[o + 2 + j])
            out[b * 32 + j] = np.float32((q & 0xF) - 8) * d
            out[b * 32 + 16 + j] = np.float32((q >> 4) - 8) * d
    return out


# ---------------------------------------------------------------- matmul decoders


@njit(inline="always", **TILE_JIT)  # numba inlines it: LLVM may leave a call in decode_tile's row loop
def tile_row(wr, k0, kc, buf, r):
    """buf[r, :kc] = the row's weights k0:k0+kc (wr: the row's uint8 bytes), exactly `dequantize`'s."""
    at = r * KC  # flat offset of buf row r
    for b in range(kc // 32):
        o = (k0 // 32 + b) * 18
        d = half_at(wr, o)
        decode_nibbles16(wr, o + 2, d, np.float32(0.0), d, np.float32(0.0), buf, at + 32 * b)


@njit(**MATVEC_JIT)
def _block(wr, o, base, xl, xh, a, b):
    """One row's share of the block at byte o: (a, b) += its weights 0-15 * xl, 16-31 * xh."""
    q = nib16(wr, o + 2)
    if AVX512:  # a table of (k - 8) * d, k = 0..15, looked up by one vpermps per 16 weights
        t = vmul(base, half_splat(wr, o))
        return vfma(vlut16(t, q), xl, a), vfma(vlut16(t, vshr4(q)), xh, b)
    # elsewhere a lookup costs two permutes and a blend per 8 lanes: convert q - 8 instead (the table's products)
    d = half_splat(wr, o)
    return vfma(vmul(vtof(isub(vand15(q), 8)), d), xl, a), vfma(vmul(vtof(isub(vshr4(q), 8)), d), xh, b)


@njit(**MATVEC_JIT)
def matvec_group(x, w, r0, out):
    """out[r0:r0+4] = W[r0:r0+4] @ x, prefetching the next group's bytes at the same pace."""
    w0, w1, w2, w3 = group_rows(w, r0)
    base = viota_minus8()
    a0 = b0 = a1 = b1 = a2 = b2 = a3 = b3 = vzero()
    ahead = (r0 + R) * w.shape[1]  # the next group's first byte
    for blk in range(x.size // 32):
        o = 18 * blk
        prefetch_lines(w, ahead + 4 * o, 72)
        xl = vload(x, 32 * blk)
        xh = vload(x, 32 * blk + 16)
        a0, b0 = _block(w0, o, base, xl, xh, a0, b0)
        a1, b1 = _block(w1, o, base, xl, xh, a1, b1)
        a2, b2 = _block(w2, o, base, xl, xh, a2, b2)
        a3, b3 = _block(w3, o, base, xl, xh, a3, b3)
    group_store(out, r0, vhsum(vadd(a0, b0)), vhsum(vadd(a1, b1)), vhsum(vadd(a2, b2)), vhsum(vadd(a3, b3)))


TYPE = DType(
    "q4_0", 2, 32, BYTES, scale_offsets=(0,),
    # calibrated on the trained fixture (benchmarks/bench_types.py; figures and rule in docs/BENCHMARKS.md)
    verify=Thresholds(kl_mean=0.05, top1=0.86, ppl_ratio=1.14),
    quantize=quantize, dequantize=dequantize,
    quantize_reference=quantize_reference, dequantize_reference=dequantize_reference,
    int8_pack=Int8Pack(parts=1, offset=8, flip=0, blocks=int_blocks),
)
