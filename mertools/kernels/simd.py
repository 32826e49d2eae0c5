"""SIMD vectors for numba kernels: a 16-lane float32 / int32 vector type and LLVM-IR intrinsics on it.

numba has no vector types, and its auto-vectoriser turns block-decoding loops into scalar or gather
code. These intrinsics give the decode kernels explicit <16 x float> / <16 x i32> values (one AVX-512
register, or two AVX2 registers) that numba keeps in SSA registers like any scalar:

    vload(x, i)              x[i:i+16] of a float32 array          vstore(out, i, v)
    vsplat(f), vzero()       broadcast / zeros                      vfma(a, b, c) = a*b + c, fused
    vadd, vsub, vmul         lane-wise                              vhsum(v): fixed-order tree sum
    nib16(w, o)              16 bytes w[o:o+16] zero-extended to int32 lanes
    sbyte16(w, o)            16 bytes as int8, sign-extended        vshr4(v), vand15(v), vtof(v)
    vlut16(table, idx)       table[idx & 15] per lane (vpermps on AVX-512, compare/select otherwise)
    half16(w, o)             16 little-endian halves at byte o, widened to float32 (vcvtph2ps)
    half_at(w, o)            one half at byte o as float32

Every intrinsic indexes raw data pointers without bounds checks: callers compute offsets from
validated shapes. numba's on-disk cache (cache=True) is keyed on the kernel module's own source file,
not on this one: after editing this file, touch the kernel modules (or delete their __pycache__/*.nbi)
so that they are recompiled. Everything here is exact (no approximations): conversions are exact, and only
`vfma`, `vadd` and `vhsum` round, as IEEE operations in a fixed order.
"""

from __future__ import annotations

import llvmlite.binding as llvm
import numba
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

LANES = 16
_I32 = ir.IntType(32)
_F32 = ir.FloatType()


def _host_has(*features: str) -> bool:
    """Whether the CPU numba compiles for has all these features (numba compiles for the host unless
    NUMBA_CPU_NAME / NUMBA_CPU_FEATURES say otherwise; then the portable IR is used)."""
    if numba.config.CPU_NAME or numba.config.CPU_FEATURES:
        return False
    try:
        have = llvm.get_host_cpu_features()
    except RuntimeError:
        return False
    return all(have.get(f, False) for f in features)


AVX512 = _host_has("avx512f", "avx512bw", "avx512vl")
AVX2 = _host_has("avx2")


class Vec(types.Type):
    """A 16-lane vector of float32 or int32, held in registers."""

    def __init__(self, elem: types.Type) -> None:
        self.elem = elem
        super().__init__(name=f"vec16<{elem}>")


F32x16 = Vec(types.float32)
I32x16 = Vec(types.int32)


@register_model(Vec)
class _VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type: Vec) -> None:
        super().__init__(dmm, fe_type, ir.VectorType(dmm.lookup(fe_type.elem).get_value_type(), LANES))


def _vty(elem: ir.Type, n: int = LANES) -> ir.VectorType:
    return ir.VectorType(elem, n)


def _data(context, builder, arrty, arr):
    return context.make_array(arrty)(context, builder, arr).data


def _at(context, builder, arrty, arr, offset, pty: ir.Type):
    """Pointer to element `offset` of a contiguous array, cast to pty*."""
    return builder.bitcast(builder.gep(_data(context, builder, arrty, arr), [offset]), pty.as_pointer())


def _splat(builder, value, n: int = LANES):
    vty = _vty(value.type, n)
    v = builder.insert_element(ir.Constant(vty, ir.Undefined), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, ir.Constant(vty, ir.Undefined), ir.Constant(_vty(_I32, n), [0] * n))


def _carray(t, dtype=None) -> bool:
    return isinstance(t, types.Array) and t.layout == "C" and (dtype is None or t.dtype == dtype)


def _int(t) -> bool:
    return isinstance(t, types.Integer)


def _call(builder, name: str, ret: ir.Type, args: list):
    mod = builder.module
    fnty = ir.FunctionType(ret, [a.type for a in args])
    fn = cgutils.get_or_insert_function(mod, fnty, name)
    return builder.call(fn, args)


# ---------------------------------------------------------------- construction, loads and stores


