"""q8_0: blocks of 32 weights in 34 bytes, x = q * d with q an int8 and d an f16 scale.

Block: d (f16, bytes 0-1), then the 32 quants as int8. Quantizer and dequantizer are bit-exact with
ggml's reference C (quantize_row_q8_0_ref) and gguf-py. Decode (matvec): sign-extend, convert, times
d, exact. `convert --dtype auto` gives this type to GGML quantizations the layout does not have.
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
from mertools.kernels.simd import decode_i8_32, half_at, half_splat, sbyte16, vadd, vfma, vhsum, vload, vmul, vtof, vzero

from .base import DType, Int8Pack, Thresholds, cast_low_byte, f16_bytes, f16_from_bytes

BYTES = 34
_F32 = np.float32


# ---------------------------------------------------------------- numpy references


def _roundf(v: np.ndarray) -> np.ndarray:
    """C roundf (halves away from zero) for float32; non-finite values pass through."""
    a = np.abs(v)
    fl = np.floor(a)
    r = fl + (a - fl >= _F32(0.5)).astype(np.float32)
    return np.copysign(r, v)


def quantize_reference(x: np.ndarray) -> np.ndarray:
    """x: float32 (..., cols) with cols % 32 == 0 -> uint8 (n_blocks, 34)."""
    xb = np.asarray(x, dtype=np.float32).reshape(-1, 32)  # (nb, 32)
    amax = np.abs(xb).max(axis=1, keepdims=True)  # (nb, 1)
    with np.errstate(all="ignore"):
        d = amax / _F32(127.0)
        inv = np.where(d != 0, _F32(1.0) / np.where(d != 0, d, _F32(1.0)), _F32(0.0)).astype(np.float32)
        q = cast_low_byte(_roundf(xb * inv)).astype(np.uint8)  # (nb, 32), int8 as bytes
    return np.concatenate([f16_bytes(d.ravel()), q], axis=1)


def dequantize_reference(raw: np.ndarray) -> np.ndarray:
    """raw: uint8 (n_blocks*34,) -> float32 (n_blocks*32,). x = q * d."""
    b = np.asarray(raw, dtype=np.uint8).reshape(-1, BYTES)
    d = f16_from_bytes(b[:, :2])  # (nb, 1)
    q = np.ascontiguousarray(b[:, 2:]).view(np.int8)  # (nb, 32)
    with np.errstate(invalid="ignore"):
        return (q.astype(np.float32) * d).reshape(-1)


def int_blocks(w2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (rows, nb*34) -> signed quants, int32 (rows, nb, 32), and scales d, float32 (rows, nb)."""
    b = np.asarray(w2, dtype=np.uint8).reshape(w2.shape[0], -1, BYTES)
    d = np.ascontiguousarray(b[:, :, :2]).view("<f2").astype(np.float32)[..., 0]
    return np.ascontiguousarray(b[:, :, 2:]).view(np.int8).astype(np.int32), d


# ---------------------------------------------------------------- numba quantizer and dequantizer


@njit(**EXACT_JIT)
def _roundf_low_byte(v):
    """C roundf (halves away from zero) then numpy's int8 cast, as a byte."""
    if v != v or v >= np.float32(2147483648.0) or v < np.float32(-2147483648.0):
        return 0
    a = abs(v)
    fl = np.floor(a)
    r = np.int64(fl) + (1 if a - fl >= np.float32(0.5) else 0)
    return (-r if v < np.float32(0.0) else r) & 0xFF


@njit(**EXACT_PJIT)
def quantize(x):
    """x: float32 (n_blocks*32,) -> uint8 (n_blocks*34,)."""
    nb = x.size // 32
    out = np.empty(nb * BYTES, dtype=np.uint8)
    for b in prange(nb):
        base = b * 32
        amax = np.float32(0.0)
        for j in range(32):
            amax = max(amax, abs(x[base + j]))
        d = amax / np.float32(127.0)
        inv = np.float32(1.0) / d if d != np.float32(0.0) else np.float32(0.0)
        h = f32_to_f16_bits(d)
        o = b * BYTES
        out[o] = h & 0xFF
        out[o + 1] = h >> 8
        for j in range(32):
            out[o + 2 + j] = _roundf_low_byte(x[base + j] * inv)
    return out


@njit(**EXACT_PJIT)
def dequantize(raw):
    """raw: uint8 (n_blocks*34,) -> float32 (n_blocks*32,). x = q * d with q int8."""
    nb = raw.size // 34
    out = np.empty(nb * 32, dtype=np.float32)
    for b in prange(nb):
        o = b * 34
        d = f16_bits_to_f32(np.int64(raw[o]) | (np.int64(raw[o + 1]) << 8))
        for j in range(32):
            q = np.int64(raw[o + 2 + j])
            out[b * 32 + j] = np.float32(q - 256 if q >= 128 else q) * d
    return out


# ---------------------------------------------------------------- matmul decoders


@njit(inline="always", **TILE_JIT)  # numba inlines it: LLVM may leave a call in decode_tile's row loop
def tile_row(wr, k0, kc, buf, r):
    """buf[r, :kc] = the row's weights k0:k0+kc (wr: the row's uint8 bytes), exactly `dequantize`'s."""
    at = r * KC  # flat offset of buf row r
    for b in range(kc // 32):
        o = (k0 // 32 + b) * 34
        decode_i8_32(wr, o + 2, half_at(wr, o), buf, at + 32 * b)


@njit(**MATVEC_JIT)
def _block(wr, o, xl, xh, a, b):
    """One row's share of the block at byte o: (a, b) += its weights 0-15 * xl, 16-31 * xh."""
    d = half_splat(wr, o)
    lo = vmul(vtof(sbyte16(wr, o + 2)), d)  # q * d
    hi = vmul(vtof(sbyte16(wr, o + 18)), d)
    return vfma(lo, xl, a), vfma(hi, xh, b)


@njit(**MATVEC_JIT)
def matvec_group(x, w, r0, out):
    """out[r0:r0+4] = W[r0:r0+4] @ x, prefetching the next group's bytes at the same pace."""
    w0, w1, w2, w3 = group_rows(w, r0)
    a0 = b0 = a1 = b1 = a2 = b2 = a3 = b3 = vzero()
    ahead = (r0 + R) * w.shape[1]
    for blk in range(x.size // 32):
        o = 34 * blk
        prefetch_lines(w, ahead + 4 * o, 136)
        xl = vload(x, 32 * blk)
        xh = vload(x, 32 * blk + 16)
        a0, b0 = _block(w0, o, xl, xh, a0, b0)
        a1, b1 = _block(w1, o, xl, xh, a1, b1)
        a2, b2 = _block(w2, o, xl, xh, a2, b2)
        a3, b3 = _block(w3, o, xl, xh, a3, b3)
    group_store(out, r0, vhsum(vadd(a0, b0)), vhsum(vadd(a1, b1)), vhsum(vadd(a2, b2)), vhsum(vadd(a3, b3)))


TYPE = DType(
    "q8_0", 8, 32, BYTES, scale_offsets=(0,),
    # calibrated on the trained fixture (benchmarks/bench_types.py; figures and rule in docs/BENCHMARKS.md)
    verify=Thresholds(kl_mean=0.02, top1=0.89, ppl_ratio=1.031),
    quantize=quantize, dequantize=dequantize,
    quantize_reference=quantize_reference, dequantize_reference=dequantize_reference,
    int8_pack=Int8Pack(parts=2, offset=128, flip=0x80, blocks=int_blocks),
)
