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
(d*sc)*q and then the difference, as the 4-bit K-quant's table (the same single-fma liberty). As
fast per byte as q4_k on AVX-512 (Zen 4, where FMAs and shuffles share ports) because the codes of a
sub-block's 32 weights are put together on 32 bytes (`codes32`) and the 6-bit scales on 16 before
widening, and the scales are read back from the stack as {1to16} operands (`spilled_scales`,
`table_args`), not broadcast by shuffles.

Prefill (tile): (d*sc)*q - dmin*m in vectors. d*sc has at most 17 significant bits and q 5, so the
product is exact in float32 and LLVM fusing it with the subtraction (the tile's fastmath) changes
nothing: the tile is `dequantize` bit for bit (the tests check it).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
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
    vload,
    vmul,
    vsplat,
    vstore,
    vsub,
    vtof,
    vty,
    vzero,
)
from mertools.kernels.simd8 import iand, ior, ishl, ishr

from ._blocks256 import (
    k4_levels,
    k4_levels_reference,
    scale_min_k4,
    unpack_scale_min_k4,
)
from ._k8 import q5_k_int8_reference
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

_F = ir.FloatType()
_I8, _I16, _I32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)
_FP = types.CPointer(types.float32)


def _splat(builder, v, n=16):
    x = builder.insert_element(ir.Constant(vty(v.type, n), ir.Undefined), v, ir.Constant(_I32, 0))
    return builder.shuffle_vector(x, ir.Constant(vty(v.type, n), ir.Undefined), ir.Constant(vty(_I32, n), [0] * n))


@intrinsic
def vlut32(typingctx, lo, hi, idx):
    """(lo if idx & 16 == 0 else hi)[idx & 15] in each lane: one vpermi2ps on AVX-512 (which ignores
    the upper index bits), a select chain elsewhere (same values)."""
    if not (lo == F32x16 and hi == F32x16 and idx == I32x16):
        return None

    def codegen(context, builder, sig, args):
        t0, t1, i = args
        if AVX512:
            fnty = ir.FunctionType(vty(_F), [t0.type, i.type, t1.type])
            fn = builder.module.declare_intrinsic("llvm.x86.avx512.vpermi2var.ps.512", fnty=fnty)
            return builder.call(fn, [t0, i, t1])
        i = builder.and_(i, ir.Constant(i.type, [31] * 16))
        out = ir.Constant(vty(_F), [0.0] * 16)
        for k in range(32):
            val = _splat(builder, builder.extract_element(t0 if k < 16 else t1, ir.Constant(_I32, k % 16)))
            out = builder.select(builder.icmp_unsigned("==", i, ir.Constant(i.type, [k] * 16)), val, out)
        return out

    return F32x16(lo, hi, idx), codegen


@intrinsic
def codes32(typingctx, w, qlo, qho, j):
    """The 5-bit codes of sub-block j's 32 weights, whose nibble bytes are at qlo (low nibbles for even
    j, high for odd j) and fifth-bit bytes (qh, bit j) at qho of a uint8 C array: two int32 vectors
    (weights 0-15, 16-31) whose bits above 4 are junk (vlut32 ignores them). Built on the 32 bytes,
    where 16-bit shifts put every byte's bit j on bit 4 and one ternlog merges it, then widened."""
    if not (is_carray(w, types.uint8) and is_int(qlo) and is_int(qho) and is_int(j)):
        return None
    rty = types.UniTuple(I32x16, 2)

    def codegen(context, builder, sig, args):
        arrty, arr, ql_at, qh_at, jj = sig.args[0], args[0], args[1], args[2], args[3]
        b32, h16, d8 = vty(_I8, 32), vty(_I16, 16), vty(_I32, 8)
        ql = builder.bitcast(builder.load(ptr_at(context, builder, arrty, arr, ql_at, b32), align=1), h16)
        qh = builder.bitcast(builder.load(ptr_at(context, builder, arrty, arr, qh_at, b32), align=1), h16)
        j16 = builder.trunc(jj, _I16)
        odd = builder.icmp_unsigned("!=", builder.and_(j16, ir.Constant(_I16, 1)), ir.Constant(_I16, 0))
        nib = builder.select(odd, builder.lshr(ql, ir.Constant(h16, [4] * 16)), ql)  # byte bits 0-3: the nibble
        four = ir.Constant(_I16, 4)
        left = builder.shl(qh, _splat(builder, builder.sub(four, j16)))  # j <= 4: bit j of each byte to bit 4
        right = builder.lshr(qh, _splat(builder, builder.sub(j16, four)))  # j > 4
        high = builder.select(builder.icmp_unsigned("<=", j16, four), left, right)
        m = ir.Constant(h16, [0x1010] * 16)
        if AVX512:  # one vpternlogd bit-select (LLVM makes two ops of it, knowing the nibble's top bits)
            fnty = ir.FunctionType(d8, [d8, d8, d8, _I32])
            fn = builder.module.declare_intrinsic("llvm.x86.avx512.pternlog.d.256", fnty=fnty)
            idx = builder.call(fn, [builder.bitcast(v, d8) for v in (nib, high, m)] + [ir.Constant(_I32, 0xD8)])
        else:
            idx = builder.or_(builder.and_(high, m), builder.and_(nib, ir.Constant(h16, [~0x1010 & 0xFFFF] * 16)))
        idx = builder.bitcast(idx, b32)
        halves = [builder.shuffle_vector(idx, idx, ir.Constant(vty(_I32, 16), list(range(h, h + 16)))) for h in (0, 16)]
        return context.make_tuple(builder, rty, [builder.zext(v, vty(_I32)) for v in halves])

    return rty(w, qlo, qho, j), codegen


