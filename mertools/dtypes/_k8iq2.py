"""IQ2_XXS's byte intrinsics (shared with its float decoders in iq2_xxs.py) and its 8-bit-activation kernels
(kernels/int8.py), which read the file's super-blocks as they are.

A super-block (66 bytes): d (f16), then per group g of 32 weights two little-endian uint32 at 2 + 8g: aux0, whose
bytes are 4 indices into the grid of 256 points of 8 unsigned coordinates (8, 25 or 43: GRID_U64), and aux1, whose
bits 7l..7l+6 index the sign pattern of point l (ggml's ksigns_iq2xs: the 7 bits plus their parity as bit 7) and
bits 28-31 are the scale ls. Weight 8l + j of group g is d * (0.5 + ls) * 0.25 * grid[aux0 byte l][j], negated when
bit j of point l's pattern is set.

`block_masks` turns a super-block's 8 aux1 words into each group's 32 sign bits (bit i: weight i negative; the
parity computed, not looked up) and 2 ls + 1 in one vector. The 8-bit kernels meet the activations' q8_K quants
(kernels/act8.py) with ggml_vec_dot_iq2_xxs_q8_K's integers: per 64 weights (groups 2k, 2k + 1) one vector of 8
grid points (`grid64`: 8 loads from a 2 KB table) and the activations negated where the weights are (`signed_x`:
the 64 sign bits as a mask, one masked subtract with AVX-512) in one vpdpbusd (grid unsigned, activations signed,
as ggml's maddubs); `row_sums4` of the 4 dot products puts group 2k + r // 2's partial sum in lane 4r + k, which
meets 2 ls + 1 in one multiply. Per row and super-block the integer T = sum_g (2 ls_g + 1) * (signed grid . x)_g;
then acc += T * (d * dk) in block order, the result 0.125 * acc: ggml's generic code (its AVX2 code sums 8 float
lanes). `iq2_xxs_int8_reference` is the kernels in numpy, bit for bit (tests/test_iq2_xxs.py).

numba's cache is keyed on each kernel's own file: after editing this one, delete the __pycache__ entries of
kernels/int8, experts8, step and dispatch (a touch does not do it).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from mertools.kernels.common import MATVEC_JIT, R, group_rows, group_store_row, prefetch_lines
from mertools.kernels.simd import I32x16, half_at, is_carray, is_int, ptr_at, vadd, vmul, vsplat, vtof, vty, vzero
from mertools.kernels.simd8 import B64, bytes64, dpbusd, fold_sm, imul, izero, lanes8, pair_quarters, row_sums4
from mertools.kernels.simd8x import lane_at

from ._iq2grid import GRID, GRID_U64, KSIGNS
from ._k8low import halves4

# simd8.dpbusd takes unsigned bytes below 128 (vpmaddubsw on AVX2): the codes here are at most 63. numba caches the
# intrinsics' code inside this file's kernels, keyed on its contents: this note came with that AVX2 path.

BYTES = 66
_I1, _I8, _I16, _I32, _I64 = (ir.IntType(n) for n in (1, 8, 16, 32, 64))
_GRID_NAME = "mertools_iq2_xxs_grid"


# ---------------------------------------------------------------- numpy


def signed_grid(b: np.ndarray) -> np.ndarray:
    """b uint8 (..., 66) super-blocks -> int64 (..., 8, 32): each group's grid values with their signs."""
    aux1 = np.ascontiguousarray(b[..., 2:]).view("<u4")[..., 1::2].astype(np.int64)  # (..., 8)
    signs = KSIGNS[(aux1[..., None] >> np.array([0, 7, 14, 21])) & 127]  # (..., 8, 4): one byte per grid point
    neg = (signs[..., None] >> np.arange(8, dtype=np.uint8)) & 1  # (..., 8, 4, 8)
    g = GRID[b[..., 2:].reshape(*b.shape[:-1], 8, 8)[..., :4]].astype(np.int64)  # aux0's bytes index the grid
    return np.where(neg == 1, -g, g).reshape(*b.shape[:-1], 8, 32)


