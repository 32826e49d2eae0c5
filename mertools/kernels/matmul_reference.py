"""Plain-numpy definitions of the matmul kernels: dequantize the whole weight, multiply in float64.

Slow and memory-hungry on purpose (the float32 weight is materialised); the tests hold
`mertools.kernels.matmul` to these.
"""

from __future__ import annotations

import numpy as np

from mertools.dtypes import DTYPES
from mertools.kernels import dequantize


def weight(w: np.ndarray, dtype: str, rows: int, cols: int) -> np.ndarray:
    """The dequantized weight, float64 (rows, cols)."""
    return dequantize(w, dtype, (rows, cols)).astype(np.float64)


def matmul(x: np.ndarray, w: np.ndarray, dtype: str, rows: int, cols: int) -> np.ndarray:
    """x: (n, cols); w: raw bytes of a (rows, cols) weight -> float64 (n, rows) = x @ W.T."""
    return np.asarray(x, dtype=np.float64) @ weight(w, dtype, rows, cols).T


def abs_matmul(x: np.ndarray, w: np.ndarray, dtype: str, rows: int, cols: int) -> np.ndarray:
    """float64 (n, rows) = |x| @ |W|.T: the scale of the rounding error of any summation order."""
    return np.abs(np.asarray(x, dtype=np.float64)) @ np.abs(weight(w, dtype, rows, cols)).T


def get_rows(w: np.ndarray, dtype: str, ids: np.ndarray, cols: int) -> np.ndarray:
    """float32 (len(ids), cols): rows `ids` of the whole dequantized weight."""
    rows = w.size // DTYPES[dtype].row_bytes(cols)
    return dequantize(w, dtype, (rows, cols))[np.asarray(ids, dtype=np.int64)]


def swiglu_expert(
    x: np.ndarray,
    gate_w: np.ndarray,
    up_w: np.ndarray,
    down_w: np.ndarray,
    dtype_gate: str,
    dtype_up: str,
    dtype_down: str,
    d_ff: int,
    d_model: int,
) -> np.ndarray:
    """float64 (n, d_model) = (silu(x @ G.T) * (x @ U.T)) @ D.T, every step in float64."""
    g = matmul(x, gate_w, dtype_gate, d_ff, d_model)  # (n, d_ff)
    u = matmul(x, up_w, dtype_up, d_ff, d_model)  # (n, d_ff)
    h = g / (1.0 + np.exp(-g)) * u
    return h @ weight(down_w, dtype_down, d_model, d_ff).T
