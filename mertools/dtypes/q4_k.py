"""q4_k: super-blocks of 256 weights in 144 bytes, 8 sub-blocks of 32 with 6-bit scales and mins.

Super-block: d and dmin (f16, bytes 0-1 and 2-3); 12 bytes packing 8 six-bit scales sc_j and mins m_j
(ggml's get_scale_min_k4); 128 bytes of 4-bit quants, chunk c (32 bytes) holding sub-block 2c in its
low nibbles and 2c+1 in its high ones. x = (d*sc_j)*q - dmin*m_j. The quantizer is ggml's
quantize_row_q4_K_ref bit for bit (gguf-py has none); the dequantizer is bit-exact with ggml and gguf-py.

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
    f32_to_f16_bits,
    group_rows,
    group_store,
    prefetch_lines,
)
from mertools.kernels.simd import (
    decode_nibbles32,
    f32_bits,
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

from ._blocks256 import block_scales, scale_min_k4, unpack_scale_min_k4
from .base import DType, Thresholds, f16_from_bytes

BYTES = 144
_CHUNK = 16  # super-blocks per parallel quantizer task, so the scratch arrays are allocated once per task
_F32 = np.float32


# ---------------------------------------------------------------- numpy references
# The quantizer is vectorised across sub-blocks, but every sum runs SEQUENTIALLY over the 32 elements
# in float32, in the C loop's order (numpy's pairwise .sum() would round differently and change
# choices). Masks stand in for the C control flow (`if (D > 0)`, `if (!d) continue;`); the values
# computed under a false mask are discarded, so floating-point warnings there are silenced.


def nearest_int_reference(fval: np.ndarray) -> np.ndarray:
    """ggml nearest_int as the bit trick: float32 (...) -> int64 (...), exact even out of range."""
    val = (np.asarray(fval, dtype=np.float32) + _F32(12582912.0)).astype(np.float32)
    return (val.view(np.int32).astype(np.int64) & 0x7FFFFF) - 0x400000


def _quant_levels(iscale: np.ndarray, x: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """MAX(0, MIN(15, nearest_int(iscale*(x - min)))): (S,), (S, 32), (S,) -> int64 (S, 32)."""
    return np.clip(nearest_int_reference(iscale[:, None] * (x - mn[:, None])), 0, 15)


def _weighted_sq_error(scale: np.ndarray, lf: np.ndarray, mn: np.ndarray, x: np.ndarray,
                       w: np.ndarray) -> np.ndarray:
    """sum_i w_i*(scale*l_i + min - x_i)^2 summed in order: -> float32 (S,)."""
    err = np.zeros(x.shape[0], dtype=np.float32)
    for i in range(32):
        diff = scale * lf[:, i] + mn - x[:, i]
        err = err + w[:, i] * (diff * diff)
    return err


def _make_qkx2_quants_reference(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """make_qkx2_quants(32, 15, x, w, L, &min, Laux, -1.f, 0.1f, 20, false) for S sub-blocks.

    x, w: float32 (S, 32) -> (scale float32 (S,), the_min float32 (S,), L uint8 (S, 32)).
    """
    nmax = _F32(15.0)
    mn = x[:, 0].copy()
    mx = x[:, 0].copy()
    sum_w = w[:, 0].copy()
    sum_x = sum_w * x[:, 0]
    for i in range(1, 32):
        xi = x[:, i]
        mn = np.where(xi < mn, xi, mn)
        mx = np.where(xi > mx, xi, mx)
        sum_w = sum_w + w[:, i]
        sum_x = sum_x + w[:, i] * xi
    mn = np.where(mn > 0, _F32(0.0), mn).astype(np.float32)
    flat = mx == mn  # C returns scale 0, L = 0 and -min right away
    iscale = nmax / (mx - mn)
    scale = _F32(1.0) / iscale
    L = _quant_levels(iscale, x, mn)
    best = _weighted_sq_error(scale, L.astype(np.float32), mn, x, w)
    for step in range(21):
        iscale = (_F32(-1.0) + _F32(0.1) * _F32(step) + nmax) / (mx - mn)
        laux = _quant_levels(iscale, x, mn)
        lf = laux.astype(np.float32)
        sum_l = np.zeros_like(sum_w)
        sum_l2 = np.zeros_like(sum_w)
        sum_xl = np.zeros_like(sum_w)
        for i in range(32):
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
        cur = _weighted_sq_error(this_scale, lf, this_min, x, w)
        take = (D > 0) & (cur < best) & ~flat
        L = np.where(take[:, None], laux, L)
        best = np.where(take, cur, best)
        scale = np.where(take, this_scale, scale)
        mn = np.where(take, this_min, mn)
    scale = np.where(flat, _F32(0.0), scale).astype(np.float32)
    L = np.where(flat[:, None], 0, L).astype(np.uint8)
    return scale, (-mn).astype(np.float32), L


def quantize_reference(x: np.ndarray) -> np.ndarray:
    """x: float32 (..., cols) with cols % 256 == 0 -> uint8 (n_blocks, 144) Q4_K blocks."""
    xs = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, 8, 32)  # (nb, 8 sub-blocks, 32)
    nb = xs.shape[0]
    with np.errstate(all="ignore"):
        sub = xs.reshape(-1, 32)  # (S = nb*8, 32)
        sum_x2 = np.zeros(sub.shape[0], dtype=np.float32)
        for i in range(32):
            sum_x2 = sum_x2 + sub[:, i] * sub[:, i]
        av_x = np.sqrt(sum_x2 / _F32(32.0))
        w = av_x[:, None] + np.abs(sub)  # (S, 32)
        scales, mins, L = _make_qkx2_quants_reference(sub, w)
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
        d16 = (max_scale / _F32(63.0)).astype(np.float16)
        dmin16 = (max_min / _F32(63.0)).astype(np.float16)

        sc, m = unpack_scale_min_k4(packed)
        d = d16.astype(np.float32)[:, None] * sc.astype(np.float32)  # (nb, 8)
        dm = dmin16.astype(np.float32)[:, None] * m.astype(np.float32)
        requant = np.clip(nearest_int_reference((xs + dm[:, :, None]) / d[:, :, None]), 0, 15)
        # `if (!d) continue;` keeps make_qkx2_quants' L; a NaN d is truthy and requantizes
        L = np.where((d != 0)[:, :, None], requant, L).astype(np.uint8)

    Lc = L.reshape(nb, 4, 2, 32)  # 64-weight chunks: low nibble = first 32, high = next 32
    qs = (Lc[:, :, 0, :] | (Lc[:, :, 1, :] << 4)).reshape(nb, 128)
    head = np.stack([d16, dmin16], axis=1).astype("<f2").view(np.uint8).reshape(nb, 4)
    return np.concatenate([head, packed, qs], axis=1)


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
def nearest_int(fval):
    """ggml's nearest_int: the 1.5*2^23 trick, kept as a bit trick so out-of-range inputs agree too."""
    val = fval + np.float32(12582912.0)
    return (np.int64(f32_bits(val)) & 0x7FFFFF) - 0x400000


