"""The runtime's arithmetic for the family pieces: float32, model matrices kept as GGML bytes and
multiplied by the numba kernels, every product computed on each sequence's own rows."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..families.pieces import glu, softmax
from ..families.weights import Mlp
from ..kernels import rowops
from ..kernels.experts8 import glu_rows
from ..kernels.int8 import GROUP
from ..kernels.matmul import Weight, swiglu_weights, weight
from ..layout.config import ModelConfig
from .batch import Batch


@dataclass(frozen=True)
class Linear:
    raw: np.ndarray  # uint8 raw GGML bytes of a (rows, cols) weight; with int8, prepared in place (packed) for `checked`
    dtype: str
    rows: int
    cols: int
    int8: bool = False  # the 8-bit-activation kernels where they take the weight (`kernels.int8.takes`)
    packed: bool = False  # with int8: raw holds the packed bytes already (a packed copy's: runtime/packed.py)
    checked: Weight = field(init=False, repr=False, compare=False)  # the bytes checked once, for the kernel calls

    def __post_init__(self) -> None:
        object.__setattr__(self, "checked", weight(self.raw, self.dtype, self.rows, self.cols, int8=self.int8,
                                                   packed=self.packed))

    def __call__(self, x: np.ndarray) -> np.ndarray:  # (n, cols) -> (n, rows)
        return self.checked(x)


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    # np.mean(x * x, axis=-1, dtype=float32) is this sum divided by the count: the same bits, without its Python
    var = np.add.reduce(x * x, axis=-1, dtype=np.float32, keepdims=True) / x.shape[-1]
    return (x / np.sqrt(var + np.float32(eps))) * w


def swiglu(m: Mlp[Linear], x: np.ndarray) -> np.ndarray:
    return swiglu_weights(np.ascontiguousarray(x, np.float32), m.gate.checked, m.up.checked, m.down.checked)


def glu_act(cfg: ModelConfig) -> np.ndarray:
    """The routed experts' activation as `experts8` takes it: float32 (alpha, limit, up offset) of `pieces.glu`, or
    zeros for a plain SwiGLU (silu(gate) * up)."""
    if cfg.plain_swiglu:
        return np.zeros(3, np.float32)
    return np.array([cfg.swiglu_alpha, cfg.swiglu_limit, cfg.swiglu_up_offset], np.float32)


class RuntimeOps:
    """`families.pieces.Ops` for a batch: kernels may take another path (and round differently) for
    another number of rows, so each sequence's rows are computed apart and a request's output never
    depends on its batch. Without a batch (prefetch guesses) the rows are taken together. `compiled` (the 8-bit
    mode): routers multiply and softmax on `kernels.rowops`, as the one-call decode step does (runtime/fused.py), and
    a GLU expert's activation is `experts8.glu_rows`, as a layer's experts in one call compute it, where numpy's BLAS
    and its float32 exp have no compiled twin."""

    def __init__(self, batch: Batch | None = None, compiled: bool = False) -> None:
        self.batch, self.compiled = batch, compiled

    def _rows(self, fn, x: np.ndarray) -> np.ndarray:  # noqa: ANN001 - (n, k) array -> (n, m) array
        return fn(x) if self.batch is None else self.batch.per_seq(fn, x)

    def linear(self, w: Linear | Weight, x: np.ndarray) -> np.ndarray:
        return self._rows(w, x)

    def dense(self, x: np.ndarray, a: np.ndarray) -> np.ndarray:
        if self.compiled:
            return self._rows(lambda rows: rowops.dense_rows(rows, a), x)
        return self._rows(lambda rows: rows @ a.T, x)

    def softmax(self, x: np.ndarray) -> np.ndarray:
        return rowops.softmax_rows(x).reshape(x.shape) if self.compiled else softmax(x)

    def mlp(self, m: Mlp[Linear], x: np.ndarray) -> np.ndarray:
        return self._rows(lambda rows: swiglu(m, rows), x)

    def glu(self, cfg: ModelConfig, g: np.ndarray, u: np.ndarray) -> np.ndarray:
        if not self.compiled:
            return glu(cfg, g, u)
        return glu_rows(np.ascontiguousarray(g, np.float32), np.ascontiguousarray(u, np.float32), glu_act(cfg))

    def rms_norm(self, x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
        return rms_norm(x, w, eps)

    def per_head(self, w: Linear, x: np.ndarray) -> np.ndarray:
        """x (n, heads, cols) -> (n, heads, rows): each head's rows of W's bytes are one contiguous block."""
        n, heads, cols = x.shape
        rows = w.rows // heads
        out = np.empty((n, heads, rows), np.float32)
        whole = w.checked.packed and rows % GROUP != 0  # heads that split a packed group: every row, then the head's
        for h in range(heads):
            xh = np.ascontiguousarray(x[:, h])
            out[:, h] = (self._rows(w.checked, xh)[:, h * rows:(h + 1) * rows] if whole
                         else self._rows(w.checked.row_block(h * rows, rows), xh))
        return out
