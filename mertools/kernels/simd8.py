"""LLVM-IR intrinsics for the 8-bit-activation kernels: 64-byte vectors and their integer dot product.

The exact kernels (`simd`) widen every weight to float32; these keep weights and quantized
activations as bytes and multiply them in integers, as ggml's vec_dot kernels do:

    bytes64(w, o)            the 64 bytes w[o:o+64] of a uint8 array (unaligned)
    bytes16x4(w, o)          the 16 bytes w[o:o+16] in each of the four 16-byte quarters
    lo4(v), hi4(v)           each byte's low / high nibble
    dpbusd(acc, u, s)        acc[i] + sum over j < 4 of u[4i+j] * s[4i+j], u unsigned bytes below 128, s signed
    dpbusd_u8(acc, u, s)     the same for any unsigned bytes (Q8_0's packed quants)
    dpbusd2(acc, u, s, v, t) acc + u.s + v.t for u, v below 64 (on AVX2 one vpmaddwd for the two products)
    ivload4x4(a, i)          a[i:i+4] of an int32 array in each quarter, as int32 lanes (`simd.I32x16`)
    ishl, ishr, iand, iors, isub (v, n): int32 lanes with n;  ior, imul, iadd (a, b): lane-wise
    row_sums4(a, b, c, d)    four groups' lanes summed per row: lane 4r + g = group g's row r (its quarter r)
    transpose4x4(v)          lane 4i + j <- lane 4j + i (float32): row_sums4's lanes back to rows in order
    ipairs_high8, fold_sm, pair_quarters, lanes8, lane_diff: the K types' integer super-block sums (see `dtypes/_k8.py`)
    bcast4(a, o), u8x16(a, o), isplat(a, i): a packed Q4_K's loads (4 activation bytes in every lane, 16 rows' bytes)

and for the K-quant kernels, which read the file's super-blocks: bytes32x2 (two 32-byte runs), izero, imul,
pick_A_B (a block's 6-bit scales spread over the lanes whose weights they scale);
q5_codes / q6_low / q6_high (Q5_K's and Q6_K's codes), bsplat32, ineg, sbytes4x4. MXFP4's and packing's are in
`simd8x.py`, the ones that quantize the activations (ggml's q8_0) in `q8act.py`.

`dpbusd` is one vpdpbusd with AVX-512 VNNI; with AVX2, vpmaddubsw then vpmaddwd by ones (its u below 128: no
int16 saturation); `dpbusd_u8` there widens the bytes to int16 for vpmaddwd (4x faster than widening to int32);
elsewhere the same sums come from widening multiplies (integers: every path gives the same values). As in `simd`,
no bounds checks: callers compute offsets from validated shapes, and the tests hold every kernel to its numpy twin.
After editing this file, delete the __pycache__/*.nbi of the modules that use it (numba's cache is keyed on each
kernel's own file's contents), and change those modules' text so that other machines' caches drop it too.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic, models, register_model

from mertools.kernels.simd import AVX2, F32x16, I32x16, _call, _host_has, _splat, binary, is_carray, is_int, ptr_at, vty

VNNI = _host_has("avx512f", "avx512bw", "avx512vl", "avx512vnni")
_I8 = ir.IntType(8)
_I16 = ir.IntType(16)
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


def _dpbusd_ir(builder, a, uu, ss):  # noqa: ANN001, ANN202 - llvmlite values
    """acc + u.s for any unsigned bytes u (`dpbusd_u8`; `dpbusd` off AVX2 or with VNNI)."""
    if VNNI:
        return _call(builder, "llvm.x86.avx512.vpdpbusd.512", vty(_I32), [a, uu, ss])
    if AVX2:  # bytes widened to int16, vpmaddwd sums product pairs (exact: |pair| <= 65280), then pairs of pairs
        u16, s16 = builder.zext(uu, vty(_I16, 64)), builder.sext(ss, vty(_I16, 64))
        parts = []
        for h in range(4):
            q = ir.Constant(vty(_I32, 16), list(range(16 * h, 16 * h + 16)))
            parts.append(_call(builder, "llvm.x86.avx2.pmadd.wd", vty(_I32, 8),
                               [builder.shuffle_vector(u16, u16, q), builder.shuffle_vector(s16, s16, q)]))
        lo = builder.shuffle_vector(parts[0], parts[1], ir.Constant(vty(_I32, 16), list(range(16))))
        hi = builder.shuffle_vector(parts[2], parts[3], ir.Constant(vty(_I32, 16), list(range(16))))
        even = builder.shuffle_vector(lo, hi, ir.Constant(vty(_I32, 16), [2 * i for i in range(16)]))
        odd = builder.shuffle_vector(lo, hi, ir.Constant(vty(_I32, 16), [2 * i + 1 for i in range(16)]))
        return builder.add(a, builder.add(even, odd))
    p = builder.mul(builder.zext(uu, vty(_I32, 64)), builder.sext(ss, vty(_I32, 64)))
    for j in range(4):
        part = builder.shuffle_vector(p, p, ir.Constant(vty(_I32, 16), [4 * i + j for i in range(16)]))
        a = builder.add(a, part)
    return a


@intrinsic
def dpbusd_u8(typingctx, acc, u, s):
    """`dpbusd` for any unsigned bytes u (Q8_0's packed quants, int8 + 128)."""
    if not (acc == I32x16 and u == B64 and s == B64):
        return None

    def codegen(context, builder, sig, args):
        return _dpbusd_ir(builder, *args)

    return I32x16(acc, u, s), codegen


def _maddubs(builder, uu, ss, h: int):  # noqa: ANN001, ANN202 - llvmlite values
    """vpmaddubsw of the h-th 32 bytes of u (unsigned) and s (signed): 16 int16 sums of adjacent products."""
    q = ir.Constant(vty(_I32, 32), list(range(32 * h, 32 * h + 32)))
    return _call(builder, "llvm.x86.avx2.pmadd.ub.sw", vty(_I16, 16),
                 [builder.shuffle_vector(uu, uu, q), builder.shuffle_vector(ss, ss, q)])


def _add_pair_sums(builder, a, halves):  # noqa: ANN001, ANN202 - llvmlite values
    """a + the two halves' int16 sums added in pairs (a vpmaddwd by ones each), lanes 0..7 from the first."""
    ones = ir.Constant(vty(_I16, 16), [1] * 16)
    w = [_call(builder, "llvm.x86.avx2.pmadd.wd", vty(_I32, 8), [p, ones]) for p in halves]
    return builder.add(a, builder.shuffle_vector(w[0], w[1], ir.Constant(vty(_I32, 16), list(range(16)))))


@intrinsic
def dpbusd(typingctx, acc, u, s):
    """acc[i] + u[4i..4i+3] . s[4i..4i+3] for u < 128 (nibbles, the K types' codes, grid points): with AVX2 and no
    VNNI one vpmaddubsw then a vpmaddwd by ones, whose int16 pair sums cannot saturate there (|2 * 127 * -128| <
    2^15; its speed: docs/BENCHMARKS.md "Decode: notes"). Bytes from 128 up take `dpbusd_u8`."""
    if not (acc == I32x16 and u == B64 and s == B64):
        return None

    def codegen(context, builder, sig, args):
        a, uu, ss = args
        if VNNI or not AVX2:
            return _dpbusd_ir(builder, a, uu, ss)
        return _add_pair_sums(builder, a, [_maddubs(builder, uu, ss, h) for h in range(2)])

    return I32x16(acc, u, s), codegen


@intrinsic
def dpbusd2(typingctx, acc, u, s, v, t):
    """acc + u.s + v.t (`dpbusd` twice) for u, v below 64 (nibbles, Q6_K's codes): with AVX2 and no VNNI the two
    vpmaddubsw's int16 pair sums are added in int16 (|sum| <= 2 * 2 * 63 * 128 = 32256 < 2^15) and meet one
    vpmaddwd by ones, not two: the same integers as two `dpbusd`."""
    if not (acc == I32x16 and u == B64 and s == B64 and v == B64 and t == B64):
        return None

    def codegen(context, builder, sig, args):
        a, uu, ss, vv, tt = args
        if VNNI or not AVX2:
            return _dpbusd_ir(builder, _dpbusd_ir(builder, a, uu, ss), vv, tt)
        return _add_pair_sums(builder, a, [builder.add(_maddubs(builder, uu, ss, h), _maddubs(builder, vv, tt, h))
                                           for h in range(2)])

    return I32x16(acc, u, s, v, t), codegen


@intrinsic
def ivload4x4(typingctx, a, i):
    """a[i:i+4] of an int32 array in each of the four quarters."""
    if not (is_carray(a, types.int32) and is_int(i)):
        return None

    def codegen(context, builder, sig, args):
        v = builder.load(ptr_at(context, builder, sig.args[0], args[0], args[1], vty(_I32, 4)), align=4)
        return builder.shuffle_vector(v, v, ir.Constant(vty(_I32, 16), [i % 4 for i in range(16)]))

    return I32x16(a, i), codegen


def _in_quarters(builder, a, b, pattern: list[int]):
    """The lanes of a and b (int32 x 16 each, b's numbered from 16) picked within each 128-bit quarter: pattern's
    4 entries (< 8) name the lanes of one quarter (a's 0..3, b's 4..7) and repeat in every quarter."""
    idx = [4 * k + p if p < 4 else 16 + 4 * k + p - 4 for k in range(4) for p in pattern]
    return builder.shuffle_vector(a, b, ir.Constant(vty(_I32, 16), idx))


@intrinsic
def row_sums4(typingctx, a, b, c, d):
    """Four groups' dot-product lanes (each: quarter r holds row r's 4 partial sums) -> lane 4r + g holds the sum of
    group g's quarter r (a = group 0 .. d = group 3): vpunpck and vpaddd, no lane crosses a quarter."""
    if not all(t == I32x16 for t in (a, b, c, d)):
        return None

    def codegen(context, builder, sig, args):
        a, b, c, d = args
        ab = builder.add(_in_quarters(builder, a, b, [0, 4, 1, 5]), _in_quarters(builder, a, b, [2, 6, 3, 7]))
        cd = builder.add(_in_quarters(builder, c, d, [0, 4, 1, 5]), _in_quarters(builder, c, d, [2, 6, 3, 7]))
        return builder.add(_in_quarters(builder, ab, cd, [0, 1, 4, 5]), _in_quarters(builder, ab, cd, [2, 3, 6, 7]))

    return I32x16(a, b, c, d), codegen


@intrinsic
def ipairs_high8(typingctx, a, i):
    """a[i + 2j] + a[i + 2j + 1] of an int32 array in lane 8 + j, j < 8, zeros in lanes 0..7 (q8_K's per-16 sums
    of a super-block as its 8 sub-blocks' of 32)."""
    if not (is_carray(a, types.int32) and is_int(i)):
        return None

    def codegen(context, builder, sig, args):
        v = builder.load(ptr_at(context, builder, sig.args[0], args[0], args[1], vty(_I32, 16)), align=4)
        zero = ir.Constant(vty(_I32), [0] * 16)
        even = builder.shuffle_vector(zero, v, ir.Constant(vty(_I32), list(range(8)) + [16 + 2 * j for j in range(8)]))
        odd = builder.shuffle_vector(zero, v, ir.Constant(vty(_I32), list(range(8)) + [17 + 2 * j for j in range(8)]))
        return builder.add(even, odd)

    return I32x16(a, i), codegen


@intrinsic
def fold_sm(typingctx, s, m):
    """Lanes 0..7: s[l] + s[l + 8]; lanes 8..15: m's (a K row's dot products and its mins' products, one vector)."""
    if not (s == I32x16 and m == I32x16):
        return None

    def codegen(context, builder, sig, args):
        a, b = args
        swapped = builder.shuffle_vector(a, a, ir.Constant(vty(_I32), list(range(8, 16)) + list(range(8))))
        low = builder.add(a, swapped)
        return builder.shuffle_vector(low, b, ir.Constant(vty(_I32), list(range(8)) + list(range(24, 32))))

    return I32x16(s, m), codegen


@intrinsic
def pair_quarters(typingctx, t):
    """t + t with quarters 0, 1 and 2, 3 swapped: lanes 0..3 (and 4..7) the sums of quarters 0 and 1, lanes 8..11
    (12..15) of quarters 2 and 3."""
    if t != I32x16:
        return None

    def codegen(context, builder, sig, args):
        pat = [4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11]
        return builder.add(args[0], builder.shuffle_vector(args[0], args[0], ir.Constant(vty(_I32), pat)))

    return I32x16(t), codegen


@intrinsic
def lanes8(typingctx, a, b, c, d, e, f, g, h):
    """float32 lanes [a, b, c, d, 0, 0, 0, 0, e, f, g, h, 0, 0, 0, 0]."""
    if not all(t == types.float32 for t in (a, b, c, d, e, f, g, h)):
        return None

    def codegen(context, builder, sig, args):
        v = ir.Constant(vty(_F32), [0.0] * 16)
        for lane, x in zip((0, 1, 2, 3, 8, 9, 10, 11), args, strict=True):
            v = builder.insert_element(v, x, ir.Constant(_I32, lane))
        return v

    return F32x16(a, b, c, d, e, f, g, h), codegen


@intrinsic
def lane_diff(typingctx, v, j):
    """v[j] - v[8 + j], float32."""
    if not (v == F32x16 and is_int(j)):
        return None

    def codegen(context, builder, sig, args):
        x, jj = args
        j32 = builder.trunc(jj, _I32) if jj.type.width > 32 else jj
        return builder.fsub(builder.extract_element(x, j32), builder.extract_element(x, builder.add(j32, ir.Constant(_I32, 8))))

    return types.float32(v, j), codegen


@intrinsic
def bcast4(typingctx, a, o):
    """The 4 bytes a[o:o+4] of a uint8 array in every 4-byte lane (a vpbroadcastd: 64 bytes)."""
    if not (is_carray(a, types.uint8) and is_int(o)):
        return None

    def codegen(context, builder, sig, args):
        v = builder.load(ptr_at(context, builder, sig.args[0], args[0], args[1], _I32), align=1)
        return builder.bitcast(_splat(builder, v), vty(_I8, 64))

    return B64(a, o), codegen


@intrinsic
def u8x16(typingctx, a, o):
    """The 16 bytes a[o:o+16] of a uint8 array, zero-extended to int32 lanes."""
    if not (is_carray(a, types.uint8) and is_int(o)):
        return None

    def codegen(context, builder, sig, args):
        return builder.zext(_u8_at(sig, args, context, builder, vty(_I8, 16)), vty(_I32))

    return I32x16(a, o), codegen


@intrinsic
def isplat(typingctx, a, i):
    """a[i] of an int32 array in every lane."""
    if not (is_carray(a, types.int32) and is_int(i)):
        return None

    def codegen(context, builder, sig, args):
        return _splat(builder, builder.load(ptr_at(context, builder, sig.args[0], args[0], args[1], _I32), align=4))

    return I32x16(a, i), codegen


def _lanes_of(pattern: list[int], vt=I32x16):  # noqa: ANN001 - a numba vector type
    """Intrinsic v -> the lanes v[pattern[i]] of a vector of type vt (a constant shuffle)."""

    @intrinsic
    def pick(typingctx, v):
        if v != vt:
            return None

        def codegen(context, builder, sig, args):
            return builder.shuffle_vector(args[0], args[0], ir.Constant(vty(_I32), pattern))

        return vt(v), codegen

    return pick


transpose4x4 = _lanes_of([4 * (m % 4) + m // 4 for m in range(16)], F32x16)  # lane 4i + j <- 4j + i: rows in order


# a K-quant super-block's [sc_0..sc_7, m_0..m_7] lanes spread over the lanes of the dot products that need them
pick_0_2 = _lanes_of([0] * 8 + [2] * 8)
pick_1_3 = _lanes_of([1] * 8 + [3] * 8)
pick_4_6 = _lanes_of([4] * 8 + [6] * 8)
pick_5_7 = _lanes_of([5] * 8 + [7] * 8)


def _int_scalar_op(op: str):
    """Intrinsic (v: I32x16, n: int) -> I32x16, `op` of each lane with n (splat)."""

    @intrinsic
    def fn(typingctx, v, n):
        if not (v == I32x16 and is_int(n)):
            return None

        def codegen(context, builder, sig, args):
            vec, k = args
            k = builder.trunc(k, _I32) if k.type.width > 32 else (builder.sext(k, _I32) if k.type.width < 32 else k)
            return getattr(builder, op)(vec, _splat(builder, k))

        return I32x16(v, n), codegen

    return fn


ishl = _int_scalar_op("shl")  # v << n
ishr = _int_scalar_op("lshr")  # v >> n (logical)
iand = _int_scalar_op("and_")  # v & m
isub = _int_scalar_op("sub")  # v - k
iors = _int_scalar_op("or_")  # v | m


ior = binary("or_", I32x16)  # a | b
imul = binary("mul", I32x16)  # a * b (callers keep products in range)
iadd = binary("add", I32x16)  # a + b (likewise)


@intrinsic
def izero(typingctx):
    def codegen(context, builder, sig, args):
        return ir.Constant(vty(_I32), [0] * 16)

    return I32x16(), codegen


@intrinsic
def bytes32x2(typingctx, w, o1, o2):
    """The 32 bytes at o1 then the 32 at o2 of a uint8 array."""
    if not (is_carray(w, types.uint8) and is_int(o1) and is_int(o2)):
        return None

    def codegen(context, builder, sig, args):
        a = builder.load(ptr_at(context, builder, sig.args[0], args[0], args[1], vty(_I8, 32)), align=1)
        b = builder.load(ptr_at(context, builder, sig.args[0], args[0], args[2], vty(_I8, 32)), align=1)
        return builder.shuffle_vector(a, b, ir.Constant(vty(_I32, 64), list(range(64))))

    return B64(w, o1, o2), codegen


def _six_bits(high: bool):
    """Intrinsic (ql, qh) -> Q6_K's 6-bit codes of a half super-block's 64 low-nibble bytes and its 32 high-pair bytes
    given twice: low nibbles (high=False: weights 0-63 of the half) or high ones (64-127), with their 2-bit pairs."""
    shifts = [4] * 32 + [6] * 32 if high else [0] * 32 + [2] * 32

    @intrinsic
    def fn(typingctx, ql, qh):
        if not (ql == B64 and qh == B64):
            return None

        def codegen(context, builder, sig, args):
            lo, hi = args
            t = vty(_I8, 64)
            nib = builder.lshr(lo, ir.Constant(t, [4] * 64)) if high else builder.and_(lo, ir.Constant(t, [15] * 64))
            pair = builder.and_(builder.lshr(hi, ir.Constant(t, shifts)), ir.Constant(t, [3] * 64))
            return builder.or_(nib, builder.shl(pair, ir.Constant(t, [4] * 64)))

        return B64(ql, qh), codegen

    return fn


q6_low = _six_bits(False)
q6_high = _six_bits(True)


@intrinsic
def q5_codes(typingctx, nib, qh, k):
    """Q5_K's 5-bit codes of 64 nibbles (two 32-byte chunks' low or high nibbles: sub-blocks k and k + 2) with their
    fifth bits, bit k (first 32 bytes) and k + 2 (last 32) of qh (its 32 bytes given twice)."""
    if not (nib == B64 and qh == B64 and is_int(k)):
        return None

    def codegen(context, builder, sig, args):
        n, h, kk = args
        t = vty(_I8, 64)
        k8 = builder.trunc(kk, _I8)
        shift = builder.add(_splat(builder, k8, 64), ir.Constant(t, [0] * 32 + [2] * 32))
        bit = builder.and_(builder.lshr(h, shift), ir.Constant(t, [1] * 64))
        return builder.or_(n, builder.shl(bit, ir.Constant(t, [4] * 64)))

    return B64(nib, qh, k), codegen


@intrinsic
def bsplat32(typingctx):
    """64 bytes of 32 (Q6_K's code offset)."""

    def codegen(context, builder, sig, args):
        return ir.Constant(vty(_I8, 64), [32] * 64)

    return B64(), codegen


@intrinsic
def ineg(typingctx, v):
    if v != I32x16:
        return None

    def codegen(context, builder, sig, args):
        return builder.neg(args[0])

    return I32x16(v), codegen


@intrinsic
def sbytes4x4(typingctx, w, o):
    """The 4 int8 at byte o of a uint8 array, sign-extended, each in the 4 int32 lanes of its quarter."""
    if not (is_carray(w, types.uint8) and is_int(o)):
        return None

    def codegen(context, builder, sig, args):
        v = builder.sext(_u8_at(sig, args, context, builder, vty(_I8, 4)), vty(_I32, 4))
        return builder.shuffle_vector(v, v, ir.Constant(vty(_I32), [i // 4 for i in range(16)]))

    return I32x16(w, o), codegen


__all__ = ["B64", "VNNI", "bcast4", "bsplat32", "bytes16x4", "bytes32x2", "bytes64", "dpbusd", "fold_sm", "hi4",
           "iadd", "iand", "ipairs_high8", "imul", "ineg", "ior", "iors", "ishl", "ishr", "isplat", "isub", "ivload4x4",
           "izero", "lane_diff", "lanes8", "lo4", "pair_quarters", "pick_0_2", "pick_1_3", "pick_4_6", "pick_5_7",
           "q5_codes", "q6_high", "q6_low", "row_sums4", "sbytes4x4", "transpose4x4", "u8x16"]
