"""q5_k: super-blocks of 256 weights in 176 bytes, 8 sub-blocks of 32 with 6-bit scales and mins.

Super-block: d and dmin (f16, bytes 0-1 and 2-3); 12 bytes of scales and mins packed as in the 4-bit K type
(get_scale_min_k4); qh, 32 bytes of fifth bits (bit j of qh[i] is weight i of sub-block j); 128
bytes of low nibbles, chunk c (32 bytes) holding sub-block 2c in its low nibbles and 2c+1 in its
high ones. x = (d*sc_j)*q - dmin*m_j with q = nibble | fifth bit << 4 (ggml's dequantize_row_q5_K
and gguf-py). The quantizer is ggml's quantize_row_q5_K_ref bit for bit (what llama-quantize writes
without an importance matrix): the 4-bit K type's algorithm (`_blocks256.k4_levels`) with
make_qkx2_quants(32, 31, .., -0.5f, 0.1f, 15, false), the fifth bits split off into qh.

Decode (matvec): two 16-entry tables fma(k, d*sc, -dmin*m) per sub-block (k = 0..15 and 16..31),
indexed by the 5-bit codes with one vpermi2ps (`vlut32`): one rounding where the reference rounds
(d*sc)*q and then the difference, as the 4-bit K-quant's table (the same single-fma liberty). The codes are put
together on 16 bytes (`index5`) before widening, and each 64-weight chunk is inlined with its
constant shifts (together 25% faster than 16-lane integer ops in a loop).

Prefill (tile): (d*sc)*q - dmin*m in vectors. d*sc has at most 17 significant bits and q 5, so the
product is exact in float32 and LLVM fusing it with the subtraction (the tile's fastmath) changes
nothing: the tile is `dequantize` bit for bit (the tests check it).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

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
    AVX512,
    F32x16,
    I32x16,
    half_at,
    is_carray,
    is_int,
    nib16,
    ptr_at,
    vadd,
    vfma,
    vhsum,
    viota,
    vlane,
    vload,
    vmul,
    vsplat,
    vstore,
    vsub,
    vtof,
    vty,
    vzero,
)

from ._blocks256 import (
    block_scales,
    iand,
    ior,
    ishl,
    ishr,
    k4_levels,
    k4_levels_reference,
    scale_min_k4,
    unpack_scale_min_k4,
)
from .base import DType, Thresholds, f16_from_bytes

BYTES = 176
_CHUNK = 16  # super-blocks per parallel quantizer task, so the scratch arrays are allocated once per task
_F32 = np.float32


# ---------------------------------------------------------------- numpy reference


def quantize_reference(x: np.ndarray) -> np.ndarray:
    """x: float32 (..., cols) with cols % 256 == 0 -> uint8 (n_blocks, 176) Q5_K blocks."""
    xs = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, 8, 32)  # (nb, 8 sub-blocks, 32)
    nb = xs.shape[0]
    with np.errstate(all="ignore"):  # values computed under a false mask are discarded
        head, L = k4_levels_reference(xs, 31, -0.5, 15)  # make_qkx2_quants(32, 31, .., -0.5f, 0.1f, 15, false)
    qh = np.zeros((nb, 32), dtype=np.uint8)
    for j in range(8):  # bit j of qh[i]: the fifth bit of weight i of sub-block j
        qh |= (L[:, j] >> 4) << j
    Lc = (L & 15).reshape(nb, 4, 2, 32)  # 64-weight chunks: low nibble = first 32, high = next 32
    qs = (Lc[:, :, 0, :] | (Lc[:, :, 1, :] << 4)).reshape(nb, 128)
    return np.concatenate([head, qh, qs], axis=1)


def dequantize_reference(raw: np.ndarray) -> np.ndarray:
    """raw: uint8 (n_blocks*176,) -> float32 (n_blocks*256,). x = (d*sc)*q - dmin*m per sub-block."""
    b = np.asarray(raw, dtype=np.uint8).reshape(-1, BYTES)
    d = f16_from_bytes(b[:, 0:2])  # (nb, 1)
    dmin = f16_from_bytes(b[:, 2:4])
    sc, m = unpack_scale_min_k4(b[:, 4:16])  # (nb, 8)
    qh = b[:, 16:48].astype(np.int32)  # (nb, 32)
    qs = b[:, 48:].astype(np.int32).reshape(-1, 4, 32)  # (nb, 4 chunks, 32)
    low = np.stack([qs & 15, qs >> 4], axis=2).reshape(-1, 8, 32)  # sub-block 2c = low, 2c+1 = high
    high = (qh[:, None, :] >> np.arange(8).reshape(1, 8, 1)) & 1  # (nb, 8, 32)
    q = (low | (high << 4)).astype(np.float32)
    with np.errstate(invalid="ignore"):
        d1 = (d * sc.astype(np.float32))[:, :, None]
        m1 = (dmin * m.astype(np.float32))[:, :, None]
        return (d1 * q - m1).reshape(-1)


# ---------------------------------------------------------------- numba quantizer and dequantizer


@njit(**EXACT_JIT)
def _q5_k_block(x, base, out, o, L, laux, weights, scales, mins, sc, mq):
    """quantize_row_q5_K_ref for one super-block: x[base:base+256] -> out[o:o+176]."""
    k4_levels(x, base, out, o, 31, np.float32(-0.5), 15, L, laux, weights, scales, mins, sc, mq)
    for i in range(32):
        h = 0
        for j in range(8):  # bit j of qh[i]: the fifth bit of weight i of sub-block j
            h |= (np.int64(L[32 * j + i]) >> 4) << j
        out[o + 16 + i] = h
    for c in range(4):  # each 64-weight chunk: low nibbles = first 32, high nibbles = next 32
        for i in range(32):
            out[o + 48 + 32 * c + i] = (L[64 * c + i] & 15) | ((L[64 * c + 32 + i] & 15) << 4)


@njit(**EXACT_PJIT)
def quantize(x):
    """x: float32 (n_blocks*256,) -> uint8 (n_blocks*176,)."""
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
            _q5_k_block(x, b * 256, out, b * BYTES, L, laux, weights, scales, mins, sc, mq)
    return out


@njit(**EXACT_PJIT)
def dequantize(raw):
    """raw: uint8 (n_blocks*176,) -> float32 (n_blocks*256,)."""
    nb = raw.size // BYTES
    out = np.empty(nb * 256, dtype=np.float32)
    for b in prange(nb):
        o = b * BYTES
        d = f16_bits_to_f32(np.int64(raw[o]) | (np.int64(raw[o + 1]) << 8))
        dmin = f16_bits_to_f32(np.int64(raw[o + 2]) | (np.int64(raw[o + 3]) << 8))
        for j in range(8):
            sc, m = scale_min_k4(raw, o + 4, j)
            d1 = d * np.float32(sc)
            m1 = dmin * np.float32(m)
            qo = o + 48 + 32 * (j // 2)
            shift = 4 * (j % 2)
            base = b * 256 + 32 * j
            for i in range(32):
                q = ((np.int64(raw[qo + i]) >> shift) & 15) | (((np.int64(raw[o + 16 + i]) >> j) & 1) << 4)
                out[base + i] = d1 * np.float32(q) - m1
    return out


# ---------------------------------------------------------------- matmul decoders


@intrinsic
def vlut32(typingctx, lo, hi, idx):
    """(lo if idx & 16 == 0 else hi)[idx & 15] in each lane: one vpermi2ps on AVX-512 (which ignores
    the upper index bits), a select chain elsewhere (same values)."""
    if not (lo == F32x16 and hi == F32x16 and idx == I32x16):
        return None

    def codegen(context, builder, sig, args):
        t0, t1, i = args
        i32 = ir.IntType(32)
        if AVX512:
            fnty = ir.FunctionType(vty(ir.FloatType()), [t0.type, i.type, t1.type])
            fn = builder.module.declare_intrinsic("llvm.x86.avx512.vpermi2var.ps.512", fnty=fnty)
            return builder.call(fn, [t0, i, t1])
        i = builder.and_(i, ir.Constant(i.type, [31] * 16))
        out = ir.Constant(vty(ir.FloatType()), [0.0] * 16)
        for k in range(32):
            src = t0 if k < 16 else t1
            val = builder.extract_element(src, ir.Constant(i32, k % 16))
            splat = builder.insert_element(ir.Constant(vty(ir.FloatType()), ir.Undefined), val, ir.Constant(i32, 0))
            splat = builder.shuffle_vector(splat, splat, ir.Constant(vty(i32), [0] * 16))
            hit = builder.icmp_unsigned("==", i, ir.Constant(i.type, [k] * 16))
            out = builder.select(hit, splat, out)
        return out

    return F32x16(lo, hi, idx), codegen


@intrinsic
def index5(typingctx, w, qlo, qho, j):
    """The 5-bit codes of sub-block j for the 16 weights whose nibble bytes are at qlo and fifth-bit bytes
    (qh) at qho of a uint8 C array: bits 0-3 the nibble (low for even j, high for odd j), bit 4 bit j
    of qh, as int32 lanes whose bits above 4 are junk (vlut32 ignores them). Built on the 16 bytes
    (xmm), where 16-bit shifts place every byte's bit 4 right, then widened: fewer full-width ops."""
    if not (is_carray(w, types.uint8) and is_int(qlo) and is_int(qho) and is_int(j)):
        return None

    def codegen(context, builder, sig, args):
        arrty, arr, ql_at, qh_at, jj = sig.args[0], args[0], args[1], args[2], args[3]
        i8, i16, i32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)
        b16, h8 = vty(i8, 16), vty(i16, 8)
        ql = builder.bitcast(builder.load(ptr_at(context, builder, arrty, arr, ql_at, b16), align=1), h8)
        qh = builder.bitcast(builder.load(ptr_at(context, builder, arrty, arr, qh_at, b16), align=1), h8)
        j16 = builder.trunc(jj, i16)

        def splat(v):
            x = builder.insert_element(ir.Constant(h8, ir.Undefined), v, ir.Constant(i32, 0))
            return builder.shuffle_vector(x, ir.Constant(h8, ir.Undefined), ir.Constant(vty(i32, 8), [0] * 8))

        odd = builder.icmp_unsigned("!=", builder.and_(j16, ir.Constant(i16, 1)), ir.Constant(i16, 0))
        nib = builder.select(odd, builder.lshr(ql, ir.Constant(h8, [4] * 8)), ql)  # byte bits 0-3: the nibble
        four = ir.Constant(i16, 4)
        left = builder.shl(qh, splat(builder.sub(four, j16)))  # j <= 4: bit j of each byte to bit 4
        right = builder.lshr(qh, splat(builder.sub(j16, four)))  # j > 4
        high = builder.select(builder.icmp_unsigned("<=", j16, four), left, right)
        m = ir.Constant(h8, [0x1010] * 8)
        idx = builder.or_(builder.and_(high, m), builder.and_(nib, ir.Constant(h8, [~0x1010 & 0xFFFF] * 8)))
        return builder.zext(builder.bitcast(idx, b16), vty(i32))

    return I32x16(w, qlo, qho, j), codegen


