"""Numba dequantizers (F16, Q4_0, Q8_0, Q4_K), bit-identical to ggml's dequantize_row_* and gguf-py.

Products are formed exactly as in C (float(q) * d, d*sc*q - dmin*m with d*sc rounded first);
fastmath stays off so nothing is fused.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from mertools.kernels.quantize_kernels import f16_bits_to_f32

_PJIT = {"cache": True, "error_model": "numpy", "parallel": True}


@njit(**_PJIT)
def dequantize_f16(raw):
    """raw: uint8 (2n,) little-endian halves -> float32 (n,)."""
    n = raw.size // 2
    out = np.empty(n, dtype=np.float32)
    for i in prange(n):
        out[i] = f16_bits_to_f32(np.int64(raw[2 * i]) | (np.int64(raw[2 * i + 1]) << 8))
    return out


@njit(**_PJIT)
def dequantize_q4_0(raw):
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


@njit(**_PJIT)
def dequantize_q8_0(raw):
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


@njit(**_PJIT)
def dequantize_q4_k(raw):
    """raw: uint8 (n_blocks*144,) -> float32 (n_blocks*256,). x = (d*sc)*q - dmin*m per sub-block."""
    nb = raw.size // 144
    out = np.empty(nb * 256, dtype=np.float32)
    for b in prange(nb):
        o = b * 144
        d = f16_bits_to_f32(np.int64(raw[o]) | (np.int64(raw[o + 1]) << 8))
        dmin = f16_bits_to_f32(np.int64(raw[o + 2]) | (np.int64(raw[o + 3]) << 8))
        s = o + 4  # 12 bytes of packed 6-bit scales and mins
        for j in range(8):  # get_scale_min_k4
            if j < 4:
                sc = np.int64(raw[s + j]) & 63
                m = np.int64(raw[s + j + 4]) & 63
            else:
                sc = (np.int64(raw[s + j + 4]) & 0xF) | ((np.int64(raw[s + j - 4]) >> 6) << 4)
                m = (np.int64(raw[s + j + 4]) >> 4) | ((np.int64(raw[s + j]) >> 6) << 4)
            d1 = d * np.float32(sc)
            m1 = dmin * np.float32(m)
            qo = o + 16 + 32 * (j // 2)  # sub-blocks 2c and 2c+1 share chunk c's 32 bytes
            shift = 4 * (j % 2)
            base = b * 256 + 32 * j
            for i in range(32):
                out[base + i] = d1 * np.float32((np.int64(raw[qo + i]) >> shift) & 0xF) - m1
    return out
