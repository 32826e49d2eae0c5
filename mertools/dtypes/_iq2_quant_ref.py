"""ggml's IQ2_XXS search tables (iq2xs_init_impl) and the numpy twin of its quantizer.

The quantizer works on level indices l = 0..2 per coordinate (grid value 2l+1, i.e. 1/3/5; the stored
values 8/25/43 only matter to the dequantizer). A group of 8 levels packs 2 bits a coordinate into u;
KMAP[u] is the grid point with those levels, or -(offset+1) into NEIGHBOURS: count, then the grid
points at the two smallest squared distances from (2l+1), ordered by (distance, index) as ggml's qsort.
ggml builds lists for all 43692 u (codes 0..3); the quantizer clamps codes to 0..2, so only those 6305
off-grid points are built here (identical lists, different offsets): 0.2 s, once, on first use.

`quantize_reference` is quantize_row_iq2_xxs_impl written over every 32-group at once, float32
operation for operation (same order, same roundings), so that it and the numba kernel agree bit for bit.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

from ._blocks256 import nearest_int_reference as _nint
from ._iq2grid import GRID_CODES

BYTES = 66
KMAP_SIZE = 43692  # max u (all codes 2) + 2, as ggml
GROUP_MAX_EPS = np.float32(1e-15)
FLT_MAX = np.float32(np.finfo(np.float32).max)
_F32 = np.float32
_SHIFTS = 2 * np.arange(8)


class SearchTables(NamedTuple):
    kmap: np.ndarray  # int32 (KMAP_SIZE,): grid index, or -(offset+1) into neighbours
    neighbours: np.ndarray  # uint16: per off-grid u, [count, grid indices...]
    grid_q: np.ndarray  # float32 (256, 8): 2*code + 1, what ggml's kgrid_q2xs holds
    codes: np.ndarray  # int8 (256, 8): level index per coordinate, (pg[i] - 1) / 2
    list_row: np.ndarray  # int32 (KMAP_SIZE,): u -> its row of `padded`, -1 on the grid
    padded: np.ndarray  # int32 (6305, 150): each off-grid point's list for numpy, padded with -1


@functools.cache
def search_tables() -> SearchTables:
    """Build kmap_q2xs and kneighbors_q2xs from the grid exactly as iq2xs_init_impl (nwant = 2)."""
    codes = GRID_CODES.astype(np.int64)
    kmap = np.full(KMAP_SIZE, -1, dtype=np.int64)
    kmap[(codes << _SHIFTS).sum(axis=1)] = np.arange(256)
    u_all = np.arange(KMAP_SIZE)
    lv = (u_all[:, None] >> _SHIFTS) & 3  # (KMAP_SIZE, 8)
    off = np.flatnonzero((kmap < 0) & (lv < 3).all(axis=1))  # off-grid points the quantizer can reach
    pos = 2 * lv[off] + 1
    grid = 2 * codes + 1
    # integer squared distances (exact): |p|^2 + |g|^2 - 2 p.g
    d2 = (pos * pos).sum(1)[:, None] + (grid * grid).sum(1)[None, :] - 2 * pos @ grid.T  # (n_off, 256)
    order = np.argsort(d2, axis=1, kind="stable")  # ties by grid index, as qsort on (d2, j)
    s = np.take_along_axis(d2, order, axis=1)
    second = np.where(s > s[:, :1], s, np.iinfo(np.int64).max).min(axis=1, keepdims=True)
    counts = (s <= second).sum(axis=1)  # every point at the first two distances
    offsets = np.concatenate([[0], np.cumsum(counts + 1)[:-1]])
    kmap[off] = -(offsets + 1)
    neighbours = np.zeros(int((counts + 1).sum()), dtype=np.uint16)
    neighbours[offsets] = counts
    width = int(counts.max())
    take = np.arange(width)[None, :] < counts[:, None]
    padded = np.where(take, order[:, :width], -1).astype(np.int32)
    list_row = np.full(KMAP_SIZE, -1, dtype=np.int32)
    list_row[off] = np.arange(off.size)
    neighbours[(offsets[:, None] + 1 + np.arange(width)[None, :])[take]] = order[:, :width][take]
    tables = SearchTables(kmap.astype(np.int32), neighbours, grid.astype(np.float32), GRID_CODES.astype(np.int8),
                          list_row, padded)
    for a in tables:
        a.setflags(write=False)
    return tables


# ---------------------------------------------------------------- the quantizer in numpy, every 32-group at once


def _fmax_scan(v: np.ndarray, start: np.ndarray) -> np.ndarray:
    """MAX(m, v[:, i]) over i from m = start: (m > v ? m : v), so a NaN v replaces m, as in C."""
    m = start
    for i in range(v.shape[1]):
        m = np.where(m > v[:, i], m, v[:, i])
    return m


def _wsum(w: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """sum_i w*a*b, left to right from 0 in float32: (G,)."""
    s = np.zeros(w.shape[0], dtype=np.float32)
    for i in range(w.shape[1]):
        s = s + w[:, i] * a[:, i] * b[:, i]
    return s


def make_qp_quants_reference(x: np.ndarray, w: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml make_qp_quants per row of x, w float32 (G, n) -> (scale float32 (G,), L uint8 (G, n)).
    L is a uint8_t in C: a negative level (x below 0 after a parity flip) wraps to 255 and is used so."""
    g, n = x.shape
    fn = _F32(nmax)
    mx = _fmax_scan(x, np.zeros(g, dtype=np.float32))
    live = ~(mx < GROUP_MAX_EPS)
    with np.errstate(all="ignore"):
        iscale = fn / mx
        L = (_nint(iscale[:, None] * x) & 0xFF).astype(np.float32)
        diff = x - (_F32(1.0) / iscale)[:, None] * L
        best = _wsum(w, diff, diff)
        for step in (-4, -3, -2, -1, 1, 2, 3, 4):
            isc = (_F32(0.1) * _F32(step) + fn) / mx
            lq = np.minimum(nmax, _nint(isc[:, None] * x)).astype(np.float32)
            diff = x - (_F32(1.0) / isc)[:, None] * lq
            mse = _wsum(w, diff, diff)
            better = mse < best
            best = np.where(better, mse, best)
            iscale = np.where(better, isc, iscale)
        li = np.minimum(nmax, _nint(iscale[:, None] * x))
        L = li & 0xFF
        lf = li.astype(np.float32)
        sumlx = _wsum(w, x, lf)
        suml2 = _wsum(w, lf, lf)
        active = np.ones(g, dtype=bool)
        for _ in range(5):
            changed = np.zeros(g, dtype=bool)
            for i in range(n):
                wi, xi, old = w[:, i], x[:, i], L[:, i].astype(np.float32)
                slx = sumlx - wi * xi * old
                sl2 = suml2 - wi * old * old
                new = np.minimum(nmax, _nint(xi * sl2 / slx))
                take = active & (slx > 0) & (sl2 > 0) & (new != L[:, i])
                nf = new.astype(np.float32)
                slx = slx + wi * xi * nf
                sl2 = sl2 + wi * nf * nf
                take &= slx * slx * suml2 > sumlx * sumlx * sl2
                L[:, i] = np.where(take, new & 0xFF, L[:, i])
                sumlx = np.where(take, slx, sumlx)
                suml2 = np.where(take, sl2, suml2)
                changed |= take
            active &= changed
        scale = np.where(suml2 > 0, sumlx / suml2, _F32(0.0)).astype(np.float32)
    return np.where(live, scale, _F32(0.0)), np.where(live[:, None], L, 0).astype(np.uint8)


