"""A rough IQ2_XXS quantizer for the full-size benchmarks' stand-ins: ggml's sign handling and weights, three of its
scale trials, and the nearest grid point by table lookup instead of ggml's weighted neighbour search.

ggml's quantizer (mertools/dtypes/_iq2_quant.py, bit for bit) tries 13 scales per group of 32 and, for every group of 8
whose rounded point is off the grid, searches that point's neighbours with importance weights; on 45 G weights that is
far over the benchmark's hour on 2 cores. Here each of the 3^8 rounded points maps through a table to its nearest grid
point (unweighted, in ggml's q = 2l + 1 units), built once from gguf-py's grid. Speed only: fidelity is measured with
ggml's quantizer, as with benchmarks/rough_q2_k.py.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from mertools.dtypes import DTYPES
from mertools.dtypes._iq2grid import GRID_CODES
from mertools.kernels.common import f16_bits_to_f32, f32_to_f16_bits

BYTES = 66  # f16 d, then 8 x (4 grid indices, 4 x 7 sign bits + a 4-bit scale)
_STEP = 6  # three scale trials (ggml: 13, 0.1 apart): on Gaussian rows relative RMS error 0.394 against 0.389 with 13


def _nearest_table() -> np.ndarray:
    """uint8 (65536,): for a point whose coordinate i has level (u >> 2i) & 3 (levels 0..2), its nearest grid point."""
    levels = np.array(np.meshgrid(*[np.arange(3)] * 8, indexing="ij")).reshape(8, -1).T  # (6561, 8), coordinate 0 first
    q, g = 2 * levels + 1, 2 * GRID_CODES.astype(np.int64) + 1
    dist = (q * q).sum(1)[:, None] - 2 * q @ g.T + (g * g).sum(1)[None, :]  # squared distances (6561, 256)
    table = np.zeros(1 << 16, np.uint8)
    table[(levels << (2 * np.arange(8))).sum(1)] = dist.argmin(1)  # ties: the lowest grid index
    return table


_NEAREST = _nearest_table()
_GRID_Q = (2 * GRID_CODES.astype(np.float32) + 1).copy()  # (256, 8) q of each grid coordinate: 1, 3 or 5


@njit(cache=True)
def _group(x, weight, table, gq, codes, xval, idx):  # x float32 (32,) -> (scale, 4 grid indices in codes[0:4], 4 signs
    # in codes[4:8]); xval float32 (32,) and idx int64 (4,) are scratch
    for k in range(4):
        s, nflip, imin, wmin = 0, 0, 0, np.float32(3.4e38)
        for i in range(8):
            v = x[8 * k + i]
            xval[8 * k + i] = v if v >= 0 else -v
            if v < 0:
                nflip += 1
                s |= 1 << i
            e = weight[8 * k + i] * v * v
            if e < wmin:
                wmin, imin = e, i
        if nflip % 2:  # the stored signs have even parity: give up the sign of the least important weight
            xval[8 * k + imin] = -xval[8 * k + imin]
            s ^= 1 << imin
        codes[4 + k] = s & 127
    mx = xval.max()
    if mx < np.float32(1e-15):
        codes[:4] = 0
        return np.float32(0.0)
    best, scale = np.float32(0.0), np.float32(0.0)
    for t in range(-6, 7, _STEP):
        inv = (np.float32(5.0) + np.float32(t) * np.float32(0.1)) / mx
        sqx, sq2 = np.float32(0.0), np.float32(0.0)
        for k in range(4):
            u = 0
            for i in range(8):
                lv = int(np.floor(np.float32(0.5) * (inv * xval[8 * k + i] - np.float32(1.0)) + np.float32(0.5)))
                u |= min(2, max(0, lv)) << (2 * i)
            idx[k] = table[u]
            for i in range(8):
                q = gq[idx[k], i]
                sqx += weight[8 * k + i] * xval[8 * k + i] * q
                sq2 += weight[8 * k + i] * q * q
        if sq2 > 0 and sqx * sqx > best * sq2:
            scale, best = sqx / sq2, sqx * sqx / sq2
            codes[:4] = idx
    return max(scale, np.float32(0.0))


@njit(cache=True)
def _block(xb, o, table, gq, weight, xval, idx, scales, codes):
    sigma2 = np.float32(0.0)
    for i in range(256):
        sigma2 += xb[i] * xb[i]
    sigma2 /= np.float32(256.0)
    for i in range(256):
        weight[i] = np.sqrt(sigma2 + xb[i] * xb[i])  # ggml's weights with an importance matrix of ones
    for g in range(8):
        scales[g] = _group(xb[32 * g:32 * g + 32], weight[32 * g:32 * g + 32], table, gq, codes[g], xval, idx)
    o[:] = 0
    if scales.max() <= 0:
        return
    dbits = f32_to_f16_bits(scales.max() / np.float32(31.0))
    d = f16_bits_to_f32(dbits)
    o[0], o[1] = dbits & 0xFF, dbits >> 8
    for g in range(8):
        half = np.float32(0.5) * (scales[g] / d - np.float32(1.0)) if d > 0 else np.float32(0.0)
        ls = min(15, max(0, int(np.floor(half + np.float32(0.5)))))
        aux = codes[g, 4] | (codes[g, 5] << 7) | (codes[g, 6] << 14) | (codes[g, 7] << 21) | (ls << 28)
        for k in range(4):
            o[2 + 8 * g + k] = codes[g, k]
            o[6 + 8 * g + k] = (aux >> (8 * k)) & 0xFF


_CHUNK = 64  # blocks per parallel task, so that its scratch is allocated once


@njit(parallel=True, cache=True)
def _quantize(x, out, table, gq):  # x float32 (nb, 256) -> out uint8 (nb, 66), block_iq2_xxs
    for c in prange((x.shape[0] + _CHUNK - 1) // _CHUNK):
        weight, xval, idx = np.empty(256, np.float32), np.empty(32, np.float32), np.empty(4, np.int64)
        scales, codes = np.empty(8, np.float32), np.empty((8, 8), np.int64)
        for b in range(c * _CHUNK, min(x.shape[0], (c + 1) * _CHUNK)):
            _block(x[b], out[b], table, gq, weight, xval, idx, scales, codes)


def rough_iq2_xxs(raw: np.ndarray, dtype: str, shape: tuple[int, ...], target: str) -> np.ndarray:
    """add_standins' Encoder: an expert tensor's bytes -> rough IQ2_XXS bytes of the same shape."""
    if target != "iq2_xxs":
        raise ValueError(f"rough_iq2_xxs writes iq2_xxs stand-ins, not {target}")
    x = DTYPES[dtype].dequantize(raw).astype(np.float32, copy=False).reshape(-1, 256)
    out = np.zeros((x.shape[0], BYTES), np.uint8)
    _quantize(x, out, _NEAREST, _GRID_Q)
    return out.reshape(-1)
