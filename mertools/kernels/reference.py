"""Plain-numpy reference quantizers (Q4_0, Q8_0) and dequantizers (F16, Q4_0, Q8_0, Q4_K).

Transcribed from ggml-quants.c, independently of gguf-py, to cross-check the numba kernels. Every
array operation is float32 (np.float32 constants), so numpy's rounding is the C reference's.
"""

from __future__ import annotations

import numpy as np

_F32 = np.float32


def _cast_low_byte(v: np.ndarray) -> np.ndarray:
    """Float -> int8/uint8 as numpy casts on x86 (via int32): NaN, Inf and out-of-range give 0.

    v: float32 (...) -> int64 (...) in 0..255.
    """
    ok = np.isfinite(v) & (v >= _F32(-2147483648.0)) & (v < _F32(2147483648.0))
    return np.where(ok, np.trunc(np.where(ok, v, _F32(0))).astype(np.int64), 0) & 0xFF


def _f16_bytes(d: np.ndarray) -> np.ndarray:
    """d: float32 (n,) -> uint8 (n, 2), GGML_FP32_TO_FP16 (round to nearest even), little-endian."""
    with np.errstate(over="ignore"):  # |d| > 65504 is stored as inf, as in ggml
        return d.astype("<f2").view(np.uint8).reshape(-1, 2)


def _f16_from_bytes(b: np.ndarray) -> np.ndarray:
    """b: uint8 (n, 2) -> float32 (n, 1)."""
    return np.ascontiguousarray(b).view("<f2").astype(np.float32).reshape(-1, 1)


def quantize_q4_0(x: np.ndarray) -> np.ndarray:
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
        q = np.minimum(_cast_low_byte(xb * inv + _F32(8.5)), 15).astype(np.uint8)  # (nb, 32)
    qs = q[:, :16] | (q[:, 16:] << 4)  # byte j: element j low, element j+16 high
    return np.concatenate([_f16_bytes(d.ravel()), qs], axis=1)


def _roundf(v: np.ndarray) -> np.ndarray:
    """C roundf (halves away from zero) for float32; non-finite values pass through."""
    a = np.abs(v)
    fl = np.floor(a)
    r = fl + (a - fl >= _F32(0.5)).astype(np.float32)
    return np.copysign(r, v)


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    """x: float32 (..., cols) with cols % 32 == 0 -> uint8 (n_blocks, 34)."""
    xb = np.asarray(x, dtype=np.float32).reshape(-1, 32)  # (nb, 32)
    amax = np.abs(xb).max(axis=1, keepdims=True)  # (nb, 1)
    with np.errstate(all="ignore"):
        d = amax / _F32(127.0)
        inv = np.where(d != 0, _F32(1.0) / np.where(d != 0, d, _F32(1.0)), _F32(0.0)).astype(np.float32)
        q = _cast_low_byte(_roundf(xb * inv)).astype(np.uint8)  # (nb, 32), int8 as bytes
    return np.concatenate([_f16_bytes(d.ravel()), q], axis=1)


def dequantize_f16(raw: np.ndarray) -> np.ndarray:
    """raw: uint8 (2n,) -> float32 (n,)."""
    return np.ascontiguousarray(raw).reshape(-1).view("<f2").astype(np.float32)


def dequantize_q4_0(raw: np.ndarray) -> np.ndarray:
    """raw: uint8 (n_blocks*18,) -> float32 (n_blocks*32,). x = (q - 8) * d."""
    b = np.asarray(raw, dtype=np.uint8).reshape(-1, 18)
    d = _f16_from_bytes(b[:, :2])  # (nb, 1)
    qs = b[:, 2:]  # (nb, 16)
    q = np.concatenate([qs & 0xF, qs >> 4], axis=1).astype(np.int32) - 8  # (nb, 32)
    with np.errstate(invalid="ignore"):  # 0 * inf = NaN, as in C
        return (q.astype(np.float32) * d).reshape(-1)


def dequantize_q8_0(raw: np.ndarray) -> np.ndarray:
    """raw: uint8 (n_blocks*34,) -> float32 (n_blocks*32,). x = q * d."""
    b = np.asarray(raw, dtype=np.uint8).reshape(-1, 34)
    d = _f16_from_bytes(b[:, :2])  # (nb, 1)
    q = np.ascontiguousarray(b[:, 2:]).view(np.int8)  # (nb, 32)
    with np.errstate(invalid="ignore"):
        return (q.astype(np.float32) * d).reshape(-1)


def unpack_scale_min_k4(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml get_scale_min_k4 for all 8 sub-blocks: scales uint8 (nb, 12) -> sc, m int32 (nb, 8)."""
    q = scales.astype(np.int32)
    sc = np.empty((q.shape[0], 8), dtype=np.int32)
    m = np.empty((q.shape[0], 8), dtype=np.int32)
    for j in range(8):
        if j < 4:
            sc[:, j] = q[:, j] & 63
            m[:, j] = q[:, j + 4] & 63
        else:
            sc[:, j] = (q[:, j + 4] & 0xF) | ((q[:, j - 4] >> 6) << 4)
            m[:, j] = (q[:, j + 4] >> 4) | ((q[:, j] >> 6) << 4)
    return sc, m


def dequantize_q4_k(raw: np.ndarray) -> np.ndarray:
    """raw: uint8 (n_blocks*144,) -> float32 (n_blocks*256,). x = d*sc*q - dmin*m per sub-block."""
    b = np.asarray(raw, dtype=np.uint8).reshape(-1, 144)
    d = _f16_from_bytes(b[:, 0:2])  # (nb, 1)
    dmin = _f16_from_bytes(b[:, 2:4])  # (nb, 1)
    sc, m = unpack_scale_min_k4(b[:, 4:16])  # (nb, 8)
    qs = b[:, 16:].reshape(-1, 4, 32)  # (nb, 4 chunks, 32)
    q = np.stack([qs & 0xF, qs >> 4], axis=2).reshape(-1, 8, 32)  # sub-block 2c = low, 2c+1 = high
    with np.errstate(invalid="ignore"):
        d1 = (d * sc.astype(np.float32))[:, :, None]  # (nb, 8, 1)
        m1 = (dmin * m.astype(np.float32))[:, :, None]
        return (d1 * q.astype(np.float32) - m1).reshape(-1)
