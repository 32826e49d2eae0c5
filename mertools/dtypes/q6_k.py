"""q6_k: super-blocks of 256 weights in 210 bytes, 16 groups of 16 with int8 scales, 6-bit quants.

Super-block: ql (128 bytes of low nibbles), qh (64 bytes of 2-bit high pairs), 16 int8 scales, then
d (f16) at byte 208, the END of the block. Half h (weights 128h..128h+127) uses ql[64h:64h+64] and
qh[32h:32h+32]: for l < 32, q = low | high << 4 with
    weight 128h + l:      low = ql[64h + l] & 15,       high = qh[32h + l] & 3
    weight 128h + l + 32: low = ql[64h + 32 + l] & 15,  high = (qh[32h + l] >> 2) & 3
    weight 128h + l + 64: low = ql[64h + l] >> 4,        high = (qh[32h + l] >> 4) & 3
    weight 128h + l + 96: low = ql[64h + 32 + l] >> 4,   high = qh[32h + l] >> 6
and x = (d * sc[k]) * (q - 32) for the 16-weight group k = weight // 16 (ggml's dequantize_row_q6_K
and gguf-py: the product d*sc rounded first). The quantizer is ggml's quantize_row_q6_K_ref bit for
bit (what llama-quantize writes without an importance matrix): per group make_qx_quants(16, 32, x, L,
rmse_type 1) (a signed scale, 18 trial scales around -32/max, weights x^2), int8 group scales
nearest_int(-128/max_scale * scale) capped at 127, d = f16(1/iscale), then every weight requantized
with the stored d*sc.

Decode (matvec): the 6-bit codes are assembled in 16-lane integer vectors, converted, and multiplied
by d*sc (one rounding, as the reference): the weights are exactly `dequantize`'s.
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
    half_at,
    half_splat,
    nib16,
    sbyte16,
    vadd,
    vfma,
    vhsum,
    vlane,
    vload,
    vmul,
    vsplat,
    vstore,
    vtof,
    vzero,
)
from mertools.kernels.simd8 import iand, ior, ishl, ishr, isub

from ._blocks256 import nearest_int, nearest_int_reference, signed_absmax, signed_absmax_reference
from ._k8 import q6_k_int8_reference
from .base import DType, Thresholds, f16_bytes, f16_from_bytes

BYTES = 210
_CHUNK = 16  # super-blocks per parallel quantizer task, so the scratch arrays are allocated once per task
_F32 = np.float32
_EPS = _F32(1e-15)  # ggml's GROUP_MAX_EPS: a group (block) whose max |x| (|scale|) is below it is all zero


# ---------------------------------------------------------------- numpy reference


def _codes(b: np.ndarray) -> np.ndarray:
    """uint8 (nb, 210) -> int32 (nb, 256) codes q - 32 in weight order."""
    ql = b[:, :128].astype(np.int32).reshape(-1, 2, 2, 32)  # (nb, half, 32-byte part, l)
    qh = b[:, 128:192].astype(np.int32).reshape(-1, 2, 1, 32)  # (nb, half, 1, l)
    low = np.stack([ql[:, :, 0] & 15, ql[:, :, 1] & 15, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], axis=2)  # (nb, 2, 4, 32)
    high = (qh >> np.array([0, 2, 4, 6]).reshape(1, 1, 4, 1)) & 3  # (nb, 2, 4, 32)
    return ((low | (high << 4)) - 32).reshape(-1, 256)


def _make_qx_quants_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants(16, 32, x, L, 1, NULL) for S groups: x float32 (S, 16) -> (scale float32 (S,),
    L int64 (S, 16) in 0..63). Sums sequential in float32: w*x*l is (w*x)*l, w*l*l is (w*l)*l."""
    amax, mx = signed_absmax_reference(x)
    w = x * x
    wx = w * x

    def trial(iscale):
        lv = np.clip(nearest_int_reference(iscale[:, None] * x), -32, 31)
        lf = lv.astype(np.float32)
        sumlx = np.zeros_like(amax)
        suml2 = np.zeros_like(amax)
        for i in range(16):
            sumlx = sumlx + wx[:, i] * lf[:, i]
            suml2 = suml2 + (w[:, i] * lf[:, i]) * lf[:, i]
        return lv, sumlx, suml2

    lv, sumlx, suml2 = trial(_F32(-32.0) / mx)
    L = lv + 32
    scale = np.where(suml2 != 0, sumlx / suml2, _F32(0.0)).astype(np.float32)  # `suml2 ?`: NaN is true
    best = scale * sumlx
    for k in range(-9, 10):
        if k == 0:
            continue
        lv, sumlx, suml2 = trial(-(_F32(32.0) + _F32(0.1) * _F32(k)) / mx)
        take = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = np.where(take[:, None], lv + 32, L)
        scale = np.where(take, sumlx / suml2, scale).astype(np.float32)
        best = np.where(take, scale * sumlx, best).astype(np.float32)
    zero = amax < _EPS
    return np.where(zero, _F32(0.0), scale).astype(np.float32), np.where(zero[:, None], 0, L)


