"""LLVM-IR intrinsics for the numba kernels: 16-lane vectors, block decoders into float32 buffers.

numba has no vector types, and its auto-vectoriser turns block-decoding loops into scalar or gather
code at 1-2 cycles a weight. These intrinsics give the kernels explicit <16 x float> / <16 x i32>
values (one AVX-512 register, or two AVX2 registers) that numba keeps in SSA registers like any scalar:

    vload(x, i)              x[i:i+16] of a float32 array          vstore(out, i, v)
    vsplat(f), vzero()       broadcast / zeros                      vfma(a, b, c) = a*b + c, fused
    vadd, vsub, vmul         lane-wise                              vhsum(v): fixed-order tree sum
    nib16(w, o)              16 bytes w[o:o+16] zero-extended to int32 lanes
    sbyte16(w, o)            16 bytes as int8, sign-extended        vshr4(v), vand15(v), vtof(v)
    vlut16(table, idx)       table[idx & 15] per lane (vpermps on AVX-512, compare/select otherwise)
    half16(w, o)             16 little-endian halves at byte o, widened to float32 (vcvtph2ps)
    half_at(w, o)            one half at byte o as float32

and, for the prefill tile (`decode_tile`), decoders that write a run of weights into a float32 buffer:
decode_nibbles16/32 (4-bit quants times a scale, minus a min), decode_i8_32 (int8 times a scale),
decode_f16_16 and copy_f32_16. They compute exactly what `dequantize` does (no fused multiply-add).

Every intrinsic indexes raw data pointers without bounds checks: callers compute offsets from
validated shapes, and the tests compare every path with the reference. numba's on-disk cache
(cache=True) is keyed on the contents of each kernel's own source file, not on this one: after editing
this file, delete the __pycache__/*.nbi of the modules that use it (a touch does not do) so they recompile.
Everything here is exact (no approximations): conversions are exact, and only `vfma`, `vadd` and
`vhsum` round, as IEEE operations in a fixed order.
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
    NUMBA_CPU_NAME / NUMBA_CPU_FEATURES say otherwise: then only the features NUMBA_CPU_FEATURES names, as
    "+avx2,+fma", count, and with none the portable IR is used)."""
    if numba.config.CPU_FEATURES:
        named = {f[1:]: f[0] == "+" for f in numba.config.CPU_FEATURES.split(",") if f[:1] in "+-" and len(f) > 1}
        return all(named.get(f, False) for f in features)
    if numba.config.CPU_NAME:
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


def vty(elem: ir.Type, n: int = LANES) -> ir.VectorType:
    return ir.VectorType(elem, n)


def _data(context, builder, arrty, arr):
    return context.make_array(arrty)(context, builder, arr).data


def ptr_at(context, builder, arrty, arr, offset, pty: ir.Type):
    """Pointer to element `offset` of a contiguous array, cast to pty*."""
    return builder.bitcast(builder.gep(_data(context, builder, arrty, arr), [offset]), pty.as_pointer())


def _splat(builder, value, n: int = LANES):
    t = vty(value.type, n)
    v = builder.insert_element(ir.Constant(t, ir.Undefined), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, ir.Constant(t, ir.Undefined), ir.Constant(vty(_I32, n), [0] * n))


def is_carray(t, dtype=None) -> bool:
    return isinstance(t, types.Array) and t.layout == "C" and (dtype is None or t.dtype == dtype)


def is_int(t) -> bool:
    return isinstance(t, types.Integer)


def _ints(*ts) -> bool:
    return all(is_int(t) for t in ts)


def _f32s(*ts) -> bool:
    return all(t == types.float32 for t in ts)


def _src_dst_ok(src, src_dtype, dst) -> bool:
    """src a C array of src_dtype, dst a float32 C array (a tile decoder's operands)."""
    return is_carray(src, src_dtype) and is_carray(dst, types.float32)


def tree_reduce(builder, x, combine):  # noqa: ANN001, ANN201 - llvmlite values
    """Lane 0 of x's 16 lanes folded as a fixed tree (8+8, 4+4, 2+2, 1+1) with combine(hi, lo) -> lanes."""
    n = LANES
    while n > 1:
        n //= 2
        lo = builder.shuffle_vector(x, x, ir.Constant(vty(_I32, n), list(range(n))))
        hi = builder.shuffle_vector(x, x, ir.Constant(vty(_I32, n), list(range(n, 2 * n))))
        x = combine(hi, lo)
    return builder.extract_element(x, ir.Constant(_I32, 0))


