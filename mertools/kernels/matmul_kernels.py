"""Numba kernels for x @ W.T with W in a GGML block layout, dequantizing on the fly: prefill (n > 1).

Decode (n == 1) has its own kernels in `matvec_kernels`.

Prefill: one tiled kernel for every dtype. Each parallel task owns RB weight rows, decodes an
RB x KC tile into a float32 buffer that stays in L1, and dots it with the KC-wide slices of all n
inputs, so each block is decoded once per call whatever n is and the weights are read once.

The tile's block decoders are LLVM vector IR (numba intrinsics): numba's auto-vectoriser turned the
natural loops into scalar or gather code at 1-2 cycles a weight. They compute exactly what
`dequantize` does (no fused multiply-add), so a tile is bit-identical to the reference weight. The
dot products use fastmath without `nnan`/`ninf`: reassociation lets LLVM vectorise the reductions,
while inf/NaN weights still propagate. Every kernel releases the GIL (nogil).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from mertools.kernels.quantize_kernels import f16_bits_to_f32

_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}
_JIT = {"nogil": True, "cache": True, "fastmath": _FASTMATH}

# dtype codes (one compiled kernel serves every dtype; the branch is taken once per tile)
F32, F16, Q4_0, Q8_0, Q4_K = 0, 1, 2, 3, 4
RB = 16  # weight rows per task (a multiple of 4, the dot's row blocking)
KC = 512  # columns per tile: RB x KC float32 = 32 KiB; a multiple of every block size

# ---------------------------------------------------------------- vector IR helpers


def _vec(ty: ir.Type, n: int) -> ir.VectorType:
    return ir.VectorType(ty, n)


def _ptr(context, builder, arrty, arr, offset, vty: ir.VectorType):
    """Pointer to element `offset` of a contiguous numba array, typed as a pointer to vty."""
    data = context.make_array(arrty)(context, builder, arr).data
    return builder.bitcast(builder.gep(data, [offset]), vty.as_pointer())


def _splat(builder, value, n: int):
    vty = _vec(value.type, n)
    v = builder.insert_element(ir.Constant(vty, ir.Undefined), value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(v, ir.Constant(vty, ir.Undefined), ir.Constant(_vec(ir.IntType(32), n), [0] * n))


# The intrinsics index raw data pointers without bounds checks: callers compute offsets from the
# validated geometry, and the tests compare every path with the reference.
def _arrays_ok(src, src_dtype, dst) -> bool:
    return (
        isinstance(src, types.Array) and src.dtype == src_dtype and src.layout == "C"
        and isinstance(dst, types.Array) and dst.dtype == types.float32 and dst.layout == "C"
    )  # fmt: skip


def _ints(*ts) -> bool:
    return all(isinstance(t, types.Integer) for t in ts)


def _f32s(*ts) -> bool:
    return all(t == types.float32 for t in ts)


@intrinsic
def half_at(typingctx, src, so):
    """The little-endian f16 at byte `so` of the uint8 array src, as float32 (exact: one fpext)."""
    if not (isinstance(src, types.Array) and src.dtype == types.uint8 and src.layout == "C" and _ints(so)):
        return None
    sig = types.float32(src, so)

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        h = builder.load(builder.bitcast(builder.gep(data, [args[1]]), ir.HalfType().as_pointer()), align=1)
        return builder.fpext(h, ir.FloatType())

    return sig, codegen


def _nibble_decoder(nbytes: int, bias: int):
    """Intrinsic dst[do:do+n] = (lo-bias)*dl - ml, dst[do+n:do+2n] = (hi-bias)*dh - mh, n bytes at src[so:].

    lo/hi are the low/high nibbles; src uint8, dst float32, offsets in elements. The bias is taken in
    integers, as the reference does (ml = mh = 0 then changes nothing, not even a -0).
    """

    @intrinsic
    def decode(typingctx, src, so, dl, ml, dh, mh, dst, do):
        if not (_arrays_ok(src, types.uint8, dst) and _ints(so, do) and _f32s(dl, ml, dh, mh)):
            return None
        sig = types.void(src, so, dl, ml, dh, mh, dst, do)

        def codegen(context, builder, signature, args):
            s, so_, dl_, ml_, dh_, mh_, d, do_ = args
            v8 = builder.load(_ptr(context, builder, signature.args[0], s, so_, _vec(ir.IntType(8), nbytes)), align=1)
            v32 = builder.zext(v8, _vec(ir.IntType(32), nbytes))
            lo = builder.and_(v32, ir.Constant(v32.type, [15] * nbytes))
            hi = builder.lshr(v32, ir.Constant(v32.type, [4] * nbytes))
            fty = _vec(ir.FloatType(), nbytes)
            for part, nib, sc, mn in ((0, lo, dl_, ml_), (nbytes, hi, dh_, mh_)):
                nib = builder.sub(nib, ir.Constant(v32.type, [bias] * nbytes))
                scaled = builder.fmul(builder.sitofp(nib, fty), _splat(builder, sc, nbytes))
                val = builder.fsub(scaled, _splat(builder, mn, nbytes))
                off = builder.add(do_, ir.Constant(do_.type, part))
                builder.store(val, _ptr(context, builder, signature.args[6], d, off, fty), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return decode


decode_nibbles16 = _nibble_decoder(16, 8)  # one Q4_0 block: (q - 8) * d
decode_nibbles32 = _nibble_decoder(32, 0)  # one 64-weight chunk of a Q4_K super-block


@intrinsic
def decode_q8_32(typingctx, src, so, d, dst, do):
    """dst[do:do+32] = int8(src[so:so+32]) * d."""
    if not (_arrays_ok(src, types.uint8, dst) and _ints(so, do) and _f32s(d)):
        return None
    sig = types.void(src, so, d, dst, do)

    def codegen(context, builder, signature, args):
        s, so_, d_, dd, do_ = args
        v8 = builder.load(_ptr(context, builder, signature.args[0], s, so_, _vec(ir.IntType(8), 32)), align=1)
        fty = _vec(ir.FloatType(), 32)
        val = builder.fmul(builder.sitofp(v8, fty), _splat(builder, d_, 32))
        builder.store(val, _ptr(context, builder, signature.args[3], dd, do_, fty), align=4)
        return context.get_dummy_value()

    return sig, codegen


def _widen16(src_dtype, elem: ir.Type):
    """Intrinsic dst[do:do+16] = float32(src[so:so+16]) for a src of `src_dtype` (exact: fpext or copy)."""

    @intrinsic
    def widen(typingctx, src, so, dst, do):
        if not (_arrays_ok(src, src_dtype, dst) and _ints(so, do)):
            return None
        sig = types.void(src, so, dst, do)

        def codegen(context, builder, signature, args):
            s, so_, dd, do_ = args
            v = builder.load(_ptr(context, builder, signature.args[0], s, so_, _vec(elem, 16)), align=1)
            fty = _vec(ir.FloatType(), 16)
            if elem != ir.FloatType():
                v = builder.fpext(v, fty)
            builder.store(v, _ptr(context, builder, signature.args[2], dd, do_, fty), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return widen


decode_f16_16 = _widen16(types.uint16, ir.HalfType())  # src: the half bits viewed as uint16
copy_f32_16 = _widen16(types.float32, ir.FloatType())


# ---------------------------------------------------------------- tile decoders


@njit(**_JIT)
def scale_min_k4(wr, s, j):
    """ggml get_scale_min_k4: 6-bit (scale, min) of sub-block j from the 12 bytes at wr[s:]."""
    if j < 4:
        return np.int64(wr[s + j]) & 63, np.int64(wr[s + j + 4]) & 63
    sc = (np.int64(wr[s + j + 4]) & 0xF) | ((np.int64(wr[s + j - 4]) >> 6) << 4)
    m = (np.int64(wr[s + j + 4]) >> 4) | ((np.int64(wr[s + j]) >> 6) << 4)
    return sc, m


@njit(**_JIT)
def decode_tile(kind, w, r0, rb, k0, kc, buf):
    """buf[r, :kc] = W[r0 + r, k0:k0+kc] for r < rb. w: uint8 (rows, row_bytes); buf: float32 (RB, KC)."""
    for r in range(rb):
        wr = w[r0 + r]
        at = r * KC  # flat offset of buf row r
        if kind == Q4_0:
            for b in range(kc // 32):
                o = (k0 // 32 + b) * 18
                d = half_at(wr, o)
                decode_nibbles16(wr, o + 2, d, np.float32(0.0), d, np.float32(0.0), buf, at + 32 * b)
        elif kind == Q8_0:
            for b in range(kc // 32):
                o = (k0 // 32 + b) * 34
                decode_q8_32(wr, o + 2, half_at(wr, o), buf, at + 32 * b)
        elif kind == Q4_K:  # chunk c: sub-block 2c in the low nibbles, 2c+1 in the high ones
            for b in range(kc // 256):
                o = (k0 // 256 + b) * 144
                d = half_at(wr, o)
                dmin = half_at(wr, o + 2)
                for c in range(4):
                    sc0, m0 = scale_min_k4(wr, o + 4, 2 * c)
                    sc1, m1 = scale_min_k4(wr, o + 4, 2 * c + 1)
                    decode_nibbles32(
                        wr, o + 16 + 32 * c,
                        d * np.float32(sc0), dmin * np.float32(m0), d * np.float32(sc1), dmin * np.float32(m1),
                        buf, at + 256 * b + 64 * c,
                    )  # fmt: skip
        elif kind == F16:
            wh = wr.view(np.uint16)
            k16 = kc - kc % 16
            for k in range(0, k16, 16):
                decode_f16_16(wh, k0 + k, buf, at + k)
            for k in range(k16, kc):
                buf[r, k] = f16_bits_to_f32(wh[k0 + k])
        else:
            wf = wr.view(np.float32)
            k16 = kc - kc % 16
            for k in range(0, k16, 16):
                copy_f32_16(wf, k0 + k, buf, at + k)
            for k in range(k16, kc):
                buf[r, k] = wf[k0 + k]


@njit(**_JIT)
def _dot(a, b, kc):
    s = np.float32(0.0)
    for k in range(kc):
        s += a[k] * b[k]
    return s


# ---------------------------------------------------------------- dot products and the kernel


@njit(**_JIT)
def _dot_4x1(x, k0, kc, buf, r, acc, i):
    """acc[i, r:r+4] += buf[r:r+4, :kc] @ x[i, k0:k0+kc]."""
    xa = x[i, k0 : k0 + kc]
    w0, w1, w2, w3 = buf[r], buf[r + 1], buf[r + 2], buf[r + 3]
    s0 = s1 = s2 = s3 = np.float32(0.0)
    for k in range(kc):
        a = xa[k]
        s0 += w0[k] * a
        s1 += w1[k] * a
        s2 += w2[k] * a
        s3 += w3[k] * a
    acc[i, r] += s0
    acc[i, r + 1] += s1
    acc[i, r + 2] += s2
    acc[i, r + 3] += s3


@njit(**_JIT)
def _dot_4x2(x, k0, kc, buf, r, acc, i):
    """acc[i:i+2, r:r+4] += x[i:i+2, k0:k0+kc] @ buf[r:r+4, :kc].T: 6 loads feed 8 FMAs."""
    xa = x[i, k0 : k0 + kc]
    xb = x[i + 1, k0 : k0 + kc]
    w0, w1, w2, w3 = buf[r], buf[r + 1], buf[r + 2], buf[r + 3]
    s0 = s1 = s2 = s3 = t0 = t1 = t2 = t3 = np.float32(0.0)
    for k in range(kc):
        a = xa[k]
        b = xb[k]
        s0 += w0[k] * a
        s1 += w1[k] * a
        s2 += w2[k] * a
        s3 += w3[k] * a
        t0 += w0[k] * b
        t1 += w1[k] * b
        t2 += w2[k] * b
        t3 += w3[k] * b
    acc[i, r] += s0
    acc[i, r + 1] += s1
    acc[i, r + 2] += s2
    acc[i, r + 3] += s3
    acc[i + 1, r] += t0
    acc[i + 1, r + 1] += t1
    acc[i + 1, r + 2] += t2
    acc[i + 1, r + 3] += t3


@njit(**_JIT)
def tile_dot(x, k0, kc, buf, rb, acc):
    """acc[i, r] += x[i, k0:k0+kc] . buf[r, :kc] for all n inputs i and the tile's rb rows."""
    n = x.shape[0]
    n2 = n - n % 2
    rb4 = rb - rb % 4
    for i in range(0, n2, 2):  # an input pair (4 KiB) and the tile (32 KiB) stay in L1
        for r in range(0, rb4, 4):
            _dot_4x2(x, k0, kc, buf, r, acc, i)
    if n2 < n:
        for r in range(0, rb4, 4):
            _dot_4x1(x, k0, kc, buf, r, acc, n2)
    for r in range(rb4, rb):  # only in the last tile, when rows % 4 != 0
        for i in range(n):
            acc[i, r] += _dot(buf[r], x[i, k0 : k0 + kc], kc)


