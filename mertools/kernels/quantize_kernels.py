"""Numba quantizers reproducing GGML's reference block bytes (Q4_0, Q8_0, Q4_K) bit for bit.

Every intermediate is float32, as in ggml-quants.c: constants are np.float32, integers are converted
with np.float32() before they meet a float (numba would otherwise promote to float64), fastmath stays
off so LLVM never fuses a multiply-add, and error_model="numpy" gives IEEE division by zero.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

_JIT = {"cache": True, "error_model": "numpy"}
_PJIT = {"cache": True, "error_model": "numpy", "parallel": True}
Q4_0_BYTES = 18
Q8_0_BYTES = 34
Q4_K_BYTES = 144
_CHUNK = 16  # Q4_K super-blocks per parallel task, so the scratch arrays are allocated once per task


@intrinsic
def f32_bits(typingctx, x):
    """Reinterpret a float32 as int32 (C memcpy)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@intrinsic
def bits_f32(typingctx, i):
    """Reinterpret an int32 as float32."""
    if i != types.int32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@njit(**_JIT)
def nearest_int(fval):
    """ggml's nearest_int: the 1.5*2^23 trick, kept as a bit trick so out-of-range inputs agree too."""
    val = fval + np.float32(12582912.0)
    return (np.int64(f32_bits(val)) & 0x7FFFFF) - 0x400000


@njit(**_JIT)
def f32_to_f16_bits(f):
    """float32 -> IEEE half bits, round to nearest even (GGML_FP32_TO_FP16, numpy astype)."""
    x = np.int64(f32_bits(f)) & 0xFFFFFFFF
    sign = (x >> 16) & 0x8000
    a = x & 0x7FFFFFFF
    if a > 0x7F800000:  # NaN: keep the top payload bits, never turn it into inf (numpy's rule)
        p = (a >> 13) & 0x3FF
        return np.uint16(sign | 0x7C00 | (p if p else 1))
    if a >= 0x477FF000:  # >= 65520 rounds to inf
        return np.uint16(sign | 0x7C00)
    if a >= 0x38800000:  # normal half: rebias the exponent, round the 13 dropped bits
        r = a - 0x38000000
        h = r >> 13
        rem = r & 0x1FFF
        if rem > 0x1000 or (rem == 0x1000 and (h & 1) == 1):
            h += 1
        return np.uint16(sign | h)
    if a <= 0x33000000:  # <= 2^-25 (exactly half the smallest subnormal) rounds to zero
        return np.uint16(sign)
    shift = 126 - (a >> 23)  # 14..24: value = mant * 2^-shift in units of 2^-24
    mant = (a & 0x7FFFFF) | 0x800000
    h = mant >> shift
    rem = mant & ((np.int64(1) << shift) - 1)
    half = np.int64(1) << (shift - 1)
    if rem > half or (rem == half and (h & 1) == 1):
        h += 1
    return np.uint16(sign | h)


@njit(**_JIT)
def f16_bits_to_f32(h):
    """IEEE half bits -> float32 (exact; NaN payloads are kept, like numpy)."""
    h = np.int64(h)
    sign = (h & 0x8000) << 16
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 0:  # zero or subnormal: m * 2^-24 is exact in float32
        v = np.float32(m) * np.float32(5.960464477539063e-08)
        return -v if sign else v
    if e == 31:
        bits = sign | 0x7F800000 | (m << 13)
    else:
        bits = sign | ((e + 112) << 23) | (m << 13)
    return bits_f32(np.int32(np.uint32(bits)))


@njit(**_JIT)
def _cast_low_byte(v):
    """numpy's float32 -> uint8/int8 cast on x86: via int32, NaN/Inf/out-of-range give 0x80000000."""
    if v != v or v >= np.float32(2147483648.0) or v < np.float32(-2147483648.0):
        return 0
    return np.int64(v) & 0xFF  # truncates toward zero


@njit(**_PJIT)
def quantize_q4_0(x):
    """x: float32 (n_blocks*32,) -> uint8 (n_blocks*18,) Q4_0 blocks."""
    nb = x.size // 32
    out = np.empty(nb * Q4_0_BYTES, dtype=np.uint8)
    for b in prange(nb):
        base = b * 32
        # the signed element of largest magnitude, first wins; starting from x[0] (not 0.0) is how
        # gguf-py picks it, which differs from C only for a block of zeros whose first zero is -0.0
        mx = x[base]
        amax = abs(mx)
        for j in range(1, 32):
            v = x[base + j]
            if amax < abs(v):
                amax = abs(v)
                mx = v
        d = mx / np.float32(-8.0)
        inv = np.float32(1.0) / d if d != np.float32(0.0) else np.float32(0.0)
        h = f32_to_f16_bits(d)
        o = b * Q4_0_BYTES
        out[o] = h & 0xFF
        out[o + 1] = h >> 8
        for j in range(16):
            q0 = min(_cast_low_byte(x[base + j] * inv + np.float32(8.5)), 15)
            q1 = min(_cast_low_byte(x[base + 16 + j] * inv + np.float32(8.5)), 15)
            out[o + 2 + j] = q0 | (q1 << 4)
    return out


@njit(**_JIT)
def _roundf_low_byte(v):
    """C roundf (halves away from zero) then numpy's int8 cast, as a byte."""
    if v != v or v >= np.float32(2147483648.0) or v < np.float32(-2147483648.0):
        return 0
    a = abs(v)
    fl = np.floor(a)
    r = np.int64(fl) + (1 if a - fl >= np.float32(0.5) else 0)
    return (-r if v < np.float32(0.0) else r) & 0xFF


@njit(**_PJIT)
def quantize_q8_0(x):
    """x: float32 (n_blocks*32,) -> uint8 (n_blocks*34,) Q8_0 blocks."""
    nb = x.size // 32
    out = np.empty(nb * Q8_0_BYTES, dtype=np.uint8)
    for b in prange(nb):
        base = b * 32
        amax = np.float32(0.0)
        for j in range(32):
            amax = max(amax, abs(x[base + j]))
        d = amax / np.float32(127.0)
        inv = np.float32(1.0) / d if d != np.float32(0.0) else np.float32(0.0)
        h = f32_to_f16_bits(d)
        o = b * Q8_0_BYTES
        out[o] = h & 0xFF
        out[o + 1] = h >> 8
        for j in range(32):
            out[o + 2 + j] = _roundf_low_byte(x[base + j] * inv)
    return out


@njit(**_JIT)
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


@njit(**_JIT)
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


@njit(**_PJIT)
def quantize_q4_k(x):
    """x: float32 (n_blocks*256,) -> uint8 (n_blocks*144,) Q4_K blocks."""
    nb = x.size // 256
    out = np.empty(nb * Q4_K_BYTES, dtype=np.uint8)
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
            _q4_k_block(x, b * 256, out, b * Q4_K_BYTES, L, laux, weights, scales, mins, sc, mq)
    return out


@njit(**_PJIT)
def first_not_below(x, limit):
    """x: float32 (n,) -> index of the first value with NOT |x| < limit (so NaN too), or -1.

    limit=inf finds the first NaN/Inf; limit=65520 also finds values that overflow float16.
    """
    n = x.size
    chunk = 1 << 16
    n_chunks = (n + chunk - 1) // chunk
    firsts = np.full(n_chunks, -1, dtype=np.int64)
    for c in prange(n_chunks):
        for i in range(c * chunk, min(n, (c + 1) * chunk)):
            if not abs(x[i]) < limit:
                firsts[c] = i
                break
    for c in range(n_chunks):
        if firsts[c] >= 0:
            return firsts[c]
    return -1
