"""q2_k: super-blocks of 256 weights in 84 bytes, 16 groups of 16 with 4-bit scales and mins.

Super-block: 16 bytes of scales (group k: scale in the low nibble of byte k, min in the high one),
qs (64 bytes of 2-bit codes: weight 128h + 32s + l has (qs[32h + l] >> 2s) & 3), then d and dmin
(f16) at bytes 80 and 82, the END of the block. x = (d*sc_k)*q - dmin*m_k for the 16-weight group
k (ggml's dequantize_row_q2_K and gguf-py). The quantizer is ggml's quantize_row_q2_K_ref bit for bit
(what llama-quantize writes without an importance matrix): per group make_qkx2_quants(16, 3, x, |x|,
.., -0.5f, 0.1f, 15, true) (absolute, not squared, errors), 4-bit scales and mins relative to the
largest (d, dmin = max/15), then every weight requantized with the stored d*sc and dmin*m.

Decode (matvec): one 16-entry table per 4 groups that share 16 bytes of codes, lane 4s + k =
fma(k, d*sc, -dmin*m) of group s, indexed by code | 4s with vpermps (`vlut16`): one rounding where the
reference rounds (d*sc)*q and then the difference, as the 4-bit K-quant's table (the same single-fma liberty).
The prefill tile computes (d*sc)*q - dmin*m in vectors: d*sc has at most 15 significant bits and q 2,
so the product is exact and a fused multiply-add there (the tile's fastmath) changes nothing.

The 8-bit-activation kernels (kernels/int8.py) read these blocks as they are, with ggml's integer sums per
super-block: dtypes/_k8low.py (`int8_reference`).
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
    f32_to_f16_bits,
    group_rows,
    group_store,
    prefetch_lines,
)
from mertools.kernels.simd import (
    F32x16,
    half_splat,
    nib16,
    vadd,
    vfma,
    vhsum,
    vlane,
    vload,
    vlut16,
    vmul,
    vsplat,
    vstore,
    vsub,
    vtof,
    vty,
    vzero,
)
from mertools.kernels.simd8 import iand, iors, ishr

from ._blocks256 import (
    make_qkx2_quants,
    make_qkx2_quants_reference,
    nearest_int,
    nearest_int_reference,
    pack_2bit,
)
from ._k8low import q2_k_int8_reference
from .base import DType, Thresholds, f16_bytes, f16_from_bytes

BYTES = 84
_CHUNK = 16  # super-blocks per parallel quantizer task, so the scratch arrays are allocated once per task
_F32 = np.float32


# ---------------------------------------------------------------- numpy reference


def quantize_reference(x: np.ndarray) -> np.ndarray:
    """x: float32 (..., cols) with cols % 256 == 0 -> uint8 (n_blocks, 84) Q2_K blocks."""
    xs = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, 16, 16)  # (nb, 16 groups, 16)
    nb = xs.shape[0]
    with np.errstate(all="ignore"):  # values computed under a false mask are discarded
        sub = xs.reshape(-1, 16)
        scales, mins, L = make_qkx2_quants_reference(sub, np.abs(sub), 3, -0.5, 0.1, 15, True)
        scales = scales.reshape(nb, 16)
        mins = mins.reshape(nb, 16)
        max_scale = np.zeros(nb, dtype=np.float32)
        max_min = np.zeros(nb, dtype=np.float32)
        for j in range(16):  # `if (scale > max_scale)`, in group order
            max_scale = np.where(scales[:, j] > max_scale, scales[:, j], max_scale)
            max_min = np.where(mins[:, j] > max_min, mins[:, j], max_min)
        sp = (max_scale > 0)[:, None]
        mp = (max_min > 0)[:, None]
        # uint8_t scales[j] = l, then |= l << 4: each int truncated to a byte
        ls = np.where(sp, nearest_int_reference((_F32(15.0) / max_scale)[:, None] * scales), 0)
        lm = np.where(mp, nearest_int_reference((_F32(15.0) / max_min)[:, None] * mins) << 4, 0)
        sb = ((ls | lm) & 0xFF).astype(np.uint8)  # (nb, 16)
        d16 = f16_bytes(np.where(sp[:, 0], max_scale / _F32(15.0), _F32(0.0)).astype(np.float32))  # (nb, 2)
        dmin16 = f16_bytes(np.where(mp[:, 0], max_min / _F32(15.0), _F32(0.0)).astype(np.float32))
        d = d16.view("<f2").astype(np.float32) * (sb & 15).astype(np.float32)  # (nb, 16)
        dm = dmin16.view("<f2").astype(np.float32) * (sb >> 4).astype(np.float32)
        requant = np.clip(nearest_int_reference((xs + dm[:, :, None]) / d[:, :, None]), 0, 3)
        L = np.where((d != 0)[:, :, None], requant, L.reshape(nb, 16, 16)).reshape(nb, 2, 4, 32)  # `if (!d) continue;`
    qs = (L[:, :, 0] | (L[:, :, 1] << 2) | (L[:, :, 2] << 4) | (L[:, :, 3] << 6)).reshape(nb, 64)
    return np.concatenate([sb, qs, d16, dmin16], axis=1).astype(np.uint8)


def dequantize_reference(raw: np.ndarray) -> np.ndarray:
    """raw: uint8 (n_blocks*84,) -> float32 (n_blocks*256,). x = (d*sc)*q - dmin*m per 16 weights."""
    b = np.asarray(raw, dtype=np.uint8).reshape(-1, BYTES)
    d = f16_from_bytes(b[:, 80:82])  # (nb, 1)
    dmin = f16_from_bytes(b[:, 82:84])
    sc = b[:, :16].astype(np.int32)  # (nb, 16)
    qs = b[:, 16:80].astype(np.int32).reshape(-1, 2, 1, 32)  # (nb, h, 1, l)
    q = ((qs >> (2 * np.arange(4)).reshape(1, 1, 4, 1)) & 3).astype(np.float32).reshape(-1, 16, 16)
    with np.errstate(invalid="ignore"):
        dl = (d * (sc & 15).astype(np.float32))[:, :, None]  # (nb, 16, 1)
        ml = (dmin * (sc >> 4).astype(np.float32))[:, :, None]
        return (dl * q - ml).reshape(-1)


# ---------------------------------------------------------------- numba quantizer and dequantizer


@njit(**EXACT_JIT)
def _q2_k_block(x, base, out, o, L, laux, weights, scales, mins):
    """quantize_row_q2_K_ref for one super-block: x[base:base+256] -> out[o:o+84]."""
    max_scale = np.float32(0.0)
    max_min = np.float32(0.0)
    for j in range(16):
        for i in range(16):
            weights[i] = abs(x[base + 16 * j + i])
        s, m = make_qkx2_quants(x, base + 16 * j, 16, weights, L, 16 * j, laux, 3, np.float32(-0.5),
                                np.float32(0.1), 15, True)
        scales[j] = s
        mins[j] = m
        if s > max_scale:
            max_scale = s
        if m > max_min:
            max_min = m
    hd = 0  # GGML_FP32_TO_FP16(0.f)
    hm = 0
    for j in range(16):
        out[o + j] = 0
    if max_scale > np.float32(0.0):
        iscale = np.float32(15.0) / max_scale
        for j in range(16):
            out[o + j] = nearest_int(iscale * scales[j]) & 0xFF  # uint8_t: the int truncated to a byte
        hd = f32_to_f16_bits(max_scale / np.float32(15.0))
    if max_min > np.float32(0.0):
        iscale = np.float32(15.0) / max_min
        for j in range(16):
            out[o + j] |= (nearest_int(iscale * mins[j]) << 4) & 0xFF
        hm = f32_to_f16_bits(max_min / np.float32(15.0))
    d_all = f16_bits_to_f32(hd)
    dmin_all = f16_bits_to_f32(hm)
    for j in range(16):
        sb = np.int64(out[o + j])
        d = d_all * np.float32(sb & 15)
        if d == np.float32(0.0):
            continue  # keeps make_qkx2_quants' L (a NaN d requantizes, as in C)
        dm = dmin_all * np.float32(sb >> 4)
        for i in range(16):
            L[16 * j + i] = min(max(nearest_int((x[base + 16 * j + i] + dm) / d), 0), 3)
    pack_2bit(L, out, o + 16)
    out[o + 80] = hd & 0xFF
    out[o + 81] = hd >> 8
    out[o + 82] = hm & 0xFF
    out[o + 83] = hm >> 8


@njit(**EXACT_PJIT)
def quantize(x):
    """x: float32 (n_blocks*256,) -> uint8 (n_blocks*84,)."""
    nb = x.size // 256
    out = np.empty(nb * BYTES, dtype=np.uint8)
    n_tasks = (nb + _CHUNK - 1) // _CHUNK
    for t in prange(n_tasks):
        L = np.empty(256, dtype=np.uint8)
        laux = np.empty(16, dtype=np.uint8)
        weights = np.empty(16, dtype=np.float32)
        scales = np.empty(16, dtype=np.float32)
        mins = np.empty(16, dtype=np.float32)
        for b in range(t * _CHUNK, min(nb, (t + 1) * _CHUNK)):
            _q2_k_block(x, b * 256, out, b * BYTES, L, laux, weights, scales, mins)
    return out


@njit(**EXACT_PJIT)
def dequantize(raw):
    """raw: uint8 (n_blocks*84,) -> float32 (n_blocks*256,)."""
    nb = raw.size // BYTES
    out = np.empty(nb * 256, dtype=np.float32)
    for b in prange(nb):
        o = b * BYTES
        d = f16_bits_to_f32(np.int64(raw[o + 80]) | (np.int64(raw[o + 81]) << 8))
        dmin = f16_bits_to_f32(np.int64(raw[o + 82]) | (np.int64(raw[o + 83]) << 8))
        for k in range(16):
            s = np.int64(raw[o + k])
            dl = d * np.float32(s & 15)
            ml = dmin * np.float32(s >> 4)
            h = k // 8
            shift = 2 * ((k % 8) // 2)
            for i in range(16):
                q = (np.int64(raw[o + 16 + 32 * h + 16 * (k % 2) + i]) >> shift) & 3
                out[b * 256 + 16 * k + i] = dl * np.float32(q) - ml
    return out


# ---------------------------------------------------------------- matmul decoders


@intrinsic
def viota_mod4(typingctx):
    """The float lanes k & 3 for k = 0..15 (a 2-bit code's value, whatever the two bits above it)."""

    def codegen(context, builder, sig, args):
        return ir.Constant(vty(ir.FloatType()), [float(k & 3) for k in range(16)])

    return F32x16(), codegen


@njit(**MATVEC_JIT)
def block_scales(wr, o):
    """(d*sc_k, dmin*m_k for k = 0..15) of the super-block at o, each rounded once as the reference."""
    s = nib16(wr, o)
    return vmul(vtof(iand(s, 15)), half_splat(wr, o + 80)), vmul(vtof(ishr(s, 4)), half_splat(wr, o + 82))


@njit(inline="always", **TILE_JIT)  # numba inlines it: LLVM may leave a call in decode_tile's row loop
def tile_row(wr, k0, kc, buf, r):
    """buf[r, :kc] = the row's weights k0:k0+kc (wr: the row's uint8 bytes), exactly `dequantize`'s."""
    at = r * KC  # flat offset of buf row r
    for b in range(kc // 256):
        o = (k0 // 256 + b) * BYTES
        dl, ml = block_scales(wr, o)
        for k in range(16):
            q = iand(ishr(nib16(wr, o + 16 + 32 * (k // 8) + 16 * (k % 2)), 2 * ((k % 8) // 2)), 3)
            vstore(buf, at + 256 * b + 16 * k, vsub(vmul(vtof(q), vlane(dl, k)), vlane(ml, k)))


@intrinsic
def quad_lanes(typingctx, v, base):
    """Lanes 4g..4g+3 = v[base + 2g] for g = 0..3 (the scales of the 4 groups sharing 16 bytes of
    codes); with a constant base (the callers are inlined) one vpermps with a constant index."""
    if not (v == F32x16 and isinstance(base, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        vec, b = args
        i32 = ir.IntType(32)
        b = builder.trunc(b, i32) if b.type.width > 32 else b
        f4 = vty(ir.FloatType(), 4)
        four = ir.Constant(f4, ir.Undefined)
        for g in range(4):
            e = builder.extract_element(vec, builder.add(b, ir.Constant(i32, 2 * g)))
            four = builder.insert_element(four, e, ir.Constant(i32, g))
        return builder.shuffle_vector(four, four, ir.Constant(vty(i32), [g // 4 for g in range(16)]))

    return F32x16(v, base), codegen


@njit(inline="always", **MATVEC_JIT)
def _quarter(wr, o, h, v, dl, nml, base, x0, x1, x2, x3, a):
    """Weights 128h + 32s + 16v + (0..15), s = 0..3, of the super-block at o (groups 8h + v + 2s, whose
    16 bytes of codes are shared): one table fma(k & 3, d*sc, -dmin*m) for the 4 groups, lane 4s + k."""
    t = vfma(base, quad_lanes(dl, 8 * h + v), quad_lanes(nml, 8 * h + v))
    q = nib16(wr, o + 16 + 32 * h + 16 * v)
    a = vfma(vlut16(t, iand(q, 3)), x0, a)
    a = vfma(vlut16(t, iors(iand(ishr(q, 2), 3), 4)), x1, a)
    a = vfma(vlut16(t, iors(iand(ishr(q, 4), 3), 8)), x2, a)
    return vfma(vlut16(t, iors(ishr(q, 6), 12)), x3, a)


@njit(inline="always", **MATVEC_JIT)
def _quarter4(x, xo, w0, w1, w2, w3, o, h, v, sc, base, acc):
    """The quarter (h, v) of the 4 rows, sharing the loads of x."""
    d0, n0, d1, n1, d2, n2, d3, n3 = sc
    a0, a1, a2, a3 = acc
    x0 = vload(x, xo)
    x1 = vload(x, xo + 32)
    x2 = vload(x, xo + 64)
    x3 = vload(x, xo + 96)
    return (_quarter(w0, o, h, v, d0, n0, base, x0, x1, x2, x3, a0), _quarter(w1, o, h, v, d1, n1, base, x0, x1, x2, x3, a1),
            _quarter(w2, o, h, v, d2, n2, base, x0, x1, x2, x3, a2), _quarter(w3, o, h, v, d3, n3, base, x0, x1, x2, x3, a3))


@njit(**MATVEC_JIT)
def _scales(wr, o, minus):
    dl, ml = block_scales(wr, o)
    return dl, vmul(ml, minus)  # -ml, exact


@njit(**MATVEC_JIT)
def matvec_group(x, w, r0, out):
    """out[r0:r0+4] = W[r0:r0+4] @ x, prefetching the next group's bytes at the same pace."""
    w0, w1, w2, w3 = group_rows(w, r0)
    base = viota_mod4()
    minus = vsplat(np.float32(-1.0))
    a = (vzero(), vzero(), vzero(), vzero())  # quarters v = 0
    b = (vzero(), vzero(), vzero(), vzero())  # quarters v = 1
    ahead = (r0 + R) * w.shape[1]
    for blk in range(x.size // 256):
        o = BYTES * blk
        prefetch_lines(w, ahead + 4 * o, 4 * BYTES)
        d0, n0 = _scales(w0, o, minus)
        d1, n1 = _scales(w1, o, minus)
        d2, n2 = _scales(w2, o, minus)
        d3, n3 = _scales(w3, o, minus)
        sc = (d0, n0, d1, n1, d2, n2, d3, n3)
        xo = 256 * blk
        a = _quarter4(x, xo, w0, w1, w2, w3, o, 0, 0, sc, base, a)
        b = _quarter4(x, xo + 16, w0, w1, w2, w3, o, 0, 1, sc, base, b)
        a = _quarter4(x, xo + 128, w0, w1, w2, w3, o, 1, 0, sc, base, a)
        b = _quarter4(x, xo + 144, w0, w1, w2, w3, o, 1, 1, sc, base, b)
    group_store(out, r0, vhsum(vadd(a[0], b[0])), vhsum(vadd(a[1], b[1])), vhsum(vadd(a[2], b[2])), vhsum(vadd(a[3], b[3])))


TYPE = DType(
    "q2_k", 10, 256, BYTES, scale_offsets=(80, 82),
    # calibrated on the trained fixture (benchmarks/bench_types.py; figures and rule in docs/BENCHMARKS.md)
    verify=Thresholds(kl_mean=0.3, top1=0.78, ppl_ratio=1.56),
    quantize=quantize, dequantize=dequantize,
    quantize_reference=quantize_reference, dequantize_reference=dequantize_reference,
    int8_reference=q2_k_int8_reference,
)