@njit(**EXACT_JIT)
def _make_qkx2_quants(x, base, weights, L, lbase, laux):
    """ggml make_qkx2_quants(32, 15, x, weights, L, &min, Laux, -1.f, 0.1f, 20, false).

    x: float32 (..., 32 from base); weights: float32 (32,); L: uint8 (256,) written at lbase;
    laux: uint8 (32,) scratch. Returns (scale, the_min), both float32.
    """
    nmax = np.float32(15.0)
    mn = x[base]
    mx = x[base]
    sum_w = weights[0]
    sum_x = sum_w * x[base]
    for i in range(1, 32):
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
        for i in range(32):
            L[lbase + i] = 0
        return np.float32(0.0), -mn
    iscale = nmax / (mx - mn)
    scale = np.float32(1.0) / iscale
    best_error = np.float32(0.0)
    for i in range(32):
        li = min(max(nearest_int(iscale * (x[base + i] - mn)), 0), 15)
        L[lbase + i] = li
        diff = scale * np.float32(li) + mn - x[base + i]
        best_error += weights[i] * (diff * diff)
    for step in range(21):
        iscale = (np.float32(-1.0) + np.float32(0.1) * np.float32(step) + nmax) / (mx - mn)
        sum_l = np.float32(0.0)
        sum_l2 = np.float32(0.0)
        sum_xl = np.float32(0.0)
        for i in range(32):
            li = min(max(nearest_int(iscale * (x[base + i] - mn)), 0), 15)
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
            for i in range(32):
                diff = this_scale * np.float32(laux[i]) + this_min - x[base + i]
                cur_error += weights[i] * (diff * diff)
            if cur_error < best_error:
                for i in range(32):
                    L[lbase + i] = laux[i]
                best_error = cur_error
                scale = this_scale
                mn = this_min
    return scale, -mn


@njit(**EXACT_JIT)
def _q4_k_block(x, base, out, o, L, laux, weights, scales, mins, sc, mq):
    """quantize_row_q4_K_ref for one super-block: x[base:base+256] -> out[o:o+144]."""
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
        s, m = _make_qkx2_quants(x, xb, weights, L, 32 * j, laux)
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
            L[32 * j + i] = min(max(nearest_int((x[base + 32 * j + i] + dm) / d), 0), 15)
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
    # 4 bits lose visibly (llama.cpp reports KL ~0.01-0.05 for Q4 types on real 7B models)
    verify=Thresholds(kl_mean=0.05, top1=0.85, ppl_ratio=1.05),
    quantize=quantize, dequantize=dequantize,
    quantize_reference=quantize_reference, dequantize_reference=dequantize_reference,
)
