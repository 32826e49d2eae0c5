"""q3_k: super-blocks of 256 weights in 110 bytes, 16 groups of 16 with 6-bit scales, 3-bit codes.

Super-block: hmask (32 bytes of high bits), qs (64 bytes of 2-bit codes), 12 bytes packing sixteen
6-bit scales (stored + 32), then d (f16) at byte 108, the END of the block. Weight 128h + 32s + l
(l < 32) has low bits (qs[32h + l] >> 2s) & 3 and high bit (hmask[l] >> (4h + s)) & 1, and
q = low - (high bit clear ? 4 : 0). Scale k (of the 16-weight group k): low nibble
(scales[k % 8] >> 4(k // 8)) & 15, high bits (scales[8 + k % 4] >> 2(k // 4)) & 3, minus 32.
x = (d * sc_k) * q (ggml's dequantize_row_q3_K and gguf-py: d*sc rounded first). The quantizer is
ggml's quantize_row_q3_K_ref bit for bit (what llama-quantize writes without an importance matrix):
per group make_q3_quants(16, 4, x, L, true) (levels from -4/max, then up to 5 passes moving single
levels while the weighted fit improves), 6-bit scales nearest_int(-32/max_scale * scale) (the int
truncated to int8 first), d = f16(1/iscale), then every weight requantized with the stored d*sc.

Decode (matvec): 8-entry tables (d*sc) * (k - 4) (one multiply, as the reference), two groups that
share their 16 bytes of codes in one 16-lane table, indexed by code | 8(group) with vpermps (`vlut16`):
the weights are exactly `dequantize`'s.

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
    is_carray,
    is_int,
    nib16,
    ptr_at,
    vadd,
    vfma,
    vhsum,
    vlane,
    vload,
    vlut16,
    vmul,
    vstore,
    vty,
    vzero,
)
from mertools.kernels.simd8 import iand, ior, iors, ishl, ishr

from ._blocks256 import (
    nearest_int,
    nearest_int_reference,
    pack_2bit,
    signed_absmax,
    signed_absmax_reference,
)
from ._k8low import q3_k_int8_reference
from .base import DType, Thresholds, f16_bytes, f16_from_bytes

BYTES = 110
_CHUNK = 16  # super-blocks per parallel quantizer task, so the scratch arrays are allocated once per task
_F32 = np.float32
_EPS = _F32(1e-15)  # ggml's GROUP_MAX_EPS: a group whose max |x| is below it is all zero


# ---------------------------------------------------------------- numpy reference


def _make_q3_quants_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """make_q3_quants(16, 4, x, L, true) for S groups: x float32 (S, 16) -> (scale float32 (S,),
    L int64 (S, 16) in 0..7). w*x*l is (w*x)*l, w*l*l is (w*l)*l; each group stops after a pass
    that changes nothing (`active`)."""
    amax, mx = signed_absmax_reference(x)
    zero = amax < _EPS
    w = x * x
    wx = w * x
    L = np.clip(nearest_int_reference((_F32(-4.0) / mx)[:, None] * x), -4, 3)
    lf = L.astype(np.float32)
    sumlx = np.zeros_like(amax)
    suml2 = np.zeros_like(amax)
    for i in range(16):
        sumlx = sumlx + wx[:, i] * lf[:, i]
        suml2 = suml2 + (w[:, i] * lf[:, i]) * lf[:, i]
    active = ~zero
    for _ in range(5):
        changed = np.zeros_like(active)
        for i in range(16):
            li = L[:, i]
            lf = li.astype(np.float32)
            slx = sumlx - wx[:, i] * lf
            sl2 = suml2 - (w[:, i] * lf) * lf
            new = np.clip(nearest_int_reference((x[:, i] * sl2) / slx), -4, 3)
            nf = new.astype(np.float32)
            slx = slx + wx[:, i] * nf  # only used where slx > 0 held before
            sl2 = sl2 + (w[:, i] * nf) * nf
            ok = active & (sumlx - wx[:, i] * lf > 0) & (new != li) & (sl2 > 0) & ((slx * slx) * suml2 > (sumlx * sumlx) * sl2)
            L[:, i] = np.where(ok, new, li)
            sumlx = np.where(ok, slx, sumlx)
            suml2 = np.where(ok, sl2, suml2)
            changed |= ok
        active &= changed
    scale = np.where(suml2 > 0, sumlx / suml2, _F32(0.0))
    return np.where(zero, _F32(0.0), scale).astype(np.float32), np.where(zero[:, None], 0, L + 4)


def quantize_reference(x: np.ndarray) -> np.ndarray:
    """x: float32 (..., cols) with cols % 256 == 0 -> uint8 (n_blocks, 110) Q3_K blocks."""
    xs = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, 16, 16)  # (nb, 16 groups, 16)
    nb = xs.shape[0]
    with np.errstate(all="ignore"):  # values computed under a false mask are discarded
        scales, L = _make_q3_quants_reference(xs.reshape(-1, 16))
        scales = scales.reshape(nb, 16)
        L = L.reshape(nb, 16, 16)
        max_scale = signed_absmax_reference(scales)[1]
        nz = max_scale != 0
        iscale = _F32(-32.0) / max_scale
        lq = nearest_int_reference(iscale[:, None] * scales)
        lq = ((lq & 0xFF) ^ 0x80) - 0x80  # int8_t l = nearest_int(...)
        lq = np.where(nz[:, None], np.clip(lq, -32, 31) + 32, 0)  # (nb, 16) in 0..63; all 0 when max_scale is 0
        d16 = f16_bytes(np.where(nz, _F32(1.0) / iscale, _F32(0.0)).astype(np.float32))  # (nb, 2)
        d = d16.view("<f2").astype(np.float32) * (lq - 32).astype(np.float32)  # (nb, 16)
        requant = np.clip(nearest_int_reference(xs / d[:, :, None]), -4, 3) + 4
        L = np.where((d != 0)[:, :, None], requant, L).reshape(nb, 8, 32)  # `if (!d) continue;`
    packed = np.zeros((nb, 12), dtype=np.int64)
    for j in range(16):  # low nibbles: bytes 0..7 (groups 8.. in the high nibble); high 2 bits: bytes 8..11
        packed[:, j % 8] |= (lq[:, j] & 15) << (4 * (j // 8))
        packed[:, 8 + j % 4] |= (lq[:, j] >> 4) << (2 * (j // 4))
    high = L > 3  # (nb, 8, 32): weight 32k + m sets bit k of hmask[m]
    hmask = (high.astype(np.int64) << np.arange(8).reshape(1, 8, 1)).sum(axis=1)  # distinct bits: sum = OR
    Lr = np.where(high, L - 4, L).reshape(nb, 2, 4, 32)
    qs = (Lr[:, :, 0] | (Lr[:, :, 1] << 2) | (Lr[:, :, 2] << 4) | (Lr[:, :, 3] << 6)).reshape(nb, 64)
    return np.concatenate([hmask, qs, packed, d16], axis=1).astype(np.uint8)


def _scales(b: np.ndarray) -> np.ndarray:
    """uint8 (nb, 110) -> int32 (nb, 16): the groups' scales sc - 32."""
    s = b[:, 96:108].astype(np.int32)
    k = np.arange(16)
    low = (s[:, k % 8] >> (4 * (k // 8))) & 15
    high = (s[:, 8 + k % 4] >> (2 * (k // 4))) & 3
    return (low | (high << 4)) - 32


def dequantize_reference(raw: np.ndarray) -> np.ndarray:
    """raw: uint8 (n_blocks*110,) -> float32 (n_blocks*256,). x = (d*sc)*q per 16 weights."""
    b = np.asarray(raw, dtype=np.uint8).reshape(-1, BYTES)
    d = f16_from_bytes(b[:, 108:110])  # (nb, 1)
    hm = b[:, 0:32].astype(np.int32)  # (nb, 32)
    qs = b[:, 32:96].astype(np.int32).reshape(-1, 2, 1, 32)  # (nb, h, 1, l)
    low = (qs >> (2 * np.arange(4)).reshape(1, 1, 4, 1)) & 3  # (nb, h, s, l)
    high = (hm[:, None, :] >> np.arange(8).reshape(1, 8, 1)) & 1  # (nb, 4h + s, l)
    q = (low.reshape(-1, 8, 32) - 4 * (1 - high)).astype(np.float32).reshape(-1, 16, 16)
    with np.errstate(invalid="ignore"):
        dl = (d * _scales(b).astype(np.float32))[:, :, None]  # (nb, 16, 1)
        return (dl * q).reshape(-1)


# ---------------------------------------------------------------- numba quantizer and dequantizer


@njit(**EXACT_JIT)
def _make_q3_quants(x, base, L, lbase, w, wx):
    """make_q3_quants(16, 4, x + base, L + lbase, true) -> scale (float32); L int64 (0..7);
    w, wx float32 (16,) scratch for x*x and (x*x)*x."""
    amax, mx = signed_absmax(x, base, 16)
    if amax < _EPS:
        for i in range(16):
            L[lbase + i] = 0
        return np.float32(0.0)
    iscale = np.float32(-4.0) / mx
    sumlx = np.float32(0.0)
    suml2 = np.float32(0.0)
    for i in range(16):
        xi = x[base + i]
        w[i] = xi * xi
        wx[i] = w[i] * xi
        li = min(max(nearest_int(iscale * xi), -4), 3)
        L[lbase + i] = li
        lf = np.float32(li)
        sumlx += wx[i] * lf
        suml2 += w[i] * lf * lf
    for _ in range(5):
        n_changed = 0
        for i in range(16):
            li = L[lbase + i]
            lf = np.float32(li)
            slx = sumlx - wx[i] * lf
            if slx > np.float32(0.0):
                sl2 = suml2 - w[i] * lf * lf
                new = min(max(nearest_int(x[base + i] * sl2 / slx), -4), 3)
                if new != li:
                    nf = np.float32(new)
                    slx += wx[i] * nf
                    sl2 += w[i] * nf * nf
                    if sl2 > np.float32(0.0) and slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[lbase + i] = new
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    for i in range(16):
        L[lbase + i] += 4
    return sumlx / suml2 if suml2 > np.float32(0.0) else np.float32(0.0)


@njit(**EXACT_JIT)
def _q3_k_block(x, base, out, o, L, scales, w, wx, lq):
    """quantize_row_q3_K_ref for one super-block: x[base:base+256] -> out[o:o+110]; lq int64 (16,)."""
    amax = np.float32(0.0)
    max_scale = np.float32(0.0)
    for j in range(16):
        s = _make_q3_quants(x, base + 16 * j, L, 16 * j, w, wx)
        scales[j] = s
        if abs(s) > amax:
            amax = abs(s)
            max_scale = s
    for k in range(12):
        out[o + 96 + k] = 0
    hd = 0  # GGML_FP32_TO_FP16(0.f)
    for j in range(16):
        lq[j] = 0
    if max_scale != np.float32(0.0):
        iscale = np.float32(-32.0) / max_scale
        for j in range(16):
            v = nearest_int(iscale * scales[j]) & 0xFF  # int8_t l = nearest_int(...)
            v = min(max(v - 256 if v >= 128 else v, -32), 31) + 32
            lq[j] = v
            out[o + 96 + j % 8] |= (v & 15) << (4 * (j // 8))
            out[o + 104 + j % 4] |= (v >> 4) << (2 * (j // 4))
        hd = f32_to_f16_bits(np.float32(1.0) / iscale)
    d_all = f16_bits_to_f32(hd)
    for j in range(16):
        d = d_all * np.float32(lq[j] - 32)
        if d == np.float32(0.0):
            continue  # keeps make_q3_quants' L (a NaN d requantizes, as in C)
        for i in range(16):
            L[16 * j + i] = min(max(nearest_int(x[base + 16 * j + i] / d), -4), 3) + 4
    for m in range(32):  # bit k of hmask[m]: the high bit of weight 32k + m
        h = 0
        for k in range(8):
            if L[32 * k + m] > 3:
                h |= 1 << k
                L[32 * k + m] -= 4
        out[o + m] = h
    pack_2bit(L, out, o + 32)
    out[o + 108] = hd & 0xFF
    out[o + 109] = hd >> 8


@njit(**EXACT_PJIT)
def quantize(x):
    """x: float32 (n_blocks*256,) -> uint8 (n_blocks*110,)."""
    nb = x.size // 256
    out = np.empty(nb * BYTES, dtype=np.uint8)
    n_tasks = (nb + _CHUNK - 1) // _CHUNK
    for t in prange(n_tasks):
        L = np.empty(256, dtype=np.int64)
        scales = np.empty(16, dtype=np.float32)
        w = np.empty(16, dtype=np.float32)
        wx = np.empty(16, dtype=np.float32)
        lq = np.empty(16, dtype=np.int64)
        for b in range(t * _CHUNK, min(nb, (t + 1) * _CHUNK)):
            _q3_k_block(x, b * 256, out, b * BYTES, L, scales, w, wx, lq)
    return out


@njit(**EXACT_PJIT)
def dequantize(raw):
    """raw: uint8 (n_blocks*110,) -> float32 (n_blocks*256,)."""
    nb = raw.size // BYTES
    out = np.empty(nb * 256, dtype=np.float32)
    for b in prange(nb):
        o = b * BYTES
        d = f16_bits_to_f32(np.int64(raw[o + 108]) | (np.int64(raw[o + 109]) << 8))
        for k in range(16):
            low = (np.int64(raw[o + 96 + k % 8]) >> (4 * (k // 8))) & 15
            high = (np.int64(raw[o + 104 + k % 4]) >> (2 * (k // 4))) & 3
            dl = d * np.float32((low | (high << 4)) - 32)
            h = k // 8
            s = (k % 8) // 2
            for i in range(16):
                j = 16 * (k % 2) + i  # byte of qs (past 32h) and of hmask
                q = (np.int64(raw[o + 32 + 32 * h + j]) >> (2 * s)) & 3
                if (np.int64(raw[o + j]) >> (4 * h + s)) & 1 == 0:
                    q -= 4
                out[b * 256 + 16 * k + i] = dl * np.float32(q)
    return out


# ---------------------------------------------------------------- matmul decoders


_IR_I32 = ir.IntType(32)
# 16 bytes are read at o + 94 (so that the read ends with the block): scales byte i is lane 2 + i
_PL = [2 + k % 8 for k in range(16)]
_SL = [4 * (k // 8) for k in range(16)]
_PH = [10 + k % 4 for k in range(16)]
_SH = [2 * (k // 4) for k in range(16)]


@intrinsic
def block_scales(typingctx, w, o):
    """[d*(sc_0 - 32) .. d*(sc_15 - 32)] of the super-block at byte o of a uint8 C array, each rounded
    once as the reference rounds it. Reads the block's last 16 bytes."""
    if not (is_carray(w, types.uint8) and is_int(o)):
        return None

    def codegen(context, builder, sig, args):
        arrty, arr, off = sig.args[0], args[0], args[1]
        i32v = vty(_IR_I32)

        def const(vals):
            return ir.Constant(i32v, vals)

        at = builder.add(off, ir.Constant(off.type, 94))
        s = builder.zext(builder.load(ptr_at(context, builder, arrty, arr, at, vty(ir.IntType(8))), align=1), i32v)
        low = builder.and_(builder.lshr(builder.shuffle_vector(s, s, const(_PL)), const(_SL)), const([15] * 16))
        high = builder.and_(builder.lshr(builder.shuffle_vector(s, s, const(_PH)), const(_SH)), const([3] * 16))
        sc = builder.sub(builder.or_(low, builder.shl(high, const([4] * 16))), const([32] * 16))
        at_d = builder.add(off, ir.Constant(off.type, 108))
        h = builder.load(ptr_at(context, builder, arrty, arr, at_d, ir.HalfType()), align=1)
        hv = builder.insert_element(ir.Constant(vty(ir.HalfType()), ir.Undefined), h, ir.Constant(_IR_I32, 0))
        hv = builder.shuffle_vector(hv, hv, const([0] * 16))
        return builder.fmul(builder.sitofp(sc, vty(ir.FloatType())), builder.fpext(hv, vty(ir.FloatType())))

    return F32x16(w, o), codegen


@intrinsic
def viota_minus4(typingctx):
    """The float lanes k - 4 for k = 0..7, then zeros (the values of a 3-bit code)."""

    def codegen(context, builder, sig, args):
        return ir.Constant(vty(ir.FloatType()), [float(k - 4) for k in range(8)] + [0.0] * 8)

    return F32x16(), codegen


@intrinsic
def viota_minus4x2(typingctx):
    """The float lanes k - 4 for k = 0..7, twice (the values of the 3-bit codes of two groups)."""

    def codegen(context, builder, sig, args):
        return ir.Constant(vty(ir.FloatType()), [float(k - 4) for k in range(8)] * 2)

    return F32x16(), codegen


@njit(**MATVEC_JIT)
def _codes(wr, o, h, s, v, hm):
    """3-bit codes (low | high << 2) of weights 128h + 32s + 16v + (0..15); hm = nib16(wr, o + 16v)."""
    low = iand(ishr(nib16(wr, o + 32 + 32 * h + 16 * v), 2 * s), 3)
    b = 4 * h + s
    high = ishr(hm, b - 2) if b >= 2 else ishl(hm, 2 - b)
    return ior(low, iand(high, 4))


@njit(inline="always", **TILE_JIT)  # numba inlines it: LLVM may leave a call in decode_tile's row loop
def tile_row(wr, k0, kc, buf, r):
    """buf[r, :kc] = the row's weights k0:k0+kc (wr: the row's uint8 bytes), exactly `dequantize`'s."""
    at = r * KC  # flat offset of buf row r
    base = viota_minus4()
    for b in range(kc // 256):
        o = (k0 // 256 + b) * BYTES
        dl = block_scales(wr, o)
        hm0 = nib16(wr, o)
        hm1 = nib16(wr, o + 16)
        for h in range(2):
            for s in range(4):
                k = 8 * h + 2 * s
                t = at + 256 * b + 16 * k
                vstore(buf, t, vlut16(vmul(base, vlane(dl, k)), _codes(wr, o, h, s, 0, hm0)))
                vstore(buf, t + 16, vlut16(vmul(base, vlane(dl, k + 1)), _codes(wr, o, h, s, 1, hm1)))


@intrinsic
def pair_lanes(typingctx, v, base):
    """Lanes 0-7 = v[base], lanes 8-15 = v[base + 2] (the scales of two groups sharing 16 bytes of
    codes); with a constant base (the callers are inlined) one vpermps with a constant index."""
    if not (v == F32x16 and is_int(base)):
        return None

    def codegen(context, builder, sig, args):
        vec, b = args
        i32 = ir.IntType(32)
        b = builder.trunc(b, i32) if b.type.width > 32 else b
        two = ir.Constant(vty(ir.FloatType(), 2), ir.Undefined)
        for g in range(2):
            e = builder.extract_element(vec, builder.add(b, ir.Constant(i32, 2 * g)))
            two = builder.insert_element(two, e, ir.Constant(i32, g))
        return builder.shuffle_vector(two, two, ir.Constant(vty(i32), [g // 8 for g in range(16)]))

    return F32x16(v, base), codegen


@njit(inline="always", **MATVEC_JIT)
def _quarter(wr, o, h, v, dl, base, x0, x1, x2, x3, a):
    """Weights 128h + 32s + 16v + (0..15), s = 0..3, of the super-block at o (groups 8h + v + 2s, whose
    16 bytes of codes are shared): two tables (d*sc)*(k - 4), lane 8(s & 1) + k, for 2 groups each."""
    t01 = vmul(base, pair_lanes(dl, 8 * h + v))
    t23 = vmul(base, pair_lanes(dl, 8 * h + v + 4))
    q = nib16(wr, o + 32 + 32 * h + 16 * v)
    hm = nib16(wr, o + 16 * v)  # bit 4h + s: the high bit of part s
    b = 4 * h
    c0 = ior(iand(q, 3), iand(ishr(hm, b - 2) if b >= 2 else ishl(hm, 2), 4))
    c1 = iors(ior(iand(ishr(q, 2), 3), iand(ishr(hm, b - 1) if b >= 1 else ishl(hm, 1), 4)), 8)
    c2 = ior(iand(ishr(q, 4), 3), iand(ishr(hm, b), 4))
    c3 = iors(ior(ishr(q, 6), iand(ishr(hm, b + 1), 4)), 8)
    a = vfma(vlut16(t01, c0), x0, a)
    a = vfma(vlut16(t01, c1), x1, a)
    a = vfma(vlut16(t23, c2), x2, a)
    return vfma(vlut16(t23, c3), x3, a)


@njit(inline="always", **MATVEC_JIT)
def _quarter4(x, xo, w0, w1, w2, w3, o, h, v, dls, base, acc):
    """The quarter (h, v) of the 4 rows, sharing the loads of x."""
    dl0, dl1, dl2, dl3 = dls
    a0, a1, a2, a3 = acc
    x0 = vload(x, xo)
    x1 = vload(x, xo + 32)
    x2 = vload(x, xo + 64)
    x3 = vload(x, xo + 96)
    return (_quarter(w0, o, h, v, dl0, base, x0, x1, x2, x3, a0), _quarter(w1, o, h, v, dl1, base, x0, x1, x2, x3, a1),
            _quarter(w2, o, h, v, dl2, base, x0, x1, x2, x3, a2), _quarter(w3, o, h, v, dl3, base, x0, x1, x2, x3, a3))


@njit(**MATVEC_JIT)
def matvec_group(x, w, r0, out):
    """out[r0:r0+4] = W[r0:r0+4] @ x, prefetching the next group's bytes at the same pace."""
    w0, w1, w2, w3 = group_rows(w, r0)
    base = viota_minus4x2()
    a = (vzero(), vzero(), vzero(), vzero())  # quarters v = 0
    b = (vzero(), vzero(), vzero(), vzero())  # quarters v = 1
    ahead = (r0 + R) * w.shape[1]
    for blk in range(x.size // 256):
        o = BYTES * blk
        prefetch_lines(w, ahead + 4 * o, 4 * BYTES)
        dls = (block_scales(w0, o), block_scales(w1, o), block_scales(w2, o), block_scales(w3, o))
        xo = 256 * blk
        a = _quarter4(x, xo, w0, w1, w2, w3, o, 0, 0, dls, base, a)
        b = _quarter4(x, xo + 16, w0, w1, w2, w3, o, 0, 1, dls, base, b)
        a = _quarter4(x, xo + 128, w0, w1, w2, w3, o, 1, 0, dls, base, a)
        b = _quarter4(x, xo + 144, w0, w1, w2, w3, o, 1, 1, dls, base, b)
    group_store(out, r0, vhsum(vadd(a[0], b[0])), vhsum(vadd(a[1], b[1])), vhsum(vadd(a[2], b[2])), vhsum(vadd(a[3], b[3])))


TYPE = DType(
    "q3_k", 11, 256, BYTES, scale_offsets=(108,),
    # calibrated on the trained fixture (benchmarks/bench_types.py; figures and rule in docs/BENCHMARKS.md)
    verify=Thresholds(kl_mean=0.2, top1=0.73, ppl_ratio=1.326),
    quantize=quantize, dequantize=dequantize,
    quantize_reference=quantize_reference, dequantize_reference=dequantize_reference,
    int8_reference=q3_k_int8_reference,
)