def quantize_reference(x: np.ndarray) -> np.ndarray:
    """x: float32 (..., cols) with cols % 256 == 0 -> uint8 (n_blocks, 210) Q6_K blocks."""
    xs = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, 16, 16)  # (nb, 16 groups, 16)
    nb = xs.shape[0]
    with np.errstate(all="ignore"):  # values computed under a false mask are discarded
        scales, L = _make_qx_quants_reference(xs.reshape(-1, 16))
        scales = scales.reshape(nb, 16)
        L = L.reshape(nb, 16, 16)
        max_abs, max_scale = signed_absmax_reference(scales)
        iscale = _F32(-128.0) / max_scale
        d16 = f16_bytes(_F32(1.0) / iscale)  # (nb, 2)
        # int8_t scales[j] = MIN(127, nearest_int(...)): the int is truncated to a byte
        sc = (np.minimum(127, nearest_int_reference(iscale[:, None] * scales)) & 0xFF).astype(np.uint8)  # (nb, 16)
        d = d16.view("<f2").astype(np.float32) * sc.view(np.int8).astype(np.float32)  # (nb, 16)
        requant = np.clip(nearest_int_reference(xs / d[:, :, None]), -32, 31) + 32
        L = np.where((d != 0)[:, :, None], requant, L).reshape(nb, 2, 4, 32)  # (block, half, part, l)
    ql = np.concatenate([(L[:, :, 0] & 15) | ((L[:, :, 2] & 15) << 4), (L[:, :, 1] & 15) | ((L[:, :, 3] & 15) << 4)],
                        axis=2).reshape(nb, 128)  # per half: 32 bytes of parts 0|2, then 32 of parts 1|3
    qh = ((L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4) | ((L[:, :, 3] >> 4) << 6)).reshape(nb, 64)
    out = np.concatenate([ql, qh, sc, d16], axis=1).astype(np.uint8)
    out[max_abs < _EPS] = 0  # memset(&y[i], 0, ...) with d = 0
    return out


def dequantize_reference(raw: np.ndarray) -> np.ndarray:
    """raw: uint8 (n_blocks*210,) -> float32 (n_blocks*256,). x = (d*sc)*(q - 32) per 16 weights."""
    b = np.asarray(raw, dtype=np.uint8).reshape(-1, BYTES)
    d = f16_from_bytes(b[:, 208:210])  # (nb, 1)
    sc = b[:, 192:208].view(np.int8).astype(np.float32)  # (nb, 16)
    q = _codes(b).astype(np.float32).reshape(-1, 16, 16)
    with np.errstate(invalid="ignore"):  # inf * 0 = NaN, as in C
        return ((d * sc)[:, :, None] * q).reshape(-1)


# ---------------------------------------------------------------- numba quantizer and dequantizer


