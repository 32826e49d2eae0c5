"""LLVM-IR intrinsics for the 8-bit-activation kernels: 64-byte vectors and their integer dot product.

The exact kernels (`simd`) widen every weight to float32; these keep weights and quantized
activations as bytes and multiply them in integers, as ggml's vec_dot kernels do:

    bytes64(w, o)            the 64 bytes w[o:o+64] of a uint8 array (unaligned)
    bytes16x4(w, o)          the 16 bytes w[o:o+16] in each of the four 16-byte quarters
    lo4(v), hi4(v)           each byte's low / high nibble
    dpbusd(acc, u, s)        acc[i] + sum over j < 4 of u[4i+j] * s[4i+j], u unsigned and s signed bytes
    ivload4x4(a, i)          a[i:i+4] of an int32 array in each quarter, as int32 lanes (`simd.I32x16`)
    ishl(v, k)               v << k in each lane
    halves4x4(w, o)          the 4 halves at byte o, each in 4 consecutive float32 lanes
    quad_sum(v, q)           (v[4q] + v[4q+2]) + (v[4q+1] + v[4q+3]), float32

`dpbusd` is one vpdpbusd with AVX-512 VNNI; elsewhere the same sums come from widening multiplies
(integers: every path gives the same values). As in `simd`, no bounds checks: callers compute offsets
from validated shapes, and the tests hold every kernel to its numpy twin. After editing this file,
touch the modules that use it (numba's cache is keyed on each kernel's own file).
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic, models, register_model

from mertools.kernels.simd import F32x16, I32x16, _call, _host_has, _splat, is_carray, is_int, ptr_at, vty

VNNI = _host_has("avx512f", "avx512bw", "avx512vl", "avx512vnni")
_I8 = ir.IntType(8)
_I32 = ir.IntType(32)
_F32 = ir.FloatType()


class Bytes64(types.Type):
    """64 bytes held in registers (one AVX-512 register, two AVX2 ones)."""

    def __init__(self) -> None:
        super().__init__(name="bytes64")


B64 = Bytes64()


@register_model(Bytes64)
class _BytesModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type: Bytes64) -> None:
        super().__init__(dmm, fe_type, vty(_I8, 64))


def _u8_at(sig, args, context, builder, t: ir.Type):
    return builder.load(ptr_at(context, builder, sig.args[0], args[0], args[1], t), align=1)


@intrinsic
def bytes64(typingctx, w, o):
    if not (is_carray(w, types.uint8) and is_int(o)):
        return None

    def codegen(context, builder, sig, args):
        return _u8_at(sig, args, context, builder, vty(_I8, 64))

    return B64(w, o), codegen


@intrinsic
def bytes16x4(typingctx, w, o):
    if not (is_carray(w, types.uint8) and is_int(o)):
        return None

    def codegen(context, builder, sig, args):
        v = _u8_at(sig, args, context, builder, vty(_I8, 16))
        return builder.shuffle_vector(v, v, ir.Constant(vty(_I32, 64), [i % 16 for i in range(64)]))

    return B64(w, o), codegen


def _nibble(shift: int):
    @intrinsic
    def fn(typingctx, v):
        if v != B64:
            return None

        def codegen(context, builder, sig, args):
            x = args[0]
            if shift:
                x = builder.lshr(x, ir.Constant(x.type, [shift] * 64))
            return builder.and_(x, ir.Constant(x.type, [15] * 64))

        return B64(v), codegen

    return fn


lo4 = _nibble(0)
hi4 = _nibble(4)


@intrinsic
def dpbusd(typingctx, acc, u, s):
    if not (acc == I32x16 and u == B64 and s == B64):
        return None

    def codegen(context, builder, sig, args):
        a, uu, ss = args
        if VNNI:
            return _call(builder, "llvm.x86.avx512.vpdpbusd.512", vty(_I32), [a, uu, ss])
        p = builder.mul(builder.zext(uu, vty(_I32, 64)), builder.sext(ss, vty(_I32, 64)))
        for j in range(4):
            part = builder.shuffle_vector(p, p, ir.Constant(vty(_I32, 16), [4 * i + j for i in range(16)]))
            a = builder.add(a, part)
        return a

    return I32x16(acc, u, s), codegen


@intrinsic
def ivload4x4(typingctx, a, i):
    """a[i:i+4] of an int32 array in each of the four quarters."""
    if not (is_carray(a, types.int32) and is_int(i)):
        return None

    def codegen(context, builder, sig, args):
        v = builder.load(ptr_at(context, builder, sig.args[0], args[0], args[1], vty(_I32, 4)), align=4)
        return builder.shuffle_vector(v, v, ir.Constant(vty(_I32, 16), [i % 4 for i in range(16)]))

    return I32x16(a, i), codegen


@intrinsic
def ishl(typingctx, v, k):
    """v << k in each int32 lane."""
    if not (v == I32x16 and is_int(k)):
        return None

    def codegen(context, builder, sig, args):
        k32 = builder.trunc(args[1], _I32) if args[1].type.width > 32 else args[1]
        return builder.shl(args[0], _splat(builder, k32))

    return I32x16(v, k), codegen


@intrinsic
def halves4x4(typingctx, w, o):
    if not (is_carray(w, types.uint8) and is_int(o)):
        return None

    def codegen(context, builder, sig, args):
        h = builder.fpext(_u8_at(sig, args, context, builder, vty(ir.HalfType(), 4)), vty(_F32, 4))
        return builder.shuffle_vector(h, h, ir.Constant(vty(_I32, 16), [i // 4 for i in range(16)]))

    return F32x16(w, o), codegen


@intrinsic
def quad_sum(typingctx, v, q):
    if not (v == F32x16 and is_int(q)):
        return None

    def codegen(context, builder, sig, args):
        x, qq = args
        base = builder.mul(builder.trunc(qq, _I32) if qq.type.width > 32 else qq, ir.Constant(_I32, 4))
        lane = [builder.extract_element(x, builder.add(base, ir.Constant(_I32, j))) for j in range(4)]
        return builder.fadd(builder.fadd(lane[0], lane[2]), builder.fadd(lane[1], lane[3]))

    return types.float32(v, q), codegen


__all__ = ["B64", "VNNI", "bytes16x4", "bytes64", "dpbusd", "halves4x4", "hi4", "ishl", "ivload4x4", "lo4", "quad_sum"]