# get_scale_min_k4 on the 16 bytes at o + 4 (12 of scales): lane l < 8 is sc_l, lane 8 + l is m_l, as
# ((s[_P] >> _SH) & _M1) | ((s[_Q] >> 2) & 0x30) in 16-bit lanes (_Q 16: a zero byte).
_P = [0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 8, 9, 10, 11]
_Q = [16] * 4 + [0, 1, 2, 3] + [16] * 4 + [4, 5, 6, 7]
_SH = [0] * 6 + [4] * 2
_M1 = [63 * 257] * 2 + [15 * 257] * 2 + [63 * 257] * 2 + [15 * 257] * 2


@intrinsic
def spilled_scales(typingctx, w, o):
    """[d*sc_0 .. d*sc_7, dmin*m_0 .. dmin*m_7] of the super-block at byte o of a uint8 C array (each
    product rounded once as the reference rounds it), unpacked on bytes and stored on the stack; two
    pointers to it that LLVM cannot see through (empty asm), so it keeps every read of a lane a load
    that its user takes as a {1to16} operand, instead of a shuffle (the port vpermi2ps needs)."""
    if not (is_carray(w, types.uint8) and is_int(o)):
        return None
    rty = types.UniTuple(_FP, 2)

    def codegen(context, builder, sig, args):
        arrty, arr, off = sig.args[0], args[0], args[1]
        b16, h8 = vty(_I8, 16), vty(_I16, 8)
        b = builder.load(ptr_at(context, builder, arrty, arr, builder.add(off, ir.Constant(off.type, 4)), b16), align=1)
        p = builder.bitcast(builder.shuffle_vector(b, b, ir.Constant(vty(_I32, 16), _P)), h8)
        q = builder.bitcast(builder.shuffle_vector(b, ir.Constant(b16, [0] * 16), ir.Constant(vty(_I32, 16), _Q)), h8)
        p = builder.and_(builder.lshr(p, ir.Constant(h8, _SH)), ir.Constant(h8, _M1))
        q = builder.and_(builder.lshr(q, ir.Constant(h8, [2] * 8)), ir.Constant(h8, [0x3030] * 8))
        lane = builder.uitofp(builder.zext(builder.bitcast(builder.or_(p, q), b16), vty(_I32)), vty(_F))
        two = builder.load(ptr_at(context, builder, arrty, arr, off, vty(ir.HalfType(), 2)), align=1)  # d, dmin
        scale = builder.fpext(builder.shuffle_vector(two, two, ir.Constant(vty(_I32), [0] * 8 + [1] * 8)), vty(_F))
        slot = cgutils.alloca_once(builder, vty(_F))
        builder.store(builder.fmul(lane, scale), slot, align=4)
        ptr = builder.bitcast(slot, _F.as_pointer())
        fnty = ir.FunctionType(ptr.type, [ptr.type])  # the second asm has side effects: LLVM keeps both
        pa, pb = (builder.asm(fnty, "", "=r,0", [ptr], side_effect=e) for e in (False, True))
        return context.make_tuple(builder, rty, [pa, pb])

    return rty(w, o), codegen


@intrinsic
def opaque(typingctx, v):
    """v, as a value LLVM does not know (AVX-512 only): a zero it cannot fold (`table_args`), or a copy
    an fma may overwrite (vfmadd213ps with a {1to16} addend) where LLVM would broadcast the addend."""
    if v != F32x16:
        return None

    def codegen(context, builder, sig, args):
        if not AVX512:
            return args[0]
        return builder.asm(ir.FunctionType(args[0].type, [args[0].type]), "", "=v,0", [args[0]], side_effect=False)

    return F32x16(v), codegen


