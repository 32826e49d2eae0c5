"""Matrix products with weights in a GGML block layout: the runtime's matmul, embedding lookup, expert FFN.

    matmul(x, w, dtype, rows, cols, out=None)   float32 (n, rows) = x @ W.T
    get_rows(w, dtype, ids, cols)               float32 (len(ids), cols), rows `ids` of W
    swiglu_expert(x, gate_w, up_w, down_w, ...) float32 (n, d_model), one SwiGLU expert

W is `rows x cols` in HF orientation (rows = output features) and arrives as raw bytes: uint8
(rows, row_bytes), or any contiguous uint8 array of that size. The numba kernels (`matmul_kernels`)
decode blocks inside the dot product and release the GIL; `matmul_reference` is the numpy definition
the tests hold them to.

Decode (n == 1) runs `matvec_kernels` (4 rows per group sharing x, blocks dequantized in vectors,
software prefetch), and so do a few inputs (n <= MATVEC_ROWS_MAX: an expert's share of a short prompt or
of a verification step), each exactly as decode computes it; more inputs the tiled kernel of
`matmul_kernels`, or the GEMM of `gemm_kernels`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mertools.dtypes import DTYPES, KIND
from mertools.errors import QuantizationError
from mertools.kernels import gemm_kernels as _g
from mertools.kernels import int8 as _i8
from mertools.kernels import matmul_kernels as _k
from mertools.kernels import matvec_kernels as _mv
from mertools.kernels.act8 import PACKED_K

__all__ = ["MATMUL_DTYPES", "Weight", "matmul", "get_rows", "layout_weight", "swiglu_expert", "swiglu_weights", "weight"]

MATMUL_DTYPES = tuple(KIND)  # every registered type has its decoders in `dispatch`
_KIND = KIND
_DTYPE_OF = {k: d for d, k in KIND.items()}
# up to this many inputs, a matvec per input (weights decoded again from cache) beat the tiled kernel
# (docs/BENCHMARKS.md, "A few inputs": `python benchmarks/bench_matmul.py --few`)
MATVEC_ROWS_MAX = 4


def _check_weight(w: np.ndarray, dtype: str, rows: int, cols: int, what: str) -> np.ndarray:
    """Validate the raw bytes of a (rows, cols) `dtype` weight; return them as uint8 (rows, row_bytes)."""
    if dtype not in _KIND:
        raise QuantizationError(f"{what}: unknown dtype {dtype!r}; expected one of {', '.join(MATMUL_DTYPES)}")
    dt = DTYPES[dtype]
    if rows < 0 or cols < 0:
        raise QuantizationError(f"{what}: negative shape ({rows}, {cols})")
    if cols % dt.block_size != 0:
        raise QuantizationError(
            f"{what}: {dtype} weight ({rows}, {cols}) needs cols to be a multiple of {dt.block_size}"
        )
    if not isinstance(w, np.ndarray) or w.dtype != np.uint8:
        raise QuantizationError(f"{what}: {dtype} weight must be uint8 bytes, got {getattr(w, 'dtype', type(w))}")
    row_bytes = dt.row_bytes(cols)
    if w.size != rows * row_bytes:
        raise QuantizationError(
            f"{what}: {dtype} weight ({rows}, {cols}) needs {rows * row_bytes} bytes "
            f"({rows} x {row_bytes}), got {w.size} (array shape {w.shape})"
        )
    return np.ascontiguousarray(w).reshape(rows, row_bytes)


def _check_x(x: np.ndarray, dtype: str, rows: int, cols: int, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != cols:
        raise QuantizationError(f"{what}: x must be (n, {cols}) to multiply a {dtype} weight ({rows}, {cols}), got {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


def matmul(
    x: np.ndarray, w: np.ndarray, dtype: str, rows: int, cols: int, out: np.ndarray | None = None
) -> np.ndarray:
    """x: float32 (n, cols); w: uint8 raw bytes of a (rows, cols) weight. Returns float32 (n, rows) = x @ W.T.

    n == 1 is the decode case (matvec), n > 1 prefill (each block decoded once for all n inputs).
    `out` (n, rows) float32 C-contiguous may be passed to avoid allocation; it must not overlap x.
    """
    w2 = _check_weight(w, dtype, rows, cols, "matmul")
    x2 = _check_x(x, dtype, rows, cols, "matmul")
    n = x2.shape[0]
    if out is None:
        out = np.empty((n, rows), dtype=np.float32)
    elif out.shape != (n, rows) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise QuantizationError(
            f"matmul: out must be float32 C-contiguous ({n}, {rows}), got {out.dtype} {out.shape}"
        )
    elif np.may_share_memory(out, x2):  # the kernels read x while writing out
        raise QuantizationError("matmul: out must not overlap x")
    if n == 0 or rows == 0:
        return out
    if cols == 0:
        out.fill(0.0)
        return out
    return _product(_KIND[dtype], x2, w2, out)


def _product(kind: int, x2: np.ndarray, w2: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out (n, rows) = x2 @ W.T by the kernel for n inputs; every argument already checked."""
    n = x2.shape[0]
    if n == 1:
        _mv.matvec(kind, x2[0], w2, out[0])
    elif n <= MATVEC_ROWS_MAX:
        _mv.matvec_rows(kind, x2, w2, out)
    elif n >= _g.GEMM_MIN_N:
        _g.matmul_gemm(kind, _g.panels(x2), n, w2, out)
    else:
        _k.matmul_tiled(kind, x2, w2, out)
    return out


