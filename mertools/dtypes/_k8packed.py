"""Q4_K and Q6_K packed by 16 rows for the 8-bit kernels (kernels/int8.py): one int32 lane per row.

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
notes". It prefetches every line two super-blocks ahead in its group's stream: from DRAM the loads otherwise waited
on memory (and cost it a little with the weight in cache; measured there).

Q6_K likewise (16 x 210 bytes per super-block of a group):

    bytes    0..31     the 16 rows' d (f16)
    bytes   32..287    the 16 int8 group scales, scale k of row r at 32 + 16k + r
    bytes  288..2335   ql by 4-byte runs: run p (bytes 4p..4p+3 of each row's 128) of row r at 288 + 64p + 4r
    bytes 2336..3359   qh by 4-byte runs: run p (of each row's 64) of row r at 2336 + 64p + 4r

ql runs 16h + n and 16h + 8 + n with qh run 8h + n hold the codes of weights 128h + 32j + 4n..4n+3 (j < 4: low
nibbles of the first, of the second, high nibbles of the first, of the second; the pair at bits 2j of qh), so the
runs n = 4m..4m+3 sum group 8h + 2j + m for the 16 rows in each of 4 vpdpbusd chains; a chain starts from
-32 times the group's activation sum (q8_K's per-16 sums: the codes' offset) and meets its 16 scales once. Per row
the integer T, then one float multiply-add: `_k8.q6_k_group`'s arithmetic, `q6_k_int8_reference`'s bits.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from mertools.kernels.common import MATVEC_JIT, prefetch_lines
from mertools.kernels.simd import half16, vadd, vmul, vsplat, vstore, vsub, vtof, vzero
from mertools.kernels.simd8 import (
    bcast4,
    bytes64,
    dpbusd,
    dpbusd2,
    hi4,
    iadd,
    iand,
    imul,
    ineg,
    ior,
    ishl,
    ishr,
    isplat,
    izero,
    lo4,
    u8x16,
)
from mertools.kernels.simd8x import copy_bytes, q6_codes, s8x16

from ._k8 import Q4_K_BYTES, Q6_K_BYTES

# simd8.dpbusd takes unsigned bytes below 128 (vpmaddubsw on AVX2): the codes here are at most 63. numba caches the
# intrinsics' code inside this file's kernels, keyed on its contents: this note came with that AVX2 path.

ROWS = 16  # rows packed together
SB16 = ROWS * Q4_K_BYTES  # a packed super-block's bytes
AHEAD = 2 * SB16  # software prefetch distance in a group's bytes
SB6 = ROWS * Q6_K_BYTES  # a packed Q6_K super-block's bytes
AHEAD6 = 2 * SB6
_Q6_STRIDE = 212  # a Q6_K block's bytes rounded up to 4, while packing


@njit(**MATVEC_JIT)  # serial, as int8._pack: it runs in the store's loader threads
def pack_q4_k(w2, out):
    """out (rows/16, 16 * row_bytes) = w2 (rows, row_bytes) of Q4_K packed as the module says; out may be w2's bytes."""
    rb = w2.shape[1]
    tmp = np.empty(ROWS * rb, np.uint8)
    t32 = tmp.view(np.uint32)
    for g in range(out.shape[0]):
        for r in range(ROWS):  # the group's rows first: out may be w2's own bytes
            copy_bytes(tmp, r * rb, w2[ROWS * g + r], 0, rb)
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
    base = wp.shape[1] * g + AHEAD
    acc_s = vzero()
    acc_m = vzero()
    for b in range(kd.shape[1]):
        o = SB16 * b
        prefetch_lines(wp, base + o, SB16)
        s = izero()
        m = izero()
        for c in range(4):  # sub-blocks 2c (low nibbles) and 2c + 1 (high)
            lo = izero()
            hi = izero()
            q, x = o + 256 + 512 * c, xo + 256 * b + 64 * c
            for p in range(0, 8, 2):  # runs p and p + 1 meet one vpmaddwd (`dpbusd2`)
                v, w = bytes64(wr, q + 64 * p), bytes64(wr, q + 64 * p + 64)
                lo = dpbusd2(lo, lo4(v), bcast4(kq, x + 4 * p), lo4(w), bcast4(kq, x + 4 * p + 4))
                hi = dpbusd2(hi, hi4(v), bcast4(kq, x + 32 + 4 * p), hi4(w), bcast4(kq, x + 36 + 4 * p))
            s = iadd(s, iadd(imul(lo, _scales(wr, o, 2 * c)), imul(hi, _scales(wr, o, 2 * c + 1))))
            k = so + 16 * b + 4 * c  # sub-blocks 2c and 2c + 1: two per-16 sums each
            m = iadd(m, iadd(imul(_mins(wr, o, 2 * c), _pair_sum(ks, k)), imul(_mins(wr, o, 2 * c + 1), _pair_sum(ks, k + 2))))
        dk = vsplat(kd[i, b])
        acc_s = vadd(acc_s, vmul(vtof(s), vmul(half16(wr, o), dk)))
        acc_m = vadd(acc_m, vmul(vtof(m), vmul(half16(wr, o + 32), dk)))
    vstore(out, out.shape[1] * io + ROWS * g, vsub(acc_s, acc_m))


