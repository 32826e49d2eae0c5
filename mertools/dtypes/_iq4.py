"""The quantizer shared by iq4_nl and iq4_xs (not a type): ggml's quantize_row_iq4_nl_impl without an
importance matrix and with ntry = 7, what ggml_quantize_chunk writes for both types (quantize_iq4_nl,
quantize_iq4_xs; note that ggml's quantize_row_iq4_nl_ref passes ntry = -1 and differs).

Per 32-weight sub-block, with weights w_j = x_j^2 and K = kvalues_iq4nl:
    max = the signed x of largest |x| (first wins); |max| < 1e-15: scale 0
    d = -max / K[0]; fit the quants of x/d (best_index_int8: the nearest K, ties to the upper one
    unless strictly nearer the lower): d = sum(w q x) / sum(w q^2), best = d * sum(w q x)
    for itry in -7..7: the quants of x * (itry + K[0]) / max, kept if sumqx^2 > best * sumq2
iq4_nl (one sub-block): the f16 of that scale, then every weight requantized with 1/scale.
iq4_xs (8 sub-blocks): d = -max_scale / 32 (max_scale: the scale of largest magnitude, first wins),
    6-bit ls = clamp(nearest_int(scale / d), -32, 31) + 32, weights requantized with 1 / (d * (ls - 32))
    (the float32 d, not its f16).
Sums run sequentially in float32 in C's order (w*q*x is (w*q)*x). The numba kernel runs the 16 fits
of a sub-block (the first guess and the 15 tries) side by side, then picks in C's order: each fit is
independent and the pick sees the same sums, so the result is C's.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from mertools.kernels.common import EXACT_JIT, EXACT_PJIT
from mertools.kernels.simd import (
    AVX512,
    LANES,
    F32x16,
    f32_bits,
    is_carray,
    is_int,
    ptr_at,
    vadd,
    vload,
    vmul,
    vsplat,
    vstore,
    vty,
    vzero,
)

from ._blocks32 import put_f16
from .base import f16_bytes

KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)  # ggml kvalues_iq4nl
_KV = np.array(KVALUES, dtype=np.float32)
_EPS = np.float32(1e-15)  # GROUP_MAX_EPS
_NTRY = 7
_FITS = 2 * _NTRY + 2  # the first guess and the tries -7..7: 16, one vector's lanes
_TRY_NUM = np.array([0] + [t + KVALUES[0] for t in range(-_NTRY, _NTRY + 1)], dtype=np.float32)  # itry + K[0]
_CHUNK = 64  # 32-weight sub-blocks per parallel task, so scratch arrays are allocated once per task
_REF_ROWS = 4096  # sub-blocks per step of the numpy reference, bounding its (rows, 16, 32) temporaries
_F32 = np.float32
if _FITS != LANES:
    raise ValueError("_iq4: the fits must fill one 16-lane vector")


# ---------------------------------------------------------------- numpy reference


def nearest_int_reference(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int (the 1.5*2^23 bit trick, kept for out-of-range values): float32 -> int64."""
    val = (np.asarray(v, dtype=np.float32) + _F32(12582912.0)).astype(np.float32)
    return (val.view(np.int32).astype(np.int64) & 0x7FFFFF) - 0x400000


def best_index_reference(v: np.ndarray) -> np.ndarray:
    """best_index_int8(16, K, v) elementwise: float32 (...) -> int64 (...). Between K[0] and K[15]
    the binary search ends at mu = the number of entries <= v; NaN ends at 15."""
    mu = np.clip(np.searchsorted(_KV, v, side="right"), 1, 15)  # NaN sorts last: 16 -> 15
    lo, hi = _KV[mu - 1], _KV[mu]
    with np.errstate(invalid="ignore"):
        mid = np.where(v - lo < hi - v, mu - 1, mu)
    return np.where(v <= _KV[0], 0, np.where(v >= _KV[15], 15, mid))


