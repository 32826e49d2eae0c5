"""iq4_nl: blocks of 32 weights in 18 bytes, x = d * K[q] with q a 4-bit index into a fixed
non-linear table K (ggml's kvalues_iq4nl) and d an f16 scale.

Block: d (f16, bytes 0-1), then 16 bytes whose low nibbles index weights 0-15 and high nibbles
16-31 (the 32-weight 4-bit layout). The dequantizer is bit-exact with ggml and gguf-py; the quantizer
(`_iq4`: a weighted scale search) with what ggml_quantize_chunk writes without an importance matrix
(quantize_iq4_nl; gguf-py has none).

Decode (matvec): the 16-entry table K * d is built per block (one multiply) and indexed by the
nibbles with `vlut16`, as the other 4-bit tables do; the weights are exactly `dequantize`'s.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from mertools.kernels.common import (
    EXACT_PJIT,
    KC,
    MATVEC_JIT,
    TILE_JIT,
    R,
    f16_bits_to_f32,
    group_rows,
    group_store,
    prefetch_lines,
)
from mertools.kernels.simd import half_splat, nib16, vadd, vfma, vhsum, vload, vlut16, vshr4, vstore, vzero

from ._blocks32 import const16, vexact_mul
from ._iq4 import KVALUES, quantize_nl, quantize_nl_reference  # KVALUES: ggml kvalues_iq4nl
from .base import DType, Thresholds, f16_from_bytes

BYTES = 18
_K = np.array(KVALUES, dtype=np.float32)
_table = const16(KVALUES)


# ---------------------------------------------------------------- numpy reference


def dequantize_reference(raw: np.ndarray) -> np.ndarray:
    """raw: uint8 (n_blocks*18,) -> float32 (n_blocks*32,). x = d * K[q]."""
    b = np.asarray(raw, dtype=np.uint8).reshape(-1, BYTES)
    d = f16_from_bytes(b[:, 0:2])  # (nb, 1)
    qs = b[:, 2:]
    q = np.concatenate([qs & 0xF, qs >> 4], axis=1)  # (nb, 32)
    with np.errstate(invalid="ignore"):  # inf * K never meets 0 (K has no zero), but NaN stays quiet
        return (d * _K[q]).reshape(-1)


# ---------------------------------------------------------------- numba dequantizer


@njit(**EXACT_PJIT)
def dequantize(raw):
    """raw: uint8 (n_blocks*18,) -> float32 (n_blocks*32,). x = d * K[q]."""
    nb = raw.size // BYTES
    out = np.empty(nb * 32, dtype=np.float32)
    k = _K
    for b in prange(nb):
        o = b * BYTES
        d = f16_bits_to_f32(np.int64(raw[o]) | (np.int64(raw[o + 1]) << 8))
        for j in range(16):
            q = np.int64(raw[o + 2 + j])
            out[b * 32 + j] = d * k[q & 0xF]
            out[b * 32 + 16 + j] = d * k[q >> 4]
    return out


# ---------------------------------------------------------------- matmul decoders


@njit(inline="always", **TILE_JIT)  # numba inlines it: LLVM may leave a call in decode_tile's row loop
def tile_row(wr, k0, kc, buf, r):
    """buf[r, :kc] = the row's weights k0:k0+kc (wr: the row's uint8 bytes), exactly `dequantize`'s."""
    at = r * KC  # flat offset of buf row r
    kv = _table()
    for b in range(kc // 32):
        o = (k0 // 32 + b) * BYTES
        t = vexact_mul(kv, half_splat(wr, o))  # K * d
        q = nib16(wr, o + 2)
        vstore(buf, at + 32 * b, vlut16(t, q))
        vstore(buf, at + 32 * b + 16, vlut16(t, vshr4(q)))


@njit(**MATVEC_JIT)
def _block(wr, o, kv, xl, xh, a, b):
    """One row's share of the block at byte o: (a, b) += its weights 0-15 * xl, 16-31 * xh."""
    t = vexact_mul(kv, half_splat(wr, o))
    q = nib16(wr, o + 2)
    return vfma(vlut16(t, q), xl, a), vfma(vlut16(t, vshr4(q)), xh, b)


@njit(**MATVEC_JIT)
def matvec_group(x, w, r0, out):
    """out[r0:r0+4] = W[r0:r0+4] @ x, prefetching the next group's bytes at the same pace."""
    w0, w1, w2, w3 = group_rows(w, r0)
    kv = _table()
    a0 = b0 = a1 = b1 = a2 = b2 = a3 = b3 = vzero()
    ahead = (r0 + R) * w.shape[1]  # the next group's first byte
    for blk in range(x.size // 32):
        o = BYTES * blk
        prefetch_lines(w, ahead + 4 * o, 4 * BYTES)
        xl = vload(x, 32 * blk)
        xh = vload(x, 32 * blk + 16)
        a0, b0 = _block(w0, o, kv, xl, xh, a0, b0)
        a1, b1 = _block(w1, o, kv, xl, xh, a1, b1)
        a2, b2 = _block(w2, o, kv, xl, xh, a2, b2)
        a3, b3 = _block(w3, o, kv, xl, xh, a3, b3)
    group_store(out, r0, vhsum(vadd(a0, b0)), vhsum(vadd(a1, b1)), vhsum(vadd(a2, b2)), vhsum(vadd(a3, b3)))


TYPE = DType(
    "iq4_nl", 20, 32, BYTES, scale_offsets=(0,),
    # calibrated on the trained fixture (benchmarks/bench_types.py; figures and rule in docs/BENCHMARKS.md)
    verify=Thresholds(kl_mean=0.03, top1=0.87, ppl_ratio=1.155),
    quantize=quantize_nl, dequantize=dequantize,
    quantize_reference=quantize_nl_reference, dequantize_reference=dequantize_reference,
)