def _call(builder, name: str, ret: ir.Type, args: list):
    mod = builder.module
    fnty = ir.FunctionType(ret, [a.type for a in args])
    fn = cgutils.get_or_insert_function(mod, fnty, name)
    return builder.call(fn, args)


# ---------------------------------------------------------------- raw addresses


def _pointer(nb_type: types.Type, ir_type: ir.Type):
    """Intrinsic: an int64 address as a pointer of `nb_type` (for numba.carray): memory the caller keeps alive, sized
    and aligned."""

    @intrinsic
    def ptr(typingctx, addr):
        if not is_int(addr):
            return None

        def codegen(context, builder, sig, args):
            return builder.inttoptr(args[0], ir.PointerType(ir_type))

        return types.CPointer(nb_type)(addr), codegen

    return ptr


u8_ptr = _pointer(types.uint8, ir.IntType(8))
f32_ptr = _pointer(types.float32, ir.FloatType())


# ---------------------------------------------------------------- construction, loads and stores


@intrinsic
def vzero(typingctx):
    def codegen(context, builder, sig, args):
        return ir.Constant(vty(_F32), [0.0] * LANES)

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
    if not (is_carray(arr, types.float32) and is_int(i)):
        return None

    def codegen(context, builder, sig, args):
        return builder.load(ptr_at(context, builder, sig.args[0], args[0], args[1], vty(_F32)), align=4)

    return F32x16(arr, i), codegen


@intrinsic
def vstore(typingctx, arr, i, v):
    """arr[i:i+16] = v for a float32 C array."""
    if not (is_carray(arr, types.float32) and is_int(i) and v == F32x16):
        return None

    def codegen(context, builder, sig, args):
        builder.store(args[2], ptr_at(context, builder, sig.args[0], args[0], args[1], vty(_F32)), align=4)
        return context.get_dummy_value()

    return types.void(arr, i, v), codegen


@intrinsic
def half_splat(typingctx, w, o):
    """The half at byte o of a uint8 C array in every lane, as float32 (vpbroadcastw + vcvtph2ps: no
    scalar insert, which would make a false dependency on a register the loop carries)."""
    if not (is_carray(w, types.uint8) and is_int(o)):
        return None

    def codegen(context, builder, sig, args):
        h = builder.load(ptr_at(context, builder, sig.args[0], args[0], args[1], ir.HalfType()), align=1)
        return builder.fpext(_splat(builder, h), vty(_F32))

    return F32x16(w, o), codegen


