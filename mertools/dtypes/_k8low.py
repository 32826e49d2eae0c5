"""The 8-bit-activation kernels of Q2_K and Q3_K (kernels/int8.py), which read the file's super-blocks as they are.

Both keep their 256 weights' low 2 bits in 64 bytes qs: weight 128h + 32s + l has (qs[32h + l] >> 2s) & 3. So the
64 bytes shifted by 2s and masked are the codes of weights 32s + (0..31) and 128 + 32s + (0..31), which meet the
activation quants of those weights (ggml's q8_K: one scale dk per 256, kernels/act8.py) in one vpdpbusd: lanes
4r..4r+3 hold group g(r, s) = 8(r // 2) + 2s + r % 2 (groups of 16 weights). `row_sums4` of the 4 dot products
(s = 0..3) puts group g(r, s)'s sum in lane 4r + s; one multiply by the scales, loaded in that order, weighs them.

- Q2_K (84 bytes: scales[16], low nibble scale, high nibble min; qs; d, dmin f16 at 80, 82): codes 0..3, so the
  integers are S = sum_k sc_k * (q . x)_k and M = sum_k m_k * bsum_k (bsum_k: `ks`, group k's activation quants
  summed). Per row and super-block f = S * (d * dk) - M * (dmin * dk), added to one float32 sum: ggml's
  vec_dot_q2_K_q8_K as its generic code writes it (its AVX2 code fuses the steps in 8 float lanes).
- Q3_K (110 bytes: hmask[32], qs at 32, scales[12] at 96 (6 bits, + 32), d f16 at 108): code u = low | high << 2
  (high: bit 4h + s of hmask[l]), the weight (d * (sc - 32)) * (u - 4). Lanes hold (u . x) - 4 * bsum (`q3_offsets`),
  times the signed scales, summed in integers into T; per row T * (d * dk) goes into one float32 sum (ggml's
  integers; its generic code sums 8 float lanes of per-lane integers instead).

A group of 4 rows (`low_k_group`) folds each row's vector (Q2_K: lanes 0-7 S, 8-15 M, `fold_halves`) into one
(`_fold4`: lane r its S or T, lane 8 + r its M), which meets [d_r * dk, dmin_r * dk] in one multiply, M's products
taken from S's (`low_minus_high`). `q2_k_int8_reference` / `q3_k_int8_reference` are the kernels in numpy, bit for
bit (tests/test_int8.py, tests/test_int8_low.py). numba's cache holds a kernel's callees' code and is keyed on its
own file's contents: after editing this one, kernels/int8.py's (and experts8's, step's) cache must go (delete their
__pycache__ entries; a touch does not do it).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from mertools.kernels.common import MATVEC_JIT, R, group_rows, group_store_row, prefetch_lines
from mertools.kernels.simd import F32x16, I32x16, half_at, is_carray, is_int, nib16, ptr_at, vadd, vmul, vsplat, vtof, vty, vzero
from mertools.kernels.simd8 import (
    B64,
    bytes32x2,
    bytes64,
    dpbusd,
    fold_sm,
    iadd,
    imul,
    ishr,
    izero,
    lanes8,
    pair_quarters,
    row_sums4,
)
from mertools.kernels.simd8x import lane_at

from ._k8 import group_scaled_sums

# simd8.dpbusd takes unsigned bytes below 128 (vpmaddubsw on AVX2): the codes here are at most 63. numba caches the
# intrinsics' code inside this file's kernels, keyed on its contents: this note came with that AVX2 path.

Q2_K_BYTES, Q3_K_BYTES = 84, 110
_I8, _I32 = ir.IntType(8), ir.IntType(32)
_GROUP_OF_LANE = [8 * (lane // 8) + 2 * (lane % 4) + (lane // 4) % 2 for lane in range(16)]  # lane 4r + s: g(r, s)


# ---------------------------------------------------------------- numpy twins


def _half(b: np.ndarray, at: int) -> np.ndarray:
    return np.ascontiguousarray(b[..., at:at + 2]).view("<f2").astype(np.float32)[..., 0]  # (rows, nb)


def _low_codes(qs: np.ndarray) -> np.ndarray:
    """qs int64 (rows, nb, 64) -> the 2-bit codes (rows, nb, 256) in weight order."""
    return np.concatenate([(qs[..., 32 * h:32 * h + 32] >> (2 * s)) & 3 for h in range(2) for s in range(4)], axis=-1)


def q2_k_int8_reference(kq: np.ndarray, kd: np.ndarray, ks: np.ndarray, w2: np.ndarray) -> np.ndarray:
    """`low_k_group` for Q2_K in numpy: kq int32 (n, cols/256, 256) the activations' q8_K quants, kd float32 (n, cols/256) their
    scales, ks int32 (n, cols/16) each 16 quants' sum, w2 uint8 (rows, row_bytes) -> float32 (n, rows). Per row and
    super-block the integers S = sum_k sc_k * (q . x)_k and M = sum_k m_k * ks_k, then S * (d * dk) - M * (dmin * dk)
    added to one float32 sum in block order."""
    rows = w2.shape[0]
    b = np.asarray(w2, np.uint8).reshape(rows, -1, Q2_K_BYTES)
    nb = b.shape[1]
    d, dmin = _half(b, 80), _half(b, 82)
    sc, m = (b[..., :16] & 15).astype(np.int64), (b[..., :16] >> 4).astype(np.int64)
    q = _low_codes(b[..., 16:80].astype(np.int64))
    out = np.empty((kq.shape[0], rows), np.float32)
    for i in range(kq.shape[0]):
        s = ((q * kq[i].reshape(nb, 256)).reshape(rows, nb, 16, 16).sum(-1) * sc).sum(-1)  # exact: within int32
        mins = (m * ks[i].reshape(nb, 16).astype(np.int64)).sum(-1)
        acc = np.zeros(rows, np.float32)
        for blk in range(nb):  # block order, one float32 operation at a time
            f = s[:, blk].astype(np.float32) * (d[:, blk] * kd[i, blk]) - mins[:, blk].astype(np.float32) * (
                dmin[:, blk] * kd[i, blk])
            acc = acc + f
        out[i] = acc
    return out


def q3_k_int8_reference(kq: np.ndarray, kd: np.ndarray, ks: np.ndarray, w2: np.ndarray) -> np.ndarray:
    """`low_k_group` for Q3_K in numpy (ks unused: q = code - 4 directly): per row and super-block the integer T = the
    sum over its 16 groups of (sc_k - 32) * (q . x)_k; then T * (d * dk) summed in block order in float32."""
    rows = w2.shape[0]
    b = np.asarray(w2, np.uint8).reshape(rows, -1, Q3_K_BYTES)
    d = _half(b, 108)
    hm = b[..., :32].astype(np.int64)
    high = np.concatenate([(hm >> j) & 1 for j in range(8)], axis=-1)  # weight 32j + l: bit j of hmask[l]
    q = _low_codes(b[..., 32:96].astype(np.int64)) + 4 * high - 4
    s, k = b[..., 96:108].astype(np.int64), np.arange(16)
    sc = (((s[..., k % 8] >> (4 * (k // 8))) & 15) | (((s[..., 8 + k % 4] >> (2 * (k // 4))) & 3) << 4)) - 32
    return group_scaled_sums(q, sc, d, kq, kd)


# ---------------------------------------------------------------- intrinsics


def _const(t: ir.Type, values: list[int]) -> ir.Constant:
    return ir.Constant(vty(t, len(values)), values)


def _load(context, builder, sig, args, t: ir.Type, align: int = 1):
    return builder.load(ptr_at(context, builder, sig.args[0], args[0], args[1], t), align=align)


@intrinsic
def ivload16(typingctx, a, i):
    """a[i:i+16] of an int32 C array."""
    if not (is_carray(a, types.int32) and is_int(i)):
        return None

    def codegen(context, builder, sig, args):
        return _load(context, builder, sig, args, vty(_I32), 4)

    return I32x16(a, i), codegen


@intrinsic
def q2_scales(typingctx, w, o):
    """The 4-bit scales (low nibbles of the 16 bytes at o) of a Q2_K super-block, group g(r, s) in lane 4r + s."""
    if not (is_carray(w, types.uint8) and is_int(o)):
        return None

    def codegen(context, builder, sig, args):
        v = _load(context, builder, sig, args, vty(_I8))
        v = builder.shuffle_vector(v, v, _const(_I32, _GROUP_OF_LANE))
        return builder.and_(builder.zext(v, vty(_I32)), _const(_I32, [15] * 16))

    return I32x16(w, o), codegen


# the 16 bytes read end with the block (o + 94): scales byte j is lane 2 + j
_Q3_SC = [(2 + k % 8, 4 * (k // 8), 10 + k % 4, 2 * (k // 4)) for k in _GROUP_OF_LANE]


@intrinsic
def q3_scales(typingctx, w, o):
    """The signed 6-bit scales (sc - 32) of the Q3_K super-block at o, group g(r, s) in lane 4r + s."""
    if not (is_carray(w, types.uint8) and is_int(o)):
        return None

    def codegen(context, builder, sig, args):
        at = builder.add(args[1], ir.Constant(args[1].type, 94))
        v = builder.zext(_load(context, builder, sig, [args[0], at], vty(_I8)), vty(_I32))

        def bits(col: int, mask: int):
            picked = builder.shuffle_vector(v, v, _const(_I32, [c[col] for c in _Q3_SC]))
            return builder.and_(builder.lshr(picked, _const(_I32, [c[col + 1] for c in _Q3_SC])), _const(_I32, [mask] * 16))

        sc = builder.or_(bits(0, 15), builder.shl(bits(2, 3), _const(_I32, [4] * 16)))
        return builder.sub(sc, _const(_I32, [32] * 16))

    return I32x16(w, o), codegen


def _crumbs(s: int):
    """Intrinsic v (B64) -> (v >> 2s) & 3 of each byte: the 2-bit codes of weights 32s + (0..31), 128 + 32s + ..."""

    @intrinsic
    def fn(typingctx, v):
        if v != B64:
            return None

        def codegen(context, builder, sig, args):
            x = builder.lshr(args[0], _const(_I8, [2 * s] * 64)) if s else args[0]
            return builder.and_(x, _const(_I8, [3] * 64))

        return B64(v), codegen

    return fn


crumbs0, crumbs1, crumbs2, crumbs3 = (_crumbs(s) for s in range(4))


@intrinsic
def q3_high(typingctx, w, o):
    """A Q3_K super-block's hmask (32 bytes at o) then the same shifted right by 4: byte l's bit s is the high bit
    of weight 32s + l, byte 32 + l's of weight 128 + 32s + l (s < 4)."""
    if not (is_carray(w, types.uint8) and is_int(o)):
        return None

    def codegen(context, builder, sig, args):
        v = _load(context, builder, sig, args, vty(_I8, 32))
        return builder.shuffle_vector(v, builder.lshr(v, _const(_I8, [4] * 32)), _const(_I32, list(range(64))))

    return B64(w, o), codegen


