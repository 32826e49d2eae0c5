"""iq2_xxs: super-blocks of 256 weights in 66 bytes (2.06 bits a weight), 8 groups of 32 whose weights are points of
a fixed grid of 8-coordinate vectors, with sign patterns and a 4-bit scale per group.

Super-block: d (f16, bytes 0-1), then group g's two little-endian uint32 at 2 + 8g: aux0, whose 4 bytes index the
grid (`_iq2grid.GRID`: 256 points, each coordinate 8, 25 or 43) for its weights 8l..8l+7, and aux1: bits 7l..7l+6
index the sign pattern of point l (ggml's ksigns_iq2xs, `_iq2grid.KSIGNS`: the 7 bits and their parity as bit 7; bit j
set negates coordinate j) and bits 28-31 are the scale ls. x = (d * (0.5 + ls) * 0.25) * grid[aux0 byte l][j] * (+-1)
(ggml's dequantize_row_iq2_xxs and gguf-py). d has 11 significant bits and 0.5 + ls 5, the coordinates 6: every
weight is exact in float32, so the order of those products never matters (here: the scale times the signed
coordinate, one multiply, which keeps NaN and signed zeros as the reference's two multiplies do). The quantizer is
ggml's quantize_iq2_xxs bit for bit with an all-ones importance matrix (dtypes/_iq2_quant.py; ggml itself insists
on an imatrix, which `mertools convert` has none of); it raises where ggml aborts (float32 overflow in its search).

Decode (matvec, prefill tile): per 16 weights two grid loads (one uint64 each, the 8 coordinate bytes), the 16 sign
bits of `_k8iq2.block_masks` as a mask negating bytes, widened to float32 and times the group's scale: exactly
`dequantize`'s weights, each meeting x in a fused multiply-add. The 8-bit-activation kernels (kernels/int8.py)
read these blocks as they are with ggml's integer sums per super-block: dtypes/_k8iq2.py (`int8_reference`).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from mertools.kernels.common import (
    EXACT_PJIT,
    KC,
    MATVEC_JIT,
    TILE_JIT,
    R,
    f16_bits_to_f32,
    group_rows,
    group_store,
    prefetch_lines,
)
from mertools.kernels.simd import (
    F32x16,
    I32x16,
    is_carray,
    is_int,
    ptr_at,
    vadd,
    vfma,
    vhsum,
    vlane,
    vload,
    vmul,
    vstore,
    vty,
    vzero,
)

from ._iq2grid import GRID, KSIGNS
from ._k8iq2 import BYTES, block_masks, byte_ptr, grid_entry, index_base, iq2_xxs_int8_reference, signed_grid
from .base import DType, Thresholds, f16_from_bytes

_F32 = np.float32
_I1, _I8, _I16, _I32 = (ir.IntType(n) for n in (1, 8, 16, 32))


# ---------------------------------------------------------------- numpy reference


def _scales(b: np.ndarray) -> np.ndarray:
    """uint8 (nb, 66) -> float32 (nb, 8): each group's d * (0.5 + ls) * 0.25 (exact)."""
    d = f16_from_bytes(b[:, :2])  # (nb, 1)
    ls = (b[:, 9::8] >> 4).astype(np.float32)  # aux1's top nibble: byte 9 + 8g
    with np.errstate(invalid="ignore"):
        return d * (_F32(0.5) + ls) * _F32(0.25)


def dequantize_reference(raw: np.ndarray) -> np.ndarray:
    """raw: uint8 (n_blocks*66,) -> float32 (n_blocks*256,)."""
    b = np.asarray(raw, dtype=np.uint8).reshape(-1, BYTES)
    with np.errstate(invalid="ignore"):
        return (_scales(b)[:, :, None] * signed_grid(b).astype(np.float32)).reshape(-1)


# ---------------------------------------------------------------- numba dequantizer


