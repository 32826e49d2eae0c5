"""q4_k: super-blocks of 256 weights in 144 bytes, 8 sub-blocks of 32 with 6-bit scales and mins.

Super-block: d and dmin (f16, bytes 0-1 and 2-3); 12 bytes packing 8 six-bit scales sc_j and mins m_j
(ggml's get_scale_min_k4); 128 bytes of 4-bit quants, chunk c (32 bytes) holding sub-block 2c in its
low nibbles and 2c+1 in its high ones. x = (d*sc_j)*q - dmin*m_j. The quantizer is ggml's
quantize_row_q4_K_ref bit for bit (gguf-py has none), its steps shared with q5_k (`_blocks256.k4_levels`:
make_qkx2_quants(32, 15, .., -1.f, 0.1f, 20, false)); the dequantizer is bit-exact with ggml and gguf-py.

Decode (matvec): a 16-entry table fma(k, d*sc, -dmin*m) per 32-weight sub-block, indexed by the
nibbles with vpermps (`vlut16`): one rounding where the reference rounds (d*sc)*k and then the
difference, so a weight may differ from `dequantize`'s in its last bit (well inside the matmul
tolerance; inf/NaN scales give inf/NaN alike), in exchange for a faster kernel.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from mertools.kernels.common import (
    EXACT_JIT,
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
from mertools.kernels.simd import (
    decode_nibbles32,
    half_at,
    nib16,
    vadd,
    vfma,
    vhsum,
    viota,
    vlane,
    vload,
    vlut16,
    vshr4,
    vzero,
)

from ._blocks256 import block_scales, k4_levels, k4_levels_reference, scale_min_k4, unpack_scale_min_k4
from ._blocks256 import nearest_int as nearest_int  # re-exported: tests use q4_k.nearest_int
from ._blocks256 import nearest_int_reference as nearest_int_reference
from ._k8 import q4_k_int8_reference
from .base import DType, Thresholds, f16_from_bytes

BYTES = 144
_CHUNK = 16  # super-blocks per parallel quantizer task, so the scratch arrays are allocated once per task


# ---------------------------------------------------------------- numpy references


def quantize_reference(x: np.ndarray) -> np.ndarray:
    """x: float32 (..., cols) with cols % 256 == 0 -> uint8 (n_blocks, 144) Q4_K blocks."""
    xs = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, 8, 32)  # (nb, 8 sub-blocks, 32)
    nb = xs.shape[0]
    with np.errstate(all="ignore"):  # values computed under a false mask are discarded
        head, L = k4_levels_reference(xs, 15, -1.0, 20)  # make_qkx2_quants(32, 15, .., -1.f, 0.1f, 20, false)
    Lc = L.reshape(nb, 4, 2, 32)  # 64-weight chunks: low nibble = first 32, high = next 32
    qs = (Lc[:, :, 0, :] | (Lc[:, :, 1, :] << 4)).reshape(nb, 128)
    return np.concatenate([head, qs], axis=1)


def dequantize_reference(raw: np.ndarray) -> np.ndarray:
    """raw: uint8 (n_blocks*144,) -> float32 (n_blocks*256,). x = d*sc*q - dmin*m per sub-block."""
    b = np.asarray(raw, dtype=np.uint8).reshape(-1, BYTES)
    d = f16_from_bytes(b[:, 0:2])  # (nb, 1)
    dmin = f16_from_bytes(b[:, 2:4])  # (nb, 1)
    sc, m = unpack_scale_min_k4(b[:, 4:16])  # (nb, 8)
    qs = b[:, 16:].reshape(-1, 4, 32)  # (nb, 4 chunks, 32)
    q = np.stack([qs & 0xF, qs >> 4], axis=2).reshape(-1, 8, 32)  # sub-block 2c = low, 2c+1 = high
    with np.errstate(invalid="ignore"):
        d1 = (d * sc.astype(np.float32))[:, :, None]  # (nb, 8, 1)
        m1 = (dmin * m.astype(np.float32))[:, :, None]
        return (d1 * q.astype(np.float32) - m1).reshape(-1)


# ---------------------------------------------------------------- numba quantizer and dequantizer


@njit(**EXACT_JIT)
def _q4_k_block(x, base, out, o, L, laux, weights, scales, mins, sc, mq):
    """quantize_row_q4_K_ref for one super-block: x[base:base+256] -> out[o:o+144]."""
    k4_levels(x, base, out, o, 15, np.float32(-1.0), 20, L, laux, weights, scales, mins, sc, mq)
    for c in range(4):  # each 64-weight chunk: low nibbles = first 32, high nibbles = next 32
        for i in range(32):
            out[o + 16 + 32 * c + i] = L[64 * c + i] | (L[64 * c + 32 + i] << 4)


@njit(**EXACT_PJIT)
def quantize(x):
    """x: float32 (n_blocks*256,) -> uint8 (n_blocks*144,)."""
    nb = x.size // 256
    out = np.empty(nb * BYTES, dtype=np.uint8)
    n_tasks = (nb + _CHUNK - 1) // _CHUNK
    for t in prange(n_tasks):
        L = np.empty(256, dtype=np.uint8)
        laux = np.empty(32, dtype=np.uint8)
        weights = np.empty(32, dtype=np.float32)
        scales = np.empty(8, dtype=np.float32)
        mins = np.empty(8, dtype=np.float32)
        sc = np.empty(8, dtype=np.int64)
        mq = np.empty(8, dtype=np.int64)
        for b in range(t * _CHUNK, min(nb, (t + 1) * _CHUNK)):
            _q4_k_block(x, b * 256, out, b * BYTES, L, laux, weights, scales, mins, sc, mq)
    return out


@njit(**EXACT_PJIT)
def dequantize(raw):
    """raw: uint8 (n_blocks*144,) -> float32 (n_blocks*256,). x = (d*sc)*q - dmin*m per sub-block."""
    nb = raw.size // 144
    out = np.empty(nb * 256, dtype=np.float32)
    for b in prange(nb):
        o = b * 144
        d = f16_bits_to_f32(np.int64(raw[o]) | (np.int64(raw[o + 1]) << 8))
        dmin = f16_bits_to_f32(np.int64(raw[o + 2]) | (np.int64(raw[o + 3]) << 8))
        s = o + 4  # 12 bytes of packed 6-bit scales and mins
        for j in range(8):  # get_scale_min_k4
            if j < 4:
                sc = np.int64(raw[s + j]) & 63
                m = np.int64(raw[s + j + 4]) & 63
            else:
                sc = (np.int64(raw[s + j + 4]) & 0xF) | ((np.int64(raw[s + j - 4]) >> 6) << 4)
                m = (np.int64(raw[s + j + 4]) >> 4) | ((np.int64(raw[s + j]) >> 6) << 4)
            d1 = d * np.float32(sc)
            m1 = dmin * np.float32(m)
            qo = o + 16 + 32 * (j // 2)  # sub-blocks 2c and 2c+1 share chunk c's 32 bytes
            shift = 4 * (j % 2)
            base = b * 256 + 32 * j
            for i in range(32):
                out[base + i] = d1 * np.float32((np.int64(raw[qo + i]) >> shift) & 0xF) - m1
    return out


# ---------------------------------------------------------------- matmul decoders


@njit(inline="always", **TILE_JIT)  # numba inlines it: LLVM may leave a call in decode_tile's row loop
def tile_row(wr, k0, kc, buf, r):
    """buf[r, :kc] = the row's weights k0:k0+kc (wr: the row's uint8 bytes), exactly `dequantize`'s."""
    at = r * KC  # flat offset of buf row r
    for b in range(kc // 256):  # chunk c: sub-block 2c in the low nibbles, 2c+1 in the high ones
        o = (k0 // 256 + b) * 144
        d = half_at(wr, o)
        dmin = half_at(wr, o + 2)
        for c in range(4):
            sc0, m0 = scale_min_k4(wr, o + 4, 2 * c)
            sc1, m1 = scale_min_k4(wr, o + 4, 2 * c + 1)
            decode_nibbles32(
                wr, o + 16 + 32 * c,
                d * np.float32(sc0), dmin * np.float32(m0), d * np.float32(sc1), dmin * np.float32(m1),
                buf, at + 256 * b + 64 * c,
            )  # fmt: skip


@njit(**MATVEC_JIT)
def _chunk(wr, o, c, dm, iota, xa, xb, xc, xd, a, b):
    """Chunk c (64 weights: sub-block 2c in the low nibbles of 32 bytes, 2c+1 in the high ones) of
    the super-block at o, whose scales dm = block_scales(wr, o); tables fma(k, d*sc, -dmin*m)."""
    t0 = vfma(iota, vlane(dm, 2 * c), vlane(dm, 8 + 2 * c))
    t1 = vfma(iota, vlane(dm, 2 * c + 1), vlane(dm, 9 + 2 * c))
    qa = nib16(wr, o + 16 + 32 * c)
    qb = nib16(wr, o + 32 + 32 * c)
    a = vfma(vlut16(t0, qa), xa, a)
    b = vfma(vlut16(t0, qb), xb, b)
    a = vfma(vlut16(t1, vshr4(qa)), xc, a)
    b = vfma(vlut16(t1, vshr4(qb)), xd, b)
    return a, b


@njit(**MATVEC_JIT)
def matvec_group(x, w, r0, out):
    """out[r0:r0+4] = W[r0:r0+4] @ x, prefetching the next group's bytes at the same pace."""
    w0, w1, w2, w3 = group_rows(w, r0)
    iota = viota()
    a0 = b0 = a1 = b1 = a2 = b2 = a3 = b3 = vzero()
    ahead = (r0 + R) * w.shape[1]
    for blk in range(x.size // 256):
        o = 144 * blk
        prefetch_lines(w, ahead + 4 * o, 576)
        dm0, dm1, dm2, dm3 = block_scales(w0, o), block_scales(w1, o), block_scales(w2, o), block_scales(w3, o)
        for c in range(4):
            xo = 256 * blk + 64 * c
            xa = vload(x, xo)
            xb = vload(x, xo + 16)
            xc = vload(x, xo + 32)
            xd = vload(x, xo + 48)
            a0, b0 = _chunk(w0, o, c, dm0, iota, xa, xb, xc, xd, a0, b0)
            a1, b1 = _chunk(w1, o, c, dm1, iota, xa, xb, xc, xd, a1, b1)
            a2, b2 = _chunk(w2, o, c, dm2, iota, xa, xb, xc, xd, a2, b2)
            a3, b3 = _chunk(w3, o, c, dm3, iota, xa, xb, xc, xd, a3, b3)
    group_store(out, r0, vhsum(vadd(a0, b0)), vhsum(vadd(a1, b1)), vhsum(vadd(a2, b2)), vhsum(vadd(a3, b3)))


TYPE = DType(
    "q4_k", 12, 256, BYTES, scale_offsets=(0, 2),
    # calibrated on the trained fixture (benchmarks/bench_types.py; figures and rule in docs/BENCHMARKS.md)
    verify=Thresholds(kl_mean=0.05, top1=0.80, ppl_ratio=1.047),
    quantize=quantize, dequantize=dequantize,
    quantize_reference=quantize_reference, dequantize_reference=dequantize_reference,
    int8_reference=q4_k_int8_reference,
)