def _q3_codes(s: int):
    """Intrinsic (qs, high) -> Q3_K's unsigned codes u = low | high bit << 2 of dot product s (0..7; q = u - 4)."""

    @intrinsic
    def fn(typingctx, q, h):
        if not (q == B64 and h == B64):
            return None

        def codegen(context, builder, sig, args):
            lo = builder.lshr(args[0], _const(_I8, [2 * s] * 64)) if s else args[0]
            hi = args[1]
            if s < 2:
                hi = builder.shl(hi, _const(_I8, [2 - s] * 64))
            elif s == 3:
                hi = builder.lshr(hi, _const(_I8, [1] * 64))
            return builder.or_(builder.and_(lo, _const(_I8, [3] * 64)), builder.and_(hi, _const(_I8, [4] * 64)))

        return B64(q, h), codegen

    return fn


q3_codes0, q3_codes1, q3_codes2, q3_codes3 = (_q3_codes(s) for s in range(4))


@intrinsic
def fold_halves(typingctx, s, m):
    """Lanes 0..7: s[l] + s[l + 8]; lanes 8..15: m[l - 8] + m[l] (a row's S and M lanes in one vector)."""
    if not (s == I32x16 and m == I32x16):
        return None

    def codegen(context, builder, sig, args):
        a = builder.shuffle_vector(args[0], args[1], _const(_I32, list(range(8)) + list(range(24, 32))))
        b = builder.shuffle_vector(args[0], args[1], _const(_I32, list(range(8, 24))))
        return builder.add(a, b)

    return I32x16(s, m), codegen


