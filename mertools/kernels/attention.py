"""Grouped-query attention of new tokens over a sequence's cached keys and values.

    attend(q, keys, vals, pos, window, sinks, divisor, voff)
        q (n, nh, hd) float32 at positions pos (n,) over keys (T, nkv, hd) and values vals[..., voff:]
        (T, nkv, dv), stored float32, as f16 bits (uint16) or as q8_0 blocks (uint8, widths in bytes) ->
        (n, nh * dv) float32; scores q.k / divisor
        (default sqrt(hd)); causal, and a sliding window when window > 0; sinks (nh,): each head's extra
        logit in the softmax's denominator, weighing no value, or None. Values may be a part of the keys
        (latent attention: vals is keys, voff its rotary width).

One new token (decode) runs `attend_one`, a numba kernel that widens each cached row to float32 as it
reads it (16 lanes at a time); several (prefill) run the numpy path, which is also the kernel's plain
definition (the tests hold them together).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from .common import MATVEC_JIT, f16_bits_to_f32
from .simd import copy_f32_16, decode_f16_16, decode_i8_32, prefetch, vadd, vfma, vhsum, vload, vsplat, vstore, vzero


def _widen16(src, so, dst, do):  # noqa: ANN001, ANN202 - dst[do:do+16] = float32(src[so:so+16]); see the overload
    raise NotImplementedError


@overload(_widen16, inline="always")
def _widen16_impl(src, so, dst, do):  # noqa: ANN001, ANN202
    if src.dtype == types.uint16:  # f16 bits
        return lambda src, so, dst, do: decode_f16_16(src, so, dst, do)
    if src.dtype == types.float32:
        return lambda src, so, dst, do: copy_f32_16(src, so, dst, do)
    return None


def _widen1(x):  # noqa: ANN001, ANN202 - one stored value as float32; see the overload
    raise NotImplementedError


@overload(_widen1, inline="always")
def _widen1_impl(x):  # noqa: ANN001, ANN202
    if x == types.uint16:
        return lambda x: f16_bits_to_f32(x)
    if x == types.float32:
        return lambda x: x
    return None


def _row(src, so, n, dst):  # noqa: ANN001, ANN202 - dst[:n] = the n values stored from src[so]; see the overload
    raise NotImplementedError


@overload(_row, inline="always")
def _row_impl(src, so, n, dst):  # noqa: ANN001, ANN202
    if src.dtype in (types.uint16, types.float32):
        def widen(src, so, n, dst):  # float32 or f16 bits, 16 lanes at a time (exact)
            n16 = n - n % 16
            for d in range(0, n16, 16):
                _widen16(src, so + d, dst, d)
            for d in range(n16, n):
                dst[d] = _widen1(src[so + d])
        return widen
    if src.dtype == types.uint8:
        def q8_0(src, so, n, dst):  # q8_0 blocks from byte `so`: an f16 scale, then 32 int8 values (32 lanes at once)
            for b in range(n // 32):
                at = so + b * 34
                decode_i8_32(src, at + 2, f16_bits_to_f32(np.int64(src[at]) | (np.int64(src[at + 1]) << 8)), dst, b * 32)
        return q8_0
    return None


# No fastmath: with `reassoc` LLVM chose each sum's order where it compiled the loop, so the same kernel gave other
# bits loaded from numba's cache than compiled in the process (the call bound to another copy), and the compiled
# decode step's copy others again. Every sum here is in the order written; the dot products run 16 lanes at a time.


@njit(parallel=True, **MATVEC_JIT)
def attend_one(q, keys, vals, voff, pos, window, sinks, divisor, out):
    """Decode attention of one new token: q (nh, hd) at position pos over keys (pos + 1, nkv, hd) and values
    vals[:, :, voff:] (float32, f16 bits or q8_0 blocks, C-contiguous; widths and voff in storage units) ->
    out (nh, dv): what `attend` computes for n = 1 (causal; sliding window if window > 0; sinks (nh,) float32
    join each head's denominator, -inf for none; scores divided by divisor) in one parallel pass over kv heads
    (`attend_group`)."""
    for g in prange(keys.shape[1]):
        attend_group(q, keys, vals, voff, pos, window, sinks, divisor, out, g)


@njit(inline="always", **MATVEC_JIT)
def _dot(a, b, n):
    """a[:n] . b[:n] (float32 C arrays): two 16-lane fma chains over alternate blocks of 16, added, then a fixed
    tree (`vhsum`); the tail after the last block of 16 added one product at a time. Not `rowops.dense_row` (one
    chain, called per key and head): attention over 4096 positions took twice as long on it (8.1-8.6 ms, 3.1-4.6)."""
    n32, n16 = n - n % 32, n - n % 16
    acc0, acc1 = vzero(), vzero()
    for d in range(0, n32, 32):
        acc0 = vfma(vload(a, d), vload(b, d), acc0)
        acc1 = vfma(vload(a, d + 16), vload(b, d + 16), acc1)
    if n16 > n32:
        acc0 = vfma(vload(a, n32), vload(b, n32), acc0)
    acc = vhsum(vadd(acc0, acc1))
    for d in range(n16, n):
        acc += a[d] * b[d]
    return acc


@njit(**MATVEC_JIT)
def attend_group(q, keys, vals, voff, pos, window, sinks, divisor, out, g):
    """`attend_one` for kv head g and its group of query heads (the compiled decode step calls it too), each key
    and value row read once (and widened once); every sum in a fixed order."""
    nh, hd = q.shape
    dv = out.shape[1]
    nkv = keys.shape[1]
    kw, vw = keys.shape[2], vals.shape[2]  # stored row widths (q8_0: bytes; else values)
    group = nh // nkv
    scale = np.float32(divisor)
    lo = max(0, pos - window + 1) if window > 0 else 0
    kf = keys.reshape(-1)
    vf = vals.reshape(-1)
    kb = kf.view(np.uint8)  # for prefetching: a head's rows are nkv*hd*itemsize bytes apart, one page each,
    vb = vf.view(np.uint8)  # which the hardware prefetcher does not follow
    item = kb.size // max(kf.size, 1)
    s = np.empty((group, pos + 1), np.float32)  # scores, then probabilities
    row = np.empty(max(hd, dv), np.float32)
    for j in range(lo, pos + 1):
        ahead = ((min(j + 8, pos) * nkv) + g) * kw * item
        for c in range(0, kw * item, 64):
            prefetch(kb, ahead + c)
        _row(kf, (j * nkv + g) * kw, hd, row)
        for i in range(group):
            s[i, j] = _dot(q[g * group + i], row, hd) / scale
    for i in range(group):
        sink = sinks[g * group + i]
        m = max(s[i, lo], sink)
        for j in range(lo + 1, pos + 1):
            m = max(m, s[i, j])
        tot = np.exp(sink - m)  # 0 for a sink of -inf
        for j in range(lo, pos + 1):
            s[i, j] = np.exp(s[i, j] - m)
            tot += s[i, j]
        for j in range(lo, pos + 1):
            s[i, j] = s[i, j] / tot
        out[g * group + i, :] = 0.0
    dv16 = dv - dv % 16
    for j in range(lo, pos + 1):
        ahead = (((min(j + 8, pos) * nkv) + g) * vw + voff) * item
        for c in range(0, (vw - voff) * item, 64):
            prefetch(vb, ahead + c)
        _row(vf, (j * nkv + g) * vw + voff, dv, row)
        for i in range(group):
            o = out[g * group + i]
            p = s[i, j]
            pv = vsplat(p)
            for d in range(0, dv16, 16):
                vstore(o, d, vfma(pv, vload(row, d), vload(o, d)))
            for d in range(dv16, dv):
                o[d] += p * row[d]


def attend_numpy(q: np.ndarray, keys: np.ndarray, vals: np.ndarray, pos: np.ndarray, window: int,
                 sinks: np.ndarray | None = None, divisor: float | None = None) -> np.ndarray:
    """q (n, nh, hd) at positions pos over keys (T, nkv, hd) and vals (T, nkv, dv) -> (n, nh * dv), in numpy
    (keys and values float32, or stored f16 bits / q8_0 blocks decoded first)."""
    keys, vals = _float32(keys), _float32(vals)
    n, nh, hd = q.shape
    nkv, total, dv = keys.shape[1], keys.shape[0], vals.shape[2]
    group = nh // nkv
    div = np.float32(np.sqrt(hd) if divisor is None else divisor)
    qg = q.reshape(n, nkv, group, hd).transpose(1, 2, 0, 3)  # (nkv, group, n, hd)
    scores = qg @ keys.transpose(1, 2, 0)[:, None] / div  # (nkv, group, n, T)
    j = np.arange(total)[None, :]
    allowed = j <= pos[:, None]  # causal (n, T)
    if window > 0:
        allowed &= j > pos[:, None] - window
    scores = np.where(allowed, scores, np.float32(-np.inf))
    if sinks is None:
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        scores /= scores.sum(axis=-1, keepdims=True)
    else:  # the sink joins the max and the denominator, then is dropped (transformers' eager_attention_forward)
        sink = sinks.astype(np.float32).reshape(nkv, group, 1, 1)
        m = np.maximum(scores.max(axis=-1, keepdims=True), sink)
        scores = np.exp(scores - m)
        scores /= scores.sum(axis=-1, keepdims=True) + np.exp(sink - m)
    out = scores @ vals.transpose(1, 0, 2)[:, None]  # (nkv, group, n, dv)
    return out.transpose(2, 0, 1, 3).reshape(n, nh * dv)


def attend(q: np.ndarray, keys: np.ndarray, vals: np.ndarray, pos: np.ndarray, window: int,
           sinks: np.ndarray | None = None, divisor: float | None = None, voff: int = 0) -> np.ndarray:
    """The kernel for one new token, numpy for several; keys/vals hold exactly positions 0..pos[-1]; values
    are vals[..., voff:] (voff > 0: a part of the keys array itself, as latent attention stores them; voff and
    the widths in storage units)."""
    n, nh, hd = q.shape
    dv = vals.shape[2] - voff  # in storage units (q8_0: bytes, 34 a block of 32 values)
    dv = dv // 34 * 32 if vals.dtype == np.uint8 else dv
    div = float(np.float32(np.sqrt(hd))) if divisor is None else divisor
    if n == 1:
        out = np.empty((nh, dv), np.float32)
        sk = _no_sinks(nh) if sinks is None else np.ascontiguousarray(sinks, dtype=np.float32)
        attend_one(np.ascontiguousarray(q[0]), keys, vals, voff, int(pos[0]), window, sk, div, out)
        return out.reshape(1, nh * dv)
    return attend_numpy(q, keys, vals[..., voff:], pos, window, sinks, div)


@lru_cache(maxsize=8)
def _no_sinks(nh: int) -> np.ndarray:
    """The kernel's "no sinks": -inf for every head (exp gives 0), allocated once per head count (never written)."""
    return np.full(nh, -np.inf, np.float32)


def _float32(x: np.ndarray) -> np.ndarray:
    """Stored keys or values (..., width) as float32: f16 bits widened, q8_0 blocks (34 bytes: f16 scale, 32 int8)
    decoded, float32 as it is."""
    if x.dtype == np.uint16:
        return x.view(np.float16).astype(np.float32)
    if x.dtype == np.uint8:
        blocks = np.ascontiguousarray(x).reshape(*x.shape[:-1], -1, 34)
        d = blocks[..., :2].copy().view(np.float16).astype(np.float32)  # (..., nb, 1)
        return (d * blocks[..., 2:].view(np.int8).astype(np.float32)).reshape(*x.shape[:-1], -1)
    return x
