"""Plain-numpy transcription of ggml's quantize_row_q4_K_ref (with make_qkx2_quants).

Vectorised across sub-blocks, but every sum runs SEQUENTIALLY over the 32 elements in float32, in
the C loop's order (numpy's pairwise .sum() would round differently and change choices). Masks
stand in for the C control flow (`if (D > 0)`, `if (!d) continue;`); the values computed under a
false mask are discarded, so floating-point warnings there are silenced.
"""

from __future__ import annotations

import numpy as np

from mertools.kernels.reference import unpack_scale_min_k4

_F32 = np.float32


def nearest_int(fval: np.ndarray) -> np.ndarray:
    """ggml nearest_int as the bit trick: float32 (...) -> int64 (...), exact even out of range."""
    val = (np.asarray(fval, dtype=np.float32) + _F32(12582912.0)).astype(np.float32)
    return (val.view(np.int32).astype(np.int64) & 0x7FFFFF) - 0x400000


def _quant_levels(iscale: np.ndarray, x: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """MAX(0, MIN(15, nearest_int(iscale*(x - min)))): (S,), (S, 32), (S,) -> int64 (S, 32)."""
    return np.clip(nearest_int(iscale[:, None] * (x - mn[:, None])), 0, 15)


def _weighted_sq_error(scale: np.ndarray, lf: np.ndarray, mn: np.ndarray, x: np.ndarray,
                       w: np.ndarray) -> np.ndarray:
    """sum_i w_i*(scale*l_i + min - x_i)^2 summed in order: -> float32 (S,)."""
    err = np.zeros(x.shape[0], dtype=np.float32)
    for i in range(32):
        diff = scale * lf[:, i] + mn - x[:, i]
        err = err + w[:, i] * (diff * diff)
    return err


def make_qkx2_quants(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """make_qkx2_quants(32, 15, x, w, L, &min, Laux, -1.f, 0.1f, 20, false) for S sub-blocks.

    x, w: float32 (S, 32) -> (scale float32 (S,), the_min float32 (S,), L uint8 (S, 32)).
    """
    nmax = _F32(15.0)
    mn = x[:, 0].copy()
    mx = x[:, 0].copy()
    sum_w = w[:, 0].copy()
    sum_x = sum_w * x[:, 0]
    for i in range(1, 32):
        xi = x[:, i]
        mn = np.where(xi < mn, xi, mn)
        mx = np.where(xi > mx, xi, mx)
        sum_w = sum_w + w[:, i]
        sum_x = sum_x + w[:, i] * xi
    mn = np.where(mn > 0, _F32(0.0), mn).astype(np.float32)
    flat = mx == mn  # C returns scale 0, L = 0 and -min right away
    iscale = nmax / (mx - mn)
    scale = _F32(1.0) / iscale
    L = _quant_levels(iscale, x, mn)
    best = _weighted_sq_error(scale, L.astype(np.float32), mn, x, w)
    for step in range(21):
        iscale = (_F32(-1.0) + _F32(0.1) * _F32(step) + nmax) / (mx - mn)
        laux = _quant_levels(iscale, x, mn)
        lf = laux.astype(np.float32)
        sum_l = np.zeros_like(sum_w)
        sum_l2 = np.zeros_like(sum_w)
        sum_xl = np.zeros_like(sum_w)
        for i in range(32):
            wl = w[:, i] * lf[:, i]
            sum_l = sum_l + wl
            sum_l2 = sum_l2 + wl * lf[:, i]  # w*l*l is (w*l)*l
            sum_xl = sum_xl + wl * x[:, i]
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        pos = this_min > 0
        this_min = np.where(pos, _F32(0.0), this_min).astype(np.float32)
        this_scale = np.where(pos, sum_xl / sum_l2, this_scale).astype(np.float32)
        cur = _weighted_sq_error(this_scale, lf, this_min, x, w)
        take = (D > 0) & (cur < best) & ~flat
        L = np.where(take[:, None], laux, L)
        best = np.where(take, cur, best)
        scale = np.where(take, this_scale, scale)
        mn = np.where(take, this_min, mn)
    scale = np.where(flat, _F32(0.0), scale).astype(np.float32)
    L = np.where(flat[:, None], 0, L).astype(np.uint8)
    return scale, (-mn).astype(np.float32), L


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """x: float32 (..., cols) with cols % 256 == 0 -> uint8 (n_blocks, 144) Q4_K blocks."""
    xs = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, 8, 32)  # (nb, 8 sub-blocks, 32)
    nb = xs.shape[0]
    with np.errstate(all="ignore"):
        sub = xs.reshape(-1, 32)  # (S = nb*8, 32)
        sum_x2 = np.zeros(sub.shape[0], dtype=np.float32)
        for i in range(32):
            sum_x2 = sum_x2 + sub[:, i] * sub[:, i]
        av_x = np.sqrt(sum_x2 / _F32(32.0))
        w = av_x[:, None] + np.abs(sub)  # (S, 32)
        scales, mins, L = make_qkx2_quants(sub, w)
        scales = scales.reshape(nb, 8)
        mins = mins.reshape(nb, 8)
        L = L.reshape(nb, 8, 32)

        max_scale = np.zeros(nb, dtype=np.float32)
        max_min = np.zeros(nb, dtype=np.float32)
        for j in range(8):  # `if (scale > max_scale)`, in sub-block order
            max_scale = np.where(scales[:, j] > max_scale, scales[:, j], max_scale)
            max_min = np.where(mins[:, j] > max_min, mins[:, j], max_min)
        inv_scale = np.where(max_scale > 0, _F32(63.0) / max_scale, _F32(0.0)).astype(np.float32)
        inv_min = np.where(max_min > 0, _F32(63.0) / max_min, _F32(0.0)).astype(np.float32)
        # uint8_t ls = nearest_int(...): truncation to a byte comes before MIN(63, ls)
        ls = np.minimum(nearest_int(inv_scale[:, None] * scales) & 0xFF, 63)  # (nb, 8)
        lm = np.minimum(nearest_int(inv_min[:, None] * mins) & 0xFF, 63)

        packed = np.zeros((nb, 12), dtype=np.int64)
        for j in range(8):
            if j < 4:
                packed[:, j] = ls[:, j]
                packed[:, j + 4] = lm[:, j]
            else:
                packed[:, j + 4] = (ls[:, j] & 0xF) | ((lm[:, j] & 0xF) << 4)
                packed[:, j - 4] |= (ls[:, j] >> 4) << 6
                packed[:, j] |= (lm[:, j] >> 4) << 6
        packed = packed.astype(np.uint8)
        d16 = (max_scale / _F32(63.0)).astype(np.float16)
        dmin16 = (max_min / _F32(63.0)).astype(np.float16)

        sc, m = unpack_scale_min_k4(packed)
        d = d16.astype(np.float32)[:, None] * sc.astype(np.float32)  # (nb, 8)
        dm = dmin16.astype(np.float32)[:, None] * m.astype(np.float32)
        requant = np.clip(nearest_int((xs + dm[:, :, None]) / d[:, :, None]), 0, 15)
        # `if (!d) continue;` keeps make_qkx2_quants' L; a NaN d is truthy and requantizes
        L = np.where((d != 0)[:, :, None], requant, L).astype(np.uint8)

    Lc = L.reshape(nb, 4, 2, 32)  # 64-weight chunks: low nibble = first 32, high = next 32
    qs = (Lc[:, :, 0, :] | (Lc[:, :, 1, :] << 4)).reshape(nb, 128)
    head = np.stack([d16, dmin16], axis=1).astype("<f2").view(np.uint8).reshape(nb, 4)
    return np.concatenate([head, packed, qs], axis=1)