@intrinsic
def low_minus_high(typingctx, v):
    """float32 lanes 0..7: v[l] - v[l + 8]; lanes 8..15: 0."""
    if v != F32x16:
        return None

    def codegen(context, builder, sig, args):
        z = ir.Constant(vty(ir.FloatType()), [0.0] * 16)
        lo = builder.shuffle_vector(args[0], z, _const(_I32, list(range(8)) + list(range(16, 24))))
        hi = builder.shuffle_vector(args[0], z, _const(_I32, list(range(8, 24))))
        return builder.fsub(lo, hi)

    return F32x16(v), codegen


@intrinsic
def halves4(typingctx, w0, w1, w2, w3, o, two):
    """float32 lanes 0..3: the f16 at byte o of rows w0..w3 (uint8 C arrays); with `two` (a literal bool) lanes 8..11
    the f16 at o + 2 (Q2_K's d, dmin); other lanes 0. One 4-byte load per row and one conversion, where `lanes8` of
    `half_at`s converts and inserts each half apart."""
    if not (all(is_carray(a, types.uint8) for a in (w0, w1, w2, w3)) and is_int(o) and isinstance(two, types.Literal)):
        return None
    pair = bool(two.literal_value)

    def codegen(context, builder, sig, args):
        t = ir.IntType(32 if pair else 16)
        v = ir.Constant(vty(t, 4), ir.Undefined)
        for r in range(4):
            x = builder.load(ptr_at(context, builder, sig.args[r], args[r], args[4], t), align=1)
            v = builder.insert_element(v, x, ir.Constant(_I32, r))
        f = builder.fpext(builder.bitcast(v, vty(ir.HalfType(), 8 if pair else 4)), vty(ir.FloatType(), 8 if pair else 4))
        z = ir.Constant(f.type, [0.0] * (8 if pair else 4))
        lanes = [0, 2, 4, 6, 8, 8, 8, 8, 1, 3, 5, 7, 8, 8, 8, 8] if pair else [0, 1, 2, 3] + [4] * 12
        return builder.shuffle_vector(f, z, _const(_I32, lanes))

    return F32x16(w0, w1, w2, w3, o, two), codegen