def _snap(xv: np.ndarray, w: np.ndarray, scale: np.ndarray, lv: np.ndarray, tabs: SearchTables) -> np.ndarray:
    """Levels lv int64 (m, 8) -> grid index (m,) via kmap, else iq2_find_best_neighbour: the first strict
    minimum of sum w*(scale*q - x)^2 below FLT_MAX (-1: none, where ggml asserts). Updates lv in place."""
    gi = tabs.kmap[(lv << _SHIFTS).sum(axis=1)].astype(np.int64)
    miss = np.flatnonzero(gi < 0)
    if miss.size:
        cand = tabs.padded[tabs.list_row[(lv[miss] << _SHIFTS).sum(axis=1)]]  # (m', width)
        cand = cand[:, : int((cand >= 0).sum(axis=1).max())]
        q = tabs.grid_q[np.maximum(cand, 0)]  # (m', width, 8)
        d2 = np.zeros(cand.shape, dtype=np.float32)
        for i in range(8):
            diff = scale[miss, None] * q[:, :, i] - xv[miss, None, i]
            d2 = d2 + w[miss, None, i] * diff * diff
        d2 = np.where((cand >= 0) & (d2 < FLT_MAX), d2, np.inf)  # NaN and >= FLT_MAX never win in C
        j = np.argmin(d2, axis=1)  # first minimum: C's strict `<`
        found = np.isfinite(d2[np.arange(miss.size), j])
        gi[miss] = np.where(found, cand[np.arange(miss.size), j], -1)
        lv[miss] = np.where(found[:, None], tabs.codes[np.maximum(gi[miss], 0)], lv[miss])
    return gi


