"""A whole decode step of a standard MoE model in one compiled call: the 8-bit mode without Python between layers.

A small model's decode step is mostly Python between kernels (dozens of calls per layer: norms, three
projections, rotary, the KV store, attention, the router, top-k, the experts, residuals), and a model with
many layers pays the same per layer. `decode_step` runs all of it for one token of one sequence, every layer,
then the output norm and head, calling the same compiled pieces the general path calls (`int8._group` for every
product, `experts8.experts8` for the experts, `attention.attend_group`, `rowops` for norms, router, softmax,
top-k and rotary), in the same order, so its logits are bit for bit those of the general path in the 8-bit mode
(tests/test_fused_step.py). What it takes, what it leaves to Python (the cache's and the trace's bookkeeping) and
when it applies: runtime/fused.py.

Weights come as offsets into a byte arena (the dense matrices, as `int8.prepare` left them), addresses of the expert
cache's slots (its arena, or mappings of the expert files) and one float32 arena of vectors, so the call's
arguments do not grow with the number of layers.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from .act8 import formats_of, quantize_act
from .attention import attend_group
from .common import MATVEC_JIT, f32_to_f16_bits
from .experts8 import _slot_view, experts8
from .int8 import _group, groups_of
from .matmul_kernels import get_rows
from .rowops import dense_row, rms_norm_into, rotate_into, softmax_into, top_k_into
from .tasks import counters, next_task, threads

# numba caches `_group`'s and `formats_of`'s code inside `decode_step`, keyed on this file's contents: a type
# branch added there (Q2_K and Q3_K's, IQ2_XXS's), simd8.dpbusd's AVX2 path (vpmaddubsw), experts8's tasks taking
# a weight group for all of an expert's rows, attention's sums in a fixed order (no fastmath), or the AVX2 path's
# paired products (simd8.dpbusd2 in Q4_0, MXFP4, packed Q4_K and Q6_K) changes this file too, so that a cache made
# before it is not used
__all__ = ["ATTN_NORM", "FFN_NORM", "K_NORM", "O_BIAS", "Q_BIAS", "Q_NORM", "ROUTER_BIAS", "SINKS", "VECTORS",
           "decode_step"]

# a layer's vectors in the float32 arena (`vec_at[layer, i]`, -1 where the layer has none); Q_BIAS: q, k and v's
# biases one after the other (a layer has all three or none)
ATTN_NORM, FFN_NORM, Q_NORM, K_NORM, Q_BIAS, O_BIAS, SINKS, ROUTER_BIAS = range(8)
VECTORS = 8
# shape[]: heads, kv heads, head dim, rotary dims, qk norm (0 none, 1 per head, 2 over the projection), expert width
NH, NKV, HD, RD, QK, DFF = range(6)
SERIAL_ROUTER = 1 << 16  # router weights up to which one thread computes the logits


def _stored(v, like):  # noqa: ANN001, ANN202 - one float32 as the KV cache `like` holds it; see the overload
    raise NotImplementedError


@overload(_stored, inline="always")
def _stored_impl(v, like):  # noqa: ANN001, ANN202
    if like.dtype == types.uint16:  # f16 bits, rounded as numpy's astype(float16)
        return lambda v, like: f32_to_f16_bits(v)
    if like.dtype == types.float32:
        return lambda v, like: v
    return None


@njit(**MATVEC_JIT)
def _vec(vec, vec_at, layer, i, n):
    o = vec_at[layer, i]
    return vec[o:o + n]


@njit(parallel=True, **MATVEC_JIT)
def _matvec(arena, m, a, out):
    """out = W @ x for the dense matrix m = (offset, type code, rows, row bytes) of the arena, x quantized (an Act8
    of one row)."""
    w = _slot_view(arena, m[0], m[2], m[3], m[1])
    out2 = out.reshape(1, out.size)
    xq, dx, nsum, kq, kd, ks = a
    n, nt = groups_of(m[2]), threads()
    ctr = counters(nt)
    for me in prange(nt):  # the groups claimed as the threads go (`tasks`)
        while True:
            g = next_task(ctr, me, nt, n)
            if g < 0:
                break
            _group(m[1], xq, dx, nsum, kq, kd, ks, 0, w, g, out2, 0)


@njit(parallel=True, **MATVEC_JIT)
def _qkv(arena, mq, mk, mv, a, q, k, v):
    """The three projections of one normalised row in one parallel region."""
    wq = _slot_view(arena, mq[0], mq[2], mq[3], mq[1])
    wk = _slot_view(arena, mk[0], mk[2], mk[3], mk[1])
    wv = _slot_view(arena, mv[0], mv[2], mv[3], mv[1])
    pq, pk, pv = groups_of(mq[2]), groups_of(mk[2]), groups_of(mv[2])
    q2, k2, v2 = q.reshape(1, q.size), k.reshape(1, k.size), v.reshape(1, v.size)
    xq, dx, nsum, kq, kd, ks = a
    nt = threads()
    ctr = counters(nt)
    for me in prange(nt):  # the groups of the three claimed as the threads go (`tasks`)
        while True:
            i = next_task(ctr, me, nt, pq + pk + pv)
            if i < 0:
                break
            # one call site: numba inlines `_group`'s code (every type's) once, not once per projection
            w, kind, g, out = wq, mq[1], i, q2
            if i >= pq + pk:
                w, kind, g, out = wv, mv[1], i - pq - pk, v2
            elif i >= pq:
                w, kind, g, out = wk, mk[1], i - pq, k2
            _group(kind, xq, dx, nsum, kq, kd, ks, 0, w, g, out, 0)


@njit(parallel=True, **MATVEC_JIT)
def _attend(q2, keys, vals, pos, window, sinks, divisor, out):
    for g in prange(keys.shape[1]):
        attend_group(q2, keys, vals, 0, pos, window, sinks, divisor, out, g)


@njit(parallel=True, **MATVEC_JIT)
def _router(h, router, logits):
    for e in prange(router.shape[0]):
        logits[e] = dense_row(h, router, e)


@njit(**MATVEC_JIT)
def _router_serial(h, router, logits):
    for e in range(router.shape[0]):
        logits[e] = dense_row(h, router, e)


@njit(**MATVEC_JIT)
def _add_vec(a, vec, vec_at, layer, i, start):
    """a += the layer's vector i from its element `start` on (float32, numpy's addition), when the layer has it."""
    if vec_at[layer, i] >= 0:
        b = _vec(vec, vec_at, layer, i, start + a.size)
        for j in range(a.size):
            a[j] = a[j] + b[start + j]


@njit(**MATVEC_JIT)
def _attention(layer, x, h, q, kk, v, att, o, arena, mats, vec, vec_at, shape, cos, sin, kv_k, kv_v, windows, sinks,
               divisor, eps, pos):
    """x += the layer's attention of x at position pos (its keys and values stored); h, q, kk, v, att, o: scratch."""
    d = x.size
    nh, nkv, hd, rd, qk = shape[NH], shape[NKV], shape[HD], shape[RD], shape[QK]
    rms_norm_into(x, _vec(vec, vec_at, layer, ATTN_NORM, d), eps, h)
    mq, mk, mv = mats[layer, 0], mats[layer, 1], mats[layer, 2]
    _qkv(arena, mq, mk, mv, quantize_act(h.reshape(1, d), formats_of(mq[1]) | formats_of(mk[1]) | formats_of(mv[1])),
         q, kk, v)
    _add_vec(q, vec, vec_at, layer, Q_BIAS, 0)
    _add_vec(kk, vec, vec_at, layer, Q_BIAS, q.size)
    _add_vec(v, vec, vec_at, layer, Q_BIAS, q.size + kk.size)
    if qk == 2:
        rms_norm_into(q, _vec(vec, vec_at, layer, Q_NORM, nh * hd), eps, q)
        rms_norm_into(kk, _vec(vec, vec_at, layer, K_NORM, nkv * hd), eps, kk)
    elif qk == 1:
        for i in range(nh):
            rms_norm_into(q[i * hd:(i + 1) * hd], _vec(vec, vec_at, layer, Q_NORM, hd), eps, q[i * hd:(i + 1) * hd])
        for i in range(nkv):
            rms_norm_into(kk[i * hd:(i + 1) * hd], _vec(vec, vec_at, layer, K_NORM, hd), eps, kk[i * hd:(i + 1) * hd])
    rotate_into(q, nh, hd, rd, cos, sin)
    rotate_into(kk, nkv, hd, rd, cos, sin)
    ks, vs = kv_k[layer], kv_v[layer]
    for g in range(nkv):
        for i in range(hd):
            ks[pos, g, i] = _stored(kk[g * hd + i], ks)
            vs[pos, g, i] = _stored(v[g * hd + i], vs)
    layer_sinks = _vec(vec, vec_at, layer, SINKS, nh) if vec_at[layer, SINKS] >= 0 else sinks
    _attend(q.reshape(nh, hd), ks, vs, pos, windows[layer], layer_sinks, divisor, att)
    _matvec(arena, mats[layer, 3], quantize_act(att.reshape(1, nh * hd), formats_of(mats[layer, 3, 1])), o)
    _add_vec(o, vec, vec_at, layer, O_BIAS, 0)
    for i in range(d):
        x[i] = x[i] + o[i]


