"""GGML block quantizers and dequantizers (numba), bit-exact with ggml's reference C and gguf-py.

    quantize(x, dtype, name=...)   float rows -> GGML block bytes, uint8 (rows, row_bytes)
    dequantize(raw, dtype, shape)  GGML block bytes -> float32 array of `shape`

Each type's kernels live in its module of `mertools.dtypes`, beside its plain-numpy reference; this
package holds the intrinsics (`simd`), what the type modules share (`common`), and the matmul kernels.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mertools.kernels import cachelock

cachelock.install()  # before any kernel compiles: their cache saves are then safe across processes

from mertools import dtypes as _registry  # noqa: E402 - used at call time: the registry imports this package's intrinsics
from mertools.errors import QuantizationError  # noqa: E402
from mertools.kernels.common import first_not_below  # noqa: E402

__all__ = ["quantize", "dequantize", "SUPPORTED_DTYPES"]


def __getattr__(name: str) -> Any:
    # derived from the registry on first use, as the registry may still be importing when this runs
    if name == "SUPPORTED_DTYPES":
        return tuple(_registry.DTYPES)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _dtype(dtype: str, what: str) -> _registry.DType:
    dt = _registry.DTYPES.get(dtype)
    if dt is None:
        raise QuantizationError(f"{what}: unknown dtype {dtype!r}; expected one of {', '.join(_registry.DTYPES)}")
    return dt


def quantize(x: np.ndarray, dtype: str, *, name: str = "tensor") -> np.ndarray:
    """Quantize rows of float32 (or float16) weights to GGML's exact block bytes.

    x: (rows, cols), or (cols,) as one row (more leading dims are kept as leading dims).
    Returns uint8 (rows, row_bytes); f32/f16 give their little-endian IEEE bytes.
    Raises QuantizationError for an unknown dtype, cols not a multiple of the block size, NaN/Inf
    values, or (f16) finite values too large for a half.
    """
    dt = _dtype(dtype, name)
    if dt.quantize is None:
        raise QuantizationError(f"{name}: {dtype} has no quantizer (a layout can only copy it from a source)")
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
    # one parallel scan finds NaN/Inf and finite values the type cannot hold (f16: those that round to inf)
    bad = int(first_not_below(flat, np.float32(dt.limit))) if flat.size else -1
    if bad >= 0:
        v = flat[bad]
        if np.isfinite(v):
            fd = np.dtype(dt.float_dtype or np.float32)
            raise QuantizationError(
                f"{name}: value {v} at flat index {bad} overflows {fd.name} (max {np.finfo(fd).max:g}); "
                "use f32 or a quant type"
            )
        raise QuantizationError(f"{name}: non-finite value {v} at flat index {bad}; cannot quantize")
    return dt.quantize(flat).reshape(*arr.shape[:-1], dt.row_bytes(cols))


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
    return dt.dequantize(data).reshape(shape)  # always a new array, never aliasing raw