def iq2_xxs_int8_reference(kq: np.ndarray, kd: np.ndarray, ks: np.ndarray, w2: np.ndarray) -> np.ndarray:
    """`iq2_xxs_group` in numpy (ks unused): kq int32 (n, cols/256, 256) the activations' q8_K quants, kd float32
    (n, cols/256) their scales, w2 uint8 (rows, row_bytes) -> float32 (n, rows). Per row and super-block the integer
    T = sum_g (2 ls_g + 1) * (signed grid . x)_g, then T * (d * dk) added to one float32 sum in block order, times
    0.125 at the end (ggml_vec_dot_iq2_xxs_q8_K_generic)."""
    rows = w2.shape[0]
    b = np.asarray(w2, np.uint8).reshape(rows, -1, BYTES)
    nb = b.shape[1]
    d = np.ascontiguousarray(b[..., :2]).view("<f2").astype(np.float32)[..., 0]  # (rows, nb)
    sc = 2 * (np.ascontiguousarray(b[..., 2:]).view("<u4")[..., 1::2].astype(np.int64) >> 28) + 1  # (rows, nb, 8)
    sg = signed_grid(b)
    out = np.empty((kq.shape[0], rows), np.float32)
    for i in range(kq.shape[0]):
        t = ((sg * kq[i].reshape(nb, 8, 32)).sum(-1) * sc).sum(-1)  # exact: |T| < 2^31
        acc = np.zeros(rows, np.float32)
        for blk in range(nb):  # block order, one float32 operation at a time
            acc = acc + t[:, blk].astype(np.float32) * (d[:, blk] * kd[i, blk])
        out[i] = np.float32(0.125) * acc
    return out


# ---------------------------------------------------------------- intrinsics


def _const(t: ir.Type, values: list[int]) -> ir.Constant:
    return ir.Constant(vty(t, len(values)), values)


def grid_entry(builder, w_ptr, at):
    """The grid point (i64: its 8 coordinate bytes) indexed by the byte at w_ptr + at (an i8 pointer): one load
    from the table, a constant of the module (built from GRID_U64: no copy in the source)."""
    mod = builder.module
    try:
        table = mod.get_global(_GRID_NAME)
    except KeyError:
        table = ir.GlobalVariable(mod, ir.ArrayType(_I64, 256), _GRID_NAME)
        table.linkage = "internal"
        table.global_constant = True
        table.initializer = ir.Constant(ir.ArrayType(_I64, 256), [int(v) for v in GRID_U64])
    idx = builder.zext(builder.load(builder.gep(w_ptr, [at]), align=1), _I64)
    return builder.load(builder.gep(table, [ir.Constant(_I64, 0), idx]), align=8)


def byte_ptr(context, builder, sig, args):
    return ptr_at(context, builder, sig.args[0], args[0], args[1], _I8)


def index_base(builder, ptr):
    """ptr through an empty asm statement: LLVM no longer sees that the grid indices it loads are bytes of the 64
    it loaded for `block_masks`, and loads each (one load port uop) instead of extracting it from that vector (vpextrb:
    a shuffle-port uop, the port these kernels are short of; llvm-mca: 10% fewer cycles)."""
    return builder.asm(ir.FunctionType(ptr.type, [ptr.type]), "", "=r,0", [ptr], False)


@intrinsic
def block_masks(typingctx, w, o):
    """The super-block at byte o: lanes 0-7 group g's 32 sign bits (bit 8l + j: bit j of point l's pattern), lanes
    8-15 its 2 ls + 1. One 64-byte load of the groups' words."""
    if not (is_carray(w, types.uint8) and is_int(o)):
        return None

    def codegen(context, builder, sig, args):
        at = builder.add(args[1], ir.Constant(args[1].type, 2))
        v = builder.load(ptr_at(context, builder, sig.args[0], args[0], at, vty(_I32)), align=1)
        a = builder.shuffle_vector(v, v, _const(_I32, [2 * g + 1 for g in range(8)]))  # aux1 of each group

        def c8(x: int) -> ir.Constant:
            return _const(_I32, [x] * 8)

        t = builder.and_(a, c8(0x7F))
        for lane in range(1, 4):  # byte l: bits 7l..7l+6
            t = builder.or_(t, builder.and_(builder.shl(a, c8(lane)), c8(0x7F << (8 * lane))))
        p = builder.xor(t, builder.lshr(t, c8(4)))  # each byte's parity in its bit 0 (higher bits mixed, masked off)
        p = builder.xor(p, builder.lshr(p, c8(2)))
        p = builder.xor(p, builder.lshr(p, c8(1)))
        m = builder.or_(t, builder.shl(builder.and_(p, c8(0x01010101)), c8(7)))
        sc = builder.or_(builder.shl(builder.lshr(a, c8(28)), c8(1)), c8(1))
        return builder.shuffle_vector(m, sc, _const(_I32, list(range(16))))

    return I32x16(w, o), codegen