def _scales_reference(xb: np.ndarray) -> np.ndarray:
    """float32 (S, 32) sub-blocks -> float32 (S,), each one's scale (0 below GROUP_MAX_EPS)."""
    ax = np.abs(xb)
    amax = ax.max(axis=1)
    mx = np.take_along_axis(xb, ax.argmax(axis=1)[:, None], axis=1)[:, 0]  # first of largest |x|
    small = amax < _EPS
    mx = np.where(small, _F32(1.0), mx).astype(np.float32)  # masked: C skips these sub-blocks
    inv = (_TRY_NUM[None, :] / mx[:, None]).astype(np.float32)  # (S, 16): the tries' 1/d
    inv[:, 0] = _F32(1.0) / (-mx / _F32(KVALUES[0]))  # the first guess d = -max / K[0]
    q = _KV[best_index_reference(inv[:, :, None] * xb[:, None, :])]  # (S, 16, 32)
    w = xb * xb
    sumqx = np.zeros(inv.shape, dtype=np.float32)
    sumq2 = np.zeros(inv.shape, dtype=np.float32)
    for j in range(32):  # sequential, as C sums
        wq = w[:, j, None] * q[:, :, j]
        sumqx = sumqx + wq * xb[:, j, None]
        sumq2 = sumq2 + wq * q[:, :, j]
    pos = sumq2 > 0
    d = np.where(pos[:, 0], sumqx[:, 0] / np.where(pos[:, 0], sumq2[:, 0], _F32(1.0)), _F32(0.0)).astype(np.float32)
    best = d * sumqx[:, 0]
    for t in range(1, _FITS):
        take = pos[:, t] & (sumqx[:, t] * sumqx[:, t] > best * sumq2[:, t])
        d = np.where(take, sumqx[:, t] / sumq2[:, t], d).astype(np.float32)
        best = np.where(take, d * sumqx[:, t], best).astype(np.float32)
    return np.where(small, _F32(0.0), d).astype(np.float32)


def scales_reference(xb: np.ndarray) -> np.ndarray:
    """float32 (S, 32) -> float32 (S,): the sub-blocks' scales, in steps that bound memory."""
    with np.errstate(all="ignore"):  # inf/NaN from x*x overflowing follow C; masked lanes are dropped
        parts = [_scales_reference(xb[i : i + _REF_ROWS]) for i in range(0, xb.shape[0], _REF_ROWS)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)


def _pack_nibbles(L: np.ndarray) -> np.ndarray:
    """int64 (nb, n) quants -> uint8 (nb, n/2): per 32 weights, byte j = L_j | L_(j+16) << 4."""
    Lb = L.reshape(L.shape[0], -1, 2, 16)
    return (Lb[:, :, 0, :] | (Lb[:, :, 1, :] << 4)).astype(np.uint8).reshape(L.shape[0], -1)


def quantize_nl_reference(x: np.ndarray) -> np.ndarray:
    """x: float32 (..., cols) with cols % 32 == 0 -> uint8 (n_blocks, 18) iq4_nl blocks."""
    xb = np.asarray(x, dtype=np.float32).reshape(-1, 32)
    d = scales_reference(xb)  # (nb,)
    with np.errstate(all="ignore"):
        inv = np.where(d != 0, _F32(1.0) / d, _F32(0.0)).astype(np.float32)  # a NaN d is truthy in C
        L = best_index_reference(inv[:, None] * xb)
    return np.concatenate([f16_bytes(d), _pack_nibbles(L)], axis=1)


def quantize_xs_reference(x: np.ndarray) -> np.ndarray:
    """x: float32 (..., cols) with cols % 256 == 0 -> uint8 (n_blocks, 136) iq4_xs super-blocks."""
    xs = np.asarray(x, dtype=np.float32).reshape(-1, 8, 32)
    nb = xs.shape[0]
    scales = scales_reference(xs.reshape(-1, 32)).reshape(nb, 8)
    max_scale = np.zeros(nb, dtype=np.float32)
    amax_scale = np.zeros(nb, dtype=np.float32)
    for ib in range(8):  # `if (fabsf(d) > amax_scale)`, in sub-block order (NaN never wins)
        take = np.abs(scales[:, ib]) > amax_scale
        amax_scale = np.where(take, np.abs(scales[:, ib]), amax_scale)
        max_scale = np.where(take, scales[:, ib], max_scale)
    with np.errstate(all="ignore"):
        d = (-max_scale / _F32(32.0)).astype(np.float32)
        inv = np.where(d != 0, _F32(1.0) / d, _F32(0.0)).astype(np.float32)
        ls = np.clip(nearest_int_reference(inv[:, None] * scales), -32, 31)  # (nb, 8)
        dl = d[:, None] * ls.astype(np.float32)
        idl = np.where(dl != 0, _F32(1.0) / dl, _F32(0.0)).astype(np.float32)
        L = best_index_reference(idl[:, :, None] * xs).reshape(nb, 256)
    ls = ls + 32
    sh = ((ls >> 4) << (2 * np.arange(8))).sum(axis=1)  # distinct bits: the sum is an or
    sl = (ls[:, 0::2] & 0xF) | ((ls[:, 1::2] & 0xF) << 4)  # (nb, 4)
    head = np.concatenate([f16_bytes(d), sh.astype("<u2").view(np.uint8).reshape(nb, 2), sl.astype(np.uint8)], axis=1)
    return np.concatenate([head, _pack_nibbles(L)], axis=1)