@intrinsic
def table_args(typingctx, p, j, zero):
    """(d*sc_j, -dmin*m_j, -dmin*m_j) in every lane, from the scales spilled at p = (pa, pb): the first
    as zero | pa[j] (zero = opaque(vzero())), one vpord with a {1to16} operand on AVX-512 that any
    vector port runs (vbroadcastss takes the shuffle port); the others through pa and pb, each the
    {1to16} operand of one table's vfmsub."""
    if not (p == types.UniTuple(_FP, 2) and is_int(j) and zero == F32x16):
        return None
    rty = types.UniTuple(F32x16, 3)

    def codegen(context, builder, sig, args):
        pa, pb = cgutils.unpack_tuple(builder, args[0], 2)
        j, j8 = args[1], builder.add(args[1], ir.Constant(args[1].type, 8))
        s, ma, mb = (_splat(builder, builder.load(builder.gep(q, [i]), align=4)) for q, i in ((pa, j), (pa, j8), (pb, j8)))
        if AVX512:
            s = builder.bitcast(builder.or_(builder.bitcast(s, vty(_I32)), builder.bitcast(args[2], vty(_I32))), vty(_F))
        return context.make_tuple(builder, rty, [s, builder.fneg(ma), builder.fneg(mb)])

    return rty(p, j, zero), codegen


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
def _sub(p, j, k, ca, cb, xa, xb, a, b):
    """Sub-block j (codes ca, cb; scales at p; k = iota, iota + 16, opaque zero) times xa, xb into a, b."""
    iota, iota16, zero = k
    s, ma, mb = table_args(p, j, zero)
    lo = vfma(iota, opaque(s), ma)  # a copy of s, that this vfmsub overwrites, for the {1to16} operand
    hi = vfma(iota16, s, mb)
    return vfma(vlut32(lo, hi, ca), xa, a), vfma(vlut32(lo, hi, cb), xb, b)


@njit(inline="always", **MATVEC_JIT)
def _chunk(xs, wr, o, c, p, k, a, b):
    """Chunk c (64 weights: sub-block 2c in the low nibbles of 32 bytes, 2c+1 in the high ones)."""
    e0, e1 = codes32(wr, o + 48 + 32 * c, o + 16, 2 * c)
    d0, d1 = codes32(wr, o + 48 + 32 * c, o + 16, 2 * c + 1)
    a, b = _sub(p, 2 * c, k, e0, e1, xs[0], xs[1], a, b)
    return _sub(p, 2 * c + 1, k, d0, d1, xs[2], xs[3], a, b)


@njit(inline="always", **MATVEC_JIT)
def _chunk4(x, xo, w0, w1, w2, w3, o, c, p0, p1, p2, p3, k, acc):
    """Chunk c of the 4 rows, sharing the loads of x (inlined with a constant c: constant shifts)."""
    xs = vload(x, xo), vload(x, xo + 16), vload(x, xo + 32), vload(x, xo + 48)
    a0, b0, a1, b1, a2, b2, a3, b3 = acc
    a0, b0 = _chunk(xs, w0, o, c, p0, k, a0, b0)
    a1, b1 = _chunk(xs, w1, o, c, p1, k, a1, b1)
    a2, b2 = _chunk(xs, w2, o, c, p2, k, a2, b2)
    a3, b3 = _chunk(xs, w3, o, c, p3, k, a3, b3)
    return a0, b0, a1, b1, a2, b2, a3, b3


@njit(**MATVEC_JIT)
def matvec_group(x, w, r0, out):
    """out[r0:r0+4] = W[r0:r0+4] @ x, prefetching the next group's bytes at the same pace."""
    w0, w1, w2, w3 = group_rows(w, r0)
    iota = viota()
    k = iota, vadd(iota, vsplat(np.float32(16.0))), opaque(vzero())
    z = vzero()
    acc = z, z, z, z, z, z, z, z  # (a, b) per row: weights 0-15 and 16-31 of each sub-block
    ahead = (r0 + R) * w.shape[1]
    for blk in range(x.size // 256):
        o = BYTES * blk
        prefetch_lines(w, ahead + 4 * o, 4 * BYTES)
        p0, p1, p2, p3 = spilled_scales(w0, o), spilled_scales(w1, o), spilled_scales(w2, o), spilled_scales(w3, o)
        acc = _chunk4(x, 256 * blk, w0, w1, w2, w3, o, 0, p0, p1, p2, p3, k, acc)
        acc = _chunk4(x, 256 * blk + 64, w0, w1, w2, w3, o, 1, p0, p1, p2, p3, k, acc)
        acc = _chunk4(x, 256 * blk + 128, w0, w1, w2, w3, o, 2, p0, p1, p2, p3, k, acc)
        acc = _chunk4(x, 256 * blk + 192, w0, w1, w2, w3, o, 3, p0, p1, p2, p3, k, acc)
    a0, b0, a1, b1, a2, b2, a3, b3 = acc
    group_store(out, r0, vhsum(vadd(a0, b0)), vhsum(vadd(a1, b1)), vhsum(vadd(a2, b2)), vhsum(vadd(a3, b3)))


TYPE = DType(
    "q5_k", 13, 256, BYTES, scale_offsets=(0, 2),
    # calibrated on the trained fixture (benchmarks/bench_types.py; figures and rule in docs/BENCHMARKS.md)
    verify=Thresholds(kl_mean=0.02, top1=0.84, ppl_ratio=1.161),
    quantize=quantize, dequantize=dequantize,
    quantize_reference=quantize_reference, dequantize_reference=dequantize_reference,
    int8_reference=q5_k_int8_reference,
)