@njit(**EXACT_PJIT)
def dequantize(raw):
    """raw: uint8 (n_blocks*66,) -> float32 (n_blocks*256,)."""
    nb = raw.size // BYTES
    out = np.empty(nb * 256, dtype=np.float32)
    for b in prange(nb):
        o = b * BYTES
        d = f16_bits_to_f32(np.int64(raw[o]) | (np.int64(raw[o + 1]) << 8))
        for g in range(8):
            q = o + 2 + 8 * g
            aux1 = np.int64(raw[q + 4]) | (np.int64(raw[q + 5]) << 8) | (np.int64(raw[q + 6]) << 16) | (
                np.int64(raw[q + 7]) << 24)
            db = d * (np.float32(0.5) + np.float32(aux1 >> 28)) * np.float32(0.25)
            for lane in range(4):
                point = np.int64(raw[q + lane])
                signs = np.int64(KSIGNS[(aux1 >> (7 * lane)) & 127])
                at = b * 256 + 32 * g + 8 * lane
                for j in range(8):
                    v = np.float32(GRID[point, j])
                    out[at + j] = db * (-v if (signs >> j) & 1 else v)
    return out


# ---------------------------------------------------------------- matmul decoders


@intrinsic
def block_scales(typingctx, w, o):
    """Lane c: d * (0.5 + ls) * 0.25 of group c // 2 of the super-block at o (the scale of weights 16c..16c+15)."""
    if not (is_carray(w, types.uint8) and is_int(o)):
        return None

    def codegen(context, builder, sig, args):
        arrty, arr, off = sig.args[0], args[0], args[1]
        at = builder.add(off, ir.Constant(off.type, 2))
        words = builder.load(ptr_at(context, builder, arrty, arr, at, vty(_I8, 64)), align=1)  # bytes 2..65
        ls = builder.lshr(builder.shuffle_vector(words, words, ir.Constant(vty(_I32), [7 + 8 * (c // 2) for c in range(16)])),
                          ir.Constant(vty(_I8), [4] * 16))
        f = builder.uitofp(ls, vty(ir.FloatType()))
        h = builder.load(ptr_at(context, builder, arrty, arr, off, ir.HalfType()), align=1)
        d = builder.fpext(h, ir.FloatType())
        dv = builder.shuffle_vector(builder.insert_element(ir.Constant(vty(ir.FloatType()), ir.Undefined), d,
                                                           ir.Constant(_I32, 0)),
                                    ir.Constant(vty(ir.FloatType()), ir.Undefined), ir.Constant(vty(_I32), [0] * 16))
        s = builder.fmul(dv, builder.fadd(f, ir.Constant(vty(ir.FloatType()), [0.5] * 16)))
        return builder.fmul(s, ir.Constant(vty(ir.FloatType()), [0.25] * 16))

    return F32x16(w, o), codegen


@intrinsic
def signed16(typingctx, w, at, m, c):
    """The 16 signed coordinates of weights 16c..16c+15 of a super-block as float32: the grid points indexed by bytes
    at, at + 1, negated where the 16 sign bits of chunk c of m (`block_masks`: lane c // 2, half c % 2) are set."""
    if not (is_carray(w, types.uint8) and is_int(at) and m == I32x16 and is_int(c)):
        return None

    def codegen(context, builder, sig, args):
        base = index_base(builder, byte_ptr(context, builder, sig, args))
        v = ir.Constant(vty(ir.IntType(64), 2), ir.Undefined)
        for j in range(2):
            v = builder.insert_element(v, grid_entry(builder, base, ir.Constant(ir.IntType(64), j)), ir.Constant(_I32, j))
        g = builder.bitcast(v, vty(_I8, 16))
        cc = builder.trunc(args[3], _I32) if args[3].type.width > 32 else args[3]
        bits = builder.extract_element(builder.bitcast(args[2], vty(_I16, 32)), cc)
        s = builder.select(builder.bitcast(bits, vty(_I1, 16)), builder.sub(ir.Constant(vty(_I8, 16), [0] * 16), g), g)
        return builder.sitofp(s, vty(ir.FloatType()))

    return F32x16(w, at, m, c), codegen


@njit(**MATVEC_JIT)  # not fastmath (called from the tile): every weight one IEEE multiply, as `dequantize`
def _decode_block(wr, o, buf, at):
    """buf[at:at+256] = the weights of the super-block at o."""
    m = block_masks(wr, o)
    sc = block_scales(wr, o)
    for c in range(16):
        vstore(buf, at + 16 * c, vmul(signed16(wr, o + 2 + 8 * (c // 2) + 2 * (c % 2), m, c), vlane(sc, c)))


@njit(inline="always", **TILE_JIT)  # numba inlines it: LLVM may leave a call in decode_tile's row loop
def tile_row(wr, k0, kc, buf, r):
    """buf[r, :kc] = the row's weights k0:k0+kc (wr: the row's uint8 bytes), exactly `dequantize`'s."""
    for b in range(kc // 256):
        _decode_block(wr, (k0 // 256 + b) * BYTES, buf, r * KC + 256 * b)


@njit(inline="always", **MATVEC_JIT)
def _chunk(wr, o, c, m, sc, xv, a):
    return vfma(vmul(signed16(wr, o + 2 + 8 * (c // 2) + 2 * (c % 2), m, c), vlane(sc, c)), xv, a)


@njit(**MATVEC_JIT)
def matvec_group(x, w, r0, out):
    """out[r0:r0+4] = W[r0:r0+4] @ x, prefetching the next group's bytes at the same pace."""
    w0, w1, w2, w3 = group_rows(w, r0)
    a0 = b0 = a1 = b1 = a2 = b2 = a3 = b3 = vzero()
    ahead = (r0 + R) * w.shape[1]
    for blk in range(x.size // 256):
        o = BYTES * blk
        prefetch_lines(w, ahead + 4 * o, 4 * BYTES)
        m0, m1, m2, m3 = block_masks(w0, o), block_masks(w1, o), block_masks(w2, o), block_masks(w3, o)
        s0, s1, s2, s3 = block_scales(w0, o), block_scales(w1, o), block_scales(w2, o), block_scales(w3, o)
        for c in range(0, 16, 2):
            xa = vload(x, 256 * blk + 16 * c)
            xb = vload(x, 256 * blk + 16 * c + 16)
            a0, b0 = _chunk(w0, o, c, m0, s0, xa, a0), _chunk(w0, o, c + 1, m0, s0, xb, b0)
            a1, b1 = _chunk(w1, o, c, m1, s1, xa, a1), _chunk(w1, o, c + 1, m1, s1, xb, b1)
            a2, b2 = _chunk(w2, o, c, m2, s2, xa, a2), _chunk(w2, o, c + 1, m2, s2, xb, b2)
            a3, b3 = _chunk(w3, o, c, m3, s3, xa, a3), _chunk(w3, o, c + 1, m3, s3, xb, b3)
    group_store(out, r0, vhsum(vadd(a0, b0)), vhsum(vadd(a1, b1)), vhsum(vadd(a2, b2)), vhsum(vadd(a3, b3)))


def quantize(x: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """ggml's quantize_iq2_xxs (dtypes/_iq2_quant.py), imported on first use: its search tables and ~20 kernels
    cost every process ~30 ms at import, and only a conversion quantizes."""
    from ._iq2_quant import quantize as q

    return q(x, importance)


def quantize_reference(x: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """`quantize`'s numpy twin (dtypes/_iq2_quant.py), imported on first use as `quantize` is."""
    from ._iq2_quant import quantize_reference as q

    return q(x, importance)


TYPE = DType(
    "iq2_xxs", 16, 256, BYTES, scale_offsets=(0,),
    # provisional, looser than q2_k's (2.06 bits a weight against 2.625): to be calibrated on the trained fixture by
    # benchmarks/bench_types.py
    verify=Thresholds(kl_mean=0.5, top1=0.7, ppl_ratio=1.9),
    quantize=quantize, quantize_reference=quantize_reference,
    dequantize=dequantize, dequantize_reference=dequantize_reference,
    int8_reference=iq2_xxs_int8_reference,
)