# ---------------------------------------------------------------- numba kernels


@njit(**EXACT_JIT)
def nearest_int(v):
    """ggml's nearest_int as the bit trick, so out-of-range (and NaN) inputs agree too."""
    val = v + np.float32(12582912.0)
    return (np.int64(f32_bits(val)) & 0x7FFFFF) - 0x400000


def _ir_call(builder, name: str, ret: ir.Type, args: list):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, args)


def _search(builder, val):
    """IR for best_index_int8(16, K, v) in 16 float lanes -> (index i32 lanes, K[index] float lanes).
    p = the last K[i] <= v with i <= 14 (0 when none), lo = K[p], hi = K[p+1]; the pick is p when
    v - lo < hi - v, else p+1. That is C's answer for every v: below K[0] it is 0 (v - lo <= 0), from
    K[15] on 15 (hi - v <= 0), and NaN, where C's search ends at 15, is caught apart."""
    f32v = vty(ir.FloatType())
    i32v = vty(ir.IntType(32))

    def kv(i):
        return ir.Constant(f32v, [float(KVALUES[i])] * LANES)

    def ints(n):
        return ir.Constant(i32v, [n] * LANES)

    if AVX512:  # a binary search, each step one vpermps
        table = ir.Constant(f32v, [float(v) for v in KVALUES])

        def lut(i):
            return _ir_call(builder, "llvm.x86.avx512.permvar.sf.512", f32v, [table, i])

        p = builder.select(builder.fcmp_ordered(">=", val, kv(8)), ints(8), ints(0))
        for step in (4, 2, 1):
            cand = builder.add(p, ints(step))
            p = builder.select(builder.fcmp_ordered(">=", val, lut(cand)), cand, p)
        p = builder.select(builder.icmp_signed(">", p, ints(14)), ints(14), p)
        lo, hi = lut(p), lut(builder.add(p, ints(1)))
    else:  # compare with every entry (the same p, lo, hi)
        p, lo = ints(0), kv(0)
        for i in range(1, 15):
            ge = builder.fcmp_ordered(">=", val, kv(i))
            p, lo = builder.select(ge, ints(i), p), builder.select(ge, kv(i), lo)
        hi = kv(15)
        for i in range(14, 0, -1):
            hi = builder.select(builder.fcmp_ordered("<", val, kv(i)), kv(i), hi)
    nearer_lo = builder.fcmp_ordered("<", builder.fsub(val, lo), builder.fsub(hi, val))
    nan = builder.fcmp_unordered("uno", val, val)
    idx = builder.select(nan, ints(15), builder.select(nearer_lo, p, builder.add(p, ints(1))))
    return idx, builder.select(nan, kv(15), builder.select(nearer_lo, lo, hi))


@intrinsic
def nearest16(typingctx, v):
    """K[best_index_int8(16, K, v)] in each lane (F32x16 -> F32x16)."""
    if v != F32x16:
        return None

    def codegen(context, builder, sig, args):
        return _search(builder, args[0])[1]

    return F32x16(v), codegen


@intrinsic
def nibbles32(typingctx, x, base, inv, out, o):
    """out[o:o+16] = best_index_int8 of inv * x[base+j] (low nibble) | of inv * x[base+16+j] (high
    nibble), j = 0..15: a 32-weight block's 4-bit codes. x: float32 C array, out: uint8 C array."""
    if not (is_carray(x, types.float32) and is_int(base) and inv == types.float32
            and is_carray(out, types.uint8) and is_int(o)):
        return None

    def codegen(context, builder, sig, args):
        xa, xb_, iv, oa, oo = args
        f32v = vty(ir.FloatType())
        scale = builder.shuffle_vector(
            builder.insert_element(ir.Constant(f32v, ir.Undefined), iv, ir.Constant(ir.IntType(32), 0)),
            ir.Constant(f32v, ir.Undefined), ir.Constant(vty(ir.IntType(32)), [0] * LANES))
        idx = []
        for h in range(2):
            at = builder.add(xb_, ir.Constant(xb_.type, 16 * h))
            v = builder.load(ptr_at(context, builder, sig.args[0], xa, at, f32v), align=4)
            idx.append(_search(builder, builder.fmul(scale, v))[0])
        b = builder.or_(idx[0], builder.shl(idx[1], ir.Constant(idx[1].type, [4] * LANES)))
        b8 = builder.trunc(b, vty(ir.IntType(8)))
        builder.store(b8, ptr_at(context, builder, sig.args[3], oa, oo, vty(ir.IntType(8))), align=1)
        return context.get_dummy_value()

    return types.none(x, base, inv, out, o), codegen


