"""A layer's resident experts on the 8-bit kernels in two parallel regions, and the gated activations they apply.

A decode step of a many-small-experts model (Qwen3-30B-A3B: 8 experts of 0.9 MB per layer; gpt-oss: 4 of 13 MB)
spent most of its expert time starting parallel regions and in Python between them when each expert ran its own
products. `experts8` runs every (row, expert) pair of a step in two regions, each row alone, the same bits as the
experts one at a time on `int8.swiglu8` / `int8.matmul8`:

    experts8(x2, rows_of, addr, kinds, rbs, d_ff, bias, act)   float32 (pairs, d_model)

For a plain SwiGLU (act[0] == 0) the activation is `silu_mul_scalar`; otherwise the GLU of `families.pieces.glu`
(gate clamped above and up on both sides at a limit, (u + offset) * g * sigmoid(alpha g), gpt-oss) on the gate and
up products plus their biases, then the down product plus its bias. `glu_rows` computes that GLU for the 8-bit mode's
per-expert path (`RuntimeOps.glu`): numpy's float32 exp has no compiled twin, so both paths use numba's.
"""

from __future__ import annotations

import numpy as np
from numba import carray, njit, prange

from mertools.kernels.act8 import formats_of, quantize_act
from mertools.kernels.common import MATVEC_JIT
from mertools.kernels.int8 import GROUP, _group, groups_of, is_packed
from mertools.kernels.matvec_kernels import silu_mul_scalar
from mertools.kernels.simd import f32_ptr, u8_ptr
from mertools.kernels.tasks import counters, next_task, threads

# numba caches `_group`'s code inside this file's kernels, keyed on this file's contents: a type branch added to
# `_group` (Q2_K and Q3_K's, IQ2_XXS's), simd8.dpbusd's AVX2 path (vpmaddubsw) or its paired products (dpbusd2)
# changes this file too, so that a cache made before it is not used
__all__ = ["experts8", "glu_rows", "glu_scalar"]


@njit(inline="always", **MATVEC_JIT)
def glu_scalar(g, u, alpha, limit, offset):
    """`pieces.glu` of one gate and up pre-activation (float32): limit > 0 clamps g above and u on both sides."""
    if limit > np.float32(0.0):
        g = min(g, limit)
        u = min(max(u, -limit), limit)
    return (u + offset) * (g * (np.float32(1.0) / (np.float32(1.0) + np.exp(-(alpha * g)))))


@njit(**MATVEC_JIT)
def glu_rows(g: np.ndarray, u: np.ndarray, act: np.ndarray) -> np.ndarray:
    """float32 (n, d_ff): `glu_scalar` of each gate and up entry (float32 C (n, d_ff) both), act (alpha, limit,
    offset) float32."""
    out = np.empty_like(g)
    for i in range(g.shape[0]):
        for r in range(g.shape[1]):
            out[i, r] = glu_scalar(g[i, r], u[i, r], act[0], act[1], act[2])
    return out