@intrinsic
def q3_offsets(typingctx, ks, at):
    """-4 times ks[at + g(r, s)] (a q8_K block's 16 groups' quant sums) in lane 4r + s: Q3_K's code offset."""
    if not (is_carray(ks, types.int32) and is_int(at)):
        return None

    def codegen(context, builder, sig, args):
        v = _load(context, builder, sig, args, vty(_I32), 4)
        return builder.mul(builder.shuffle_vector(v, v, _const(_I32, _GROUP_OF_LANE)), _const(_I32, [-4] * 16))

    return I32x16(ks, at), codegen


# ---------------------------------------------------------------- kernels (three: Q3_K, else Q2_K)


@njit(**MATVEC_JIT)
def _row(wr, o, three):
    """The super-block at o of a row: its 4 code vectors (dot products s = 0..3), its scales in `row_sums4`'s lane
    order, and Q2_K's mins in group order (Q3_K: zeros)."""
    if three:
        q, h = bytes64(wr, o + 32), q3_high(wr, o)
        return q3_codes0(q, h), q3_codes1(q, h), q3_codes2(q, h), q3_codes3(q, h), q3_scales(wr, o), izero()
    q = bytes64(wr, o + 16)
    return crumbs0(q), crumbs1(q), crumbs2(q), crumbs3(q), q2_scales(wr, o), ishr(nib16(wr, o), 4)


