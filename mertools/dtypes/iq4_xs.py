"""iq4_xs: super-blocks of 256 weights in 136 bytes, 8 sub-blocks of 32 with 6-bit scales, 4-bit
codes into IQ4_NL's fixed non-linear table of 16 int8 values.

Super-block: d (f16, bytes 0-1); scales_h (uint16, bytes 2-3: 2 high bits per sub-block, sub-block j
at bits 2j..2j+1); scales_l (bytes 4-7: the low nibbles, sub-block j in byte j//2, low nibble first);
128 bytes of codes, sub-block j in bytes 8+16j..8+16j+15 (low nibbles: its weights 0-15, high
nibbles: 16-31). x = (d * (ls_j - 32)) * KVALUES[q] (ggml's dequantize_row_iq4_xs and gguf-py: the
product d*ls rounded first). The quantizer (`_iq4`: a weighted scale search per sub-block, then the
6-bit scales) is bit-exact with what ggml_quantize_chunk writes without an importance matrix
(quantize_iq4_xs; gguf-py has none).

Decode (matvec): a 16-entry table (d*ls) * KVALUES[k] per sub-block (one multiply, as the
reference) indexed by the nibbles with vpermps (`vlut16`): the weights are exactly `dequantize`'s.
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
    half_at,
    is_carray,
    is_int,
    nib16,
    ptr_at,
    vadd,
    vfma,
    vhsum,
    vlane,
    vload,
    vlut16,
    vmul,
    vshr4,
    vsplat,
    vstore,
    vty,
    vzero,
)

from ._iq4 import KVALUES, quantize_xs, quantize_xs_reference  # KVALUES: ggml kvalues_iq4nl
from .base import DType, Thresholds, f16_from_bytes

BYTES = 136
_F32 = np.float32


# ---------------------------------------------------------------- numpy reference


def _scales(b: np.ndarray) -> np.ndarray:
    """uint8 (nb, 136) -> int32 (nb, 8): the sub-blocks' scales ls - 32."""
    sh = b[:, 2].astype(np.int32) | (b[:, 3].astype(np.int32) << 8)  # (nb,)
    sl = b[:, 4:8].astype(np.int32)  # (nb, 4)
    j = np.arange(8)
    low = (sl[:, j // 2] >> (4 * (j % 2))) & 15
    high = (sh[:, None] >> (2 * j)) & 3
    return (low | (high << 4)) - 32


def dequantize_reference(raw: np.ndarray) -> np.ndarray:
    """raw: uint8 (n_blocks*136,) -> float32 (n_blocks*256,). x = (d*ls)*KVALUES[q] per sub-block."""
    b = np.asarray(raw, dtype=np.uint8).reshape(-1, BYTES)
    d = f16_from_bytes(b[:, 0:2])  # (nb, 1)
    qs = b[:, 8:].reshape(-1, 8, 16)  # (nb, 8 sub-blocks, 16)
    q = np.concatenate([qs & 15, qs >> 4], axis=2)  # (nb, 8, 32)
    kv = np.array(KVALUES, dtype=np.float32)[q]
    with np.errstate(invalid="ignore"):
        dl = (d * _scales(b).astype(np.float32))[:, :, None]  # (nb, 8, 1)
        return (dl * kv).reshape(-1)


# ---------------------------------------------------------------- numba dequantizer


@njit(**EXACT_PJIT)
def dequantize(raw):
    """raw: uint8 (n_blocks*136,) -> float32 (n_blocks*256,)."""
    kv = np.array(KVALUES, dtype=np.float32)
    nb = raw.size // BYTES
    out = np.empty(nb * 256, dtype=np.float32)
    for b in prange(nb):
        o = b * BYTES
        d = f16_bits_to_f32(np.int64(raw[o]) | (np.int64(raw[o + 1]) << 8))
        sh = np.int64(raw[o + 2]) | (np.int64(raw[o + 3]) << 8)
        for j in range(8):
            ls = ((np.int64(raw[o + 4 + j // 2]) >> (4 * (j % 2))) & 15) | (((sh >> (2 * j)) & 3) << 4)
            dl = d * np.float32(ls - 32)
            base = b * 256 + 32 * j
            for i in range(16):
                q = np.int64(raw[o + 8 + 16 * j + i])
                out[base + i] = dl * kv[q & 15]
                out[base + 16 + i] = dl * kv[q >> 4]
    return out


# ---------------------------------------------------------------- matmul decoders


@intrinsic
def kvalues(typingctx):
    """The float lanes KVALUES[0..15]."""

    def codegen(context, builder, sig, args):
        return ir.Constant(vty(ir.FloatType()), [float(k) for k in KVALUES])

    return F32x16(), codegen


_IR_I32 = ir.IntType(32)
_P = [4, 4, 5, 5, 6, 6, 7, 7] * 2  # byte of scales_l holding sub-block j's low nibble
_SHL = [0, 4] * 8
_Q = [2, 2, 2, 2, 3, 3, 3, 3] * 2  # byte of scales_h holding its high bits
_SHQ = [0, 2, 4, 6] * 4


@intrinsic
def block_scales(typingctx, w, o):
    """[d*(ls_0 - 32) .. d*(ls_7 - 32)] twice, for the super-block at byte o of a uint8 C array, each
    rounded once as the reference rounds it. Reads the 16 bytes at o."""
    if not (is_carray(w, types.uint8) and is_int(o)):
        return None

    def codegen(context, builder, sig, args):
        arrty, arr, off = sig.args[0], args[0], args[1]
        i32v = vty(_IR_I32)

        def const(vals):
            return ir.Constant(i32v, vals)

        s = builder.zext(builder.load(ptr_at(context, builder, arrty, arr, off, vty(ir.IntType(8))), align=1), i32v)
        low = builder.and_(builder.lshr(builder.shuffle_vector(s, s, const(_P)), const(_SHL)), const([15] * 16))
        high = builder.and_(builder.lshr(builder.shuffle_vector(s, s, const(_Q)), const(_SHQ)), const([3] * 16))
        ls = builder.sub(builder.or_(low, builder.shl(high, const([4] * 16))), const([32] * 16))
        h = builder.load(ptr_at(context, builder, arrty, arr, off, ir.HalfType()), align=1)
        hv = builder.insert_element(ir.Constant(vty(ir.HalfType()), ir.Undefined), h, ir.Constant(_IR_I32, 0))
        hv = builder.shuffle_vector(hv, hv, const([0] * 16))
        d = builder.fpext(hv, vty(ir.FloatType()))
        return builder.fmul(builder.sitofp(ls, vty(ir.FloatType())), d)

    return F32x16(w, o), codegen


@njit(inline="always", **TILE_JIT)  # numba inlines it: LLVM may leave a call in decode_tile's row loop
def tile_row(wr, k0, kc, buf, r):
    """buf[r, :kc] = the row's weights k0:k0+kc (wr: the row's uint8 bytes), exactly `dequantize`'s."""
    at = r * KC  # flat offset of buf row r
    kv = kvalues()
    for b in range(kc // 256):
        o = (k0 // 256 + b) * BYTES
        d = half_at(wr, o)
        sh = np.int64(wr[o + 2]) | (np.int64(wr[o + 3]) << 8)
        for j in range(8):
            ls = ((np.int64(wr[o + 4 + j // 2]) >> (4 * (j % 2))) & 15) | (((sh >> (2 * j)) & 3) << 4)
            table = vmul(kv, vsplat(d * np.float32(ls - 32)))
            q = nib16(wr, o + 8 + 16 * j)
            t = at + 256 * b + 32 * j
            vstore(buf, t, vlut16(table, q))
            vstore(buf, t + 16, vlut16(table, vshr4(q)))


@njit(**MATVEC_JIT)
def _sub(wr, o, j, dl, kv, xa, xb, a, b):
    """Sub-block j of the super-block at o, whose scales dl = block_scales(wr, o)."""
    table = vmul(kv, vlane(dl, j))
    q = nib16(wr, o + 8 + 16 * j)
    return vfma(vlut16(table, q), xa, a), vfma(vlut16(table, vshr4(q)), xb, b)


@njit(**MATVEC_JIT)
def matvec_group(x, w, r0, out):
    """out[r0:r0+4] = W[r0:r0+4] @ x, prefetching the next group's bytes at the same pace."""
    w0, w1, w2, w3 = group_rows(w, r0)
    kv = kvalues()
    a0 = b0 = a1 = b1 = a2 = b2 = a3 = b3 = vzero()
    ahead = (r0 + R) * w.shape[1]
    for blk in range(x.size // 256):
        o = BYTES * blk
        prefetch_lines(w, ahead + 4 * o, 4 * BYTES)
        dl0, dl1, dl2, dl3 = block_scales(w0, o), block_scales(w1, o), block_scales(w2, o), block_scales(w3, o)
        for j in range(8):
            xo = 256 * blk + 32 * j
            xa = vload(x, xo)
            xb = vload(x, xo + 16)
            a0, b0 = _sub(w0, o, j, dl0, kv, xa, xb, a0, b0)
            a1, b1 = _sub(w1, o, j, dl1, kv, xa, xb, a1, b1)
            a2, b2 = _sub(w2, o, j, dl2, kv, xa, xb, a2, b2)
            a3, b3 = _sub(w3, o, j, dl3, kv, xa, xb, a3, b3)
    group_store(out, r0, vhsum(vadd(a0, b0)), vhsum(vadd(a1, b1)), vhsum(vadd(a2, b2)), vhsum(vadd(a3, b3)))


TYPE = DType(
    "iq4_xs", 23, 256, BYTES, scale_offsets=(0,),
    # calibrated on the trained fixture (benchmarks/bench_types.py; figures and rule in docs/BENCHMARKS.md)
    verify=Thresholds(kl_mean=0.03, top1=0.86, ppl_ratio=1.165),
    quantize=quantize_xs, dequantize=dequantize,
    quantize_reference=quantize_xs_reference, dequantize_reference=dequantize_reference,
)