@njit(**EXACT_JIT)
def _make_qx_quants(x, base, L, lbase, w, wx):
    """make_qx_quants(16, 32, x + base, L + lbase, 1, NULL) -> scale (float32); L uint8 (0..63);
    w, wx float32 (16,) scratch for x*x and (x*x)*x."""
    amax, mx = signed_absmax(x, base, 16)
    if amax < _EPS:
        for i in range(16):
            L[lbase + i] = 0
        return np.float32(0.0)
    for i in range(16):
        w[i] = x[base + i] * x[base + i]
        wx[i] = w[i] * x[base + i]
    iscale = np.float32(-32.0) / mx
    sumlx = np.float32(0.0)
    suml2 = np.float32(0.0)
    for i in range(16):
        li = min(max(nearest_int(iscale * x[base + i]), -32), 31)
        L[lbase + i] = li + 32
        lf = np.float32(li)
        sumlx += wx[i] * lf
        suml2 += w[i] * lf * lf
    scale = sumlx / suml2 if suml2 != np.float32(0.0) else np.float32(0.0)
    best = scale * sumlx
    for k in range(-9, 10):
        if k == 0:
            continue
        iscale = -(np.float32(32.0) + np.float32(0.1) * np.float32(k)) / mx
        sumlx = np.float32(0.0)
        suml2 = np.float32(0.0)
        for i in range(16):
            lf = np.float32(min(max(nearest_int(iscale * x[base + i]), -32), 31))
            sumlx += wx[i] * lf
            suml2 += w[i] * lf * lf
        if suml2 > np.float32(0.0) and sumlx * sumlx > best * suml2:
            for i in range(16):
                L[lbase + i] = min(max(nearest_int(iscale * x[base + i]), -32), 31) + 32
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@njit(**EXACT_JIT)
def _q6_k_block(x, base, out, o, L, scales, w, wx):
    """quantize_row_q6_K_ref for one super-block: x[base:base+256] -> out[o:o+210]."""
    max_abs = np.float32(0.0)
    max_scale = np.float32(0.0)
    for j in range(16):
        s = _make_qx_quants(x, base + 16 * j, L, 16 * j, w, wx)
        scales[j] = s
        if abs(s) > max_abs:
            max_abs = abs(s)
            max_scale = s
    if max_abs < _EPS:
        for k in range(BYTES):
            out[o + k] = 0
        return
    iscale = np.float32(-128.0) / max_scale
    hd = f32_to_f16_bits(np.float32(1.0) / iscale)
    out[o + 208] = hd & 0xFF
    out[o + 209] = hd >> 8
    d_all = f16_bits_to_f32(hd)
    for j in range(16):
        q = min(127, nearest_int(iscale * scales[j])) & 0xFF  # int8_t: the int truncated to a byte
        out[o + 192 + j] = q
        d = d_all * np.float32(q - 256 if q >= 128 else q)
        if d == np.float32(0.0):
            continue  # keeps make_qx_quants' L (a NaN d requantizes, as in C)
        for i in range(16):
            L[16 * j + i] = min(max(nearest_int(x[base + 16 * j + i] / d), -32), 31) + 32
    for h in range(2):
        for i in range(32):
            a0 = np.int64(L[128 * h + i])
            a1 = np.int64(L[128 * h + 32 + i])
            a2 = np.int64(L[128 * h + 64 + i])
            a3 = np.int64(L[128 * h + 96 + i])
            out[o + 64 * h + i] = (a0 & 15) | ((a2 & 15) << 4)
            out[o + 64 * h + 32 + i] = (a1 & 15) | ((a3 & 15) << 4)
            out[o + 128 + 32 * h + i] = (a0 >> 4) | ((a1 >> 4) << 2) | ((a2 >> 4) << 4) | ((a3 >> 4) << 6)


@njit(**EXACT_PJIT)
def quantize(x):
    """x: float32 (n_blocks*256,) -> uint8 (n_blocks*210,)."""
    nb = x.size // 256
    out = np.empty(nb * BYTES, dtype=np.uint8)
    n_tasks = (nb + _CHUNK - 1) // _CHUNK
    for t in prange(n_tasks):
        L = np.empty(256, dtype=np.uint8)
        scales = np.empty(16, dtype=np.float32)
        w = np.empty(16, dtype=np.float32)
        wx = np.empty(16, dtype=np.float32)
        for b in range(t * _CHUNK, min(nb, (t + 1) * _CHUNK)):
            _q6_k_block(x, b * 256, out, b * BYTES, L, scales, w, wx)
    return out