@njit(**EXACT_JIT)
def sub_scale(x, base, kv, tnum, inv, sqx, sq2):
    """The scale of the sub-block x[base:base+32] (0 below GROUP_MAX_EPS). inv, sqx, sq2: float32
    (16,) scratch for the fits' 1/d and sums."""
    amax = np.float32(0.0)
    mx = np.float32(0.0)
    for j in range(32):
        ax = abs(x[base + j])
        if ax > amax:
            amax = ax
            mx = x[base + j]
    if amax < _EPS:
        return np.float32(0.0)
    inv[0] = np.float32(1.0) / (-mx / kv[0])
    for t in range(1, _FITS):
        inv[t] = tnum[t] / mx
    vinv = vload(inv, 0)  # the 16 fits' 1/d, one per lane
    sx = vzero()
    s2 = vzero()
    for j in range(32):  # lane t: C's loop for fit t, the same operations in the same order
        xj = x[base + j]
        vx = vsplat(xj)
        q = nearest16(vmul(vinv, vx))
        wq = vmul(vsplat(xj * xj), q)
        sx = vadd(sx, vmul(wq, vx))
        s2 = vadd(s2, vmul(wq, q))
    vstore(sqx, 0, sx)
    vstore(sq2, 0, s2)
    d = sqx[0] / sq2[0] if sq2[0] > np.float32(0.0) else np.float32(0.0)
    best = d * sqx[0]
    for t in range(1, _FITS):
        if sq2[t] > np.float32(0.0) and sqx[t] * sqx[t] > best * sq2[t]:
            d = sqx[t] / sq2[t]
            best = d * sqx[t]
    return d


@njit(**EXACT_PJIT)
def quantize_nl(x):
    """x: float32 (n_blocks*32,) -> uint8 (n_blocks*18,) iq4_nl blocks."""
    nb = x.size // 32
    out = np.empty(nb * 18, dtype=np.uint8)
    kv = _KV
    tnum = _TRY_NUM
    for c in prange((nb + _CHUNK - 1) // _CHUNK):
        inv = np.empty(_FITS, dtype=np.float32)
        sqx = np.empty(_FITS, dtype=np.float32)
        sq2 = np.empty(_FITS, dtype=np.float32)
        for b in range(c * _CHUNK, min(nb, (c + 1) * _CHUNK)):
            d = sub_scale(x, 32 * b, kv, tnum, inv, sqx, sq2)
            put_f16(out, 18 * b, d)
            idl = np.float32(1.0) / d if d != np.float32(0.0) else np.float32(0.0)  # NaN d is truthy in C
            nibbles32(x, 32 * b, idl, out, 18 * b + 2)
    return out


@njit(**EXACT_PJIT)
def quantize_xs(x):
    """x: float32 (n_blocks*256,) -> uint8 (n_blocks*136,) iq4_xs super-blocks."""
    nb = x.size // 256
    out = np.empty(nb * 136, dtype=np.uint8)
    kv = _KV
    tnum = _TRY_NUM
    for c in prange((nb + _CHUNK // 8 - 1) // (_CHUNK // 8)):
        inv = np.empty(_FITS, dtype=np.float32)
        sqx = np.empty(_FITS, dtype=np.float32)
        sq2 = np.empty(_FITS, dtype=np.float32)
        scales = np.empty(8, dtype=np.float32)
        for b in range(c * (_CHUNK // 8), min(nb, (c + 1) * (_CHUNK // 8))):
            base = 256 * b
            o = 136 * b
            max_scale = np.float32(0.0)
            amax_scale = np.float32(0.0)
            for ib in range(8):
                s = sub_scale(x, base + 32 * ib, kv, tnum, inv, sqx, sq2)
                scales[ib] = s
                if abs(s) > amax_scale:
                    amax_scale = abs(s)
                    max_scale = s
            d = -max_scale / np.float32(32.0)
            put_f16(out, o, d)
            idd = np.float32(1.0) / d if d != np.float32(0.0) else np.float32(0.0)
            sh = 0
            for ib in range(8):
                ls = min(max(nearest_int(idd * scales[ib]), -32), 31)
                dl = d * np.float32(ls)
                idl = np.float32(1.0) / dl if dl != np.float32(0.0) else np.float32(0.0)
                nibbles32(x, base + 32 * ib, idl, out, o + 8 + 16 * ib)
                ls += 32
                if ib % 2 == 0:
                    out[o + 4 + ib // 2] = ls & 0xF
                else:
                    out[o + 4 + ib // 2] |= (ls & 0xF) << 4
                sh |= (ls >> 4) << (2 * ib)
            out[o + 2] = sh & 0xFF
            out[o + 3] = sh >> 8
    return out
