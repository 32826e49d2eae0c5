"""The numpy definition of the 8-bit-activation path (`int8`): what its kernels compute, bit for bit."""

from __future__ import annotations

import numpy as np

from mertools.dtypes import DTYPES, q8_0
from mertools.dtypes._blocks256 import signed_absmax_reference


def quantize_act(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 (n, cols) -> ggml's q8_0 of each row: quants int32 (n, nb, 32), scales float32 (n, nb)."""
    n, cols = x.shape
    raw = q8_0.quantize_reference(x).reshape(n, cols // 32, q8_0.BYTES)
    dx = np.ascontiguousarray(raw[:, :, :2]).view("<f2").astype(np.float32)[..., 0]
    return np.ascontiguousarray(raw[:, :, 2:]).view(np.int8).astype(np.int32), dx


def quantize_k(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float32 (n, cols), cols % 256 == 0 -> ggml's q8_K of each row (quantize_row_q8_K_ref: iscale = -127 / the
    first value of largest magnitude, nearest_int of iscale * x at most 127, d = 1 / iscale; NaN quants 0, and
    within -127 for a subnormal largest value, which ggml leaves undefined): quants int32 (n, nb, 256), scales float32
    (n, nb), and each 16 quants' sum (ggml's bsums), int32 (n, cols/16)."""
    n, cols = x.shape
    v = np.asarray(x, np.float32).reshape(n * (cols // 256), 256)
    amax, mx = signed_absmax_reference(v)
    with np.errstate(all="ignore"):
        iscale = np.where(amax > 0, np.float32(-127.0) / np.where(amax > 0, mx, np.float32(1.0)), np.float32(0.0))
        p = iscale[:, None] * v
        q = np.clip(np.rint(p), -127, 127)
        q = np.where(np.isnan(p), 0, q).astype(np.int32)
        d = np.where(amax > 0, np.float32(1.0) / iscale, np.float32(0.0)).astype(np.float32)
    sums = q.reshape(-1, 16, 16).sum(-1).astype(np.int32)
    return q.reshape(n, -1, 256), d.reshape(n, -1), sums.reshape(n, -1)


def _packed(xq: np.ndarray, dx: np.ndarray, w2: np.ndarray, dtype: str) -> np.ndarray:
    """The packed types' kernel (int8._packed_group): per row and block, the integer sum over the block's 32 weights
    times d_w * d_x (float32, one rounding each), summed in block order."""
    q, d = DTYPES[dtype].int8_pack.blocks(w2)  # (rows, nb, 32), (rows, nb)
    rows, nb, _ = q.shape
    out = np.empty((len(xq), rows), np.float32)
    for i in range(len(xq)):
        terms = (q * xq[i]).sum(axis=2).astype(np.float32) * (d * dx[i])  # exact integers, then float32 products
        acc = np.zeros(rows, np.float32)
        for b in range(nb):  # block order, one float32 addition at a time
            acc += terms[:, b]
        out[i] = acc
    return out


def matmul8(x: np.ndarray, w2: np.ndarray, dtype: str) -> np.ndarray:
    """float32 (n, rows) = x @ W.T as `int8.matmul8` computes it, from W's file bytes w2 (rows, row_bytes)."""
    x = np.asarray(x, np.float32)
    dt = DTYPES[dtype]
    with np.errstate(all="ignore"):  # inf/NaN scales propagate as in the kernels
        if dt.int8_pack is not None:
            return _packed(*quantize_act(x), w2, dtype)
        return dt.int8_reference(*quantize_k(x), w2)
