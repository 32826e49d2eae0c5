"""Pieces shared by the 256-weight K-quant types (not a type); their int32-lane operations (ishl, ishr, iand,
iors, isub, ior) are `kernels.simd8`'s. The packed
6-bit scales and mins of the 4- and 5-bit K types (ggml's get_scale_min_k4): `unpack_scale_min_k4`
(numpy), `scale_min_k4` (one sub-block, numba) and `block_scales` (all 16 products in one vector).

The quantizer pieces the K types share, each a numpy reference and a numba twin, ggml's float32
arithmetic step for step: `nearest_int` (the 1.5*2^23 trick), `signed_absmax` (the signed
largest magnitude make_qx_quants, make_q3_quants and their callers start from), `make_qkx2_quants` (ggml's min/scale
search with its per-caller nmax, rmin, rdelta, nstep, use_mad: q2_k, q4_k, q5_k) and `k4_levels`
(quantize_row_q{4,5}_K_ref up to the packing of the codes: the 6-bit scales and mins, d, dmin and
the requantized levels). numba's on-disk cache is keyed on each kernel's own source file: after
editing this file, delete the type modules' and `kernels/dispatch`'s caches (*.nbi, *.nbc).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from mertools.kernels.common import EXACT_JIT, TILE_JIT, f16_bits_to_f32, f32_to_f16_bits
from mertools.kernels.simd import LANES, F32x16, I32x16, f32_bits, is_carray, is_int, ptr_at, vty

from .base import f16_bytes

_F32 = np.float32


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


def _scale_min_lanes(context, builder, arrty, arr, off):
    """The int32 lanes [sc_0 .. sc_7, m_0 .. m_7] of the super-block at byte `off` (reads the 16 bytes at off + 4)."""
    i32v = vty(_IR_I32)

    def const(vals):
        return ir.Constant(i32v, vals)

    at4 = builder.add(off, ir.Constant(off.type, 4))
    s = builder.zext(builder.load(ptr_at(context, builder, arrty, arr, at4, vty(ir.IntType(8))), align=1), i32v)
    p = builder.shuffle_vector(s, s, const(_P))
    q = builder.shuffle_vector(s, s, const(_Q))
    lane = builder.and_(builder.lshr(p, const(_SH)), const(_M1))
    return builder.or_(lane, builder.and_(builder.lshr(q, const([2] * LANES)), const(_M2)))


@intrinsic
def scale_min_lanes(typingctx, w, o):
    """[sc_0 .. sc_7, m_0 .. m_7] of the super-block at byte o of a uint8 C array, as int32 lanes (the 8-bit
    kernels multiply them in integers). Reads the 16 bytes at o + 4, as `block_scales`."""
    if not (is_carray(w, types.uint8) and is_int(o)):
        return None

    def codegen(context, builder, sig, args):
        return _scale_min_lanes(context, builder, sig.args[0], args[0], args[1])

    return I32x16(w, o), codegen


@intrinsic
def block_scales(typingctx, w, o):
    """[d*sc_0 .. d*sc_7, -dmin*m_0 .. -dmin*m_7] of the super-block at byte o of a uint8 C
    array, each product rounded once as the reference rounds it (the minus is exact). Reads the 16
    bytes at o + 4 (the scales and 4 bytes of quants, which always follow)."""
    if not (is_carray(w, types.uint8) and is_int(o)):
        return None

    def codegen(context, builder, sig, args):
        arrty, arr, off = sig.args[0], args[0], args[1]
        lane = _scale_min_lanes(context, builder, arrty, arr, off)
        two = builder.load(ptr_at(context, builder, arrty, arr, off, vty(ir.HalfType(), 2)), align=1)  # d, dmin
        idx = ir.Constant(vty(_IR_I32), [0] * 8 + [1] * 8)
        scale = builder.fpext(builder.shuffle_vector(two, two, idx), vty(_IR_F32))
        sign = ir.Constant(vty(_IR_F32), [1.0] * 8 + [-1.0] * 8)
        return builder.fmul(builder.sitofp(lane, vty(_IR_F32)), builder.fmul(scale, sign))

    return F32x16(w, o), codegen


# ---------------------------------------------------------------- quantizer pieces: numpy references
# Vectorised across (sub-)blocks, but every sum runs SEQUENTIALLY over the elements in float32, in the
# C loop's order (numpy's pairwise .sum() would round differently and change choices). Masks stand in
# for the C control flow; values computed under a false mask are discarded (callers silence warnings).


def nearest_int_reference(fval: np.ndarray) -> np.ndarray:
    """ggml nearest_int as the bit trick: float32 (...) -> int64 (...), exact even out of range."""
    val = (np.asarray(fval, dtype=np.float32) + _F32(12582912.0)).astype(np.float32)
    return (val.view(np.int32).astype(np.int64) & 0x7FFFFF) - 0x400000


def signed_absmax_reference(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of v float32 (S, n): (max |v|, the first element reaching it, with its sign), float32 (S,)
    each (`if (ax > amax) { amax = ax; max = x[i]; }` from 0, so NaN never wins)."""
    amax = np.zeros(v.shape[0], dtype=np.float32)
    mx = np.zeros(v.shape[0], dtype=np.float32)
    for i in range(v.shape[1]):
        take = np.abs(v[:, i]) > amax
        amax = np.where(take, np.abs(v[:, i]), amax)
        mx = np.where(take, v[:, i], mx)
    return amax, mx


