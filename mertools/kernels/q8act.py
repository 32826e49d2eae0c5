"""LLVM-IR intrinsics that quantize activation rows as ggml's quantize_row_q8_0 and _q8_K (kernels/act8.py):

    absmax32(x, o)                max(0, |x[o..o+31]|) of a float32 array (NaN ignored)
    q8_round32(x, o, inv, q, qo)  the quants of x[o..o+31] * inv stored at q[qo] (roundf: halves away from zero,
                                  NaN 0, as quantize_row_q8_0 and numpy's int8 cast); their lane-wise half sums
    q8k_round32(x, o, inv, q, qo) the same as quantize_row_q8_K rounds (nearest_int: ties to even), within +-127
    neg_quad_sums(v, a, o)        a[o:o+4] = minus each 4 lanes' int32 sum
    half_round(f)                 f through an IEEE half and back (round to nearest even)

Exact: the same values as the scalar definitions (`dtypes.q8_0._roundf_low_byte`, `kernels.common`'s half
conversions), tested on every float a quant can be. As in `simd`, no bounds checks. After editing this file, delete
numba's cache files of the modules that use it (kernels/act8.py): touching them was not always enough.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from mertools.kernels.simd import I32x16, _call, _splat, is_carray, is_int, ptr_at, vty

_I8 = ir.IntType(8)
_I32 = ir.IntType(32)
_F32 = ir.FloatType()


@intrinsic
def absmax32(typingctx, x, o):
    """max(0, |x[o]|, ..., |x[o+31]|) of a float32 array, NaN ignored (as a running max(amax, |v|) from 0)."""
    if not (is_carray(x, types.float32) and is_int(o)):
        return None

    def codegen(context, builder, sig, args):
        arr, off = args
        lo = builder.load(ptr_at(context, builder, sig.args[0], arr, off, vty(_F32)), align=4)
        hi = builder.load(ptr_at(context, builder, sig.args[0], arr, builder.add(off, ir.Constant(off.type, 16)),
                                 vty(_F32)), align=4)
        fabs = [_call(builder, "llvm.fabs.v16f32", vty(_F32), [v]) for v in (lo, hi)]
        m = _call(builder, "llvm.maxnum.v16f32", vty(_F32), fabs)
        n = 16
        while n > 1:  # max is exact: any order gives the same value
            n //= 2
            a = builder.shuffle_vector(m, m, ir.Constant(vty(_I32, n), list(range(n))))
            b = builder.shuffle_vector(m, m, ir.Constant(vty(_I32, n), list(range(n, 2 * n))))
            m = _call(builder, f"llvm.maxnum.v{n}f32" if n > 1 else "llvm.maxnum.f32", a.type if n > 1 else _F32,
                      [a, b] if n > 1 else [builder.extract_element(a, ir.Constant(_I32, 0)),
                                            builder.extract_element(b, ir.Constant(_I32, 0))])
        return _call(builder, "llvm.maxnum.f32", _F32, [m, ir.Constant(_F32, 0.0)])

    return types.float32(x, o), codegen


def _rounder(ties_even: bool):
    """Intrinsic (x, o, inv, q, qo): q[qo:qo+32] = the quants of x[o + j] * inv, j < 32; returns the two 16-lane
    halves' quants summed lane by lane (int32: lane i is quant i plus quant 16 + i)."""

    @intrinsic
    def fn(typingctx, x, o, inv, q, qo):
        if not (is_carray(x, types.float32) and is_int(o) and inv == types.float32 and is_carray(q, types.uint8)
                and is_int(qo)):
            return None

        def codegen(context, builder, sig, args):
            arr, off, iv, out, qoff = args
            scale = _splat(builder, iv)
            below_half = _splat(builder, ir.Constant(_F32, 0.49999997))  # the float below 0.5: 0.49999997 + 0.5 < 1
            halves = []
            for k in (0, 16):
                v = builder.load(ptr_at(context, builder, sig.args[0], arr,
                                        builder.add(off, ir.Constant(off.type, k)), vty(_F32)), align=4)
                v = builder.fmul(v, scale)
                if ties_even:  # q8_K: nearest_int (ties to even) kept within +-127
                    r = _call(builder, "llvm.rint.v16f32", vty(_F32), [v])
                    r = _call(builder, "llvm.minnum.v16f32", vty(_F32), [r, _splat(builder, ir.Constant(_F32, 127.0))])
                    r = _call(builder, "llvm.maxnum.v16f32", vty(_F32), [r, _splat(builder, ir.Constant(_F32, -127.0))])
                else:
                    # roundf as trunc(|v| + 0.49999997) with v's sign (llvm.round is a call per lane on x86: no
                    # such rounding mode), exact for every float (tests)
                    a = _call(builder, "llvm.fabs.v16f32", vty(_F32), [v])
                    r = _call(builder, "llvm.trunc.v16f32", vty(_F32), [builder.fadd(a, below_half)])
                    r = _call(builder, "llvm.copysign.v16f32", vty(_F32), [r, v])
                # NaN -> 0 (minnum/maxnum would have made it a bound), then a plain conversion
                r = builder.select(builder.fcmp_unordered("uno", v, v), _splat(builder, ir.Constant(_F32, 0.0)), r)
                i = builder.fptosi(r, vty(_I32))
                builder.store(builder.trunc(i, vty(_I8)), ptr_at(context, builder, sig.args[3], out,
                                                                 builder.add(qoff, ir.Constant(qoff.type, k)),
                                                                 vty(_I8)), align=1)
                halves.append(builder.sext(builder.trunc(i, vty(_I8)), vty(_I32)))
            return builder.add(*halves)

        return I32x16(x, o, inv, q, qo), codegen

    return fn


q8_round32 = _rounder(False)
q8k_round32 = _rounder(True)


@intrinsic
def half_round(typingctx, f):
    """f rounded to the nearest half (ties to even; overflow to inf) and back to float32: one vcvtps2ph/vcvtph2ps
    pair, what GGML_FP32_TO_FP16 then GGML_FP16_TO_FP32 give (kernels.common's f32_to_f16_bits, in hardware)."""
    if f != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.fpext(builder.fptrunc(args[0], ir.HalfType()), _F32)

    return types.float32(f), codegen


@intrinsic
def neg_quad_sums(typingctx, v, a, o):
    """a[o + j] = -(v[4j] + v[4j+1] + v[4j+2] + v[4j+3]) for j < 4 (an int32 array), by shuffles and one store."""
    if not (v == I32x16 and is_carray(a, types.int32) and is_int(o)):
        return None

    def codegen(context, builder, sig, args):
        x, arr, off = args
        for step in (1, 2):  # each lane gets its pair's, then its quad's sum
            swap = [i ^ step for i in range(16)]
            x = builder.add(x, builder.shuffle_vector(x, x, ir.Constant(vty(_I32), swap)))
        quads = builder.shuffle_vector(x, x, ir.Constant(vty(_I32, 4), [0, 4, 8, 12]))
        builder.store(builder.neg(quads), ptr_at(context, builder, sig.args[1], arr, off, vty(_I32, 4)), align=4)
        return context.get_dummy_value()

    return types.void(v, a, o), codegen


__all__ = ["absmax32", "half_round", "neg_quad_sums", "q8_round32", "q8k_round32"]