@intrinsic
def grid64(typingctx, w, o):
    """The 8 grid points (64 unsigned bytes) of two groups: indices at bytes o..o+3 and o+8..o+11."""
    if not (is_carray(w, types.uint8) and is_int(o)):
        return None

    def codegen(context, builder, sig, args):
        base = index_base(builder, byte_ptr(context, builder, sig, args))
        v = ir.Constant(vty(_I64, 8), ir.Undefined)
        for j, at in enumerate((0, 1, 2, 3, 8, 9, 10, 11)):
            v = builder.insert_element(v, grid_entry(builder, base, ir.Constant(_I64, at)), ir.Constant(_I32, j))
        return builder.bitcast(v, vty(_I8, 64))

    return B64(w, o), codegen


@intrinsic
def signed_x(typingctx, x, m, k):
    """x (64 activation quants of groups 2k, 2k + 1) negated where the weights are: the sign bits of lanes 2k and
    2k + 1 of m (`block_masks`) as a 64-lane mask (q8_K quants are within +-127: no overflow)."""
    if not (x == B64 and m == I32x16 and is_int(k)):
        return None

    def codegen(context, builder, sig, args):
        xv, mv, kk = args
        kk = builder.trunc(kk, _I32) if kk.type.width > 32 else kk
        bits = builder.extract_element(builder.bitcast(mv, vty(_I64, 8)), kk)
        neg = builder.sub(ir.Constant(vty(_I8, 64), [0] * 64), xv)
        return builder.select(builder.bitcast(bits, vty(_I1, 64)), neg, xv)

    return B64(x, m, k), codegen


