"""f32: IEEE single precision, 4 bytes a weight. Norms and routers are always stored so; never an expert."""

from __future__ import annotations

import numpy as np
from numba import njit

from mertools.kernels.common import KC, MATVEC_JIT, TILE_JIT, group_float
from mertools.kernels.simd import copy_f32_16

from .base import DType


def quantize(x: np.ndarray) -> np.ndarray:
    """float32 (n,) -> uint8 (4n,), little-endian."""
    return x.astype("<f4").view(np.uint8)


def dequantize(raw: np.ndarray) -> np.ndarray:
    """uint8 (4n,) -> float32 (n,), a copy (never aliasing raw)."""
    return np.ascontiguousarray(raw).reshape(-1).view("<f4").astype(np.float32)


@njit(inline="always", **TILE_JIT)  # numba inlines it: LLVM may leave a call in decode_tile's row loop
def tile_row(wr, k0, kc, buf, r):
    """buf[r, :kc] = the row's weights k0:k0+kc (wr: the row's uint8 bytes)."""
    at = r * KC  # flat offset of buf row r
    wf = wr.view(np.float32)
    k16 = kc - kc % 16
    for k in range(0, k16, 16):
        copy_f32_16(wf, k0 + k, buf, at + k)
    for k in range(k16, kc):
        buf[r, k] = wf[k0 + k]


@njit(**MATVEC_JIT)
def matvec_group(x, w, r0, out):
    """out[r0:r0+4] = W[r0:r0+4] @ x."""
    group_float(x, w, r0, out, 4)


TYPE = DType(
    "f32", 0, 1, 4, float_dtype="<f4", expert=False,
    quantize=quantize, dequantize=dequantize, quantize_reference=quantize, dequantize_reference=dequantize,
)