@njit(**MATVEC_JIT)
def _act(kq, ks, i, blk, three):
    """Block blk of q8_K activation row i: for s = 0..3 the quants of weights 32s + (0..31) and 128 + 32s + (0..31),
    then its 16 groups' sums (Q2_K's mins meet them), or -4 times them in `row_sums4`'s order (Q3_K's offset)."""
    xo, at = kq.shape[1] * i + 256 * blk, ks.shape[1] * i + 16 * blk
    return (bytes32x2(kq, xo, xo + 128), bytes32x2(kq, xo + 32, xo + 160), bytes32x2(kq, xo + 64, xo + 192),
            bytes32x2(kq, xo + 96, xo + 224), q3_offsets(ks, at) if three else ivload16(ks, at))


@njit(**MATVEC_JIT)
def _sm(c0, c1, c2, c3, sc, m, x0, x1, x2, x3, xs, three):
    """One row's super-block against one activation block, in integers: Q2_K lanes 0-7 summing to S, 8-15 to M;
    Q3_K 16 lanes summing to T."""
    z = izero()
    dots = row_sums4(dpbusd(z, c0, x0), dpbusd(z, c1, x1), dpbusd(z, c2, x2), dpbusd(z, c3, x3))
    if three:
        return imul(iadd(dots, xs), sc)
    return fold_halves(imul(dots, sc), imul(m, xs))


@njit(**MATVEC_JIT)
def _sm_at(wr, o, x0, x1, x2, x3, xs, three):
    c0, c1, c2, c3, sc, m = _row(wr, o, three)
    return _sm(c0, c1, c2, c3, sc, m, x0, x1, x2, x3, xs, three)


@njit(inline="always", **MATVEC_JIT)
def _fold4(v0, v1, v2, v3, three):
    """4 rows' `_sm` vectors folded: row r's S in lane r, its M in lane 8 + r (Q3_K: T in lane r, lanes 8.. zero)."""
    t = pair_quarters(row_sums4(v0, v1, v2, v3))
    return fold_sm(t, izero()) if three else t


@njit(**MATVEC_JIT)
def low_k_group(kq, kd, ks, i, w, r0, out, io, three):
    """out[io, r0:r0+4] = W[r0:r0+4] @ x for the q8_K activation row i of (kq, kd, ks), Q2_K or Q3_K (three): the 4
    rows' integers (`_fold4`) times [d_r * dk, dmin_r * dk] (Q3_K: [d_r * dk, 0]), M's products taken from S's, added
    to the rows' sums."""
    w0, w1, w2, w3 = group_rows(w, r0)
    acc = vzero()
    bsz = Q3_K_BYTES if three else Q2_K_BYTES
    ahead = (r0 + R) * w.shape[1]
    for blk in range(kd.shape[1]):
        o = bsz * blk
        prefetch_lines(w, ahead + 4 * o, 4 * bsz)
        x0, x1, x2, x3, xs = _act(kq, ks, i, blk, three)
        t = _fold4(_sm_at(w0, o, x0, x1, x2, x3, xs, three), _sm_at(w1, o, x0, x1, x2, x3, xs, three),
                   _sm_at(w2, o, x0, x1, x2, x3, xs, three), _sm_at(w3, o, x0, x1, x2, x3, xs, three), three)
        dm = halves4(w0, w1, w2, w3, o + 108, False) if three else halves4(w0, w1, w2, w3, o + 80, True)
        acc = vadd(acc, low_minus_high(vmul(vtof(t), vmul(dm, vsplat(kd[i, blk])))))
    group_store_row(out, io, r0, lane_at(acc, 0), lane_at(acc, 1), lane_at(acc, 2), lane_at(acc, 3))


