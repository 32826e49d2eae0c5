"""Integer-lane pieces shared by the 256-weight K-quant types with 2-, 3-, 5- and 6-bit codes (not a type).

    ishl(v, n), ishr(v, n)   int32 lanes shifted left / right (logical) by n
    iand(v, m), iors(v, m)   lanes & m, lanes | m (m an int, broadcast)
    isub(v, k)               lanes - k
    ior(a, b)                a | b lane-wise

They complete `kernels.simd`'s `vshr4` / `vand15` for codes of 2, 3, 5 and 6 bits. Also the packed
6-bit scales and mins of the 4- and 5-bit K types (ggml's get_scale_min_k4): `unpack_scale_min_k4`
(numpy), `scale_min_k4` (one sub-block, numba) and `block_scales` (all 16 products in one vector). numba's on-disk
cache is keyed on each kernel's own source file: after editing this file, delete the type modules'
and `kernels/dispatch`'s caches (*.nbi, *.nbc).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from mertools.kernels.common import TILE_JIT
from mertools.kernels.simd import LANES, F32x16, I32x16, is_carray, is_int, ptr_at, vty


def _int_scalar_op(op: str):
    """Intrinsic (v: I32x16, n: int) -> I32x16, `op` of each lane with n (splat)."""

    @intrinsic
    def fn(typingctx, v, n):
        if not (v == I32x16 and isinstance(n, types.Integer)):
            return None

        def codegen(context, builder, sig, args):
            vec, k = args
            i32 = ir.IntType(32)
            k = builder.trunc(k, i32) if k.type.width > 32 else (builder.sext(k, i32) if k.type.width < 32 else k)
            t = vty(i32)
            s = builder.insert_element(ir.Constant(t, ir.Undefined), k, ir.Constant(i32, 0))
            s = builder.shuffle_vector(s, ir.Constant(t, ir.Undefined), ir.Constant(vty(i32), [0] * 16))
            return getattr(builder, op)(vec, s)

        return I32x16(v, n), codegen

    return fn


ishl = _int_scalar_op("shl")  # v << n
ishr = _int_scalar_op("lshr")  # v >> n (logical)
iand = _int_scalar_op("and_")  # v & m
isub = _int_scalar_op("sub")  # v - k
iors = _int_scalar_op("or_")  # v | m


@intrinsic
def ior(typingctx, a, b):
    """a | b lane-wise (int32 vectors)."""
    if not (a == I32x16 and b == I32x16):
        return None

    def codegen(context, builder, sig, args):
        return builder.or_(args[0], args[1])

    return I32x16(a, b), codegen


def unpack_scale_min_k4(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml get_scale_min_k4 for all 8 sub-blocks: scales uint8 (nb, 12) -> sc, m int32 (nb, 8)."""
    q = scales.astype(np.int32)
    sc = np.empty((q.shape[0], 8), dtype=np.int32)
    m = np.empty((q.shape[0], 8), dtype=np.int32)
    for j in range(8):
        if j < 4:
            sc[:, j] = q[:, j] & 63
            m[:, j] = q[:, j + 4] & 63
        else:
            sc[:, j] = (q[:, j + 4] & 0xF) | ((q[:, j - 4] >> 6) << 4)
            m[:, j] = (q[:, j + 4] >> 4) | ((q[:, j] >> 6) << 4)
    return sc, m


@njit(**TILE_JIT)
def scale_min_k4(wr, s, j):
    """ggml get_scale_min_k4: 6-bit (scale, min) of sub-block j from the 12 bytes at wr[s:]."""
    if j < 4:
        return np.int64(wr[s + j]) & 63, np.int64(wr[s + j + 4]) & 63
    sc = (np.int64(wr[s + j + 4]) & 0xF) | ((np.int64(wr[s + j - 4]) >> 6) << 4)
    m = (np.int64(wr[s + j + 4]) >> 4) | ((np.int64(wr[s + j]) >> 6) << 4)
    return sc, m


# The 12 bytes s[0..11] at offset 4 of a super-block pack 8 six-bit scales sc_j and mins m_j
# (ggml get_scale_min_k4). Lane l < 8 computes sc_l, lane 8 + l computes m_l, as
# ((s[P] >> SH) & M1) | ((s[Q] >> 2) & M2) (the M2 term adds the top two bits for j >= 4).
_P = [0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 8, 9, 10, 11]
_Q = [0, 0, 0, 0, 0, 1, 2, 3, 0, 0, 0, 0, 4, 5, 6, 7]
_SH = [0] * 12 + [4] * 4
_M1 = [63] * 4 + [15] * 4 + [63] * 4 + [15] * 4
_M2 = [0] * 4 + [0x30] * 4 + [0] * 4 + [0x30] * 4
_IR_I32 = ir.IntType(32)
_IR_F32 = ir.FloatType()


@intrinsic
def block_scales(typingctx, w, o):
    """[d*sc_0 .. d*sc_7, -dmin*m_0 .. -dmin*m_7] of the super-block at byte o of a uint8 C
    array, each product rounded once as the reference rounds it (the minus is exact). Reads the 16
    bytes at o + 4 (the scales and 4 bytes of quants, which always follow)."""
    if not (is_carray(w, types.uint8) and is_int(o)):
        return None

    def codegen(context, builder, sig, args):
        arrty, arr, off = sig.args[0], args[0], args[1]
        i32v = vty(_IR_I32)

        def const(vals):
            return ir.Constant(i32v, vals)

        at4 = builder.add(off, ir.Constant(off.type, 4))
        s = builder.zext(builder.load(ptr_at(context, builder, arrty, arr, at4, vty(ir.IntType(8))), align=1), i32v)
        p = builder.shuffle_vector(s, s, const(_P))
        q = builder.shuffle_vector(s, s, const(_Q))
        lane = builder.and_(builder.lshr(p, const(_SH)), const(_M1))
        lane = builder.or_(lane, builder.and_(builder.lshr(q, const([2] * LANES)), const(_M2)))
        two = builder.load(ptr_at(context, builder, arrty, arr, off, vty(ir.HalfType(), 2)), align=1)  # d, dmin
        scale = builder.fpext(builder.shuffle_vector(two, two, const([0] * 8 + [1] * 8)), vty(_IR_F32))
        sign = ir.Constant(vty(_IR_F32), [1.0] * 8 + [-1.0] * 8)
        return builder.fmul(builder.sitofp(lane, vty(_IR_F32)), builder.fmul(scale, sign))

    return F32x16(w, o), codegen
