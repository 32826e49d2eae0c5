"""Vector pieces shared by the 32-weight block types q4_1, q5_0, q5_1, iq4_nl and mxfp4 (not a type).

    vaffine(a, d, m)     a*d + m lane-wise with two roundings, as the references compute it; its
                         instructions carry a flag (arcp, meaningless without a division) so that the
                         prefill tile's fastmath pass leaves them alone and LLVM never fuses them
    vexact_mul(a, d)     a*d, likewise immune to the fastmath pass
    const16(values)      an intrinsic giving 16 constant float lanes (a quant type's value table)
    q5_lo16 / q5_hi16    the 5-bit quants of weights 0-15 / 16-31 of a q5 block as int32 lanes
                         (q5_1); q5_lo16_signed / q5_hi16_signed the same minus 16 (q5_0). (w, o)
                         with o the byte of qh (4 bytes, bit j the high bit of weight j) followed
                         by the 16 nibble bytes; the high bits go through a lane mask (a kmov and a
                         masked or on AVX-512) rather than per-lane shifts

and the scalar pieces of their numba quantizers:

    c_byte(v)            C's (uint8_t)/(int8_t) cast of a float as x86 code does it: a byte 0..255
    c_int8(v)            the same byte read as a signed int8_t, -128..127
    put_f16(out, o, v)   out[o:o+2] = GGML_FP32_TO_FP16(v), little-endian

numba's on-disk cache is keyed on each kernel's own source file: after editing this file, delete the
type modules' and `kernels/dispatch`'s caches (*.nbi, *.nbc).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from mertools.kernels.common import EXACT_JIT, f32_to_f16_bits
from mertools.kernels.simd import LANES, F32x16, I32x16, is_carray, is_int, ptr_at, vty

_I32 = ir.IntType(32)
_F32 = ir.FloatType()
_EXACT = ("arcp",)  # any flag keeps numba's fastmath pass from adding contract/reassoc


@intrinsic
def vaffine(typingctx, a, d, m):
    """a*d + m with two IEEE roundings, never fused (d, m: F32x16)."""
    if not (a == F32x16 and d == F32x16 and m == F32x16):
        return None

    def codegen(context, builder, sig, args):
        return builder.fadd(builder.fmul(args[0], args[1], flags=_EXACT), args[2], flags=_EXACT)

    return F32x16(a, d, m), codegen


@intrinsic
def vexact_mul(typingctx, a, d):
    """a*d, one IEEE rounding, never fused with a later add."""
    if not (a == F32x16 and d == F32x16):
        return None

    def codegen(context, builder, sig, args):
        return builder.fmul(args[0], args[1], flags=_EXACT)

    return F32x16(a, d), codegen


def const16(values):
    """An intrinsic () -> F32x16 holding `values` (16 floats exactly representable in float32)."""
    vals = [float(v) for v in values]
    if len(vals) != LANES:
        raise ValueError("const16 needs 16 values")

    @intrinsic
    def table(typingctx):
        def codegen(context, builder, sig, args):
            return ir.Constant(vty(_F32), vals)

        return F32x16(), codegen

    return table


def _q5_16(high: bool, bias: int):
    @intrinsic
    def quants(typingctx, w, o):
        if not (is_carray(w, types.uint8) and is_int(o)):
            return None

        def codegen(context, builder, sig, args):
            arrty, arr, off = sig.args[0], args[0], args[1]
            i32v = vty(_I32)
            # the 16 high bits of this half as a lane mask (one kmov on AVX-512), 16 where set
            qh = builder.load(ptr_at(context, builder, arrty, arr, off, _I32), align=1)  # little-endian u32
            bits = builder.trunc(builder.lshr(qh, ir.Constant(_I32, 16)) if high else qh, ir.IntType(16))
            mask = builder.bitcast(bits, vty(ir.IntType(1)))
            hb = builder.select(mask, ir.Constant(i32v, [16] * LANES), ir.Constant(i32v, [0] * LANES))
            at = builder.add(off, ir.Constant(off.type, 4))
            b32 = builder.zext(builder.load(ptr_at(context, builder, arrty, arr, at, vty(ir.IntType(8))), align=1), i32v)
            if high:
                nib = builder.lshr(b32, ir.Constant(i32v, [4] * LANES))
            else:
                nib = builder.and_(b32, ir.Constant(i32v, [15] * LANES))
            q = builder.or_(nib, hb)
            return builder.sub(q, ir.Constant(i32v, [bias] * LANES)) if bias else q

        return I32x16(w, o), codegen

    return quants


q5_lo16 = _q5_16(False, 0)
q5_hi16 = _q5_16(True, 0)
q5_lo16_signed = _q5_16(False, 16)  # q5_0: q - 16
q5_hi16_signed = _q5_16(True, 16)


# ---------------------------------------------------------------- scalar quantizer pieces


@njit(**EXACT_JIT)
def c_byte(v):
    """A float32 cast to uint8_t/int8_t by gcc on x86 (cvttss2si, then the low byte): NaN, Inf and
    values outside int32 give 0x80000000, so byte 0 (numpy's casts agree: `base.cast_low_byte`)."""
    if v != v or v >= np.float32(2147483648.0) or v < np.float32(-2147483648.0):
        return 0
    return np.int64(v) & 0xFF  # truncates toward zero


@njit(**EXACT_JIT)
def c_int8(v):
    """(int8_t)v as a signed value: C's MIN(15, (int8_t)...) compares it signed."""
    b = c_byte(v)
    return b - 256 if b >= 128 else b


@njit(**EXACT_JIT)
def put_f16(out, o, v):
    """out[o], out[o+1] = the half of float32 v (round to nearest even), little-endian."""
    h = f32_to_f16_bits(v)
    out[o] = h & 0xFF
    out[o + 1] = h >> 8


@njit(**EXACT_JIT)
def min_scale(x, base, levels):
    """The head of C's quantize_row_q4_1/q5_1_ref for the 32 weights at x[base]: (min, d = (max - min) /
    levels, 1/d or 0). C starts its scan from FLT_MAX / -FLT_MAX: the same as the first weight for
    finite input."""
    mn = x[base]
    mx = x[base]
    for j in range(1, 32):
        v = x[base + j]
        if v < mn:
            mn = v
        if v > mx:
            mx = v
    d = (mx - mn) / levels
    return mn, d, (np.float32(1.0) / d if d != np.float32(0.0) else np.float32(0.0))