@njit(**MATVEC_JIT)
def decode_step(token, embed, embed_kind, x, pos, arena, mats, head, vec, vec_at, out_norm, routers, shape, cos, sin,
                kv_k, kv_v, windows, sinks, divisor, eps, slot_addr, slots, geometry, act, k, norm, scaling, logits,
                chosen, weights, first, moe_first):
    """One token through the layers from `first` on, then the output norm and head.

    token: its id, a row of embed (uint8 (vocab, row bytes) of type code embed_kind, as the file holds it).
    x (d,) float32: its embedding here (first 0), else the hidden state entering layer `first` (the general path did
    the layers before it), or with `moe_first` entering that layer's experts; the final hidden state on return (before
    the norm); pos: its position.
    arena: the dense matrices' bytes; mats (L, 4, 4) int64 per layer q, k, v, o as (offset, type code, rows, row
    bytes), head (4,) the output's. vec: float32 arena of vectors, vec_at (L, VECTORS) their offsets (-1: none),
    out_norm the output norm's. routers (L, E, d) float32. shape: see NH..DFF. cos, sin (rd / 2,) float32 at pos.
    kv_k, kv_v (L, capacity, nkv, hd): the sequence's cache (f16 bits or float32), position pos written here.
    windows (L,) int64 (0: full), sinks (nh,) float32 -inf: a layer's without sinks of its own (vector SINKS).
    Biases, where a layer has them: q, k, v (Q_BIAS), o (O_BIAS), the router's (ROUTER_BIAS). slot_addr: each cache
    slot's address (its arena slice, or the mapping of the file in it), slots (L, E) each expert's slot, -1 when it
    is not resident; geometry (L, E, 3, 4) per role (offset in its slot, type code, row bytes, its bias's offset or
    -1), act the experts' activation (`experts8`). k experts per token, `norm` renormalise, `scaling` the routed
    scaling. Writes chosen (L, k) int64 and weights (L, k) float32 layer by layer (from `first`), and logits (vocab,).
    Returns L when done; or, at the first layer one of whose chosen experts is not resident, that layer, x then its
    input plus its attention (its keys and values stored), its chosen and weights written: the caller may read those
    experts and go on with `first` that layer and `moe_first` (x as returned: the layer's attention is not run again),
    or compute that layer's experts itself and go on with `first` the layer after it."""
    d = x.size
    if first == 0 and not moe_first:
        get_rows(embed_kind, embed, np.full(1, token, np.int64), x.reshape(1, d))
    nh, nkv, hd, d_ff = shape[NH], shape[NKV], shape[HD], shape[DFF]
    h = np.empty(d, np.float32)
    q, kk, v = np.empty(nh * hd, np.float32), np.empty(nkv * hd, np.float32), np.empty(nkv * hd, np.float32)
    att = np.empty((nh, hd), np.float32)
    o = np.empty(d, np.float32)
    scores = np.empty(routers.shape[1], np.float32)
    one_row = np.zeros(k, np.int64)  # every choice on the token's row
    offs, kinds, rbs = np.empty((k, 3), np.int64), np.empty((k, 3), np.int64), np.empty((k, 3), np.int64)
    bias = np.zeros((k, 3), np.int64)
    for layer in range(first, mats.shape[0]):
        if not (moe_first and layer == first):
            _attention(layer, x, h, q, kk, v, att, o, arena, mats, vec, vec_at, shape, cos, sin, kv_k, kv_v, windows,
                       sinks, divisor, eps, pos)
        # the experts: router, softmax, top-k, then every chosen expert at once
        rms_norm_into(x, _vec(vec, vec_at, layer, FFN_NORM, d), eps, h)
        if routers.shape[1] * d <= SERIAL_ROUTER:  # each logit the same either way: a small one is not worth a region
            _router_serial(h, routers[layer], scores)
        else:
            _router(h, routers[layer], scores)
        _add_vec(scores, vec, vec_at, layer, ROUTER_BIAS, 0)
        softmax_into(scores, scores)
        top_k_into(scores, k, norm, scaling, chosen[layer], weights[layer])
        for c in range(k):
            if slots[layer, chosen[layer, c]] < 0:
                return layer  # an expert to read first: the caller goes on from this layer's experts
        for c in range(k):
            e = chosen[layer, c]
            base = slot_addr[slots[layer, e]]
            for r in range(3):
                offs[c, r] = base + geometry[layer, e, r, 0]
                kinds[c, r] = geometry[layer, e, r, 1]
                rbs[c, r] = geometry[layer, e, r, 2]
                bias[c, r] = base + geometry[layer, e, r, 3] if geometry[layer, e, r, 3] >= 0 else 0
        y = experts8(h.reshape(1, d), one_row, offs, kinds, rbs, d_ff, bias, act)
        for i in range(d):  # each choice's share, summed in choice order (numpy's sum over the choices' axis)
            acc = y[0, i] * weights[layer, 0]
            for c in range(1, k):
                acc = acc + y[c, i] * weights[layer, c]
            o[i] = acc
        for i in range(d):
            x[i] = x[i] + o[i]
    rms_norm_into(x, out_norm, eps, h)
    _matvec(arena, head, quantize_act(h.reshape(1, d), formats_of(head[1])), logits)
    return mats.shape[0]