# ---------------------------------------------------------------- a prompt's rows: one weight row against 8 rows of x


@njit(**MATVEC_JIT)
def _sm_x(c0, c1, c2, c3, sc, m, kq, ks, i, blk, three):
    """`_sm` against block blk of activation row i."""
    x0, x1, x2, x3, xs = _act(kq, ks, i, blk, three)
    return _sm(c0, c1, c2, c3, sc, m, x0, x1, x2, x3, xs, three)


@njit(**MATVEC_JIT)
def _rows4(wr, o, c0, c1, c2, c3, sc, m, kq, kd, ks, i0, i1, i2, i3, blk, acc, three):
    """`low_k_group`'s step for one weight row against activation rows i0..i3 (lanes 0..3)."""
    t = _fold4(_sm_x(c0, c1, c2, c3, sc, m, kq, ks, i0, blk, three), _sm_x(c0, c1, c2, c3, sc, m, kq, ks, i1, blk, three),
               _sm_x(c0, c1, c2, c3, sc, m, kq, ks, i2, blk, three), _sm_x(c0, c1, c2, c3, sc, m, kq, ks, i3, blk, three),
               three)
    d, dmin = (half_at(wr, o + 108), np.float32(0.0)) if three else (half_at(wr, o + 80), half_at(wr, o + 82))
    dk = lanes8(kd[i0, blk], kd[i1, blk], kd[i2, blk], kd[i3, blk], kd[i0, blk], kd[i1, blk], kd[i2, blk], kd[i3, blk])
    return vadd(acc, low_minus_high(vmul(vtof(t), vmul(lanes8(d, d, d, d, dmin, dmin, dmin, dmin), dk))))


@njit(**MATVEC_JIT)
def low_k_rows(kq, kd, ks, i0, w, r, out, three):
    """out[i0:i0+8, r] = W[r] @ x_i for the q8_K activation rows i0..i0+7 (fewer past the last), Q2_K or Q3_K (three):
    each row the bits of `low_k_group`'s, the weight row's codes and scales decoded once per block for the 8."""
    wr = w[r]
    last = kq.shape[0] - 1
    i1, i2, i3, i4 = min(i0 + 1, last), min(i0 + 2, last), min(i0 + 3, last), min(i0 + 4, last)  # past the last:
    i5, i6, i7 = min(i0 + 5, last), min(i0 + 6, last), min(i0 + 7, last)  # computed, not stored
    a = vzero()
    b = vzero()
    bsz = Q3_K_BYTES if three else Q2_K_BYTES
    for blk in range(kd.shape[1]):
        o = bsz * blk
        c0, c1, c2, c3, sc, m = _row(wr, o, three)
        a = _rows4(wr, o, c0, c1, c2, c3, sc, m, kq, kd, ks, i0, i1, i2, i3, blk, a, three)
        b = _rows4(wr, o, c0, c1, c2, c3, sc, m, kq, kd, ks, i4, i5, i6, i7, blk, b, three)
    sums = (lane_at(a, 0), lane_at(a, 1), lane_at(a, 2), lane_at(a, 3), lane_at(b, 0), lane_at(b, 1), lane_at(b, 2),
            lane_at(b, 3))
    for j in range(min(8, last + 1 - i0)):
        out[i0 + j, r] = sums[j]
