"""The 8-bit kernels' activations: rows quantized as ggml's q8_0 (per 32) and q8_K (per 256), as each weight type wants.

ggml quantizes a matrix product's activations to the format its weight type's vec_dot takes: q8_0 (d = max|x| / 127
per 32, f16 scale, roundf) for the 32-weight types, q8_K (one float32 scale per 256: iscale = -127 / the signed
largest value, nearest_int, at most 127) for the K types, whose super-block's sub-block products then sum in
integers with one float multiply per 256 weights (kernels/int8.py, dtypes/_k8.py). `quantize_act(x2, formats)`
computes the formats asked for (`formats_of(kind)` ORed over the weights that will read them); a format not asked
for has arrays of zero columns:

    xq uint8 (n, cols)       q8_0 quants (int8 bytes)   kq uint8 (n, cols)       q8_K quants (int8 bytes)
    dx float32 (n, cols/32)  their f16 scales            kd float32 (n, cols/256) their scales
    nsum int32 (n, cols/8)   minus each lane's sum       ks int32 (n, cols/16)    the sum of each 16 quants

(a lane: weights 4j..4j+3 and 16+4j..16+4j+3 of a block, j < 4, what a packed group's dot product sums; ks is
ggml's bsums: Q6_K's groups of 16 take them one by one, Q4_K's sub-blocks of 32 by pairs). Numpy
definitions: kernels/int8_reference.py, held bit for bit by tests/test_int8.py.
"""

from __future__ import annotations

from collections import namedtuple

import numpy as np
from numba import njit

from mertools.dtypes import DTYPES, KIND
from mertools.kernels.common import MATVEC_JIT
from mertools.kernels.q8act import absmax32, half_round, neg_quad_sums, q8_round32, q8k_round32

__all__ = ["PACKED_K", "Act8", "Q8_0_ACT", "Q8_K_ACT", "formats_of", "quantize_act"]

Act8 = namedtuple("Act8", "xq dx nsum kq kd ks")  # regions unpack it before their loops (a tuple in one cost 2-4 us)
Q8_0_ACT, Q8_K_ACT = 1, 2  # formats_of's bits
PACKED_K = 1 << 10  # added to a K type's code: its bytes repacked by `int8.prepare` (16 rows per super-block)
# the types whose 8-bit kernels read the file's super-blocks (an `int8_reference`, dtypes/_k8.py): they take q8_K
# frozen into `formats_of`'s compiled code: a K type given an 8-bit kernel (Q2_K, Q3_K: dtypes/_k8low.py; IQ2_XXS:
# dtypes/_k8iq2.py) must change this file, or a cache made before it would give that type q8_0 activations
_K_KINDS = tuple(KIND[name] for name, dt in DTYPES.items() if dt.int8_reference is not None)


@njit(**MATVEC_JIT)
def formats_of(kind: int) -> int:
    """The activation format a weight of type code `kind` reads on the 8-bit kernels (Q8_0_ACT or Q8_K_ACT)."""
    for k in _K_KINDS:
        if kind % PACKED_K == k:
            return Q8_K_ACT
    return Q8_0_ACT


@njit(**MATVEC_JIT)
def _q8_0_rows(x, xq, dx, nsum):
    """quantize_row_q8_0 of each row of x (n, cols), with the sums the packed kernels take."""
    for i in range(x.shape[0]):
        xi, qi = x[i], xq[i]
        for b in range(x.shape[1] // 32):
            d = absmax32(xi, 32 * b) / np.float32(127.0)
            inv = np.float32(1.0) / d if d != np.float32(0.0) else np.float32(0.0)
            dx[i, b] = half_round(d)
            s = q8_round32(xi, 32 * b, inv, qi, 32 * b)  # lane j: quants j and 16 + j
            neg_quad_sums(s, nsum[i], 4 * b)


@njit(**MATVEC_JIT)
def _q8_k_rows(x, kq, kd, ks):
    """quantize_row_q8_K_ref of each row of x (n, cols), with each 16 quants' sum (ggml's bsums)."""
    for i in range(x.shape[0]):
        xi, qi = x[i], kq[i]
        qs = qi.view(np.int8)
        for b in range(x.shape[1] // 256):
            o = 256 * b
            amax = np.float32(0.0)
            for c in range(8):
                amax = max(amax, absmax32(xi, o + 32 * c))
            if amax == np.float32(0.0):  # ggml: d = 0, quants 0 (NaN never counts: `ax > amax`)
                kd[i, b] = np.float32(0.0)
                qi[o:o + 256] = 0
                ks[i, 16 * b:16 * b + 16] = 0
                continue
            j = o
            while abs(xi[j]) != amax:  # the first element reaching it, with its sign
                j += 1
            iscale = np.float32(-127.0) / xi[j]
            d = np.float32(1.0) / iscale
            kd[i, b] = d
            for c in range(8):
                q8k_round32(xi, o + 32 * c, iscale, qi, o + 32 * c)
            for k in range(16):
                t = np.int32(0)
                for j in range(o + 16 * k, o + 16 * k + 16):
                    t += np.int32(qs[j])
                ks[i, 16 * b + k] = t


@njit(**MATVEC_JIT)  # compiled: the one-call decode step (kernels/step.py) quantizes with it too
def quantize_act(x2: np.ndarray, formats: int) -> Act8:
    """float32 C (n, cols), cols % 32 == 0 -> its Act8, the formats in `formats` (Q8_0_ACT | Q8_K_ACT bits; q8_K
    only when cols % 256 == 0, the K types' rows)."""
    n, cols = x2.shape
    c0 = cols if formats & Q8_0_ACT else 0
    ck = cols if formats & Q8_K_ACT and cols % 256 == 0 else 0
    a = Act8(np.empty((n, c0), np.uint8), np.empty((n, c0 // 32), np.float32), np.empty((n, c0 // 8), np.int32),
             np.empty((n, ck), np.uint8), np.empty((n, ck // 256), np.float32), np.empty((n, ck // 16), np.int32))
    if c0:
        _q8_0_rows(x2, a.xq, a.dx, a.nsum)
    if ck:
        _q8_k_rows(x2, a.kq, a.kd, a.ks)
    return a
