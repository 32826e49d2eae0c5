"""GGML block quantizers and dequantizers (numba), bit-exact with ggml's reference C and gguf-py.

    quantize(x, dtype, name=...)   float rows -> GGML block bytes, uint8 (rows, row_bytes)
    dequantize(raw, dtype, shape)  GGML block bytes -> float32 array of `shape`

The raw numba kernels live in `quantize_kernels` / `dequantize_kernels`, each beside its plain-numpy
reference (`reference`, `q4k_reference`).
"""

from __future__ import annotations

import numpy as np

from mertools.errors import QuantizationError
from mertools.kernels import dequantize_kernels as _dq
from mertools.kernels import quantize_kernels as _q
from mertools.layout.constants import DTYPES

__all__ = ["quantize", "dequantize", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = ("f32", "f16", "q4_0", "q8_0", "q4_k")
_QUANTIZERS = {"q4_0": _q.quantize_q4_0, "q8_0": _q.quantize_q8_0, "q4_k": _q.quantize_q4_k}
_DEQUANTIZERS = {
    "f16": _dq.dequantize_f16,
    "q4_0": _dq.dequantize_q4_0,
    "q8_0": _dq.dequantize_q8_0,
    "q4_k": _dq.dequantize_q4_k,
}


def _dtype(dtype: str, what: str):
    if dtype not in SUPPORTED_DTYPES:
        raise QuantizationError(f"{what}: unknown dtype {dtype!r}; expected one of {', '.join(SUPPORTED_DTYPES)}")
    return DTYPES[dtype]


def quantize(x: np.ndarray, dtype: str, *, name: str = "tensor") -> np.ndarray:
    """Quantize rows of float32 (or float16) weights to GGML's exact block bytes.

    x: (rows, cols), or (cols,) as one row (more leading dims are kept as leading dims).
    Returns uint8 (rows, row_bytes); f32/f16 give their little-endian IEEE bytes.
    Raises QuantizationError for an unknown dtype, cols not a multiple of the block size, NaN/Inf
    values, or (f16) finite values too large for a half.
    """
    dt = _dtype(dtype, name)
    arr = np.asarray(x)
    if not np.issubdtype(arr.dtype, np.floating):
        raise QuantizationError(f"{name}: expected float32 or float16 weights, got {arr.dtype}")
    if arr.ndim == 0:
        raise QuantizationError(f"{name}: cannot quantize a scalar")
    if arr.ndim == 1:
        arr = arr.reshape(1, -1)
    cols = arr.shape[-1]
    if cols % dt.block_size != 0:
        raise QuantizationError(
            f"{name}: {dtype} needs the number of columns to be a multiple of {dt.block_size}, got {cols}"
        )
    # numba takes no float16 arrays; float32 holds every float16 exactly
    flat = np.ascontiguousarray(arr, dtype=np.float32).reshape(-1)  # (rows*cols,)
    # one parallel scan finds NaN/Inf and, for f16, finite values that round to inf in half precision
    limit = np.float32(65520.0 if dtype == "f16" else np.inf)
    bad = int(_q.first_not_below(flat, limit)) if flat.size else -1
    if bad >= 0:
        v = flat[bad]
        if np.isfinite(v):
            raise QuantizationError(
                f"{name}: value {v} at flat index {bad} overflows float16 (max 65504); use f32 or a quant type"
            )
        raise QuantizationError(f"{name}: non-finite value {v} at flat index {bad}; cannot quantize")
    out_shape = (*arr.shape[:-1], dt.row_bytes(cols))
    if dtype == "f32":
        return flat.astype("<f4").view(np.uint8).reshape(out_shape)
    if dtype == "f16":
        return flat.astype("<f2").view(np.uint8).reshape(out_shape)  # round to nearest even
    return _QUANTIZERS[dtype](flat).reshape(out_shape)


def dequantize(raw: np.ndarray, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """GGML block bytes -> float32 array of `shape` (raw: uint8 of any shape with the right size)."""
    shape = tuple(int(s) for s in shape)
    dt = _dtype(dtype, "dequantize")
    if not shape:
        raise QuantizationError("dequantize: shape must have at least one dimension")
    if shape[-1] % dt.block_size != 0:
        raise QuantizationError(
            f"dequantize: {dtype} needs the last dimension to be a multiple of {dt.block_size}, got {shape[-1]}"
        )
    data = np.ascontiguousarray(raw).reshape(-1)
    if data.dtype != np.uint8:
        data = data.view(np.uint8)
    expected = dt.nbytes(shape)
    if data.size != expected:
        raise QuantizationError(f"dequantize: {dtype} {shape} needs {expected} bytes, got {data.size}")
    if dtype == "f32":
        return data.view("<f4").astype(np.float32).reshape(shape)  # a copy, never aliasing raw
    return _DEQUANTIZERS[dtype](data).reshape(shape)