@njit(inline="always", **MATVEC_JIT)
def _pair_sum(ks, k):
    """ks[k] + ks[k + 1] in every lane: a sub-block's activation sum from q8_K's per-16 sums."""
    return iadd(isplat(ks, k), isplat(ks, k + 1))


@njit(**MATVEC_JIT)
def q4_k_packed_rows4(kq, kd, ks, i0, wp, g, out):
    """out[i0:i0+4, 16g:16g+16] (fewer past the last row) = the packed group g of a Q4_K weight times the q8_K
    activation rows i0..i0+3: each row the bits of `q4_k_packed_group`'s, the group's codes and scales decoded once
    for the 4 rows (a prompt)."""
    wr = wp[g]
    last = kq.shape[0] - 1
    i1, i2, i3 = min(i0 + 1, last), min(i0 + 2, last), min(i0 + 3, last)
    x0, x1, x2, x3 = kq.shape[1] * i0, kq.shape[1] * i1, kq.shape[1] * i2, kq.shape[1] * i3
    k0, k1, k2, k3 = ks.shape[1] * i0, ks.shape[1] * i1, ks.shape[1] * i2, ks.shape[1] * i3
    as0 = as1 = as2 = as3 = am0 = am1 = am2 = am3 = vzero()
    for b in range(kd.shape[1]):
        o = SB16 * b
        s0 = s1 = s2 = s3 = m0 = m1 = m2 = m3 = izero()
        for c in range(4):
            lo0 = lo1 = lo2 = lo3 = hi0 = hi1 = hi2 = hi3 = izero()
            q, xb = o + 256 + 512 * c, 256 * b + 64 * c
            for p in range(8):
                v = bytes64(wr, q + 64 * p)
                lo, hi, xp = lo4(v), hi4(v), xb + 4 * p
                lo0, hi0 = dpbusd(lo0, lo, bcast4(kq, x0 + xp)), dpbusd(hi0, hi, bcast4(kq, x0 + xp + 32))
                lo1, hi1 = dpbusd(lo1, lo, bcast4(kq, x1 + xp)), dpbusd(hi1, hi, bcast4(kq, x1 + xp + 32))
                lo2, hi2 = dpbusd(lo2, lo, bcast4(kq, x2 + xp)), dpbusd(hi2, hi, bcast4(kq, x2 + xp + 32))
                lo3, hi3 = dpbusd(lo3, lo, bcast4(kq, x3 + xp)), dpbusd(hi3, hi, bcast4(kq, x3 + xp + 32))
            sa, sb, kk = _scales(wr, o, 2 * c), _scales(wr, o, 2 * c + 1), 16 * b + 4 * c
            ma, mb = _mins(wr, o, 2 * c), _mins(wr, o, 2 * c + 1)
            s0 = iadd(s0, iadd(imul(lo0, sa), imul(hi0, sb)))
            s1 = iadd(s1, iadd(imul(lo1, sa), imul(hi1, sb)))
            s2 = iadd(s2, iadd(imul(lo2, sa), imul(hi2, sb)))
            s3 = iadd(s3, iadd(imul(lo3, sa), imul(hi3, sb)))
            m0 = iadd(m0, iadd(imul(ma, _pair_sum(ks, k0 + kk)), imul(mb, _pair_sum(ks, k0 + kk + 2))))
            m1 = iadd(m1, iadd(imul(ma, _pair_sum(ks, k1 + kk)), imul(mb, _pair_sum(ks, k1 + kk + 2))))
            m2 = iadd(m2, iadd(imul(ma, _pair_sum(ks, k2 + kk)), imul(mb, _pair_sum(ks, k2 + kk + 2))))
            m3 = iadd(m3, iadd(imul(ma, _pair_sum(ks, k3 + kk)), imul(mb, _pair_sum(ks, k3 + kk + 2))))
        d, dmin = half16(wr, o), half16(wr, o + 32)
        dk0, dk1, dk2, dk3 = vsplat(kd[i0, b]), vsplat(kd[i1, b]), vsplat(kd[i2, b]), vsplat(kd[i3, b])
        as0, am0 = vadd(as0, vmul(vtof(s0), vmul(d, dk0))), vadd(am0, vmul(vtof(m0), vmul(dmin, dk0)))
        as1, am1 = vadd(as1, vmul(vtof(s1), vmul(d, dk1))), vadd(am1, vmul(vtof(m1), vmul(dmin, dk1)))
        as2, am2 = vadd(as2, vmul(vtof(s2), vmul(d, dk2))), vadd(am2, vmul(vtof(m2), vmul(dmin, dk2)))
        as3, am3 = vadd(as3, vmul(vtof(s3), vmul(d, dk3))), vadd(am3, vmul(vtof(m3), vmul(dmin, dk3)))
    _store4(out, i0, last, ROWS * g, vsub(as0, am0), vsub(as1, am1), vsub(as2, am2), vsub(as3, am3))


