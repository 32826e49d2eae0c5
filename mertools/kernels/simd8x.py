"""More byte intrinsics of the 8-bit kernels: MXFP4's value table and scales, the 16-byte copies of packing, and a
packed Q6_K's codes and scales.

    byte_table(values)       intrinsic v (B64 of nibbles) -> the bytes values[v]
    e8m0x16(w, o)            the 16 E8M0 exponent bytes at byte o as float32 2^(e - 128)
    copy16(dst, do, src, so, flip)   dst[do:do+16] = src[so:so+16] ^ flip (uint8 C arrays, unaligned)
    copy_bytes(dst, do, src, so, n)  dst[do:do+n] = src[so:so+n] by copy16 (numba's slice assignment was slow)
    q6_codes(nib, qh, k)     Q6_K's 6-bit codes: each nibble with bits 2k, 2k + 1 of its qh byte above it
    s8x16(w, o)              the 16 bytes at byte o as int8, sign-extended to int32 lanes
    lane_at(v, j)            v[j] of a float32 vector

As in `simd8`: no bounds checks (callers compute offsets from validated shapes); after editing this file delete
numba's caches of the modules that use it.
"""

from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from mertools.kernels.simd import AVX2, AVX512, F32x16, I32x16, _call, _splat, is_carray, is_int, ptr_at, vty
from mertools.kernels.simd8 import B64, _u8_at

_I8 = ir.IntType(8)
_I32 = ir.IntType(32)
_F32 = ir.FloatType()


def byte_table(values: tuple[int, ...]):
    """Intrinsic v (B64 of nibbles, 0..15) -> the bytes values[v] (16 entries, 0..255): one vpshufb on AVX-512, two
    on AVX2, a select chain elsewhere (the same bytes)."""
    if len(values) != 16 or not all(0 <= v < 256 for v in values):
        raise ValueError(f"byte_table: 16 byte values expected, got {values}")

    @intrinsic
    def lut(typingctx, v):
        if v != B64:
            return None

        def codegen(context, builder, sig, args):
            idx = args[0]
            if AVX512:
                table = ir.Constant(vty(_I8, 64), [values[i % 16] for i in range(64)])
                return _call(builder, "llvm.x86.avx512.pshuf.b.512", vty(_I8, 64), [table, idx])
            if AVX2:
                table = ir.Constant(vty(_I8, 32), [values[i % 16] for i in range(32)])
                halves = [_call(builder, "llvm.x86.avx2.pshuf.b", vty(_I8, 32), [table, builder.shuffle_vector(
                    idx, idx, ir.Constant(vty(_I32, 32), list(range(32 * h, 32 * h + 32))))]) for h in range(2)]
                return builder.shuffle_vector(halves[0], halves[1], ir.Constant(vty(_I32, 64), list(range(64))))
            out = ir.Constant(vty(_I8, 64), [values[0]] * 64)
            for k in range(1, 16):
                hit = builder.icmp_unsigned("==", idx, ir.Constant(vty(_I8, 64), [k] * 64))
                out = builder.select(hit, ir.Constant(vty(_I8, 64), [values[k]] * 64), out)
            return out

        return B64(v), codegen

    return lut


@intrinsic
def e8m0x16(typingctx, w, o):
    """The 16 E8M0 exponent bytes at byte o as float32 2^(e - 128) (ggml_e8m0_to_fp32_half: subnormal for e < 2)."""
    if not (is_carray(w, types.uint8) and is_int(o)):
        return None

    def codegen(context, builder, sig, args):
        e = builder.zext(_u8_at(sig, args, context, builder, vty(_I8, 16)), vty(_I32, 16))
        normal = builder.shl(builder.sub(e, ir.Constant(vty(_I32), [1] * 16)), ir.Constant(vty(_I32), [23] * 16))
        tiny = builder.shl(ir.Constant(vty(_I32), [0x00200000] * 16), e)
        low = builder.icmp_unsigned("<", e, ir.Constant(vty(_I32), [2] * 16))
        return builder.bitcast(builder.select(low, tiny, normal), vty(_F32))

    return F32x16(w, o), codegen


@intrinsic
def copy16(typingctx, dst, do, src, so, flip):
    if not (is_carray(dst, types.uint8) and is_carray(src, types.uint8) and is_int(do) and is_int(so) and is_int(flip)):
        return None

    def codegen(context, builder, sig, args):
        d, dof, s, sof, f = args
        v = builder.load(ptr_at(context, builder, sig.args[2], s, sof, vty(_I8, 16)), align=1)
        fb = builder.trunc(f, _I8)
        v = builder.xor(v, builder.shuffle_vector(builder.insert_element(ir.Constant(vty(_I8, 16), ir.Undefined), fb,
                                                                         ir.Constant(_I32, 0)),
                                                  ir.Constant(vty(_I8, 16), ir.Undefined), ir.Constant(vty(_I32, 16), [0] * 16)))
        builder.store(v, ptr_at(context, builder, sig.args[0], d, dof, vty(_I8, 16)), align=1)
        return context.get_dummy_value()

    return types.void(dst, do, src, so, flip), codegen


@intrinsic
def q6_codes(typingctx, nib, qh, k):
    """nib | ((qh >> 2k) & 3) << 4 of each byte (64 nibbles, their qh bytes: Q6_K's codes, 0..63)."""
    if not (nib == B64 and qh == B64 and is_int(k)):
        return None

    def codegen(context, builder, sig, args):
        n, h, kk = args
        t = vty(_I8, 64)
        shift = _splat(builder, builder.trunc(builder.shl(kk, ir.Constant(kk.type, 1)), _I8), 64)
        pair = builder.and_(builder.lshr(h, shift), ir.Constant(t, [3] * 64))
        return builder.or_(n, builder.shl(pair, ir.Constant(t, [4] * 64)))

    return B64(nib, qh, k), codegen


@intrinsic
def s8x16(typingctx, a, o):
    """The 16 bytes a[o:o+16] of a uint8 array as int8, sign-extended to int32 lanes."""
    if not (is_carray(a, types.uint8) and is_int(o)):
        return None

    def codegen(context, builder, sig, args):
        return builder.sext(_u8_at(sig, args, context, builder, vty(_I8, 16)), vty(_I32))

    return I32x16(a, o), codegen


@intrinsic
def lane_at(typingctx, v, j):
    """v[j], float32."""
    if not (v == F32x16 and is_int(j)):
        return None

    def codegen(context, builder, sig, args):
        x, jj = args
        return builder.extract_element(x, builder.trunc(jj, _I32) if jj.type.width > 32 else jj)

    return types.float32(v, j), codegen


@njit(inline="always", nogil=True, cache=True)
def copy_bytes(dst, do, src, so, n):
    """dst[do:do + n] = src[so:so + n] (uint8 C arrays) by 16-byte vectors, then the tail bytes."""
    for k in range(0, n - 15, 16):
        copy16(dst, do + k, src, so + k, 0)
    for k in range(n - n % 16, n):
        dst[do + k] = src[so + k]


__all__ = ["byte_table", "copy16", "copy_bytes", "e8m0x16", "lane_at", "q6_codes", "s8x16"]
