"""The 8-bit-activation kernels of the K types (kernels/int8.py), which read the file's super-blocks as they are.

A K super-block holds its 256 weights' codes in 128 contiguous bytes (and Q5_K / Q6_K their high bits in 32 or 64
more), so a row's block is a few 64-byte vectors, each meeting 64 activation quants (ggml's q8_K of x: one scale dk
per 256, kernels/act8.py) in one vpdpbusd: 16 int32 lanes of 4 products. No repacking: slots mapped from the files
run these as well.

- Q4_K / Q5_K (sub-blocks of 32 with 6-bit scales and mins): qs[0:64] holds sub-blocks 0 and 2 in its low nibbles
  (each 32-byte chunk: weights 0-15 then 16-31) and 1 and 3 in its high ones; qs[64:128] likewise 4, 6 and 5, 7;
  Q5_K adds bit j of qh[l] to weight l of sub-block j. Lanes 0-7 of a dot product belong to one sub-block, 8-15 to
  the other: times the sub-block's scale and summed in integers into S, the super-block's; the mins give the
  integer M = sum of m_j * bsum_j (bsum_j: the sum of sub-block j's activation quants, two of `ks`'s sums of 16).
  Per row, S * (d * dk) and M * (dmin * dk) go into two float32 sums, the second taken from the first at the end
  (ggml's vec_dot_q4_K_q8_K arithmetic up to the order of its float operations; llama.cpp's repacked q4_K kernels keep the
  two sums apart too). A group folds its 4 rows' S and M into one vector (`row_sums4`) for the float steps.
- Q6_K (groups of 16 with int8 scales): half h's 64 low-nibble bytes and 32 high-pair bytes make the codes of
  weights 128h..128h+63 (low nibbles, pairs at shifts 0 and 2) and 128h+64..128h+127 (high nibbles, shifts 4 and 6);
  each dot product starts from -32 times its activations' lane sums (the codes' offset), its lanes times their
  group's scale, all summed in integers into T, the super-block's; per row T * (d * dk) goes into one float32 sum
  (ggml's integer sums per super-block, as Q4_K's; 4 rows folded into one vector for the float steps).

One float multiply-add per super-block and row, as ggml's vec_dot_q4_K_q8_K: with q8_0's scale per 32, each dot
product needed its own (1.4-2x slower, `/tmp` micro-benchmark; docs/BENCHMARKS.md).

Each `*_int8_reference` is its kernel in numpy, bit for bit (tests/test_int8.py): integer sums, float32 products
in the kernel's order. Q4_K and Q6_K are also packed by 16 rows where a weight is prepared (`_k8packed.py`), with
these kernels' bits.
numba's cache is keyed on each kernel's own file's contents: after editing this one, delete kernels/__pycache__/int8.*
(and experts8's, step's).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from mertools.kernels.common import MATVEC_JIT, R, group_rows, group_store_row, prefetch_lines
from mertools.kernels.simd import half_at, vadd, vmul, vsplat, vtof, vzero
from mertools.kernels.simd8 import (
    bsplat32,
    bytes32x2,
    bytes64,
    dpbusd,
    fold_sm,
    hi4,
    iadd,
    imul,
    ineg,
    ipairs_high8,
    izero,
    lane_diff,
    lanes8,
    lo4,
    pair_quarters,
    pick_0_2,
    pick_1_3,
    pick_4_6,
    pick_5_7,
    q5_codes,
    q6_high,
    q6_low,
    row_sums4,
    sbytes4x4,
)
from mertools.kernels.simd8x import lane_at

from ._blocks256 import scale_min_lanes, unpack_scale_min_k4

# simd8.dpbusd takes unsigned bytes below 128 (vpmaddubsw on AVX2): the codes here are at most 63. numba caches the
# intrinsics' code inside this file's kernels, keyed on its contents: this note came with that AVX2 path.

Q4_K_BYTES, Q5_K_BYTES, Q6_K_BYTES = 144, 176, 210
_PAIRS = ((0, 2), (1, 3), (4, 6), (5, 7))  # the sub-blocks of lanes 0-7 and 8-15 of each Q4_K / Q5_K dot product


def _half(b: np.ndarray, at: int) -> np.ndarray:
    return np.ascontiguousarray(b[..., at:at + 2]).view("<f2").astype(np.float32)  # (rows, nb, 1)


def _k4_reference(kq: np.ndarray, kd: np.ndarray, ks: np.ndarray, b: np.ndarray, codes: list[np.ndarray]) -> np.ndarray:
    """Q4_K / Q5_K: b uint8 (rows, nb, block bytes) with d, dmin and the scales at bytes 0-15; codes the four
    (rows, nb, 64) code vectors in _PAIRS order. Per row and super-block the integers S (each sub-block's dot product
    times its scale) and M (each min times its sub-block's activation sum); then S * (d * dk) and M * (dmin * dk)
    summed in block order, each in its own float32 sum, and the second taken from the first."""
    rows, nb = b.shape[:2]
    d, dmin = _half(b, 0)[..., 0], _half(b, 2)[..., 0]
    sc, m = (a.reshape(rows, nb, 8).astype(np.int64) for a in unpack_scale_min_k4(b[..., 4:16].reshape(-1, 12)))
    out = np.empty((kq.shape[0], rows), np.float32)
    for i in range(kq.shape[0]):
        x = kq[i].reshape(nb, 8, 32)
        s = np.zeros((rows, nb), np.int64)
        for v, (a, c) in enumerate(_PAIRS):
            dots = (codes[v] * np.concatenate([x[:, a], x[:, c]], axis=1)).reshape(rows, nb, 2, 32).sum(-1)
            s += dots[..., 0] * sc[..., a] + dots[..., 1] * sc[..., c]  # exact: within int32 (tests)
        mins = (m * ks[i].reshape(nb, 8, 2).sum(-1).astype(np.int64)).sum(-1)
        acc_s, acc_m = np.zeros(rows, np.float32), np.zeros(rows, np.float32)
        for blk in range(nb):  # block order, one float32 addition at a time
            acc_s = acc_s + s[:, blk].astype(np.float32) * (d[:, blk] * kd[i, blk])
            acc_m = acc_m + mins[:, blk].astype(np.float32) * (dmin[:, blk] * kd[i, blk])
        out[i] = acc_s - acc_m
    return out


def q4_k_int8_reference(kq: np.ndarray, kd: np.ndarray, ks: np.ndarray, w2: np.ndarray) -> np.ndarray:
    """`k4_group` in numpy: kq int32 (n, cols/256, 256) the activations' q8_K quants, kd float32 (n, cols/256) their
    scales, ks int32 (n, cols/16) each 16 quants' sum, w2 uint8 (rows, row_bytes) -> float32 (n, rows)."""
    b = np.asarray(w2, np.uint8).reshape(w2.shape[0], -1, Q4_K_BYTES)
    qs = b[..., 16:].astype(np.int32)
    return _k4_reference(kq, kd, ks, b, [qs[..., :64] & 15, qs[..., :64] >> 4, qs[..., 64:] & 15, qs[..., 64:] >> 4])


def q5_k_int8_reference(kq: np.ndarray, kd: np.ndarray, ks: np.ndarray, w2: np.ndarray) -> np.ndarray:
    """`k4_group` with five in numpy (as q4_k_int8_reference, each code with its fifth bit)."""
    b = np.asarray(w2, np.uint8).reshape(w2.shape[0], -1, Q5_K_BYTES)
    qs = b[..., 48:].astype(np.int32)
    qh = np.tile(b[..., 16:48].astype(np.int32), 2)  # (rows, nb, 64): qh[l] beside both 32-byte chunks
    codes = []
    for v, nib in enumerate((qs[..., :64] & 15, qs[..., :64] >> 4, qs[..., 64:] & 15, qs[..., 64:] >> 4)):
        bits = np.array([_PAIRS[v][0]] * 32 + [_PAIRS[v][1]] * 32)  # the sub-block of each byte
        codes.append(nib | (((qh >> bits) & 1) << 4))
    return _k4_reference(kq, kd, ks, b, codes)


def q6_k_int8_reference(kq: np.ndarray, kd: np.ndarray, ks: np.ndarray, w2: np.ndarray) -> np.ndarray:
    """`q6_k_group` in numpy (ks unused: the code offset's sums come from kq): per row and super-block the integer
    T = the sum over its 16 groups of scale * ((code - 32) . x), then T * (d * dk) summed in block order in float32."""
    rows = w2.shape[0]
    b = np.asarray(w2, np.uint8).reshape(rows, -1, Q6_K_BYTES)
    d = _half(b, 208)[..., 0]
    sc = np.ascontiguousarray(b[..., 192:208]).view(np.int8).astype(np.int64)  # (rows, nb, 16)
    codes = []  # weight order: per half, its low nibbles (pairs at shifts 0, 2) then its high ones (4, 6)
    for h in range(2):
        ql = b[..., 64 * h:64 * h + 64].astype(np.int64)
        qh = np.tile(b[..., 128 + 32 * h:160 + 32 * h].astype(np.int64), 2)
        for nib, shifts in ((ql & 15, [0] * 32 + [2] * 32), (ql >> 4, [4] * 32 + [6] * 32)):
            codes.append(nib | (((qh >> np.array(shifts)) & 3) << 4))
    q = np.concatenate(codes, axis=-1) - 32  # (rows, nb, 256)
    return group_scaled_sums(q, sc, d, kq, kd)


def group_scaled_sums(q: np.ndarray, sc: np.ndarray, d: np.ndarray, kq: np.ndarray, kd: np.ndarray) -> np.ndarray:
    """The twins' common end for types with one signed scale per 16 weights and no mins (Q6_K, Q3_K): q int64 (rows,
    nb, 256) signed codes, sc int64 (rows, nb, 16), d float32 (rows, nb) -> float32 (n, rows): per row and super-block
    the integer T = sum_k sc_k * (q . x)_k, then T * (d * dk) added to one float32 sum in block order."""
    rows, nb = q.shape[0], q.shape[1]
    out = np.empty((kq.shape[0], rows), np.float32)
    for i in range(kq.shape[0]):
        t = ((q * kq[i].reshape(nb, 256)).reshape(rows, nb, 16, 16).sum(-1) * sc).sum(-1)  # exact: within int32
        acc = np.zeros(rows, np.float32)
        for blk in range(nb):  # block order, one float32 addition at a time
            acc = acc + t[:, blk].astype(np.float32) * (d[:, blk] * kd[i, blk])
        out[i] = acc
    return out


# ---------------------------------------------------------------- kernels


@njit(**MATVEC_JIT)
def _k4_sm(wr, o, c0, c1, c2, c3, x0, x1, x2, x3, xb):
    """A Q4_K / Q5_K row's super-block at o, its four code vectors c_v, against a q8_K block's activation vectors (xb:
    its sub-blocks' quant sums in lanes 8-15): lanes 0-7 sum to S (the sub-blocks' dot products times their scales),
    lanes 8-15 to M (the mins times the activation sums), all in integers."""
    lanes = scale_min_lanes(wr, o)
    s = imul(dpbusd(izero(), c0, x0), pick_0_2(lanes))
    s = iadd(s, imul(dpbusd(izero(), c1, x1), pick_1_3(lanes)))
    s = iadd(s, imul(dpbusd(izero(), c2, x2), pick_4_6(lanes)))
    s = iadd(s, imul(dpbusd(izero(), c3, x3), pick_5_7(lanes)))
    return fold_sm(s, imul(lanes, xb))


@njit(**MATVEC_JIT)
def _k4_codes(wr, o, five):
    """The four code vectors (in _PAIRS order) of the Q4_K / Q5_K (five) super-block at o of a row."""
    q = o + (48 if five else 16)  # the low nibbles
    qa, qb = bytes64(wr, q), bytes64(wr, q + 64)
    if five:
        qh = bytes32x2(wr, o + 16, o + 16)
        return q5_codes(lo4(qa), qh, 0), q5_codes(hi4(qa), qh, 1), q5_codes(lo4(qb), qh, 4), q5_codes(hi4(qb), qh, 5)
    return lo4(qa), hi4(qa), lo4(qb), hi4(qb)


@njit(**MATVEC_JIT)
def _k4_x(kq, ks, i, blk):
    """Block blk of q8_K activation row i as `_k4_sm` takes it: its four vectors (in _PAIRS order), and its 8 quant
    sums in lanes 8-15."""
    xo = kq.shape[1] * i + 256 * blk
    return (bytes32x2(kq, xo, xo + 64), bytes32x2(kq, xo + 32, xo + 96), bytes32x2(kq, xo + 128, xo + 192),
            bytes32x2(kq, xo + 160, xo + 224), ipairs_high8(ks, ks.shape[1] * i + 16 * blk))


@njit(**MATVEC_JIT)
def _k4_sm_codes(wr, o, five, x0, x1, x2, x3, xb):
    c0, c1, c2, c3 = _k4_codes(wr, o, five)
    return _k4_sm(wr, o, c0, c1, c2, c3, x0, x1, x2, x3, xb)


@njit(**MATVEC_JIT)
def k4_group(kq, kd, ks, i, w, r0, out, io, five):
    """out[io, r0:r0+4] = W[r0:r0+4] @ x for the q8_K activation row i of (kq, kd, ks): Q4_K, or Q5_K (five). The 4
    rows' S and M (`_k4_sm`) folded into one vector (lanes 0-3 S, 8-11 M: `row_sums4`, `pair_quarters`), which meets
    [d_r * dk, dmin_r * dk] in one multiply-add: lanes 0-3 the rows' S sums, 8-11 their M sums."""
    w0, w1, w2, w3 = group_rows(w, r0)
    acc = vzero()
    ahead = (r0 + R) * w.shape[1]
    bsz = Q5_K_BYTES if five else Q4_K_BYTES
    for blk in range(kd.shape[1]):
        o = bsz * blk
        prefetch_lines(w, ahead + 4 * o, 4 * bsz)
        x0, x1, x2, x3, xb = _k4_x(kq, ks, i, blk)
        t = row_sums4(_k4_sm_codes(w0, o, five, x0, x1, x2, x3, xb), _k4_sm_codes(w1, o, five, x0, x1, x2, x3, xb),
                      _k4_sm_codes(w2, o, five, x0, x1, x2, x3, xb), _k4_sm_codes(w3, o, five, x0, x1, x2, x3, xb))
        dm = lanes8(half_at(w0, o), half_at(w1, o), half_at(w2, o), half_at(w3, o),
                    half_at(w0, o + 2), half_at(w1, o + 2), half_at(w2, o + 2), half_at(w3, o + 2))
        acc = vadd(acc, vmul(vtof(pair_quarters(t)), vmul(dm, vsplat(kd[i, blk]))))
    group_store_row(out, io, r0, lane_diff(acc, 0), lane_diff(acc, 1), lane_diff(acc, 2), lane_diff(acc, 3))


@njit(**MATVEC_JIT)
def _q6_s(wr, o, x0, x1, x2, x3, c0, c1, c2, c3):
    """A Q6_K row's super-block at o: 16 int32 lanes summing to its T; c_v = -32 * the lane sums of x_v (the codes'
    offset)."""
    ql0, qh0 = bytes64(wr, o), bytes32x2(wr, o + 128, o + 128)
    ql1, qh1 = bytes64(wr, o + 64), bytes32x2(wr, o + 160, o + 160)
    s = imul(dpbusd(c0, q6_low(ql0, qh0), x0), sbytes4x4(wr, o + 192))
    s = iadd(s, imul(dpbusd(c1, q6_high(ql0, qh0), x1), sbytes4x4(wr, o + 196)))
    s = iadd(s, imul(dpbusd(c2, q6_low(ql1, qh1), x2), sbytes4x4(wr, o + 200)))
    return iadd(s, imul(dpbusd(c3, q6_high(ql1, qh1), x3), sbytes4x4(wr, o + 204)))


@njit(inline="always", **MATVEC_JIT)
def _totals4(s0, s1, s2, s3):
    """The sums of four 16-lane int32 vectors in lanes 0..3 (lanes 8..15 zero)."""
    return fold_sm(pair_quarters(row_sums4(s0, s1, s2, s3)), izero())


@njit(**MATVEC_JIT)
def _q6_x(kq, kd, i, blk, k32):
    """Block blk of q8_K activation row i as `_q6_s` takes it: its four 64-byte vectors, minus 32 times their lane
    sums (the codes' offset), dk."""
    xo = kq.shape[1] * i + 256 * blk
    x0, x1, x2, x3 = bytes64(kq, xo), bytes64(kq, xo + 64), bytes64(kq, xo + 128), bytes64(kq, xo + 192)
    return (x0, x1, x2, x3, ineg(dpbusd(izero(), k32, x0)), ineg(dpbusd(izero(), k32, x1)),
            ineg(dpbusd(izero(), k32, x2)), ineg(dpbusd(izero(), k32, x3)), kd[i, blk])


@njit(**MATVEC_JIT)
def q6_k_group(kq, kd, i, w, r0, out, io):
    """out[io, r0:r0+4] = W[r0:r0+4] @ x for the q8_K activation row i of (kq, kd), Q6_K: the 4 rows' T (`_q6_s`)
    folded into lanes 0..3, which meet [d_r * dk] in one multiply-add."""
    w0, w1, w2, w3 = group_rows(w, r0)
    acc = vzero()
    ahead = (r0 + R) * w.shape[1]
    k32 = bsplat32()
    z = np.float32(0.0)
    for blk in range(kd.shape[1]):
        o = Q6_K_BYTES * blk
        prefetch_lines(w, ahead + 4 * o, 4 * Q6_K_BYTES)
        x0, x1, x2, x3, c0, c1, c2, c3, dk = _q6_x(kq, kd, i, blk, k32)
        t = _totals4(_q6_s(w0, o, x0, x1, x2, x3, c0, c1, c2, c3), _q6_s(w1, o, x0, x1, x2, x3, c0, c1, c2, c3),
                     _q6_s(w2, o, x0, x1, x2, x3, c0, c1, c2, c3), _q6_s(w3, o, x0, x1, x2, x3, c0, c1, c2, c3))
        d = lanes8(half_at(w0, o + 208), half_at(w1, o + 208), half_at(w2, o + 208), half_at(w3, o + 208), z, z, z, z)
        acc = vadd(acc, vmul(vtof(t), vmul(d, vsplat(dk))))
    group_store_row(out, io, r0, lane_at(acc, 0), lane_at(acc, 1), lane_at(acc, 2), lane_at(acc, 3))


# ---------------------------------------------------------------- a prompt's rows: one weight row against 8 rows of x


@njit(**MATVEC_JIT)
def _rows8(i0, last):
    """Activation rows i0..i0+7, those past `last` replaced by it (computed, not stored)."""
    return (i0, min(i0 + 1, last), min(i0 + 2, last), min(i0 + 3, last), min(i0 + 4, last), min(i0 + 5, last),
            min(i0 + 6, last), min(i0 + 7, last))


@njit(**MATVEC_JIT)
def _k4_sm_x(wr, o, c0, c1, c2, c3, kq, ks, i, blk):
    """`_k4_sm` against block blk of activation row i."""
    x0, x1, x2, x3, xb = _k4_x(kq, ks, i, blk)
    return _k4_sm(wr, o, c0, c1, c2, c3, x0, x1, x2, x3, xb)


@njit(**MATVEC_JIT)
def _k4_rows4(wr, o, c0, c1, c2, c3, kq, kd, ks, i0, i1, i2, i3, blk, acc):
    """`k4_group`'s step for one weight row against activation rows i0..i3 (lanes 0-3: their S sums, 8-11: M)."""
    t = row_sums4(_k4_sm_x(wr, o, c0, c1, c2, c3, kq, ks, i0, blk), _k4_sm_x(wr, o, c0, c1, c2, c3, kq, ks, i1, blk),
                  _k4_sm_x(wr, o, c0, c1, c2, c3, kq, ks, i2, blk), _k4_sm_x(wr, o, c0, c1, c2, c3, kq, ks, i3, blk))
    d, dmin = half_at(wr, o), half_at(wr, o + 2)
    dk = lanes8(kd[i0, blk], kd[i1, blk], kd[i2, blk], kd[i3, blk], kd[i0, blk], kd[i1, blk], kd[i2, blk], kd[i3, blk])
    return vadd(acc, vmul(vtof(pair_quarters(t)), vmul(lanes8(d, d, d, d, dmin, dmin, dmin, dmin), dk)))


@njit(**MATVEC_JIT)
def k4_rows(kq, kd, ks, i0, w, r, out, five):
    """out[i0:i0+8, r] = W[r] @ x_i for the q8_K activation rows i0..i0+7 (fewer past the last): Q4_K, or Q5_K (five).
    Each row's result is the bits of `k4_group`'s (the same integers and float steps per row and block); the weight
    row's codes are decoded once per block for the 8 rows, where a group decodes them again for every row of a
    prompt."""
    wr = w[r]
    last = kq.shape[0] - 1
    i0, i1, i2, i3, i4, i5, i6, i7 = _rows8(i0, last)
    a = vzero()
    b = vzero()
    bsz = Q5_K_BYTES if five else Q4_K_BYTES
    for blk in range(kd.shape[1]):
        o = bsz * blk
        c0, c1, c2, c3 = _k4_codes(wr, o, five)
        a = _k4_rows4(wr, o, c0, c1, c2, c3, kq, kd, ks, i0, i1, i2, i3, blk, a)
        b = _k4_rows4(wr, o, c0, c1, c2, c3, kq, kd, ks, i4, i5, i6, i7, blk, b)
    sums = (lane_diff(a, 0), lane_diff(a, 1), lane_diff(a, 2), lane_diff(a, 3),
            lane_diff(b, 0), lane_diff(b, 1), lane_diff(b, 2), lane_diff(b, 3))
    for j in range(min(8, last + 1 - i0)):
        out[i0 + j, r] = sums[j]


@njit(**MATVEC_JIT)
def _q6_s_x(wr, o, kq, kd, i, blk, k32):
    """`_q6_s` against block blk of activation row i."""
    x0, x1, x2, x3, c0, c1, c2, c3, _ = _q6_x(kq, kd, i, blk, k32)
    return _q6_s(wr, o, x0, x1, x2, x3, c0, c1, c2, c3)


@njit(**MATVEC_JIT)
def _q6_rows4(wr, o, kq, kd, i0, i1, i2, i3, blk, k32, acc):
    """`q6_k_group`'s step for one weight row against activation rows i0..i3 (lanes 0..3)."""
    t = _totals4(_q6_s_x(wr, o, kq, kd, i0, blk, k32), _q6_s_x(wr, o, kq, kd, i1, blk, k32),
                 _q6_s_x(wr, o, kq, kd, i2, blk, k32), _q6_s_x(wr, o, kq, kd, i3, blk, k32))
    z = np.float32(0.0)
    dk = lanes8(kd[i0, blk], kd[i1, blk], kd[i2, blk], kd[i3, blk], z, z, z, z)
    return vadd(acc, vmul(vtof(t), vmul(vsplat(half_at(wr, o + 208)), dk)))


@njit(**MATVEC_JIT)
def q6_k_rows(kq, kd, i0, w, r, out):
    """out[i0:i0+8, r] = W[r] @ x_i for the q8_K activation rows i0..i0+7 (fewer past the last), Q6_K: each row the
    bits of `q6_k_group`'s."""
    wr = w[r]
    last = kq.shape[0] - 1
    i0, i1, i2, i3, i4, i5, i6, i7 = _rows8(i0, last)
    a = vzero()
    b = vzero()
    k32 = bsplat32()
    for blk in range(kd.shape[1]):
        o = Q6_K_BYTES * blk
        a = _q6_rows4(wr, o, kq, kd, i0, i1, i2, i3, blk, k32, a)
        b = _q6_rows4(wr, o, kq, kd, i4, i5, i6, i7, blk, k32, b)
    sums = (lane_at(a, 0), lane_at(a, 1), lane_at(a, 2), lane_at(a, 3), lane_at(b, 0), lane_at(b, 1), lane_at(b, 2),
            lane_at(b, 3))
    for j in range(min(8, last + 1 - i0)):
        out[i0 + j, r] = sums[j]
