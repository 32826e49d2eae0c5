"""bf16: bfloat16, 2 bytes a weight: the top half of a float32 (sign, 8 exponent bits, 7 mantissa bits).

Widening is exact (the bits shifted up by 16, NaN payloads kept), bit-identical with ggml and gguf-py.
The quantizer is ggml's GGML_FP32_TO_BF16 (round to nearest even; a NaN is kept, made quiet), as
gguf-py's. Values that round to inf in bf16 (|x| >= 2^128 - 2^119) are not refused by `quantize`
(`limit` stays inf: numpy has no bf16 to name in the message); convert's finiteness check refuses them.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from mertools.kernels.common import EXACT_PJIT, KC, MATVEC_JIT, TILE_JIT, R, group_rows, group_store, prefetch_lines
from mertools.kernels.simd import LANES, F32x16, bits_f32, is_carray, is_int, ptr_at, vadd, vfma, vhsum, vload, vstore, vty, vzero

from .base import DType, Thresholds

# ---------------------------------------------------------------- numpy references


def quantize(x: np.ndarray) -> np.ndarray:
    """float32 (n,) -> uint8 (2n,): GGML_FP32_TO_BF16, round to nearest even, NaN made quiet."""
    u = np.ascontiguousarray(x, dtype=np.float32).reshape(-1).view(np.uint32).astype(np.uint64)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    rounded = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
    bits = np.where(nan, (u >> 16) | 64, rounded).astype("<u2")
    return bits.view(np.uint8)


def dequantize_reference(raw: np.ndarray) -> np.ndarray:
    """raw: uint8 (2n,) -> float32 (n,)."""
    return (np.ascontiguousarray(raw).reshape(-1).view("<u2").astype(np.uint32) << 16).view(np.float32)


# ---------------------------------------------------------------- numba


@njit(**EXACT_PJIT)
def dequantize(raw):
    """raw: uint8 (2n,) little-endian bf16 -> float32 (n,)."""
    n = raw.size // 2
    out = np.empty(n, dtype=np.float32)
    for i in prange(n):
        out[i] = bits_f32(np.int32(np.uint32((np.int64(raw[2 * i]) << 16) | (np.int64(raw[2 * i + 1]) << 24))))
    return out


@njit(inline="always", **MATVEC_JIT)
def _at(wr, k):
    """Weight k of a bf16 row (its uint8 bytes) as float32."""
    return bits_f32(np.int32(np.uint32((np.int64(wr[2 * k]) << 16) | (np.int64(wr[2 * k + 1]) << 24))))


@intrinsic
def bf16x16(typingctx, w, o):
    """16 little-endian bf16 at byte o of a uint8 C array, widened to float32 lanes (exact)."""
    if not (is_carray(w, types.uint8) and is_int(o)):
        return None

    def codegen(context, builder, sig, args):
        i32v = vty(ir.IntType(32))
        v = builder.load(ptr_at(context, builder, sig.args[0], args[0], args[1], vty(ir.IntType(16))), align=1)
        v = builder.shl(builder.zext(v, i32v), ir.Constant(i32v, [16] * LANES))
        return builder.bitcast(v, vty(ir.FloatType()))

    return F32x16(w, o), codegen


@njit(inline="always", **TILE_JIT)  # numba inlines it: LLVM may leave a call in decode_tile's row loop
def tile_row(wr, k0, kc, buf, r):
    """buf[r, :kc] = the row's weights k0:k0+kc (wr: the row's uint8 bytes)."""
    at = r * KC  # flat offset of buf row r
    k16 = kc - kc % 16
    for k in range(0, k16, 16):
        vstore(buf, at + k, bf16x16(wr, 2 * (k0 + k)))
    for k in range(k16, kc):
        buf[r, k] = _at(wr, k0 + k)


@njit(**MATVEC_JIT)
def matvec_group(x, w, r0, out):
    """out[r0:r0+4] = W[r0:r0+4] @ x for any width (a scalar tail past the last 16 columns)."""
    w0, w1, w2, w3 = group_rows(w, r0)
    a0 = b0 = a1 = b1 = a2 = b2 = a3 = b3 = vzero()
    cols = x.size
    ahead = (r0 + R) * w.shape[1]
    k = 0
    while k + 32 <= cols:
        prefetch_lines(w, ahead + 8 * k, 256)
        xl = vload(x, k)
        xh = vload(x, k + 16)
        a0 = vfma(bf16x16(w0, 2 * k), xl, a0)
        b0 = vfma(bf16x16(w0, 2 * k + 32), xh, b0)
        a1 = vfma(bf16x16(w1, 2 * k), xl, a1)
        b1 = vfma(bf16x16(w1, 2 * k + 32), xh, b1)
        a2 = vfma(bf16x16(w2, 2 * k), xl, a2)
        b2 = vfma(bf16x16(w2, 2 * k + 32), xh, b2)
        a3 = vfma(bf16x16(w3, 2 * k), xl, a3)
        b3 = vfma(bf16x16(w3, 2 * k + 32), xh, b3)
        k += 32
    if k + 16 <= cols:
        xl = vload(x, k)
        a0 = vfma(bf16x16(w0, 2 * k), xl, a0)
        a1 = vfma(bf16x16(w1, 2 * k), xl, a1)
        a2 = vfma(bf16x16(w2, 2 * k), xl, a2)
        a3 = vfma(bf16x16(w3, 2 * k), xl, a3)
        k += 16
    s0, s1, s2, s3 = vhsum(vadd(a0, b0)), vhsum(vadd(a1, b1)), vhsum(vadd(a2, b2)), vhsum(vadd(a3, b3))
    for j in range(k, cols):
        s0 += _at(w0, j) * x[j]
        s1 += _at(w1, j) * x[j]
        s2 += _at(w2, j) * x[j]
        s3 += _at(w3, j) * x[j]
    group_store(out, r0, s0, s1, s2, s3)


TYPE = DType(
    "bf16", 30, 1, 2, float_dtype="bf16",
    # calibrated on the trained fixture (benchmarks/bench_types.py; figures and rule in docs/BENCHMARKS.md)
    verify=Thresholds(kl_mean=2e-05, top1=0.90, ppl_ratio=1.006),
    quantize=quantize, dequantize=dequantize, quantize_reference=quantize, dequantize_reference=dequantize_reference,
)