@njit(parallel=True, **_JIT)
def matmul_tiled(kind, x, w, out):
    """x: float32 (n, cols); w: uint8 (rows, row_bytes) of dtype code `kind`; out: float32 (n, rows)."""
    n, cols = x.shape
    rows = w.shape[0]
    for t in prange((rows + RB - 1) // RB):
        r0 = t * RB
        rb = min(RB, rows - r0)
        buf = np.empty((RB, KC), dtype=np.float32)  # (RB, KC) decoded weights
        acc = np.zeros((n, RB), dtype=np.float32)  # (n, RB) partial sums
        for k0 in range(0, cols, KC):
            kc = min(KC, cols - k0)  # a multiple of the block size, as cols and KC are
            decode_tile(kind, w, r0, rb, k0, kc, buf)
            tile_dot(x, k0, kc, buf, rb, acc)
        for i in range(n):
            for r in range(rb):
                out[i, r0 + r] = acc[i, r]


@njit(**_JIT)
def get_rows(kind, w, ids, out):
    """out[i] = W[ids[i]] decoded (bit-identical to `dequantize`), serially: an embedding lookup is a
    few rows, too little work for a parallel region. out: float32 (len(ids), cols)."""
    buf = np.empty((RB, KC), dtype=np.float32)
    cols = out.shape[1]
    for i in range(ids.size):
        for k0 in range(0, cols, KC):
            kc = min(KC, cols - k0)
            decode_tile(kind, w, ids[i], 1, k0, kc, buf)
            out[i, k0 : k0 + kc] = buf[0, :kc]