def _qkx2_error(scale, lf, mn, x, w, use_mad: bool) -> np.ndarray:
    """sum_i w_i * |scale*l_i + min - x_i| (use_mad) or its square, summed in order: -> float32 (S,)."""
    err = np.zeros(x.shape[0], dtype=np.float32)
    for i in range(x.shape[1]):
        diff = scale * lf[:, i] + mn - x[:, i]
        err = err + w[:, i] * (np.abs(diff) if use_mad else diff * diff)
    return err


def make_qkx2_quants_reference(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
                               use_mad: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml make_qkx2_quants(n, nmax, x, w, L, &min, Laux, rmin, rdelta, nstep, use_mad) for S rows.

    x, w: float32 (S, n) -> (scale float32 (S,), the_min float32 (S,), L uint8 (S, n)).
    """
    n = x.shape[1]
    fmax = _F32(nmax)
    mn = x[:, 0].copy()
    mx = x[:, 0].copy()
    sum_w = w[:, 0].copy()
    sum_x = sum_w * x[:, 0]
    for i in range(1, n):
        xi = x[:, i]
        mn = np.where(xi < mn, xi, mn)
        mx = np.where(xi > mx, xi, mx)
        sum_w = sum_w + w[:, i]
        sum_x = sum_x + w[:, i] * xi
    mn = np.where(mn > 0, _F32(0.0), mn).astype(np.float32)
    flat = mx == mn  # C returns scale 0, L = 0 and -min right away

    def levels(iscale):
        return np.clip(nearest_int_reference(iscale[:, None] * (x - mn[:, None])), 0, nmax)

    iscale = fmax / (mx - mn)
    scale = _F32(1.0) / iscale
    L = levels(iscale)
    best = _qkx2_error(scale, L.astype(np.float32), mn, x, w, use_mad)
    for step in range(nstep + 1):
        iscale = (_F32(rmin) + _F32(rdelta) * _F32(step) + fmax) / (mx - mn)
        laux = levels(iscale)
        lf = laux.astype(np.float32)
        sum_l = np.zeros_like(sum_w)
        sum_l2 = np.zeros_like(sum_w)
        sum_xl = np.zeros_like(sum_w)
        for i in range(n):
            wl = w[:, i] * lf[:, i]
            sum_l = sum_l + wl
            sum_l2 = sum_l2 + wl * lf[:, i]  # w*l*l is (w*l)*l
            sum_xl = sum_xl + wl * x[:, i]
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        pos = this_min > 0
        this_min = np.where(pos, _F32(0.0), this_min).astype(np.float32)
        this_scale = np.where(pos, sum_xl / sum_l2, this_scale).astype(np.float32)
        cur = _qkx2_error(this_scale, lf, this_min, x, w, use_mad)
        take = (D > 0) & (cur < best) & ~flat
        L = np.where(take[:, None], laux, L)
        best = np.where(take, cur, best)
        scale = np.where(take, this_scale, scale)
        mn = np.where(take, this_min, mn)
    scale = np.where(flat, _F32(0.0), scale).astype(np.float32)
    L = np.where(flat[:, None], 0, L).astype(np.uint8)
    return scale, (-mn).astype(np.float32), L


def k4_levels_reference(xs: np.ndarray, nmax: int, rmin: float, nstep: int) -> tuple[np.ndarray, np.ndarray]:
    """quantize_row_q{4,5}_K_ref up to the packing of the codes (nmax 15 or 31, and its rmin, nstep).

    xs: float32 (nb, 8, 32) -> (head uint8 (nb, 16): d, dmin (f16) and the 12 packed scale/min bytes;
    L uint8 (nb, 8, 32): the levels 0..nmax).
    """
    nb = xs.shape[0]
    sub = xs.reshape(-1, 32)  # (S = nb*8, 32)
    sum_x2 = np.zeros(sub.shape[0], dtype=np.float32)
    for i in range(32):
        sum_x2 = sum_x2 + sub[:, i] * sub[:, i]
    av_x = np.sqrt(sum_x2 / _F32(32.0))
    w = av_x[:, None] + np.abs(sub)  # (S, 32)
    scales, mins, L = make_qkx2_quants_reference(sub, w, nmax, rmin, 0.1, nstep, False)
    scales = scales.reshape(nb, 8)
    mins = mins.reshape(nb, 8)
    L = L.reshape(nb, 8, 32)

    max_scale = np.zeros(nb, dtype=np.float32)
    max_min = np.zeros(nb, dtype=np.float32)
    for j in range(8):  # `if (scale > max_scale)`, in sub-block order
        max_scale = np.where(scales[:, j] > max_scale, scales[:, j], max_scale)
        max_min = np.where(mins[:, j] > max_min, mins[:, j], max_min)
    inv_scale = np.where(max_scale > 0, _F32(63.0) / max_scale, _F32(0.0)).astype(np.float32)
    inv_min = np.where(max_min > 0, _F32(63.0) / max_min, _F32(0.0)).astype(np.float32)
    # uint8_t ls = nearest_int(...): truncation to a byte comes before MIN(63, ls)
    ls = np.minimum(nearest_int_reference(inv_scale[:, None] * scales) & 0xFF, 63)  # (nb, 8)
    lm = np.minimum(nearest_int_reference(inv_min[:, None] * mins) & 0xFF, 63)

    packed = np.zeros((nb, 12), dtype=np.int64)
    for j in range(8):
        if j < 4:
            packed[:, j] = ls[:, j]
            packed[:, j + 4] = lm[:, j]
        else:
            packed[:, j + 4] = (ls[:, j] & 0xF) | ((lm[:, j] & 0xF) << 4)
            packed[:, j - 4] |= (ls[:, j] >> 4) << 6
            packed[:, j] |= (lm[:, j] >> 4) << 6
    packed = packed.astype(np.uint8)
    d16 = f16_bytes(max_scale / _F32(63.0))  # (nb, 2)
    dmin16 = f16_bytes(max_min / _F32(63.0))

    sc, m = unpack_scale_min_k4(packed)
    d = d16.view("<f2").astype(np.float32) * sc.astype(np.float32)  # (nb, 8)
    dm = dmin16.view("<f2").astype(np.float32) * m.astype(np.float32)
    requant = np.clip(nearest_int_reference((xs + dm[:, :, None]) / d[:, :, None]), 0, nmax)
    # `if (!d) continue;` keeps make_qkx2_quants' L; a NaN d is truthy and requantizes
    L = np.where((d != 0)[:, :, None], requant, L).astype(np.uint8)
    return np.concatenate([d16, dmin16, packed], axis=1), L


# ---------------------------------------------------------------- quantizer pieces: numba


@njit(**EXACT_JIT)
def nearest_int(fval):
    """ggml's nearest_int: the 1.5*2^23 trick, kept as a bit trick so out-of-range inputs agree too."""
    val = fval + np.float32(12582912.0)
    return (np.int64(f32_bits(val)) & 0x7FFFFF) - 0x400000


@njit(**EXACT_JIT)
def signed_absmax(x, base, n):
    """(max |x[base:base+n]|, the first element reaching it, with its sign), as signed_absmax_reference."""
    amax = np.float32(0.0)
    mx = np.float32(0.0)
    for i in range(n):
        if abs(x[base + i]) > amax:
            amax = abs(x[base + i])
            mx = x[base + i]
    return amax, mx


@njit(**EXACT_JIT)
def make_qkx2_quants(x, base, n, weights, L, lbase, laux, nmax, rmin, rdelta, nstep, use_mad):
    """ggml make_qkx2_quants(n, nmax, x + base, weights, L + lbase, &min, laux, rmin, rdelta, nstep,
    use_mad): x float32, weights float32 (n,), L uint8 written at lbase, laux uint8 (n,) scratch.
    Returns (scale, the_min), both float32."""
    fmax = np.float32(nmax)
    r0 = np.float32(rmin)  # new names: rebinding a float64 argument would make numba compute in float64
    dr = np.float32(rdelta)
    mn = x[base]
    mx = x[base]
    sum_w = weights[0]
    sum_x = sum_w * x[base]
    for i in range(1, n):
        xi = x[base + i]
        if xi < mn:
            mn = xi
        if xi > mx:
            mx = xi
        w = weights[i]
        sum_w += w
        sum_x += w * xi
    if mn > np.float32(0.0):
        mn = np.float32(0.0)
    if mx == mn:
        for i in range(n):
            L[lbase + i] = 0
        return np.float32(0.0), -mn
    iscale = fmax / (mx - mn)
    scale = np.float32(1.0) / iscale
    best_error = np.float32(0.0)
    for i in range(n):
        li = min(max(nearest_int(iscale * (x[base + i] - mn)), 0), nmax)
        L[lbase + i] = li
        diff = scale * np.float32(li) + mn - x[base + i]
        best_error += weights[i] * (abs(diff) if use_mad else diff * diff)
    for step in range(nstep + 1):
        iscale = (r0 + dr * np.float32(step) + fmax) / (mx - mn)
        sum_l = np.float32(0.0)
        sum_l2 = np.float32(0.0)
        sum_xl = np.float32(0.0)
        for i in range(n):
            li = min(max(nearest_int(iscale * (x[base + i] - mn)), 0), nmax)
            laux[i] = li
            w = weights[i]
            lf = np.float32(li)
            sum_l += w * lf
            sum_l2 += w * lf * lf
            sum_xl += w * lf * x[base + i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > np.float32(0.0):
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > np.float32(0.0):
                this_min = np.float32(0.0)
                this_scale = sum_xl / sum_l2
            cur_error = np.float32(0.0)
            for i in range(n):
                diff = this_scale * np.float32(laux[i]) + this_min - x[base + i]
                cur_error += weights[i] * (abs(diff) if use_mad else diff * diff)
            if cur_error < best_error:
                for i in range(n):
                    L[lbase + i] = laux[i]
                best_error = cur_error
                scale = this_scale
                mn = this_min
    return scale, -mn


@njit(**EXACT_JIT)
def k4_levels(x, base, out, o, nmax, rmin, nstep, L, laux, weights, scales, mins, sc, mq):
    """quantize_row_q{4,5}_K_ref for one super-block up to the packing of the codes: d, dmin and the 12
    scale bytes to out[o:o+16], the levels 0..nmax of x[base:base+256] to L (uint8 (256,)). Scratch:
    laux uint8 (32,), weights float32 (32,), scales and mins float32 (8,), sc and mq int64 (8,)."""
    max_scale = np.float32(0.0)
    max_min = np.float32(0.0)
    for j in range(8):
        xb = base + 32 * j
        sum_x2 = np.float32(0.0)
        for i in range(32):
            sum_x2 += x[xb + i] * x[xb + i]
        av_x = np.sqrt(sum_x2 / np.float32(32.0))
        for i in range(32):
            weights[i] = av_x + abs(x[xb + i])
        s, m = make_qkx2_quants(x, xb, 32, weights, L, 32 * j, laux, nmax, rmin, np.float32(0.1), nstep, False)
        scales[j] = s
        mins[j] = m
        if s > max_scale:
            max_scale = s
        if m > max_min:
            max_min = m
    inv_scale = np.float32(63.0) / max_scale if max_scale > np.float32(0.0) else np.float32(0.0)
    inv_min = np.float32(63.0) / max_min if max_min > np.float32(0.0) else np.float32(0.0)
    for j in range(8):
        # uint8_t ls = nearest_int(...) truncates to a byte before MIN(63, ls)
        sc[j] = min(nearest_int(inv_scale * scales[j]) & 0xFF, 63)
        mq[j] = min(nearest_int(inv_min * mins[j]) & 0xFF, 63)
    for j in range(4):
        out[o + 4 + j] = sc[j] | ((sc[j + 4] >> 4) << 6)
        out[o + 8 + j] = mq[j] | ((mq[j + 4] >> 4) << 6)
        out[o + 12 + j] = (sc[j + 4] & 0xF) | ((mq[j + 4] & 0xF) << 4)
    hd = f32_to_f16_bits(max_scale / np.float32(63.0))
    hm = f32_to_f16_bits(max_min / np.float32(63.0))
    out[o] = hd & 0xFF
    out[o + 1] = hd >> 8
    out[o + 2] = hm & 0xFF
    out[o + 3] = hm >> 8
    d_all = f16_bits_to_f32(hd)
    dmin_all = f16_bits_to_f32(hm)
    for j in range(8):
        d = d_all * np.float32(sc[j])
        if d == np.float32(0.0):
            continue  # keeps the L chosen by make_qkx2_quants (NaN d does not skip, as in C)
        dm = dmin_all * np.float32(mq[j])
        for i in range(32):
            L[32 * j + i] = min(max(nearest_int((x[base + 32 * j + i] + dm) / d), 0), nmax)


@njit(**EXACT_JIT)
def pack_2bit(L, out, at):
    """q2_k/q3_k's 2-bit code packing: 256 codes L (low 2 bits used) -> 64 bytes at out[at:], byte i of
    half h holding codes 128h + i, +32, +64, +96 in bits 0-1, 2-3, 4-5, 6-7."""
    for h in range(2):
        for i in range(32):
            t = 128 * h + i
            out[at + 32 * h + i] = L[t] | (L[t + 32] << 2) | (L[t + 64] << 4) | (L[t + 96] << 6)
