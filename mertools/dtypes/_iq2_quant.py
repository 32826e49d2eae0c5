"""ggml's IQ2_XXS quantizer (quantize_iq2_xxs -> quantize_row_iq2_xxs_impl), bit for bit, in numba.

Super-block: 256 weights in 66 bytes, f16 d then 8 groups of 32 as two little-endian uint32: aux0 holds
4 grid indices (one byte per 8 weights), aux1 four 7-bit sign indices at bits 0, 7, 14, 21 and a 4-bit
scale at 28..31. Per group ggml flips signs to an even count (the least important weight pays), seeds a
scale with make_qp_quants, tries 13 scales snapping each 8 weights to the grid (kmap, else the nearest of
the precomputed neighbours), keeps the best, snaps once more and refits the scale.

ggml asserts an importance matrix; `importance` float32 (cols,) is that imatrix, the same vector for
every row (llama-quantize passes it so); None means all ones. The numpy twin is in _iq2_quant_ref.py;
both use float32 operations in C's order and roundings, never fused, so the bytes agree with ggml's.

Speed (about 4x ggml's C, 52 neighbour searches per group of 32): a search term w*(s*q - x)^2 takes one
of 3 values per coordinate, so each is computed once and looked up (vpermps) for 16 neighbours at a time,
then summed in C's order; the winner is found with vector compares (_iq2_vec.py), not a scalar chain;
the tables are small and contiguous (kernel_tables); and a whole task runs in one function (_blocks).
"""

from __future__ import annotations

import functools

import numpy as np
from numba import njit, prange

from mertools.errors import QuantizationError
from mertools.kernels.common import EXACT_JIT, EXACT_PJIT, f32_to_f16_bits
from mertools.kernels.simd import nib16, vadd, viota, vload, vlut16, vmul, vsplat, vstore, vsub, vzero

from ._blocks256 import nearest_int
from ._iq2_quant_ref import BYTES, FLT_MAX, GROUP_MAX_EPS, quantize_blocks_reference, search_tables
from ._iq2_vec import vfirst_eq, vhmin, vmin_valid

_CHUNK = 16  # super-blocks per parallel task: scratch is allocated once per task


# ---------------------------------------------------------------- the search tables in numba's layout

_MAX_LIST = 256  # the distance scratch: every list, padded to 16, fits (the longest has 150)
_POW3 = 3 ** np.arange(8)