@njit(**MATVEC_JIT)
def _codes(wr, o, j, v, qh):
    """5-bit codes of weights 16v..16v+15 of sub-block j; qh = nib16(wr, o + 16 + 16v)."""
    ql = nib16(wr, o + 48 + 32 * (j // 2) + 16 * v)
    low = iand(ql, 15) if j % 2 == 0 else ishr(ql, 4)
    high = ishl(qh, 4 - j) if j < 4 else ishr(qh, j - 4)
    return ior(low, iand(high, 16))


@njit(inline="always", **TILE_JIT)  # numba inlines it: LLVM may leave a call in decode_tile's row loop
def tile_row(wr, k0, kc, buf, r):
    """buf[r, :kc] = the row's weights k0:k0+kc (wr: the row's uint8 bytes), exactly `dequantize`'s."""
    at = r * KC  # flat offset of buf row r
    for b in range(kc // 256):
        o = (k0 // 256 + b) * BYTES
        d = half_at(wr, o)
        dmin = half_at(wr, o + 2)
        qh0 = nib16(wr, o + 16)
        qh1 = nib16(wr, o + 32)
        for j in range(8):
            sc, m = scale_min_k4(wr, o + 4, j)
            d1 = vsplat(d * np.float32(sc))
            m1 = vsplat(dmin * np.float32(m))
            t = at + 256 * b + 32 * j
            vstore(buf, t, vsub(vmul(vtof(_codes(wr, o, j, 0, qh0)), d1), m1))
            vstore(buf, t + 16, vsub(vmul(vtof(_codes(wr, o, j, 1, qh1)), d1), m1))


@njit(inline="always", **MATVEC_JIT)
def _chunk(wr, o, c, dm, iota, iota16, xa, xb, xc, xd, a, b):
    """Chunk c (64 weights: sub-block 2c in the low nibbles of 32 bytes, 2c+1 in the high ones) of the
    super-block at o, whose scales dm = block_scales(wr, o). The 5-bit index of vlut32 takes the
    nibble's bits 0-3 and the fifth bit at bit 4 (bits above are ignored): one bit-select each."""
    j = 2 * c
    s0 = vlane(dm, j)
    m0 = vlane(dm, 8 + j)
    s1 = vlane(dm, j + 1)
    m1 = vlane(dm, 9 + j)
    ql = o + 48 + 32 * c
    a = vfma(vlut32(vfma(iota, s0, m0), vfma(iota16, s0, m0), index5(wr, ql, o + 16, j)), xa, a)
    b = vfma(vlut32(vfma(iota, s0, m0), vfma(iota16, s0, m0), index5(wr, ql + 16, o + 32, j)), xb, b)
    a = vfma(vlut32(vfma(iota, s1, m1), vfma(iota16, s1, m1), index5(wr, ql, o + 16, j + 1)), xc, a)
    b = vfma(vlut32(vfma(iota, s1, m1), vfma(iota16, s1, m1), index5(wr, ql + 16, o + 32, j + 1)), xd, b)
    return a, b


@njit(inline="always", **MATVEC_JIT)
def _chunk4(x, xo, w0, w1, w2, w3, o, c, dm0, dm1, dm2, dm3, iota, iota16, a0, b0, a1, b1, a2, b2, a3, b3):
    """Chunk c of the 4 rows, sharing the loads of x (inlined with a constant c: constant shifts)."""
    xa = vload(x, xo)
    xb = vload(x, xo + 16)
    xc = vload(x, xo + 32)
    xd = vload(x, xo + 48)
    a0, b0 = _chunk(w0, o, c, dm0, iota, iota16, xa, xb, xc, xd, a0, b0)
    a1, b1 = _chunk(w1, o, c, dm1, iota, iota16, xa, xb, xc, xd, a1, b1)
    a2, b2 = _chunk(w2, o, c, dm2, iota, iota16, xa, xb, xc, xd, a2, b2)
    a3, b3 = _chunk(w3, o, c, dm3, iota, iota16, xa, xb, xc, xd, a3, b3)
    return a0, b0, a1, b1, a2, b2, a3, b3


@njit(**MATVEC_JIT)
def matvec_group(x, w, r0, out):
    """out[r0:r0+4] = W[r0:r0+4] @ x, prefetching the next group's bytes at the same pace."""
    w0, w1, w2, w3 = group_rows(w, r0)
    iota = viota()
    iota16 = vadd(iota, vsplat(np.float32(16.0)))
    a0 = b0 = a1 = b1 = a2 = b2 = a3 = b3 = vzero()
    ahead = (r0 + R) * w.shape[1]
    for blk in range(x.size // 256):
        o = BYTES * blk
        prefetch_lines(w, ahead + 4 * o, 4 * BYTES)
        dm0, dm1, dm2, dm3 = block_scales(w0, o), block_scales(w1, o), block_scales(w2, o), block_scales(w3, o)
        xo = 256 * blk
        a0, b0, a1, b1, a2, b2, a3, b3 = _chunk4(x, xo, w0, w1, w2, w3, o, 0, dm0, dm1, dm2, dm3, iota, iota16,
                                                 a0, b0, a1, b1, a2, b2, a3, b3)
        a0, b0, a1, b1, a2, b2, a3, b3 = _chunk4(x, xo + 64, w0, w1, w2, w3, o, 1, dm0, dm1, dm2, dm3, iota, iota16,
                                                 a0, b0, a1, b1, a2, b2, a3, b3)
        a0, b0, a1, b1, a2, b2, a3, b3 = _chunk4(x, xo + 128, w0, w1, w2, w3, o, 2, dm0, dm1, dm2, dm3, iota, iota16,
                                                 a0, b0, a1, b1, a2, b2, a3, b3)
        a0, b0, a1, b1, a2, b2, a3, b3 = _chunk4(x, xo + 192, w0, w1, w2, w3, o, 3, dm0, dm1, dm2, dm3, iota, iota16,
                                                 a0, b0, a1, b1, a2, b2, a3, b3)
    group_store(out, r0, vhsum(vadd(a0, b0)), vhsum(vadd(a1, b1)), vhsum(vadd(a2, b2)), vhsum(vadd(a3, b3)))


TYPE = DType(
    "q5_k", 13, 256, BYTES, scale_offsets=(0, 2),
    # provisional until calibrated on the trained fixture: 5.5 bits, between the 4-bit and 8-bit types' limits
    verify=Thresholds(kl_mean=0.02, top1=0.87, ppl_ratio=1.03),
    quantize=quantize, dequantize=dequantize,
    quantize_reference=quantize_reference, dequantize_reference=dequantize_reference,
)