@njit(**EXACT_PJIT)
def dequantize(raw):
    """raw: uint8 (n_blocks*210,) -> float32 (n_blocks*256,)."""
    nb = raw.size // BYTES
    out = np.empty(nb * 256, dtype=np.float32)
    for b in prange(nb):
        o = b * BYTES
        d = f16_bits_to_f32(np.int64(raw[o + 208]) | (np.int64(raw[o + 209]) << 8))
        for h in range(2):
            for p in range(4):  # 32-weight part p of the half: low nibble of ql part p & 1, qh bits 2p
                qlo = o + 64 * h + 32 * (p & 1)
                shift = 4 * (p >> 1)
                base = b * 256 + 128 * h + 32 * p
                for i in range(32):
                    s = np.int64(raw[o + 192 + 8 * h + 2 * p + i // 16])
                    dl = d * np.float32(s - 256 if s >= 128 else s)
                    q = ((np.int64(raw[qlo + i]) >> shift) & 15) | (((np.int64(raw[o + 128 + 32 * h + i]) >> (2 * p)) & 3) << 4)
                    out[base + i] = dl * np.float32(q - 32)
    return out


# ---------------------------------------------------------------- matmul decoders


@njit(**MATVEC_JIT)
def _quad(wr, o, h, v):
    """The codes q - 32 of the four 16-weight groups at weights 128h + 16v + 32p (p = 0..3)."""
    qa = nib16(wr, o + 64 * h + 16 * v)
    qb = nib16(wr, o + 64 * h + 32 + 16 * v)
    qh = nib16(wr, o + 128 + 32 * h + 16 * v)
    q0 = ior(iand(qa, 15), iand(ishl(qh, 4), 0x30))
    q1 = ior(iand(qb, 15), iand(ishl(qh, 2), 0x30))
    q2 = ior(ishr(qa, 4), iand(qh, 0x30))
    q3 = ior(ishr(qb, 4), iand(ishr(qh, 2), 0x30))
    return isub(q0, 32), isub(q1, 32), isub(q2, 32), isub(q3, 32)


@njit(**MATVEC_JIT)
def block_scales(wr, o):
    """[d*sc_0 .. d*sc_15] of the super-block at byte o, each rounded once as the reference."""
    return vmul(vtof(sbyte16(wr, o + 192)), half_splat(wr, o + 208))


@njit(inline="always", **TILE_JIT)
def _put(buf, t, q, d, s):
    """buf[t:t+16] = (d * int8(s)) * q, the product d*sc rounded first as in the reference."""
    sc = np.int64(s)
    dl = d * np.float32(sc - 256 if sc >= 128 else sc)
    vstore(buf, t, vmul(vtof(q), vsplat(dl)))


@njit(inline="always", **TILE_JIT)  # numba inlines it: LLVM may leave a call in decode_tile's row loop
def tile_row(wr, k0, kc, buf, r):
    """buf[r, :kc] = the row's weights k0:k0+kc (wr: the row's uint8 bytes), exactly `dequantize`'s."""
    at = r * KC  # flat offset of buf row r
    for b in range(kc // 256):
        o = (k0 // 256 + b) * BYTES
        d = half_at(wr, o + 208)
        for h in range(2):
            for v in range(2):
                q0, q1, q2, q3 = _quad(wr, o, h, v)
                k = o + 192 + 8 * h + v  # the scale of group 8h + v (+ 2p)
                t = at + 256 * b + 128 * h + 16 * v  # (+ 32p)
                _put(buf, t, q0, d, wr[k])
                _put(buf, t + 32, q1, d, wr[k + 2])
                _put(buf, t + 64, q2, d, wr[k + 4])
                _put(buf, t + 96, q3, d, wr[k + 6])


@njit(**MATVEC_JIT)
def _row(wr, o, h, v, dm, x0, x1, x2, x3, a, b):
    """One row's share of the four 16-weight groups at 128h + 16v + 32p: (a, b) += weights * x."""
    q0, q1, q2, q3 = _quad(wr, o, h, v)
    k = 8 * h + v
    a = vfma(vmul(vtof(q0), vlane(dm, k)), x0, a)
    b = vfma(vmul(vtof(q1), vlane(dm, k + 2)), x1, b)
    a = vfma(vmul(vtof(q2), vlane(dm, k + 4)), x2, a)
    b = vfma(vmul(vtof(q3), vlane(dm, k + 6)), x3, b)
    return a, b


@njit(**MATVEC_JIT)
def matvec_group(x, w, r0, out):
    """out[r0:r0+4] = W[r0:r0+4] @ x, prefetching the next group's bytes at the same pace."""
    w0, w1, w2, w3 = group_rows(w, r0)
    a0 = b0 = a1 = b1 = a2 = b2 = a3 = b3 = vzero()
    ahead = (r0 + R) * w.shape[1]
    for blk in range(x.size // 256):
        o = BYTES * blk
        prefetch_lines(w, ahead + 4 * o, 4 * BYTES)
        dm0, dm1, dm2, dm3 = block_scales(w0, o), block_scales(w1, o), block_scales(w2, o), block_scales(w3, o)
        for h in range(2):
            for v in range(2):
                xo = 256 * blk + 128 * h + 16 * v
                x0 = vload(x, xo)
                x1 = vload(x, xo + 32)
                x2 = vload(x, xo + 64)
                x3 = vload(x, xo + 96)
                a0, b0 = _row(w0, o, h, v, dm0, x0, x1, x2, x3, a0, b0)
                a1, b1 = _row(w1, o, h, v, dm1, x0, x1, x2, x3, a1, b1)
                a2, b2 = _row(w2, o, h, v, dm2, x0, x1, x2, x3, a2, b2)
                a3, b3 = _row(w3, o, h, v, dm3, x0, x1, x2, x3, a3, b3)
    group_store(out, r0, vhsum(vadd(a0, b0)), vhsum(vadd(a1, b1)), vhsum(vadd(a2, b2)), vhsum(vadd(a3, b3)))


TYPE = DType(
    "q6_k", 14, 256, BYTES, scale_offsets=(208,),
    # calibrated on the trained fixture (benchmarks/bench_types.py; figures and rule in docs/BENCHMARKS.md)
    verify=Thresholds(kl_mean=0.02, top1=0.87, ppl_ratio=1.076),
    quantize=quantize, dequantize=dequantize,
    quantize_reference=quantize_reference, dequantize_reference=dequantize_reference,
    int8_reference=q6_k_int8_reference,
)