def _levels(xv: np.ndarray, inv: np.ndarray) -> np.ndarray:
    """MAX(0, MIN(2, nearest_int(0.5f*(id*x - 1)))): int64, same shape as xv (G, 32)."""
    return np.clip(_nint(_F32(0.5) * (inv[:, None] * xv - _F32(1.0))), 0, 2)


def quantize_blocks_reference(x: np.ndarray, qw: np.ndarray) -> tuple[np.ndarray, bool]:
    """x, qw float32 (nb, 256) -> (uint8 (nb, 66), ok): ok False where ggml would abort (a NaN search)."""
    tabs = search_tables()
    nb = x.shape[0]
    G = nb * 8
    ok = True
    with np.errstate(all="ignore"):
        sumx2 = np.zeros(nb, dtype=np.float32)
        for i in range(256):
            sumx2 = sumx2 + x[:, i] * x[:, i]
        sigma2 = sumx2 / _F32(256.0)
        xb = x.reshape(G, 32)
        weight = (qw.reshape(G, 32) * np.sqrt(np.repeat(sigma2, 8)[:, None] + xb * xb)).astype(np.float32)
        waux = np.sqrt(weight)
        neg = ~(xb >= 0)  # NaN counts as negative, as `if (x >= 0) ... else`
        xval = np.where(neg, -xb, xb).reshape(G, 4, 8)
        negk = neg.reshape(G, 4, 8)
        wx = (weight * xb * xb).reshape(G, 4, 8)
        imin = np.zeros((G, 4), dtype=np.int64)  # first strict minimum of w*x*x
        mn = wx[:, :, 0]
        for i in range(1, 8):
            lt = wx[:, :, i] < mn
            mn = np.where(lt, wx[:, :, i], mn)
            imin = np.where(lt, i, imin)
        odd = negk.sum(axis=2) % 2 == 1
        flip = odd[:, :, None] & (np.arange(8) == imin[:, :, None])
        xval = np.where(flip, -xval, xval).reshape(G, 32)
        signs = ((negk ^ flip) << np.arange(8)).sum(axis=2) & 127  # (G, 4)

        mx = _fmax_scan(xval[:, 1:], xval[:, 0])
        live = ~(mx < GROUP_MAX_EPS)
        scale, L = make_qp_quants_reference(xval, weight, 4)
        L = L.astype(np.int64)
        eff_max = scale * _F32(3.0)
        live &= ~(eff_max <= 0)
        best = np.zeros(G, dtype=np.float32)
        x8, w8 = xval.reshape(G * 4, 8), waux.reshape(G * 4, 8)
        for step in range(-6, 7):
            inv = (_F32(5.0) + _F32(step) * _F32(0.1)) / eff_max
            this_scale = _F32(1.0) / inv
            laux = _levels(xval, inv).reshape(G * 4, 8)
            gi = _snap(x8, w8, np.repeat(this_scale, 4), laux, tabs)
            ok &= bool((gi >= 0)[np.repeat(live, 4)].all())  # GGML_ASSERT(grid_index >= 0) in the search
            q = (2 * laux + 1).astype(np.float32).reshape(G, 32)
            sumqx = _wsum(weight, xval, q)
            sumq2 = _wsum(weight, q, q)
            take = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
            scale = np.where(take, sumqx / sumq2, scale)
            best = np.where(take, scale * sumqx, best)
            L = np.where(take[:, None], laux.reshape(G, 32), L)
        pos = scale > 0
        inv = _F32(1.0) / scale
        lv = _levels(xval, inv).reshape(G * 4, 8)
        gi = _snap(x8, w8, np.repeat(scale, 4), lv, tabs)
        ok &= bool((gi >= 0)[np.repeat(pos & live, 4)].all())
        L = np.where(pos[:, None], lv.reshape(G, 32), L)
        q = (2 * L + 1).astype(np.float32)
        sumqx = _wsum(weight, xval, q)
        sumq2 = _wsum(weight, q, q)
        scale = np.where(pos & (sumq2 > 0), sumqx / sumq2, scale).astype(np.float32)
        flipall = scale < 0  # "should never happen": ggml makes the scale positive and flips every sign
        scale = np.where(flipall, -scale, scale)
        signs = np.where(flipall[:, None], ~signs & 127, signs)
        on = ((L >= 0) & (L <= 2)).reshape(G, 4, 8).all(axis=2)  # make_qp_quants' levels may be 3, 4 or wrapped
        gfinal = np.where(on, tabs.kmap[(np.clip(L, 0, 2).reshape(G, 4, 8) << _SHIFTS).sum(axis=2)], -1)  # (G, 4)
        ok &= bool((gfinal >= 0)[live].all())  # ggml: "Oops: found point not on grid" -> abort
        ok &= not np.isnan(scale[live]).any()  # GGML_ASSERT(scale >= 0)
        scale = np.where(live, scale, _F32(0.0))
        gbytes = np.where(live[:, None], gfinal, 0).astype(np.uint32)
        aux0 = (gbytes << (8 * np.arange(4, dtype=np.uint32))).sum(axis=1, dtype=np.uint32)
        aux1 = (np.where(live[:, None], signs, 0).astype(np.uint32) << (7 * np.arange(4, dtype=np.uint32))).sum(
            axis=1, dtype=np.uint32)
        scales = scale.reshape(nb, 8)
        max_scale = _fmax_scan(scales, np.zeros(nb, dtype=np.float32))
        d = max_scale / _F32(31.0)
        inv_d = _F32(1.0) / d
        ls = np.clip(_nint(_F32(0.5) * (inv_d[:, None] * scales - _F32(1.0))), 0, 15).astype(np.uint32)
        aux1 = aux1.reshape(nb, 8) | (ls << np.uint32(28))
        q2 = np.stack([aux0.reshape(nb, 8), aux1], axis=2).reshape(nb, 16)
        empty = max_scale == 0  # `if (!max_scale)`: d = 0, every byte zero
        q2 = np.where(empty[:, None], np.uint32(0), q2).astype("<u4")
        d16 = np.where(empty, _F32(0.0), d).astype("<f2")
    out = np.concatenate([d16.view(np.uint8).reshape(nb, 2), q2.view(np.uint8).reshape(nb, 64)], axis=1)
    return out, ok