@njit(**MATVEC_JIT)
def _slot_view(arena, off, rows, rb, kind):
    """The (rows, rb) weight at byte `off` of a byte buffer (the dense matrices' arena, a cache slot), as `_group`
    reads it (packed types by groups)."""
    w = arena[off:off + rows * rb]
    if is_packed(kind):
        return w.reshape(rows // GROUP, GROUP * rb)
    return w.reshape(rows, rb)


@njit(**MATVEC_JIT)
def _view_at(addr, rows, rb, kind):
    """The (rows, rb) weight at address `addr` (a cache slot's bytes, which the cache keeps alive: its arena, or the
    mapping of an expert file), as `_group` reads it."""
    return _slot_view(carray(u8_ptr(addr), rows * rb), 0, rows, rb, kind)


@njit(**MATVEC_JIT)
def _runs(addr):
    """int64 (runs + 1,): where each run of consecutive pairs on the same expert (the same three addresses) starts,
    then the number of pairs. A task takes one weight group for a run's pairs, so their rows read it from cache."""
    starts = np.empty(addr.shape[0] + 1, np.int64)
    n = 0
    for p in range(addr.shape[0]):
        if p == 0 or addr[p, 0] != addr[p - 1, 0] or addr[p, 1] != addr[p - 1, 1] or addr[p, 2] != addr[p - 1, 2]:
            starts[n] = p
            n += 1
    starts[n] = addr.shape[0]
    return starts[:n + 1]


@njit(inline="always", **MATVEC_JIT)
def _gate_up_task(t, a, rows_of, addr, kinds, rbs, bias, act, runs, h, u):
    """Task t of `_gate_up`: weight group t % groups of run t // groups, for every pair of the run."""
    groups = groups_of(h.shape[1])
    xq, dx, nsum, kq, kd, ks = a
    run, g = t // groups, t % groups
    for p in range(runs[run], runs[run + 1]):
        i = rows_of[p]
        for r in range(2):  # gate, then up: one call site, so one inlined copy of `_group`'s code (every type's)
            w = _view_at(addr[p, r], h.shape[1], rbs[p, r], kinds[p, r])
            _group(kinds[p, r], xq, dx, nsum, kq, kd, ks, i, w, g, h if r == 0 else u, p)
        end = min(GROUP * g + GROUP, h.shape[1])
        if act[0] == np.float32(0.0):
            for r in range(GROUP * g, end):
                h[p, r] = silu_mul_scalar(h[p, r], u[p, r])
            continue
        # views of the biases (of address 0 when the experts have none: then never read)
        gb, ub = carray(f32_ptr(bias[p, 0]), h.shape[1]), carray(f32_ptr(bias[p, 1]), h.shape[1])
        for r in range(GROUP * g, end):
            gr, ur = h[p, r], u[p, r]
            if bias[p, 0] != 0:  # numpy adds the biases to the products, then the GLU
                gr, ur = gr + gb[r], ur + ub[r]
            h[p, r] = glu_scalar(gr, ur, act[0], act[1], act[2])


@njit(parallel=True, **MATVEC_JIT)
def _gate_up(a, rows_of, addr, kinds, rbs, bias, act, runs, h, u):
    n, nt = (runs.size - 1) * groups_of(h.shape[1]), threads()
    ctr = counters(nt)
    for me in prange(nt):  # the tasks claimed as the threads go (`tasks`)
        while True:
            t = next_task(ctr, me, nt, n)
            if t < 0:
                break
            _gate_up_task(t, a, rows_of, addr, kinds, rbs, bias, act, runs, h, u)


@njit(parallel=True, **MATVEC_JIT)
def _down(a, addr, kinds, rbs, bias, runs, y):
    groups = groups_of(y.shape[1])
    xq, dx, nsum, kq, kd, ks = a
    n, nt = (runs.size - 1) * groups, threads()
    ctr = counters(nt)
    for me in prange(nt):
        while True:
            t = next_task(ctr, me, nt, n)
            if t < 0:
                break
            run, g = t // groups, t % groups
            for p in range(runs[run], runs[run + 1]):
                wd = _view_at(addr[p, 2], y.shape[1], rbs[p, 2], kinds[p, 2])
                _group(kinds[p, 2], xq, dx, nsum, kq, kd, ks, p, wd, g, y, p)
                if bias[p, 2] != 0:
                    db = carray(f32_ptr(bias[p, 2]), y.shape[1])
                    for r in range(GROUP * g, min(GROUP * g + GROUP, y.shape[1])):
                        y[p, r] = y[p, r] + db[r]


@njit(**MATVEC_JIT)  # compiled: the one-call decode step (kernels/step.py) runs a token's experts with it too
def experts8(x2: np.ndarray, rows_of: np.ndarray, addr: np.ndarray, kinds: np.ndarray, rbs: np.ndarray, d_ff: int,
             bias: np.ndarray, act: np.ndarray) -> np.ndarray:
    """float32 (P, d_model): for each pair p, the expert whose gate, up and down start at the addresses addr[p] (cache
    slots' bytes; type codes kinds[p], row bytes rbs[p], as `int8.prepare` left them) applied to row rows_of[p] of
    x2 (float32 C (n, d_model)). bias[p]: the addresses of its gate, up and down biases (float32 in its slot; 0: none).
    act: float32 (3,) (alpha, limit, up offset) of a GLU, alpha 0 for a plain SwiGLU. The same bits as the expert's
    products on `int8.swiglu8` / `int8.matmul8` and its activation (`silu_mul_scalar`, `glu_rows`) one expert at a
    time, each row alone either way."""
    n_pairs, d_model = rows_of.size, x2.shape[1]
    h, u = np.empty((n_pairs, d_ff), np.float32), np.empty((n_pairs, d_ff), np.float32)
    f_in, f_down = 0, 0
    for p in range(n_pairs):  # the activation formats the pairs' weights read
        f_in |= formats_of(kinds[p, 0]) | formats_of(kinds[p, 1])
        f_down |= formats_of(kinds[p, 2])
    runs = _runs(addr)
    _gate_up(quantize_act(x2, f_in), rows_of, addr, kinds, rbs, bias, act, runs, h, u)
    y = np.empty((n_pairs, d_model), np.float32)
    _down(quantize_act(h, f_down), addr, kinds, rbs, bias, runs, y)
    return y