# lane 4r + k of row_sums4(dot_0..dot_3) holds group 2k + r // 2: its 2 ls + 1 (lanes 8 + g of block_masks)
_SCALE_LANES = [8 + 2 * (lane % 4) + (lane // 4) // 2 for lane in range(16)]


@intrinsic
def lane_scales(typingctx, m):
    if m != I32x16:
        return None

    def codegen(context, builder, sig, args):
        return builder.shuffle_vector(args[0], args[0], _const(_I32, _SCALE_LANES))

    return I32x16(m), codegen


# ---------------------------------------------------------------- kernels


@njit(inline="always", **MATVEC_JIT)
def _block_t(wr, o, x0, x1, x2, x3):
    """One row's super-block at o against an activation block's 4 vectors: 16 int32 lanes summing to T."""
    m = block_masks(wr, o)
    z = izero()
    dots = row_sums4(dpbusd(z, grid64(wr, o + 2), signed_x(x0, m, 0)), dpbusd(z, grid64(wr, o + 18), signed_x(x1, m, 1)),
                     dpbusd(z, grid64(wr, o + 34), signed_x(x2, m, 2)), dpbusd(z, grid64(wr, o + 50), signed_x(x3, m, 3)))
    return imul(dots, lane_scales(m))


@njit(inline="always", **MATVEC_JIT)
def _fold4(v0, v1, v2, v3):
    """4 rows' `_block_t` vectors folded: row r's T in lane r, lanes 8-15 zero."""
    return fold_sm(pair_quarters(row_sums4(v0, v1, v2, v3)), izero())


@njit(**MATVEC_JIT)
def iq2_xxs_group(kq, kd, i, w, r0, out, io):
    """out[io, r0:r0+4] = W[r0:r0+4] @ x for the q8_K activation row i of (kq, kd): the 4 rows' T (`_fold4`) times
    d_r * dk, added to the rows' sums, which are scaled by 0.125 at the end."""
    w0, w1, w2, w3 = group_rows(w, r0)
    acc = vzero()
    ahead = (r0 + R) * w.shape[1]
    for blk in range(kd.shape[1]):
        o = BYTES * blk
        prefetch_lines(w, ahead + 4 * o, 4 * BYTES)
        xo = kq.shape[1] * i + 256 * blk
        x0, x1, x2, x3 = bytes64(kq, xo), bytes64(kq, xo + 64), bytes64(kq, xo + 128), bytes64(kq, xo + 192)
        t = _fold4(_block_t(w0, o, x0, x1, x2, x3), _block_t(w1, o, x0, x1, x2, x3), _block_t(w2, o, x0, x1, x2, x3),
                   _block_t(w3, o, x0, x1, x2, x3))
        acc = vadd(acc, vmul(vtof(t), vmul(halves4(w0, w1, w2, w3, o, False), vsplat(kd[i, blk]))))
    acc = vmul(acc, vsplat(np.float32(0.125)))
    group_store_row(out, io, r0, lane_at(acc, 0), lane_at(acc, 1), lane_at(acc, 2), lane_at(acc, 3))


@njit(inline="always", **MATVEC_JIT)
def _t_x(g0, g1, g2, g3, m, sc, kq, i, blk):
    """A weight row's decoded super-block (grid vectors g_k, masks m, lane scales sc) against block blk of
    activation row i: `_block_t`'s lanes."""
    xo = kq.shape[1] * i + 256 * blk
    z = izero()
    dots = row_sums4(dpbusd(z, g0, signed_x(bytes64(kq, xo), m, 0)), dpbusd(z, g1, signed_x(bytes64(kq, xo + 64), m, 1)),
                     dpbusd(z, g2, signed_x(bytes64(kq, xo + 128), m, 2)),
                     dpbusd(z, g3, signed_x(bytes64(kq, xo + 192), m, 3)))
    return imul(dots, sc)


@njit(**MATVEC_JIT)
def _rows4(g0, g1, g2, g3, m, sc, d, kq, kd, i0, i1, i2, i3, blk, acc):
    """`iq2_xxs_group`'s step for one weight row against activation rows i0..i3 (lanes 0..3)."""
    t = _fold4(_t_x(g0, g1, g2, g3, m, sc, kq, i0, blk), _t_x(g0, g1, g2, g3, m, sc, kq, i1, blk),
               _t_x(g0, g1, g2, g3, m, sc, kq, i2, blk), _t_x(g0, g1, g2, g3, m, sc, kq, i3, blk))
    z = np.float32(0.0)
    dk = lanes8(kd[i0, blk], kd[i1, blk], kd[i2, blk], kd[i3, blk], z, z, z, z)
    return vadd(acc, vmul(vtof(t), vmul(lanes8(d, d, d, d, z, z, z, z), dk)))


@njit(**MATVEC_JIT)
def iq2_xxs_rows(kq, kd, i0, w, r, out):
    """out[i0:i0+8, r] = W[r] @ x_i for the q8_K activation rows i0..i0+7 (fewer past the last): each the bits of
    `iq2_xxs_group`'s, the weight row's grid points and signs decoded once per block for the 8."""
    wr = w[r]
    last = kq.shape[0] - 1
    i1, i2, i3, i4 = min(i0 + 1, last), min(i0 + 2, last), min(i0 + 3, last), min(i0 + 4, last)  # past the last:
    i5, i6, i7 = min(i0 + 5, last), min(i0 + 6, last), min(i0 + 7, last)  # computed, not stored
    a = vzero()
    b = vzero()
    for blk in range(kd.shape[1]):
        o = BYTES * blk
        m = block_masks(wr, o)
        g0, g1, g2, g3 = grid64(wr, o + 2), grid64(wr, o + 18), grid64(wr, o + 34), grid64(wr, o + 50)
        sc, d = lane_scales(m), half_at(wr, o)
        a = _rows4(g0, g1, g2, g3, m, sc, d, kq, kd, i0, i1, i2, i3, blk, a)
        b = _rows4(g0, g1, g2, g3, m, sc, d, kq, kd, i4, i5, i6, i7, blk, b)
    eighth = vsplat(np.float32(0.125))
    a, b = vmul(a, eighth), vmul(b, eighth)
    sums = (lane_at(a, 0), lane_at(a, 1), lane_at(a, 2), lane_at(a, 3), lane_at(b, 0), lane_at(b, 1), lane_at(b, 2),
            lane_at(b, 3))
    for j in range(min(8, last + 1 - i0)):
        out[i0 + j, r] = sums[j]
