"""Prefill kernel for many inputs (n >= GEMM_MIN_N): out = x @ W.T as a register-blocked GEMM.

Each parallel task owns TASK_ROWS weight rows, in tiles of RB rows x KC columns decoded exactly
(`dispatch.decode_tile`, bit-identical to `dequantize`) into an L1 buffer. The inputs are
rearranged once per call into panels of 16 inputs stored column by column (`panels`; n is zero
padded to NP, a multiple of 16), so that a tile column k meets 16 inputs in one vector load and a
microkernel step reads 4 contiguous runs. The microkernel computes 4 weight rows x 64 inputs
in 16 vector accumulators: per column k, 4 vector loads of xT and 16 fused multiply-adds whose
weight operand is a broadcast from the tile (an embedded-broadcast memory operand), so it is
bound by the FMA units rather than by loads, as the n = 1 matvec is bound by memory.

Rounding: each (input, row) sum runs over the KC columns of a tile in order, fused, from zero;
the tile sums are added in column order. Every input's result therefore depends only on its own
row of x (never on n or on its neighbours), and the chains stay short (KC terms, then cols/KC).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from mertools.kernels.common import KC, RB
from mertools.kernels.dispatch import decode_tile
from mertools.kernels.simd import vadd, vfma, vload, vsplat, vstore, vzero

# numba caches `dispatch`'s branches inside this file's kernels, keyed on this file's contents: a type added there
# (last: IQ2_XXS) changes this file too, so that a cache made before it is not used

_JIT = {"nogil": True, "cache": True}
TASK_ROWS = 4 * RB  # rows per parallel task (its buffers are allocated once)
GEMM_MIN_N = 16  # below this the tiled kernel of matmul_kernels is used
KG = 256  # columns per tile: a multiple of every block size, <= KC; 64 inputs x KG of xT = 64 KiB


@njit(**_JIT)
def _acc_add(acc, at, v):
    vstore(acc, at, vadd(vload(acc, at), v))


@njit(**_JIT)
def _acc_add4(acc, at, v0, v1, v2, v3):
    _acc_add(acc, at, v0)
    _acc_add(acc, at + 16, v1)
    _acc_add(acc, at + 32, v2)
    _acc_add(acc, at + 48, v3)


@njit(**_JIT)
def _micro4x4(xt, cols, np_, k0, kc, buf, r, i0, acc):
    """acc[(r+j)*np_ + i0 : +64] += sum over the tile's kc columns k of buf[r+j, k] * x[i0:i0+64, k0+k].
    xt: x in 16-input panels, flat (NP/16, cols, 16): panel v holds inputs 16v..16v+15, column-major."""
    a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = vzero()
    a20 = a21 = a22 = a23 = a30 = a31 = a32 = a33 = vzero()
    p = (i0 // 16) * cols * 16  # panel of inputs i0..i0+15; the next three follow, cols*16 apart
    for k in range(kc):
        xo = p + (k0 + k) * 16
        x0 = vload(xt, xo)
        x1 = vload(xt, xo + cols * 16)
        x2 = vload(xt, xo + cols * 32)
        x3 = vload(xt, xo + cols * 48)
        w = vsplat(buf[r, k])
        a00, a01, a02, a03 = vfma(w, x0, a00), vfma(w, x1, a01), vfma(w, x2, a02), vfma(w, x3, a03)
        w = vsplat(buf[r + 1, k])
        a10, a11, a12, a13 = vfma(w, x0, a10), vfma(w, x1, a11), vfma(w, x2, a12), vfma(w, x3, a13)
        w = vsplat(buf[r + 2, k])
        a20, a21, a22, a23 = vfma(w, x0, a20), vfma(w, x1, a21), vfma(w, x2, a22), vfma(w, x3, a23)
        w = vsplat(buf[r + 3, k])
        a30, a31, a32, a33 = vfma(w, x0, a30), vfma(w, x1, a31), vfma(w, x2, a32), vfma(w, x3, a33)
    _acc_add4(acc, r * np_ + i0, a00, a01, a02, a03)
    _acc_add4(acc, (r + 1) * np_ + i0, a10, a11, a12, a13)
    _acc_add4(acc, (r + 2) * np_ + i0, a20, a21, a22, a23)
    _acc_add4(acc, (r + 3) * np_ + i0, a30, a31, a32, a33)


@njit(**_JIT)
def _micro4x1(xt, cols, np_, k0, kc, buf, r, i0, acc):
    """As _micro4x4 for 16 inputs (the remainder of n past a multiple of 64)."""
    a0 = a1 = a2 = a3 = vzero()
    p = (i0 // 16) * cols * 16
    for k in range(kc):
        x0 = vload(xt, p + (k0 + k) * 16)
        a0 = vfma(vsplat(buf[r, k]), x0, a0)
        a1 = vfma(vsplat(buf[r + 1, k]), x0, a1)
        a2 = vfma(vsplat(buf[r + 2, k]), x0, a2)
        a3 = vfma(vsplat(buf[r + 3, k]), x0, a3)
    _acc_add(acc, r * np_ + i0, a0)
    _acc_add(acc, (r + 1) * np_ + i0, a1)
    _acc_add(acc, (r + 2) * np_ + i0, a2)
    _acc_add(acc, (r + 3) * np_ + i0, a3)


@njit(parallel=True, **_JIT)
def matmul_gemm(kind, xt, n, w, out):
    """out (n, rows) = x @ W.T from xt = `panels(x)`, (NP/16, cols, 16) float32.
    w: uint8 (rows, row_bytes) of dtype code `kind`."""
    cols = xt.shape[1]
    np_ = 16 * xt.shape[0]
    rows = w.shape[0]
    n64 = np_ - np_ % 64
    xf = xt.reshape(-1)
    for t in prange((rows + TASK_ROWS - 1) // TASK_ROWS):
        buf = np.zeros((RB, KC), dtype=np.float32)  # rows past the end stay zero
        acc = np.zeros(RB * np_, dtype=np.float32)  # (RB, NP) sums of the current tile of rows
        for r0 in range(t * TASK_ROWS, min((t + 1) * TASK_ROWS, rows), RB):
            rb = min(RB, rows - r0)
            acc[:] = 0.0
            for k0 in range(0, cols, KG):
                kc = min(KG, cols - k0)
                decode_tile(kind, w, r0, rb, k0, kc, buf)
                # 64 inputs x KG columns of x (64 KiB, 4 contiguous runs) serve the tile's 4 row quads
                for i0 in range(0, n64, 64):
                    for r in range(0, rb, 4):  # rows past rb (stale in buf) are computed, not stored
                        _micro4x4(xf, cols, np_, k0, kc, buf, r, i0, acc)
                for i0 in range(n64, np_, 16):
                    for r in range(0, rb, 4):
                        _micro4x1(xf, cols, np_, k0, kc, buf, r, i0, acc)
            for r in range(rb):
                for i in range(n):
                    out[i, r0 + r] = acc[r * np_ + i]


def panels(x: np.ndarray) -> np.ndarray:
    """x float32 (n, cols) -> (NP/16, cols, 16): inputs in panels of 16, each column-major, zero padded."""
    n, cols = x.shape
    nv = -(-n // 16)
    pad = np.zeros((nv * 16, cols), np.float32)
    pad[:n] = x
    return np.ascontiguousarray(pad.reshape(nv, 16, cols).transpose(0, 2, 1))