@intrinsic
def vzero(typingctx):
    def codegen(context, builder, sig, args):
        return ir.Constant(_vty(_F32), [0.0] * LANES)

    return F32x16(), codegen


@intrinsic
def vsplat(typingctx, f):
    if f != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return _splat(builder, args[0])

    return F32x16(f), codegen


@intrinsic
def vload(typingctx, arr, i):
    """arr[i:i+16] of a float32 C array (unaligned)."""
    if not (_carray(arr, types.float32) and _int(i)):
        return None

    def codegen(context, builder, sig, args):
        return builder.load(_at(context, builder, sig.args[0], args[0], args[1], _vty(_F32)), align=4)

    return F32x16(arr, i), codegen


@intrinsic
def vstore(typingctx, arr, i, v):
    """arr[i:i+16] = v for a float32 C array."""
    if not (_carray(arr, types.float32) and _int(i) and v == F32x16):
        return None

    def codegen(context, builder, sig, args):
        builder.store(args[2], _at(context, builder, sig.args[0], args[0], args[1], _vty(_F32)), align=4)
        return context.get_dummy_value()

    return types.void(arr, i, v), codegen


@intrinsic
def half_at(typingctx, w, o):
    """The little-endian half at byte o of a uint8 C array, as float32 (exact)."""
    if not (_carray(w, types.uint8) and _int(o)):
        return None

    def codegen(context, builder, sig, args):
        h = builder.load(_at(context, builder, sig.args[0], args[0], args[1], ir.HalfType()), align=1)
        return builder.fpext(h, _F32)

    return types.float32(w, o), codegen


@intrinsic
def half_splat(typingctx, w, o):
    """The half at byte o of a uint8 C array in every lane, as float32 (vpbroadcastw + vcvtph2ps: no
    scalar insert, which would make a false dependency on a register the loop carries)."""
    if not (_carray(w, types.uint8) and _int(o)):
        return None

    def codegen(context, builder, sig, args):
        h = builder.load(_at(context, builder, sig.args[0], args[0], args[1], ir.HalfType()), align=1)
        return builder.fpext(_splat(builder, h), _vty(_F32))

    return F32x16(w, o), codegen