@intrinsic
def prefetch(typingctx, w, o):
    """Prefetch the cache line holding byte o of a uint8 C array (any rank) into all cache levels.
    A hint only: it never faults, but callers keep o inside the array anyway."""
    if not (is_carray(w, types.uint8) and is_int(o)):
        return None

    def codegen(context, builder, sig, args):
        p = ptr_at(context, builder, sig.args[0], args[0], args[1], ir.IntType(8))
        fnty = ir.FunctionType(ir.VoidType(), [p.type, _I32, _I32, _I32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(fn, [p, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])
        return context.get_dummy_value()

    return types.void(w, o), codegen


def _load_at(elem: ir.Type, n: int):
    """Intrinsic (w, o) -> the n little-endian `elem`s at byte o of a uint8 C array (unaligned), as
    float32 (a scalar for n = 1, else an F32x16); halves are widened exactly (vcvtph2ps)."""

    @intrinsic
    def load(typingctx, w, o):
        if not (is_carray(w, types.uint8) and is_int(o)):
            return None

        def codegen(context, builder, sig, args):
            v = builder.load(ptr_at(context, builder, sig.args[0], args[0], args[1], elem if n == 1 else vty(elem, n)), align=1)
            return v if elem == _F32 else builder.fpext(v, _F32 if n == 1 else vty(_F32, n))

        return (types.float32 if n == 1 else F32x16)(w, o), codegen

    return load


half_at = _load_at(ir.HalfType(), 1)  # one half at byte o
half16 = _load_at(ir.HalfType(), LANES)  # 16 halves at byte o
f32_at = _load_at(_F32, 1)  # one float32 at byte o
f32x16_at = _load_at(_F32, LANES)  # 16 float32 at byte o


def _bytes16(signed: bool):
    @intrinsic
    def load(typingctx, w, o):
        if not (is_carray(w, types.uint8) and is_int(o)):
            return None

        def codegen(context, builder, sig, args):
            v = builder.load(ptr_at(context, builder, sig.args[0], args[0], args[1], vty(ir.IntType(8))), align=1)
            return (builder.sext if signed else builder.zext)(v, vty(_I32))

        return I32x16(w, o), codegen

    return load


nib16 = _bytes16(False)  # 16 bytes, each zero-extended (both nibbles still in it)
sbyte16 = _bytes16(True)  # 16 bytes as int8, sign-extended


# ---------------------------------------------------------------- arithmetic


def binary(op: str, vt: Vec = F32x16):
    """Intrinsic (a, b: vt) -> vt, the IR instruction `op` lane-wise (`simd8` makes its int32 ones with it)."""

    @intrinsic
    def fn(typingctx, a, b):
        if not (a == vt and b == vt):
            return None

        def codegen(context, builder, sig, args):
            return getattr(builder, op)(args[0], args[1])

        return vt(a, b), codegen

    return fn


vadd = binary("fadd")
vsub = binary("fsub")
vmul = binary("fmul")


@intrinsic
def vfma(typingctx, a, b, c):
    """a*b + c with one rounding (llvm.fma: vfmadd on any FMA machine)."""
    if not (a == F32x16 and b == F32x16 and c == F32x16):
        return None

    def codegen(context, builder, sig, args):
        return _call(builder, "llvm.fma.v16f32", vty(_F32), list(args))

    return F32x16(a, b, c), codegen


@intrinsic
def vhsum(typingctx, v):
    """Sum of the 16 lanes as a fixed tree (8+8, 4+4, 2+2, 1+1)."""
    if v != F32x16:
        return None

    def codegen(context, builder, sig, args):
        return tree_reduce(builder, args[0], lambda hi, lo: builder.fadd(lo, hi))  # lo first, as before (NaN payloads)

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
        return builder.sitofp(args[0], vty(_F32))

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
            return _call(builder, "llvm.x86.avx512.permvar.sf.512", vty(_F32), [t, i])
        if AVX2:
            v8 = vty(_F32, 8)
            lo_t = builder.shuffle_vector(t, t, ir.Constant(vty(_I32, 8), list(range(8))))
            hi_t = builder.shuffle_vector(t, t, ir.Constant(vty(_I32, 8), list(range(8, 16))))
            high = builder.icmp_unsigned("!=", builder.and_(i, ir.Constant(i.type, [8] * LANES)),
                                         ir.Constant(i.type, [0] * LANES))
            halves = []
            for h in range(2):
                ih = builder.shuffle_vector(i, i, ir.Constant(vty(_I32, 8), list(range(8 * h, 8 * h + 8))))
                a = _call(builder, "llvm.x86.avx2.permps", v8, [lo_t, ih])
                b = _call(builder, "llvm.x86.avx2.permps", v8, [hi_t, ih])
                mh = builder.shuffle_vector(high, high, ir.Constant(vty(_I32, 8), list(range(8 * h, 8 * h + 8))))
                halves.append(builder.select(mh, b, a))
            return builder.shuffle_vector(halves[0], halves[1], ir.Constant(vty(_I32, 16), list(range(16))))
        i = builder.and_(i, ir.Constant(i.type, [15] * LANES))
        out = _splat(builder, builder.extract_element(t, ir.Constant(_I32, 0)))
        for k in range(1, 16):
            hit = builder.icmp_unsigned("==", i, ir.Constant(i.type, [k] * LANES))
            out = builder.select(hit, _splat(builder, builder.extract_element(t, ir.Constant(_I32, k))), out)
        return out

    return F32x16(table, idx), codegen


@intrinsic
def viota_minus8(typingctx):
    """The float lanes -8, -7, ..., 7 (q - 8 for q = lane: the values of a signed 4-bit quant)."""

    def codegen(context, builder, sig, args):
        return ir.Constant(vty(_F32), [float(k - 8) for k in range(LANES)])

    return F32x16(), codegen


@intrinsic
def viota(typingctx):
    """The float lanes 0, 1, ..., 15 (q for q = lane: the values of an unsigned 4-bit quant)."""

    def codegen(context, builder, sig, args):
        return ir.Constant(vty(_F32), [float(k) for k in range(LANES)])

    return F32x16(), codegen


@intrinsic
def vlane(typingctx, v, j):
    """Lane j of v in every lane (a constant j after unrolling becomes one vpermps/vbroadcastss)."""
    if not (v == F32x16 and is_int(j)):
        return None

    def codegen(context, builder, sig, args):
        j32 = builder.trunc(args[1], _I32) if args[1].type.width > 32 else args[1]
        return _splat(builder, builder.extract_element(args[0], j32))

    return F32x16(v, j), codegen


# ---------------------------------------------------------------- tile decoders (into a float32 buffer)


def _nibble_decoder(nbytes: int, bias: int):
    """Intrinsic dst[do:do+n] = (lo-bias)*dl - ml, dst[do+n:do+2n] = (hi-bias)*dh - mh, n bytes at src[so:].

    lo/hi are the low/high nibbles; src uint8, dst float32, offsets in elements. The bias is taken in
    integers, as the reference does (ml = mh = 0 then changes nothing, not even a -0).
    """

    @intrinsic
    def decode(typingctx, src, so, dl, ml, dh, mh, dst, do):
        if not (_src_dst_ok(src, types.uint8, dst) and _ints(so, do) and _f32s(dl, ml, dh, mh)):
            return None
        sig = types.void(src, so, dl, ml, dh, mh, dst, do)

        def codegen(context, builder, signature, args):
            s, so_, dl_, ml_, dh_, mh_, d, do_ = args
            v8 = builder.load(ptr_at(context, builder, signature.args[0], s, so_, vty(ir.IntType(8), nbytes)), align=1)
            v32 = builder.zext(v8, vty(_I32, nbytes))
            lo = builder.and_(v32, ir.Constant(v32.type, [15] * nbytes))
            hi = builder.lshr(v32, ir.Constant(v32.type, [4] * nbytes))
            fty = vty(_F32, nbytes)
            for part, nib, sc, mn in ((0, lo, dl_, ml_), (nbytes, hi, dh_, mh_)):
                nib = builder.sub(nib, ir.Constant(v32.type, [bias] * nbytes))
                scaled = builder.fmul(builder.sitofp(nib, fty), _splat(builder, sc, nbytes))
                val = builder.fsub(scaled, _splat(builder, mn, nbytes))
                off = builder.add(do_, ir.Constant(do_.type, part))
                builder.store(val, ptr_at(context, builder, signature.args[6], d, off, fty), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return decode


decode_nibbles16 = _nibble_decoder(16, 8)  # 32 signed 4-bit quants (q - 8) * d from 16 bytes
decode_nibbles32 = _nibble_decoder(32, 0)  # 64 unsigned 4-bit quants, a scale and a min per 32


@intrinsic
def decode_i8_32(typingctx, src, so, d, dst, do):
    """dst[do:do+32] = int8(src[so:so+32]) * d."""
    if not (_src_dst_ok(src, types.uint8, dst) and _ints(so, do) and _f32s(d)):
        return None
    sig = types.void(src, so, d, dst, do)

    def codegen(context, builder, signature, args):
        s, so_, d_, dd, do_ = args
        v8 = builder.load(ptr_at(context, builder, signature.args[0], s, so_, vty(ir.IntType(8), 32)), align=1)
        fty = vty(_F32, 32)
        val = builder.fmul(builder.sitofp(v8, fty), _splat(builder, d_, 32))
        builder.store(val, ptr_at(context, builder, signature.args[3], dd, do_, fty), align=4)
        return context.get_dummy_value()

    return sig, codegen


def _widen16(src_dtype, elem: ir.Type):
    """Intrinsic dst[do:do+16] = float32(src[so:so+16]) for a src of `src_dtype` (exact: fpext or copy)."""

    @intrinsic
    def widen(typingctx, src, so, dst, do):
        if not (_src_dst_ok(src, src_dtype, dst) and _ints(so, do)):
            return None
        sig = types.void(src, so, dst, do)

        def codegen(context, builder, signature, args):
            s, so_, dd, do_ = args
            v = builder.load(ptr_at(context, builder, signature.args[0], s, so_, vty(elem, 16)), align=1)
            fty = vty(_F32, 16)
            if elem != _F32:
                v = builder.fpext(v, fty)
            builder.store(v, ptr_at(context, builder, signature.args[2], dd, do_, fty), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return widen


decode_f16_16 = _widen16(types.uint16, ir.HalfType())  # src: the half bits viewed as uint16
copy_f32_16 = _widen16(types.float32, _F32)


# ---------------------------------------------------------------- scalar bit casts


def _bitcast(src: types.Type, dst: types.Type, dst_ir: ir.Type):
    """Intrinsic reinterpreting the bits of a `src` scalar as `dst` (C memcpy)."""

    @intrinsic
    def cast(typingctx, x):
        if x != src:
            return None

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], dst_ir)

        return dst(src), codegen

    return cast


f32_bits = _bitcast(types.float32, types.int32, _I32)
bits_f32 = _bitcast(types.int32, types.float32, _F32)
