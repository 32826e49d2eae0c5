"""f16: IEEE half precision, 2 bytes a weight; differs from an f32/bf16 source only by rounding."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from mertools.kernels.common import EXACT_PJIT, KC, MATVEC_JIT, TILE_JIT, f16_bits_to_f32, group_float
from mertools.kernels.simd import decode_f16_16

from .base import DType, Thresholds


def quantize(x: np.ndarray) -> np.ndarray:
    """float32 (n,) -> uint8 (2n,), round to nearest even (the caller refuses values that round to inf)."""
    return x.astype("<f2").view(np.uint8)


def dequantize_reference(raw: np.ndarray) -> np.ndarray:
    """raw: uint8 (2n,) -> float32 (n,)."""
    return np.ascontiguousarray(raw).reshape(-1).view("<f2").astype(np.float32)


@njit(**EXACT_PJIT)
def dequantize(raw):
    """raw: uint8 (2n,) little-endian halves -> float32 (n,)."""
    n = raw.size // 2
    out = np.empty(n, dtype=np.float32)
    for i in prange(n):
        out[i] = f16_bits_to_f32(np.int64(raw[2 * i]) | (np.int64(raw[2 * i + 1]) << 8))
    return out


@njit(inline="always", **TILE_JIT)  # numba inlines it: LLVM may leave a call in decode_tile's row loop
def tile_row(wr, k0, kc, buf, r):
    """buf[r, :kc] = the row's weights k0:k0+kc (wr: the row's uint8 bytes)."""
    at = r * KC  # flat offset of buf row r
    wh = wr.view(np.uint16)
    k16 = kc - kc % 16
    for k in range(0, k16, 16):
        decode_f16_16(wh, k0 + k, buf, at + k)
    for k in range(k16, kc):
        buf[r, k] = f16_bits_to_f32(wh[k0 + k])


@njit(**MATVEC_JIT)
def matvec_group(x, w, r0, out):
    """out[r0:r0+4] = W[r0:r0+4] @ x."""
    group_float(x, w, r0, out, 2)


TYPE = DType(
    "f16", 1, 1, 2, float_dtype="<f2",
    limit=65520.0,  # the smallest float32 that rounds to inf in half precision
    # calibrated on the trained fixture (benchmarks/bench_types.py; figures and rule in docs/BENCHMARKS.md)
    verify=Thresholds(kl_mean=1e-06, top1=0.90, ppl_ratio=1.001),
    quantize=quantize, dequantize=dequantize, quantize_reference=quantize, dequantize_reference=dequantize_reference,
)