@njit(inline="always", **MATVEC_JIT)
def _store4(out, i0, last, col, v0, v1, v2, v3):
    """out[i0 + j, col:col+16] = v_j for the rows up to `last`."""
    n = out.shape[1]
    vstore(out, n * i0 + col, v0)
    if i0 + 1 <= last:
        vstore(out, n * (i0 + 1) + col, v1)
    if i0 + 2 <= last:
        vstore(out, n * (i0 + 2) + col, v2)
    if i0 + 3 <= last:
        vstore(out, n * (i0 + 3) + col, v3)


@njit(**MATVEC_JIT)
def pack_q6_k(w2, out):
    """out (rows/16, 16 * row_bytes) = w2 (rows, row_bytes) of Q6_K packed as the module says; out may be w2's bytes."""
    nb = w2.shape[1] // Q6_K_BYTES
    tmp = np.empty(ROWS * nb * _Q6_STRIDE, np.uint8)  # the group's blocks, each at a 4-byte boundary: runs as uint32
    t32 = tmp.view(np.uint32)
    for g in range(out.shape[0]):
        for r in range(ROWS):  # the group's rows first: out may be w2's own bytes
            row = w2[ROWS * g + r]
            for b in range(nb):
                copy_bytes(tmp, (r * nb + b) * _Q6_STRIDE, row, Q6_K_BYTES * b, Q6_K_BYTES)
        og = out[g]
        o32 = og.view(np.uint32)
        for b in range(nb):
            po = SB6 * b
            for r in range(ROWS):
                src = (r * nb + b) * _Q6_STRIDE
                og[po + 2 * r] = tmp[src + 208]
                og[po + 2 * r + 1] = tmp[src + 209]
                for k in range(16):
                    og[po + 32 + 16 * k + r] = tmp[src + 192 + k]
                for p in range(48):  # ql's 32 runs, then qh's 16: run p of row r at 288 + 64p + 4r
                    o32[(po + 288 + 64 * p + 4 * r) // 4] = t32[src // 4 + p]


@njit(**MATVEC_JIT)
def q6_k_packed_group(kq, kd, ks, i, wp, g, out, io):
    """out[io, 16g:16g+16] = the packed group g of a Q6_K weight times the q8_K activation row i of (kq, kd, ks)."""
    wr = wp[g]
    xo, so = kq.shape[1] * i, ks.shape[1] * i
    base = wp.shape[1] * g + AHEAD6
    acc = vzero()
    for b in range(kd.shape[1]):
        o = SB6 * b
        prefetch_lines(wp, base + o, SB6)
        t = izero()
        for h in range(2):
            for m in range(2):  # groups 8h + 2j + m: runs n = 4m..4m+3
                k = so + 16 * b + 8 * h + m
                d0, d1, d2, d3 = _offset(ks, k), _offset(ks, k + 2), _offset(ks, k + 4), _offset(ks, k + 6)
                x = xo + 256 * b + 128 * h
                for n in range(4 * m, 4 * m + 4, 2):  # runs n and n + 1 meet one vpmaddwd (`dpbusd2`)
                    ql, qr = o + 288 + 64 * (16 * h + n), o + 2336 + 64 * (8 * h + n)  # ql run 16h + n, qh run 8h + n
                    qa, pa = bytes64(wr, ql), bytes64(wr, ql + 64)  # and each one's next run
                    qb, pb = bytes64(wr, ql + 512), bytes64(wr, ql + 576)  # ql runs 16h + 8 + n, + 9 + n
                    qh, ph = bytes64(wr, qr), bytes64(wr, qr + 64)
                    xn, xm = x + 4 * n, x + 4 * n + 4
                    d0 = dpbusd2(d0, q6_codes(lo4(qa), qh, 0), bcast4(kq, xn), q6_codes(lo4(pa), ph, 0), bcast4(kq, xm))
                    d1 = dpbusd2(d1, q6_codes(lo4(qb), qh, 1), bcast4(kq, xn + 32), q6_codes(lo4(pb), ph, 1), bcast4(kq, xm + 32))
                    d2 = dpbusd2(d2, q6_codes(hi4(qa), qh, 2), bcast4(kq, xn + 64), q6_codes(hi4(pa), ph, 2), bcast4(kq, xm + 64))
                    d3 = dpbusd2(d3, q6_codes(hi4(qb), qh, 3), bcast4(kq, xn + 96), q6_codes(hi4(pb), ph, 3), bcast4(kq, xm + 96))
                sc = o + 32 + 16 * (8 * h + m)  # scale k of the 16 rows at 32 + 16k
                t = iadd(t, iadd(iadd(imul(d0, s8x16(wr, sc)), imul(d1, s8x16(wr, sc + 32))),
                                 iadd(imul(d2, s8x16(wr, sc + 64)), imul(d3, s8x16(wr, sc + 96)))))
        acc = vadd(acc, vmul(vtof(t), vmul(half16(wr, o), vsplat(kd[i, b]))))
    vstore(out, out.shape[1] * io + ROWS * g, acc)


@njit(inline="always", **MATVEC_JIT)
def _offset(ks, k):
    """-32 times q8_K's sum of 16 activation quants ks[k] in every lane (Q6_K's code offset)."""
    return ineg(ishl(isplat(ks, k), 5))


@njit(**MATVEC_JIT)
def q6_k_packed_rows2(kq, kd, ks, i0, wp, g, out):
    """out[i0:i0+2, 16g:16g+16] (one row past the last) = the packed group g of a Q6_K weight times the q8_K
    activation rows i0, i0 + 1: each row the bits of `q6_k_packed_group`'s, the codes built once for the 2 (a
    prompt; with 4 rows the accumulators outgrew the registers)."""
    wr = wp[g]
    last = kq.shape[0] - 1
    i1 = min(i0 + 1, last)
    xa, xb, ka, kb = kq.shape[1] * i0, kq.shape[1] * i1, ks.shape[1] * i0, ks.shape[1] * i1
    acc_a = vzero()
    acc_b = vzero()
    for b in range(kd.shape[1]):
        o = SB6 * b
        ta = izero()
        tb = izero()
        for h in range(2):
            for m in range(2):
                k = 16 * b + 8 * h + m
                a0, a1, a2, a3 = _offset(ks, ka + k), _offset(ks, ka + k + 2), _offset(ks, ka + k + 4), _offset(ks, ka + k + 6)
                b0, b1, b2, b3 = _offset(ks, kb + k), _offset(ks, kb + k + 2), _offset(ks, kb + k + 4), _offset(ks, kb + k + 6)
                x = 256 * b + 128 * h
                for n in range(4 * m, 4 * m + 4):
                    qa = bytes64(wr, o + 288 + 64 * (16 * h + n))
                    qb = bytes64(wr, o + 288 + 64 * (16 * h + 8 + n))
                    qh = bytes64(wr, o + 2336 + 64 * (8 * h + n))
                    c0, c1 = q6_codes(lo4(qa), qh, 0), q6_codes(lo4(qb), qh, 1)
                    c2, c3 = q6_codes(hi4(qa), qh, 2), q6_codes(hi4(qb), qh, 3)
                    xn = x + 4 * n
                    a0, b0 = dpbusd(a0, c0, bcast4(kq, xa + xn)), dpbusd(b0, c0, bcast4(kq, xb + xn))
                    a1, b1 = dpbusd(a1, c1, bcast4(kq, xa + xn + 32)), dpbusd(b1, c1, bcast4(kq, xb + xn + 32))
                    a2, b2 = dpbusd(a2, c2, bcast4(kq, xa + xn + 64)), dpbusd(b2, c2, bcast4(kq, xb + xn + 64))
                    a3, b3 = dpbusd(a3, c3, bcast4(kq, xa + xn + 96)), dpbusd(b3, c3, bcast4(kq, xb + xn + 96))
                sc = o + 32 + 16 * (8 * h + m)
                s0, s1, s2, s3 = s8x16(wr, sc), s8x16(wr, sc + 32), s8x16(wr, sc + 64), s8x16(wr, sc + 96)
                ta = iadd(ta, iadd(iadd(imul(a0, s0), imul(a1, s1)), iadd(imul(a2, s2), imul(a3, s3))))
                tb = iadd(tb, iadd(iadd(imul(b0, s0), imul(b1, s1)), iadd(imul(b2, s2), imul(b3, s3))))
        d = half16(wr, o)
        acc_a = vadd(acc_a, vmul(vtof(ta), vmul(d, vsplat(kd[i0, b]))))
        acc_b = vadd(acc_b, vmul(vtof(tb), vmul(d, vsplat(kd[i1, b]))))
    vstore(out, out.shape[1] * i0 + ROWS * g, acc_a)
    if i0 + 1 <= last:
        vstore(out, out.shape[1] * (i0 + 1) + ROWS * g, acc_b)