@intrinsic
def prefetch(typingctx, w, o):
    """Prefetch the cache line holding byte o of a uint8 C array (any rank) into all cache levels.
    A hint only: it never faults, but callers keep o inside the array anyway."""
    if not (_carray(w, types.uint8) and _int(o)):
        return None

    def codegen(context, builder, sig, args):
        p = _at(context, builder, sig.args[0], args[0], args[1], ir.IntType(8))
        fnty = ir.FunctionType(ir.VoidType(), [p.type, _I32, _I32, _I32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(fn, [p, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])
        return context.get_dummy_value()

    return types.void(w, o), codegen


@intrinsic
def f32x16_at(typingctx, w, o):
    """16 little-endian float32 at byte o of a uint8 C array (unaligned)."""
    if not (_carray(w, types.uint8) and _int(o)):
        return None

    def codegen(context, builder, sig, args):
        return builder.load(_at(context, builder, sig.args[0], args[0], args[1], _vty(_F32)), align=1)

    return F32x16(w, o), codegen


@intrinsic
def f32_at(typingctx, w, o):
    """The little-endian float32 at byte o of a uint8 C array."""
    if not (_carray(w, types.uint8) and _int(o)):
        return None

    def codegen(context, builder, sig, args):
        return builder.load(_at(context, builder, sig.args[0], args[0], args[1], _F32), align=1)

    return types.float32(w, o), codegen


@intrinsic
def half16(typingctx, w, o):
    """16 little-endian halves at byte o of a uint8 C array, as float32 lanes (exact: vcvtph2ps)."""
    if not (_carray(w, types.uint8) and _int(o)):
        return None

    def codegen(context, builder, sig, args):
        h = builder.load(_at(context, builder, sig.args[0], args[0], args[1], _vty(ir.HalfType())), align=1)
        return builder.fpext(h, _vty(_F32))

    return F32x16(w, o), codegen


def _bytes16(signed: bool):
    @intrinsic
    def load(typingctx, w, o):
        if not (_carray(w, types.uint8) and _int(o)):
            return None

        def codegen(context, builder, sig, args):
            v = builder.load(_at(context, builder, sig.args[0], args[0], args[1], _vty(ir.IntType(8))), align=1)
            return (builder.sext if signed else builder.zext)(v, _vty(_I32))

        return I32x16(w, o), codegen

    return load


nib16 = _bytes16(False)  # 16 bytes, each zero-extended (both nibbles still in it)
sbyte16 = _bytes16(True)  # 16 bytes as int8, sign-extended


# ---------------------------------------------------------------- arithmetic


def _binary(op: str):
    @intrinsic
    def fn(typingctx, a, b):
        if not (a == F32x16 and b == F32x16):
            return None

        def codegen(context, builder, sig, args):
            return getattr(builder, op)(args[0], args[1])

        return F32x16(a, b), codegen

    return fn


vadd = _binary("fadd")
vsub = _binary("fsub")
vmul = _binary("fmul")


@intrinsic
def vfma(typingctx, a, b, c):
    """a*b + c with one rounding (llvm.fma: vfmadd on any FMA machine)."""
    if not (a == F32x16 and b == F32x16 and c == F32x16):
        return None

    def codegen(context, builder, sig, args):
        return _call(builder, "llvm.fma.v16f32", _vty(_F32), list(args))

    return F32x16(a, b, c), codegen


@intrinsic
def vhsum(typingctx, v):
    """Sum of the 16 lanes as a fixed tree (8+8, 4+4, 2+2, 1+1)."""
    if v != F32x16:
        return None

    def codegen(context, builder, sig, args):
        x = args[0]
        n = LANES
        while n > 1:
            n //= 2
            lo = builder.shuffle_vector(x, x, ir.Constant(_vty(_I32, n), list(range(n))))
            hi = builder.shuffle_vector(x, x, ir.Constant(_vty(_I32, n), list(range(n, 2 * n))))
            x = builder.fadd(lo, hi)
        return builder.extract_element(x, ir.Constant(_I32, 0))

    return types.float32(v), codegen


def _int_op(fn_ir):
    @intrinsic
    def fn(typingctx, v):
        if v != I32x16:
            return None

        def codegen(context, builder, sig, args):
            return fn_ir(builder, args[0])

        return I32x16(v), codegen

    return fn


vshr4 = _int_op(lambda b, v: b.lshr(v, ir.Constant(v.type, [4] * LANES)))
vand15 = _int_op(lambda b, v: b.and_(v, ir.Constant(v.type, [15] * LANES)))


@intrinsic
def vtof(typingctx, v):
    """int32 lanes -> float32 (exact for |v| < 2^24)."""
    if v != I32x16:
        return None

    def codegen(context, builder, sig, args):
        return builder.sitofp(args[0], _vty(_F32))

    return F32x16(v), codegen


@intrinsic
def vlut16(typingctx, table, idx):
    """table[idx & 15] in each lane: one vpermps on AVX-512 (which ignores the upper index bits),
    two 8-entry vpermps per half and a blend on AVX2, a select chain elsewhere (same values)."""
    if not (table == F32x16 and idx == I32x16):
        return None

    def codegen(context, builder, sig, args):
        t, i = args
        if AVX512:
            return _call(builder, "llvm.x86.avx512.permvar.sf.512", _vty(_F32), [t, i])
        if AVX2:
            v8 = _vty(_F32, 8)
            lo_t = builder.shuffle_vector(t, t, ir.Constant(_vty(_I32, 8), list(range(8))))
            hi_t = builder.shuffle_vector(t, t, ir.Constant(_vty(_I32, 8), list(range(8, 16))))
            high = builder.icmp_unsigned("!=", builder.and_(i, ir.Constant(i.type, [8] * LANES)),
                                         ir.Constant(i.type, [0] * LANES))
            halves = []
            for h in range(2):
                ih = builder.shuffle_vector(i, i, ir.Constant(_vty(_I32, 8), list(range(8 * h, 8 * h + 8))))
                a = _call(builder, "llvm.x86.avx2.permps", v8, [lo_t, ih])
                b = _call(builder, "llvm.x86.avx2.permps", v8, [hi_t, ih])
                mh = builder.shuffle_vector(high, high, ir.Constant(_vty(_I32, 8), list(range(8 * h, 8 * h + 8))))
                halves.append(builder.select(mh, b, a))
            return builder.shuffle_vector(halves[0], halves[1], ir.Constant(_vty(_I32, 16), list(range(16))))
        i = builder.and_(i, ir.Constant(i.type, [15] * LANES))
        out = _splat(builder, builder.extract_element(t, ir.Constant(_I32, 0)))
        for k in range(1, 16):
            hit = builder.icmp_unsigned("==", i, ir.Constant(i.type, [k] * LANES))
            out = builder.select(hit, _splat(builder, builder.extract_element(t, ir.Constant(_I32, k))), out)
        return out

    return F32x16(table, idx), codegen


@intrinsic
def viota_minus8(typingctx):
    """The float lanes -8, -7, ..., 7 (Q4_0's q - 8 for q = lane)."""

    def codegen(context, builder, sig, args):
        return ir.Constant(_vty(_F32), [float(k - 8) for k in range(LANES)])

    return F32x16(), codegen


@intrinsic
def viota(typingctx):
    """The float lanes 0, 1, ..., 15 (Q4_K's q for q = lane)."""

    def codegen(context, builder, sig, args):
        return ir.Constant(_vty(_F32), [float(k) for k in range(LANES)])

    return F32x16(), codegen


@intrinsic
def vlane(typingctx, v, j):
    """Lane j of v in every lane (a constant j after unrolling becomes one vpermps/vbroadcastss)."""
    if not (v == F32x16 and _int(j)):
        return None

    def codegen(context, builder, sig, args):
        j32 = builder.trunc(args[1], _I32) if args[1].type.width > 32 else args[1]
        return _splat(builder, builder.extract_element(args[0], j32))

    return F32x16(v, j), codegen


# ---------------------------------------------------------------- GGML Q4_K scales

# The 12 bytes s[0..11] at offset 4 of a Q4_K super-block pack 8 six-bit scales sc_j and mins m_j
# (ggml get_scale_min_k4). Lane l < 8 computes sc_l, lane 8 + l computes m_l, as
# ((s[P] >> SH) & M1) | ((s[Q] >> 2) & M2) (the M2 term adds the top two bits for j >= 4).
_P = [0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 8, 9, 10, 11]
_Q = [0, 0, 0, 0, 0, 1, 2, 3, 0, 0, 0, 0, 4, 5, 6, 7]
_SH = [0] * 12 + [4] * 4
_M1 = [63] * 4 + [15] * 4 + [63] * 4 + [15] * 4
_M2 = [0] * 4 + [0x30] * 4 + [0] * 4 + [0x30] * 4


@intrinsic
def q4k_scales(typingctx, w, o):
    """[d*sc_0 .. d*sc_7, -dmin*m_0 .. -dmin*m_7] of the Q4_K super-block at byte o of a uint8 C
    array, each product rounded once as the reference rounds it (the minus is exact). Reads the 16
    bytes at o + 4 (the scales and 4 bytes of quants, which always follow)."""
    if not (_carray(w, types.uint8) and _int(o)):
        return None

    def codegen(context, builder, sig, args):
        arrty, arr, off = sig.args[0], args[0], args[1]
        i32v = _vty(_I32)

        def const(vals):
            return ir.Constant(i32v, vals)

        at4 = builder.add(off, ir.Constant(off.type, 4))
        s = builder.zext(builder.load(_at(context, builder, arrty, arr, at4, _vty(ir.IntType(8))), align=1), i32v)
        p = builder.shuffle_vector(s, s, const(_P))
        q = builder.shuffle_vector(s, s, const(_Q))
        lane = builder.and_(builder.lshr(p, const(_SH)), const(_M1))
        lane = builder.or_(lane, builder.and_(builder.lshr(q, const([2] * LANES)), const(_M2)))
        two = builder.load(_at(context, builder, arrty, arr, off, _vty(ir.HalfType(), 2)), align=1)  # d, dmin
        scale = builder.fpext(builder.shuffle_vector(two, two, const([0] * 8 + [1] * 8)), _vty(_F32))
        sign = ir.Constant(_vty(_F32), [1.0] * 8 + [-1.0] * 8)
        return builder.fmul(builder.sitofp(lane, _vty(_F32)), builder.fmul(scale, sign))

    return F32x16(w, o), codegen
