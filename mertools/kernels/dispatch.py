"""The kernels' one dispatch over tensor types: the only kernel module that names them.

A kernel serves every type with one compiled body, so the type arrives as a code (`kind`, the
type's ggml type number, `mertools.dtypes.KIND`) and the branch below picks the type module's
decoder, once per tile row (prefill) or per group of rows (decode). numba needs the chain of
branches written out inside jitted code: a new type adds one branch to each function.

numba's on-disk cache is keyed on each file's contents only (numba 0.68 hashes the source; a touch changes
nothing), and a cached kernel holds its callees' code: after editing a type module, change this file and the
files calling it (matvec_kernels, matmul_kernels, gemm_kernels: each carries a comment for it), or delete their
__pycache__/*.nbi, so that the kernels calling it are recompiled (a stale matvec ran a new type as f32).
"""

from __future__ import annotations

from numba import njit

from mertools.dtypes import (
    bf16,
    f16,
    f32,
    iq2_xxs,
    iq4_nl,
    iq4_xs,
    mxfp4,
    q2_k,
    q3_k,
    q4_0,
    q4_1,
    q4_k,
    q5_0,
    q5_1,
    q5_k,
    q6_k,
    q8_0,
)
from mertools.kernels.common import MATVEC_JIT, TILE_JIT

F32, F16, Q4_0, Q8_0, Q4_K = (m.TYPE.ggml_type for m in (f32, f16, q4_0, q8_0, q4_k))
Q2_K, Q3_K, Q5_K, Q6_K, IQ4_XS = (m.TYPE.ggml_type for m in (q2_k, q3_k, q5_k, q6_k, iq4_xs))
Q4_1, Q5_0, Q5_1, IQ4_NL, BF16, MXFP4 = (m.TYPE.ggml_type for m in (q4_1, q5_0, q5_1, iq4_nl, bf16, mxfp4))
IQ2_XXS = iq2_xxs.TYPE.ggml_type


@njit(**TILE_JIT)
def decode_tile(kind, w, r0, rb, k0, kc, buf):
    """buf[r, :kc] = W[r0 + r, k0:k0+kc] for r < rb, bit-identical to `dequantize`.
    w: uint8 (rows, row_bytes) of type code `kind`; buf: float32 (RB, KC)."""
    for r in range(rb):
        wr = w[r0 + r]
        if kind == Q4_0:
            q4_0.tile_row(wr, k0, kc, buf, r)
        elif kind == Q8_0:
            q8_0.tile_row(wr, k0, kc, buf, r)
        elif kind == Q4_K:
            q4_k.tile_row(wr, k0, kc, buf, r)
        elif kind == Q6_K:
            q6_k.tile_row(wr, k0, kc, buf, r)
        elif kind == Q5_K:
            q5_k.tile_row(wr, k0, kc, buf, r)
        elif kind == IQ4_XS:
            iq4_xs.tile_row(wr, k0, kc, buf, r)
        elif kind == Q3_K:
            q3_k.tile_row(wr, k0, kc, buf, r)
        elif kind == Q2_K:
            q2_k.tile_row(wr, k0, kc, buf, r)
        elif kind == IQ2_XXS:
            iq2_xxs.tile_row(wr, k0, kc, buf, r)
        elif kind == Q4_1:
            q4_1.tile_row(wr, k0, kc, buf, r)
        elif kind == Q5_0:
            q5_0.tile_row(wr, k0, kc, buf, r)
        elif kind == Q5_1:
            q5_1.tile_row(wr, k0, kc, buf, r)
        elif kind == IQ4_NL:
            iq4_nl.tile_row(wr, k0, kc, buf, r)
        elif kind == MXFP4:
            mxfp4.tile_row(wr, k0, kc, buf, r)
        elif kind == BF16:
            bf16.tile_row(wr, k0, kc, buf, r)
        elif kind == F16:
            f16.tile_row(wr, k0, kc, buf, r)
        else:
            f32.tile_row(wr, k0, kc, buf, r)


@njit(**MATVEC_JIT)
def matvec_group(kind, x, w, r0, out):
    """out[r0:r0+4] = W[r0:r0+4] @ x (fewer rows past the end). w: uint8 (rows, row_bytes) of type code `kind`."""
    if kind == Q4_0:
        q4_0.matvec_group(x, w, r0, out)
    elif kind == Q4_K:
        q4_k.matvec_group(x, w, r0, out)
    elif kind == Q6_K:
        q6_k.matvec_group(x, w, r0, out)
    elif kind == Q5_K:
        q5_k.matvec_group(x, w, r0, out)
    elif kind == IQ4_XS:
        iq4_xs.matvec_group(x, w, r0, out)
    elif kind == Q3_K:
        q3_k.matvec_group(x, w, r0, out)
    elif kind == Q2_K:
        q2_k.matvec_group(x, w, r0, out)
    elif kind == IQ2_XXS:
        iq2_xxs.matvec_group(x, w, r0, out)
    elif kind == Q8_0:
        q8_0.matvec_group(x, w, r0, out)
    elif kind == Q4_1:
        q4_1.matvec_group(x, w, r0, out)
    elif kind == Q5_0:
        q5_0.matvec_group(x, w, r0, out)
    elif kind == Q5_1:
        q5_1.matvec_group(x, w, r0, out)
    elif kind == IQ4_NL:
        iq4_nl.matvec_group(x, w, r0, out)
    elif kind == MXFP4:
        mxfp4.matvec_group(x, w, r0, out)
    elif kind == BF16:
        bf16.matvec_group(x, w, r0, out)
    elif kind == F16:
        f16.matvec_group(x, w, r0, out)
    else:
        f32.matvec_group(x, w, r0, out)
