"""Q4_K packed by 16 rows for the 8-bit kernels (kernels/int8.py): one int32 lane per row.

The file's Q4_K rows put a super-block's 256 codes in one row's 128 bytes, so a vpdpbusd over them mixes two
sub-blocks in its lanes, and each dot product needs its scales spread over the lanes and multiplied in (`_k8.py`).
Packed (in place, the same size: 16 x 144 bytes per super-block of a group of 16 rows), lane r of every vector is row
r, as llama.cpp's repacked q4_K_8x8 kernels do on 8 rows:

    bytes    0..31     the 16 rows' d (f16), row r at 2r
    bytes   32..63     the 16 rows' dmin
    bytes   64..255    the 12 scale bytes, byte k of row r at 64 + 16k + r
    bytes  256..2303   the quants by 4-byte runs: run p (bytes 4p..4p+3 of each row's 128) of row r at 256 + 64p + 4r

A vpdpbusd then takes 64 bytes (4 codes of each row) and 4 activation quants broadcast to every lane: 8 of them sum
a sub-block for the 16 rows, whose scales (16 bytes a vector, decoded for the 16 rows at once) multiply each lane
once per sub-block, not once per dot product; the mins meet the activations' per-32 sums likewise. The result is the
file kernels' arithmetic (`_k8.k4_group`: integer S and M per super-block, two float32 sums), so
`q4_k_int8_reference` defines both, bit for bit. What it gains over the file kernel: docs/BENCHMARKS.md "Decode:
notes". No software prefetch: it made this kernel slower from DRAM.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from mertools.kernels.common import MATVEC_JIT
from mertools.kernels.simd import half16, vadd, vmul, vsplat, vstore, vsub, vtof, vzero
from mertools.kernels.simd8 import bcast4, bytes64, dpbusd, hi4, iadd, iand, imul, ior, ishl, ishr, isplat, izero, lo4, u8x16

from ._k8 import Q4_K_BYTES

ROWS = 16  # rows packed together
SB16 = ROWS * Q4_K_BYTES  # a packed super-block's bytes


@njit(**MATVEC_JIT)  # serial, as int8._pack: it runs in the store's loader threads
def pack_q4_k(w2, out):
    """out (rows/16, 16 * row_bytes) = w2 (rows, row_bytes) of Q4_K packed as the module says; out may be w2's bytes."""
    rb = w2.shape[1]
    tmp = np.empty(ROWS * rb, np.uint8)
    t32 = tmp.view(np.uint32)
    for g in range(out.shape[0]):
        for r in range(ROWS):  # the group's rows first: out may be w2's own bytes
            tmp[r * rb:(r + 1) * rb] = w2[ROWS * g + r]
        og = out[g]
        o32 = og.view(np.uint32)
        for b in range(rb // Q4_K_BYTES):
            po = SB16 * b
            for r in range(ROWS):
                src = r * rb + Q4_K_BYTES * b
                for k in range(4):
                    og[po + 32 * (k // 2) + 2 * r + k % 2] = tmp[src + k]
                for k in range(12):
                    og[po + 64 + 16 * k + r] = tmp[src + 4 + k]
                for p in range(32):
                    o32[(po + 256 + 64 * p + 4 * r) // 4] = t32[(src + 16 + 4 * p) // 4]


@njit(inline="always", **MATVEC_JIT)
def _scales(wr, o, j):
    """Sub-block j's 6-bit scale of the 16 rows (ggml's get_scale_min_k4, a lane per row)."""
    s = o + 64
    if j < 4:
        return iand(u8x16(wr, s + 16 * j), 63)
    return ior(iand(u8x16(wr, s + 16 * (j + 4)), 15), ishl(ishr(u8x16(wr, s + 16 * (j - 4)), 6), 4))


@njit(inline="always", **MATVEC_JIT)
def _mins(wr, o, j):
    """Sub-block j's 6-bit min of the 16 rows."""
    s = o + 64
    if j < 4:
        return iand(u8x16(wr, s + 16 * (j + 4)), 63)
    return ior(ishr(u8x16(wr, s + 16 * (j + 4)), 4), ishl(ishr(u8x16(wr, s + 16 * j), 6), 4))


@njit(**MATVEC_JIT)
def q4_k_packed_group(kq, kd, ks, i, wp, g, out, io):
    """out[io, 16g:16g+16] = the packed group g of a Q4_K weight times the q8_K activation row i of (kq, kd, ks)."""
    wr = wp[g]
    xo, so = kq.shape[1] * i, ks.shape[1] * i
    acc_s = vzero()
    acc_m = vzero()
    for b in range(kd.shape[1]):
        o = SB16 * b
        s = izero()
        m = izero()
        for c in range(4):  # sub-blocks 2c (low nibbles) and 2c + 1 (high)
            lo = izero()
            hi = izero()
            q, x = o + 256 + 512 * c, xo + 256 * b + 64 * c
            for p in range(8):
                v = bytes64(wr, q + 64 * p)
                lo = dpbusd(lo, lo4(v), bcast4(kq, x + 4 * p))
                hi = dpbusd(hi, hi4(v), bcast4(kq, x + 32 + 4 * p))
            s = iadd(s, iadd(imul(lo, _scales(wr, o, 2 * c)), imul(hi, _scales(wr, o, 2 * c + 1))))
            k = so + 16 * b + 4 * c  # the per-16 sums of sub-blocks 2c and 2c + 1, two each
            m = iadd(m, iadd(imul(_mins(wr, o, 2 * c), iadd(isplat(ks, k), isplat(ks, k + 1))),
                             imul(_mins(wr, o, 2 * c + 1), iadd(isplat(ks, k + 2), isplat(ks, k + 3)))))
        dk = vsplat(kd[i, b])
        acc_s = vadd(acc_s, vmul(vtof(s), vmul(half16(wr, o), dk)))
        acc_m = vadd(acc_m, vmul(vtof(m), vmul(half16(wr, o + 32), dk)))
    vstore(out, out.shape[1] * io + ROWS * g, vsub(acc_s, acc_m))