@dataclass(frozen=True)
class Weight:
    """A weight's bytes checked once (`weight`), for the runtime's many calls per token: `matmul` and
    `swiglu_expert` check their arguments on every call, which a decode step of a small model pays dozens of
    times; these call the same kernels with the same arguments, so the results are the same bits.
    With `int8`, the 8-bit-activation kernels (`int8`) instead, at any number of rows (a prompt's rows of a K type run
    `int8._k_rows`, which decodes a weight row once for 8 activation rows: 1.1-1.9x the float GEMM from 16 to 128
    rows, docs/BENCHMARKS.md "Decode: notes")."""

    w2: np.ndarray  # uint8 (rows, row_bytes); packed (int8 and a packed type): (rows / 16, 16 * row_bytes)
    kind: int  # the type code the kernels take w2 by (a packed K type's own, `int8.prepared_kind`)
    rows: int
    cols: int
    int8: bool = False  # the bytes as `int8.prepare` left them, for the 8-bit kernels

    @property
    def dtype(self) -> str:
        return _DTYPE_OF[self.kind % PACKED_K]

    @property
    def packed(self) -> bool:
        return self.int8 and self.kind in _i8.PACKED_KINDS

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """float32 (n, rows) = x @ W.T for x float32 (n, cols); anything else goes through `matmul`'s checks."""
        plain = x.dtype == np.float32 and x.ndim == 2 and x.shape[1] == self.cols and x.flags.c_contiguous and len(x)
        if self.int8:
            x2 = x if plain else _check_x(x, self.dtype, self.rows, self.cols, "matmul")
            return _i8.matmul8_kind(x2, self.w2, self.kind, np.empty((x2.shape[0], self.rows), np.float32))
        if not plain:
            return matmul(x, self.w2, self.dtype, self.rows, self.cols)
        return _product(self.kind, x, self.w2, np.empty((x.shape[0], self.rows), np.float32))

    def row_block(self, start: int, n: int) -> Weight:
        """Rows start..start+n of W (a packed weight: at multiples of its groups, 16 rows), sharing the bytes."""
        if not self.packed:
            return Weight(self.w2[start:start + n], self.kind, n, self.cols, self.int8)
        if start % _i8.GROUP or n % _i8.GROUP:
            raise QuantizationError(f"row_block: rows {start}..{start + n} of a packed weight are not whole groups "
                                    f"of {_i8.GROUP}")
        return Weight(self.w2[start // _i8.GROUP:(start + n) // _i8.GROUP], self.kind, n, self.cols, True)


def layout_weight(w: np.ndarray, dtype: str, rows: int, cols: int, int8: bool = False, kind: int | None = None) -> Weight:
    """A `Weight` over bytes whose size the layout's manifest has checked against (rows, cols) of `dtype` (an expert
    slot's tensor): only shaped, as an expert is applied a few times per layer and token. `int8`: for the 8-bit
    kernels; `kind` the type code they take the bytes by (default the type's own: `int8.prepared_kind` when the store
    prepared the slot, which a runtime tier holds per expert, so a packed type's bytes are packed and a K type's
    bytes are packed or the file's)."""
    kind = _KIND[dtype] if kind is None else kind
    if int8 and kind in _i8.PACKED_KINDS:
        return Weight(w.reshape(rows // _i8.GROUP, -1), kind, rows, cols, True)
    return Weight(w.reshape(rows, -1), kind, rows, cols, int8)


def weight(w: np.ndarray, dtype: str, rows: int, cols: int, int8: bool = False, packed: bool = False) -> Weight:
    """`w` (raw bytes of a (rows, cols) `dtype` weight) checked as `matmul` checks it, for `Weight` calls. `int8`: for
    the 8-bit kernels when they take it (`int8.takes`), prepared in place: a packed type's `w` then holds packed bytes
    (with `packed`, it holds them already)."""
    if rows == 0 or cols == 0:
        raise QuantizationError(f"weight: an empty {dtype} weight ({rows}, {cols}) has no kernel call")
    w2 = _check_weight(w, dtype, rows, cols, "weight")
    if int8 and _i8.takes(dtype, rows, cols):
        return Weight(_i8.prepare(w2, dtype, packed), _i8.prepared_kind(dtype, rows, cols), rows, cols, True)
    return Weight(w2, _KIND[dtype], rows, cols)


def swiglu_weights(x: np.ndarray, gate: Weight, up: Weight, down: Weight) -> np.ndarray:
    """float32 (n, d_model) = (silu(x @ G.T) * (x @ U.T)) @ D.T for checked weights and x float32 C-contiguous
    (n, d_model). Up to MATVEC_ROWS_MAX rows run the fused decode kernel, each row exactly as decoding it alone;
    gate and up both on the 8-bit kernels (`int8`), the fused 8-bit kernel."""
    n = x.shape[0]
    if gate.int8 and up.int8:
        return down(_i8.swiglu8_kind(x, gate.w2, gate.kind, up.w2, up.kind, gate.rows))
    if n > MATVEC_ROWS_MAX or gate.int8 or up.int8:  # many rows, or each of gate and up on its own kernels
        return down(silu_mul(gate(x), up(x)))
    h = np.empty((n, gate.rows), np.float32)
    _mv.matvec_swiglu(gate.kind, up.kind, x, gate.w2, up.w2, h, np.empty((n, gate.rows), np.float32))
    return down(h)


def get_rows(w: np.ndarray, dtype: str, ids: np.ndarray, cols: int) -> np.ndarray:
    """Embedding lookup: float32 (len(ids), cols), the dequantized rows `ids` (int64 (k,)) of W.

    Only the selected rows' bytes are decoded (bit-identical to `dequantize`). The number of rows is
    taken from the byte count.
    """
    if dtype not in _KIND:
        raise QuantizationError(f"get_rows: unknown dtype {dtype!r}; expected one of {', '.join(MATMUL_DTYPES)}")
    dt = DTYPES[dtype]
    if cols <= 0 or cols % dt.block_size != 0:
        raise QuantizationError(f"get_rows: {dtype} needs cols to be a positive multiple of {dt.block_size}, got {cols}")
    if not isinstance(w, np.ndarray) or w.dtype != np.uint8:
        raise QuantizationError(f"get_rows: {dtype} weight must be uint8 bytes, got {getattr(w, 'dtype', type(w))}")
    row_bytes = dt.row_bytes(cols)
    if w.size % row_bytes != 0:
        raise QuantizationError(f"get_rows: {w.size} bytes are not whole {dtype} rows of {cols} ({row_bytes} bytes each)")
    w2 = _check_weight(w, dtype, w.size // row_bytes, cols, "get_rows")
    rows = w2.shape[0]
    idx = np.asarray(ids).reshape(-1)
    if idx.size and not np.issubdtype(idx.dtype, np.integer):
        raise QuantizationError(f"get_rows: ids must be integers, got {idx.dtype}")
    idx = idx.astype(np.int64, copy=False)
    if idx.size and (idx.min() < 0 or idx.max() >= rows):
        bad = idx[(idx < 0) | (idx >= rows)][0]
        raise QuantizationError(f"get_rows: id {bad} out of range for a {dtype} weight ({rows}, {cols})")
    out = np.empty((idx.size, cols), np.float32)
    _k.get_rows(_KIND[dtype], w2, idx, out)
    return out


def silu_mul(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    """silu(g) * u in place in g (float32 (n, d_ff) both); returns g."""
    with np.errstate(over="ignore"):  # exp(-g) = inf for g < -88: silu -> -0, the right limit
        denom = np.exp(-g)
    denom += np.float32(1.0)
    np.divide(g, denom, out=g)
    g *= u
    return g


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
    """float32 (n, d_model) = (silu(x @ G.T) * (x @ U.T)) @ D.T for one expert.

    x: float32 (n, d_model); gate/up: (d_ff, d_model) bytes; down: (d_model, d_ff) bytes.
    """
    g = Weight(_check_weight(gate_w, dtype_gate, d_ff, d_model, "swiglu_expert gate"), _KIND[dtype_gate], d_ff, d_model)
    u = Weight(_check_weight(up_w, dtype_up, d_ff, d_model, "swiglu_expert up"), _KIND[dtype_up], d_ff, d_model)
    d = Weight(_check_weight(down_w, dtype_down, d_model, d_ff, "swiglu_expert down"), _KIND[dtype_down], d_model, d_ff)
    x2 = _check_x(x, dtype_gate, d_ff, d_model, "swiglu_expert")
    if not (d_ff and d_model and len(x2)):  # no kernel call: an empty product is zeros
        return np.zeros((len(x2), d_model), np.float32)
    return swiglu_weights(x2, g, u, d)