@functools.cache
def kernel_tables() -> tuple[np.ndarray, ...]:
    """ggml's kmap and neighbour lists re-laid for the kernel: (k3, loff, lcnt, lc, codes).
    k3 int32 (6561,), indexed by the 8 levels in base 3 (L1-sized, unlike the 2-bit kmap): grid index,
    or -(m+1) for list m. List m has lcnt[m] entries, padded to n16 (a multiple of 16), in 9 rows of
    n16 bytes at 9*loff[m] of lc: 8 rows of levels, coordinate-major (one 16-byte load gives coordinate
    i of 16 neighbours), then their grid indices (next to the levels: no second cache miss)."""
    t = search_tables()
    lv = (np.arange(6561)[:, None] // _POW3) % 3  # (6561, 8) levels
    u = (lv << (2 * np.arange(8))).sum(axis=1)
    km = t.kmap[u].astype(np.int64)
    off = np.flatnonzero(km < 0)
    starts = -km[off]  # first entry in ggml's flat list, after the count
    lcnt = t.neighbours[starts - 1].astype(np.int64)
    n16 = (lcnt + 15) & ~15
    loff = np.concatenate([[0], np.cumsum(n16)[:-1]])
    lc = np.zeros(9 * int(n16.sum()), dtype=np.uint8)
    for m in range(off.size):  # 6305 short lists, once
        g = t.neighbours[starts[m]: starts[m] + lcnt[m]]
        blk = np.zeros((9, n16[m]), dtype=np.uint8)
        blk[:8, : lcnt[m]] = t.codes[g].T
        blk[8, : lcnt[m]] = g
        lc[9 * loff[m]: 9 * (loff[m] + n16[m])] = blk.reshape(-1)
    if n16.max() > _MAX_LIST:
        raise ValueError(f"iq2_xxs: a neighbour list of {lcnt.max()} entries overflows the kernel's scratch")
    k3 = km.astype(np.int32)
    k3[off] = -(np.arange(off.size) + 1)
    out = (k3, loff, lcnt, lc, t.codes)
    for a in out:
        a.setflags(write=False)
    return out


# ---------------------------------------------------------------- numba kernels


@njit(**EXACT_JIT)
def _make_qp_quants(x, w, L):
    """make_qp_quants(32, 4, x, L, w) -> scale; L uint8 (32,) (a negative level wraps, as the C uint8_t)."""
    mx = np.float32(0.0)
    for i in range(32):
        mx = mx if mx > x[i] else x[i]
    if mx < GROUP_MAX_EPS:
        L[:] = 0
        return np.float32(0.0)
    iscale = np.float32(4.0) / mx
    for i in range(32):
        L[i] = nearest_int(iscale * x[i]) & 0xFF
    scale = np.float32(1.0) / iscale
    best = np.float32(0.0)
    for i in range(32):
        diff = x[i] - scale * np.float32(L[i])
        best += w[i] * diff * diff
    for step in range(-4, 5):
        if step == 0:
            continue
        isc = (np.float32(0.1) * np.float32(step) + np.float32(4.0)) / mx
        sc = np.float32(1.0) / isc
        mse = np.float32(0.0)
        for i in range(32):
            diff = x[i] - sc * np.float32(min(4, nearest_int(isc * x[i])))
            mse += w[i] * diff * diff
        if mse < best:
            best = mse
            iscale = isc
    sumlx = np.float32(0.0)
    suml2 = np.float32(0.0)
    for i in range(32):
        li = min(4, nearest_int(iscale * x[i]))
        L[i] = li & 0xFF
        sumlx += w[i] * x[i] * np.float32(li)
        suml2 += w[i] * np.float32(li) * np.float32(li)
    for _ in range(5):
        changed = 0
        for i in range(32):
            old = np.float32(L[i])
            slx = sumlx - w[i] * x[i] * old
            sl2 = suml2 - w[i] * old * old
            if slx > 0 and sl2 > 0:
                new = min(4, nearest_int(x[i] * sl2 / slx))
                if new != np.int64(L[i]):
                    slx += w[i] * x[i] * np.float32(new)
                    sl2 += w[i] * np.float32(new) * np.float32(new)
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new & 0xFF
                        sumlx = slx
                        suml2 = sl2
                        changed += 1
        if changed == 0:
            break
    return sumlx / suml2 if suml2 > 0 else np.float32(0.0)


@njit(**EXACT_JIT, inline="always")
def _term(sq, x, w):
    """Lanes 0..2: w*(s*q - x)*(s*q - x) for q = 1, 3, 5 (sq = s*q), C's operations in C's order."""
    diff = vsub(sq, vsplat(x))
    return vmul(vmul(vsplat(w), diff), diff)


# One function for a task's super-blocks: an array passed to a call, even an inlined one, costs two
# atomic reference counts, which in the 52 searches a group made up 40% of the time.
@njit(**EXACT_JIT)
def _blocks(x, qw, out, b0, b1, k3, loff, lcnt, lc, codes):
    """quantize_row_iq2_xxs_impl for super-blocks b0..b1-1 of x -> out. Returns the first on which ggml
    aborts (float32 overflow: a search finds no distance below FLT_MAX, a level off the grid, a NaN
    scale), else -1."""
    weight = np.empty(32, np.float32)
    waux = np.empty(32, np.float32)
    xval = np.empty(32, np.float32)
    d2 = np.empty(_MAX_LIST, np.float32)
    lv = np.empty(64, np.int64)  # ggml's L at 0..31 (an int8_t), Laux at 32..63
    lqp = np.empty(32, np.uint8)  # make_qp_quants' L (a uint8_t)
    scales = np.empty(8, np.float32)
    q2 = np.empty(16, np.int64)
    qv = vadd(vadd(viota(), viota()), vsplat(np.float32(1.0)))  # lanes 0..2: q = 1, 3, 5
    for b in range(b0, b1):
        xb0 = b * 256
        qb0 = xb0 % qw.size
        sumx2 = np.float32(0.0)
        for i in range(256):
            sumx2 += x[xb0 + i] * x[xb0 + i]
        sigma2 = sumx2 / np.float32(256.0)
        for j in range(16):
            q2[j] = 0
        max_scale = np.float32(0.0)
        for ib in range(8):
            base = xb0 + 32 * ib
            scales[ib] = 0
            for i in range(32):
                v = x[base + i]
                weight[i] = qw[qb0 + 32 * ib + i] * np.sqrt(sigma2 + v * v)
                waux[i] = np.sqrt(weight[i])
            signs = 0
            for k in range(4):
                nflip = 0
                sk = 0
                for i in range(8):
                    v = x[base + 8 * k + i]
                    if v >= 0:
                        xval[8 * k + i] = v
                    else:
                        xval[8 * k + i] = -v
                        nflip += 1
                        sk |= 1 << i
                if nflip % 2:  # an odd count: flip the weight with the smallest w*x*x (the first, on ties)
                    imin = 0
                    mn = weight[8 * k] * x[base + 8 * k] * x[base + 8 * k]
                    for i in range(1, 8):
                        ax = weight[8 * k + i] * x[base + 8 * k + i] * x[base + 8 * k + i]
                        if ax < mn:
                            mn = ax
                            imin = i
                    xval[8 * k + imin] = -xval[8 * k + imin]
                    sk ^= 1 << imin
                signs |= (sk & 127) << (7 * k)
            mx = xval[0]
            for i in range(1, 32):
                mx = mx if mx > xval[i] else xval[i]
            if mx < GROUP_MAX_EPS:
                continue
            scale = _make_qp_quants(xval, weight, lqp)
            eff_max = scale * np.float32(3.0)
            if eff_max <= 0:
                continue
            for i in range(32):
                lv[i] = np.int64(lqp[i]) - 256 if lqp[i] > 127 else np.int64(lqp[i])  # read back as int8_t
            best = np.float32(0.0)
            failed = False
            for it in range(14):  # 13 trial scales into Laux, then (it 13) the best one into L
                if it < 13:
                    inv = (np.float32(5.0) + np.float32(it - 6) * np.float32(0.1)) / eff_max
                    sc = np.float32(1.0) / inv
                    lo = 32
                elif scale > 0:
                    inv = np.float32(1.0) / scale
                    sc = scale
                    lo = 0
                else:
                    break
                for i in range(32):
                    lv[lo + i] = min(max(nearest_int(np.float32(0.5) * (inv * xval[i] - np.float32(1.0))), 0), 2)
                sq = vmul(vsplat(sc), qv)
                for k in range(4):
                    k8 = lo + 8 * k
                    t = 0
                    for i in range(7, -1, -1):
                        t = 3 * t + lv[k8 + i]
                    g = np.int64(k3[t])
                    if g >= 0:
                        continue
                    # iq2_find_best_neighbour: each term takes one of 3 values per coordinate, computed
                    # once, then looked up per neighbour and summed in C's order: 16 neighbours a vector
                    o = loff[-g - 1]
                    n = lcnt[-g - 1]
                    n16 = (n + 15) & ~15
                    t0 = _term(sq, xval[8 * k], waux[8 * k])
                    t1 = _term(sq, xval[8 * k + 1], waux[8 * k + 1])
                    t2 = _term(sq, xval[8 * k + 2], waux[8 * k + 2])
                    t3 = _term(sq, xval[8 * k + 3], waux[8 * k + 3])
                    t4 = _term(sq, xval[8 * k + 4], waux[8 * k + 4])
                    t5 = _term(sq, xval[8 * k + 5], waux[8 * k + 5])
                    t6 = _term(sq, xval[8 * k + 6], waux[8 * k + 6])
                    t7 = _term(sq, xval[8 * k + 7], waux[8 * k + 7])
                    mins = vsplat(FLT_MAX)
                    for j in range(0, n16, 16):
                        c = 9 * o + j
                        d = vadd(vzero(), vlut16(t0, nib16(lc, c)))
                        d = vadd(d, vlut16(t1, nib16(lc, c + n16)))
                        d = vadd(d, vlut16(t2, nib16(lc, c + 2 * n16)))
                        d = vadd(d, vlut16(t3, nib16(lc, c + 3 * n16)))
                        d = vadd(d, vlut16(t4, nib16(lc, c + 4 * n16)))
                        d = vadd(d, vlut16(t5, nib16(lc, c + 5 * n16)))
                        d = vadd(d, vlut16(t6, nib16(lc, c + 6 * n16)))
                        d = vadd(d, vlut16(t7, nib16(lc, c + 7 * n16)))
                        vstore(d2, j, d)
                        mins = vmin_valid(mins, d, n - j)
                    bd = vhmin(mins)  # ggml's pick: the least distance below FLT_MAX, at its first index
                    if not bd < FLT_MAX:
                        failed = True  # GGML_ASSERT(grid_index >= 0)
                        break
                    jb = 0
                    while True:
                        f = vfirst_eq(vload(d2, jb), bd)
                        jb += f
                        if f < 16:
                            break
                    g = np.int64(lc[9 * o + 8 * n16 + jb])
                    for i in range(8):
                        lv[k8 + i] = codes[g, i]
                if failed:
                    break
                sqx = np.float32(0.0)
                sq2 = np.float32(0.0)
                for i in range(32):
                    q = np.float32(2 * lv[lo + i] + 1)
                    sqx += weight[i] * xval[i] * q
                    sq2 += weight[i] * q * q
                if it == 13:
                    if sq2 > 0:
                        scale = sqx / sq2
                elif sq2 > 0 and sqx * sqx > best * sq2:
                    scale = sqx / sq2
                    best = scale * sqx
                    for i in range(32):
                        lv[i] = lv[32 + i]
            if failed:
                return b
            if scale < 0:  # "should never happen" in ggml: a positive scale, every sign flipped
                scale = -scale
                signs = ~signs & 0xFFFFFFF
            if not scale >= 0:
                return b  # GGML_ASSERT(scale >= 0) on NaN
            a0 = 0
            for k in range(4):
                t = 0
                for i in range(7, -1, -1):
                    if lv[8 * k + i] < 0 or lv[8 * k + i] > 2:
                        return b  # a level off the grid: ggml prints "Oops" and aborts
                    t = 3 * t + lv[8 * k + i]
                if k3[t] < 0:
                    return b
                a0 |= np.int64(k3[t]) << (8 * k)
            q2[2 * ib] = a0
            q2[2 * ib + 1] = signs
            scales[ib] = scale
            max_scale = max_scale if max_scale > scale else scale
        o = b * BYTES
        for j in range(BYTES):
            out[o + j] = 0
        if max_scale == 0:
            continue  # every byte 0, d too
        d = max_scale / np.float32(31.0)
        hd = f32_to_f16_bits(d)
        inv = np.float32(1.0) / d
        for ib in range(8):
            ls = min(max(nearest_int(np.float32(0.5) * (inv * scales[ib] - np.float32(1.0))), 0), 15)
            q2[2 * ib + 1] |= ls << 28
        out[o] = hd & 0xFF
        out[o + 1] = hd >> 8
        for j in range(16):
            for k in range(4):
                out[o + 2 + 4 * j + k] = (q2[j] >> (8 * k)) & 0xFF
    return -1


@njit(**EXACT_PJIT)
def _quantize(x, qw, k3, loff, lcnt, lc, codes):
    """x float32 (nb*256,), qw float32 (cols,), cols % 256 == 0 -> (uint8 (nb*66,), first block ggml aborts on or -1)."""
    nb = x.size // 256
    out = np.empty(nb * BYTES, dtype=np.uint8)
    n_tasks = (nb + _CHUNK - 1) // _CHUNK
    fail = np.full(n_tasks, -1, dtype=np.int64)
    for t in prange(n_tasks):
        fail[t] = _blocks(x, qw, out, t * _CHUNK, min(nb, (t + 1) * _CHUNK), k3, loff, lcnt, lc, codes)
    bad = -1
    for t in range(n_tasks):
        if fail[t] >= 0:
            bad = fail[t]
            break
    return out, bad


# ---------------------------------------------------------------- public API


def _check(x: np.ndarray, importance: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """-> (x float32 (rows, cols) C-contiguous, importance float32 (cols,)), or QuantizationError."""
    a = np.asarray(x)
    if not np.issubdtype(a.dtype, np.floating):
        raise QuantizationError(f"iq2_xxs: expected float32 weights, got dtype {a.dtype}")
    if a.ndim not in (1, 2):
        raise QuantizationError(f"iq2_xxs: expected weights of shape (rows, cols) or (n,), got shape {a.shape}")
    a2 = np.ascontiguousarray(a, dtype=np.float32).reshape(-1, a.shape[-1])
    cols = a2.shape[1]
    if cols % 256 != 0:
        raise QuantizationError(f"iq2_xxs: the number of columns must be a multiple of 256, got {cols} (shape {a.shape})")
    if a2.size and not np.isfinite(a2).all():
        bad = int(np.flatnonzero(~np.isfinite(a2.reshape(-1)))[0])
        raise QuantizationError(f"iq2_xxs: expected finite weights, got {a2.reshape(-1)[bad]} at flat index {bad}")
    if importance is None:
        return a2, np.ones(cols, dtype=np.float32)
    qa = np.asarray(importance)
    if not np.issubdtype(qa.dtype, np.floating) and not np.issubdtype(qa.dtype, np.integer):
        raise QuantizationError(f"iq2_xxs: expected a float32 importance vector, got dtype {qa.dtype}")
    if qa.shape != (cols,):
        raise QuantizationError(f"iq2_xxs: expected importance of shape ({cols},) (one per column), got {qa.shape}")
    qw = np.ascontiguousarray(qa, dtype=np.float32)
    if not (np.isfinite(qw).all() and (qw >= 0).all()):
        i = int(np.flatnonzero(~(np.isfinite(qw) & (qw >= 0)))[0])
        raise QuantizationError(f"iq2_xxs: expected finite importance >= 0, got {qw[i]} at column {i}")
    return a2, qw


def _aborts(block: int, cols: int) -> QuantizationError:
    row, col = divmod(block * 256, cols)
    return QuantizationError(f"iq2_xxs: super-block at row {row}, column {col} overflows float32 inside ggml's "
                             "search (ggml aborts on it); scale the weights down")


def quantize(x: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """x: float32 (rows, cols) or (n,) (one row), cols % 256 == 0; importance float32 (cols,) >= 0 or None
    (all ones) -> uint8 (rows*cols/256*66,): ggml's IQ2_XXS bytes, in parallel."""
    a, qw = _check(x, importance)
    out, bad = _quantize(a.reshape(-1), qw, *kernel_tables())
    if bad >= 0:
        raise _aborts(int(bad), a.shape[1])
    return out


def quantize_reference(x: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """The numpy twin of `quantize` (slow: for small inputs and tests), same arguments, same bytes."""
    a, qw = _check(x, importance)
    rows, cols = a.shape
    out, ok = quantize_blocks_reference(a.reshape(-1, 256), np.tile(qw, rows).reshape(-1, 256))
    if not ok:
        raise QuantizationError("iq2_xxs: a super-block overflows float32 inside ggml's search (ggml aborts on it)")
    return out.reshape(-1)
