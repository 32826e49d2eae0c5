"""Three 16-lane intrinsics for the IQ2_XXS neighbour search (on kernels/simd.py's F32x16 vectors).

ggml keeps the first neighbour whose distance is strictly below the best so far (from FLT_MAX): the least
distance below FLT_MAX, at its first index. A scalar scan of that is one long dependency chain (compare,
select, compare, ...) and was 40% of the quantizer's time; these find the same neighbour a vector at a
time. They only compare and select, never round, so the result is ggml's exactly.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from mertools.kernels.simd import LANES, F32x16, tree_reduce, vty

_I32 = ir.IntType(32)


def _lane_ids() -> ir.Constant:
    return ir.Constant(vty(_I32), list(range(LANES)))


def _splat(builder: ir.IRBuilder, value: ir.Value) -> ir.Value:
    t = vty(value.type)
    v = builder.insert_element(ir.Constant(t, ir.Undefined), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, ir.Constant(t, ir.Undefined), ir.Constant(vty(_I32), [0] * LANES))


@intrinsic
def vmin_valid(typingctx, m, d, nleft):
    """Lane-wise: d where lane < nleft and d < m, else m (a NaN d never enters: `<` is false)."""
    if not (m == F32x16 and d == F32x16 and isinstance(nleft, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        mv, dv, n = args
        n32 = builder.trunc(n, _I32) if n.type.width > 32 else n
        inside = builder.icmp_signed("<", _lane_ids(), _splat(builder, n32))
        take = builder.and_(inside, builder.fcmp_ordered("<", dv, mv))
        return builder.select(take, dv, mv)

    return F32x16(m, d, nleft), codegen


@intrinsic
def vhmin(typingctx, v):
    """The least lane of v (a tree of compare-selects; v holds no NaN)."""
    if v != F32x16:
        return None

    def codegen(context, builder, sig, args):
        return tree_reduce(builder, args[0], lambda hi, lo: builder.select(builder.fcmp_ordered("<", hi, lo), hi, lo))

    return types.float32(v), codegen


@intrinsic
def vfirst_eq(typingctx, v, s):
    """The lowest lane of v equal to s, or 16 when none is (an int64)."""
    if not (v == F32x16 and s == types.float32):
        return None

    def codegen(context, builder, sig, args):
        eq = builder.fcmp_ordered("==", args[0], _splat(builder, args[1]))
        bits = builder.zext(builder.bitcast(eq, ir.IntType(LANES)), _I32)
        bits = builder.or_(bits, ir.Constant(_I32, 1 << LANES))  # so that "none" counts 16
        fnty = ir.FunctionType(_I32, [_I32, ir.IntType(1)])
        cttz = cgutils.get_or_insert_function(builder.module, fnty, "llvm.cttz.i32")
        return builder.zext(builder.call(cttz, [bits, ir.Constant(ir.IntType(1), 0)]), ir.IntType(64))

    return types.int64(v, s), codegen
