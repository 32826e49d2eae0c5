"""The K-quant quantizers (q2_k, q3_k, q4_k, q5_k, q6_k): ggml's quantize_row_*_ref bit for bit.

tests/test_quantize.py checks every quantizer against its numpy twin and against SHA-256 of ggml's
output; this file adds what is particular to the K types: their shared search helpers against their
references, data aimed at the branches of the C code (zero groups, flat groups, f16 overflow of d
and dmin, ties), ggml's own round-trip limits per type, and, when libggml is at hand (a development
machine, never CI), a live comparison with ggml on fresh random data.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants
from numba import njit

from fixtures import ggml_oracle
from mertools.dtypes import DTYPES, _blocks256
from mertools.kernels import dequantize, quantize

K_TYPES = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k")
F32 = np.float32
# tests/test-quantize-fns.cpp: MAX_QUANTIZATION_TOTAL_ERROR(_2BITS, _3BITS)
GGML_ROUND_TRIP_LIMIT = {"q2_k": 0.0075, "q3_k": 0.0040, "q4_k": 0.002, "q5_k": 0.002, "q6_k": 0.002}


def _rows(x: np.ndarray, dtype: str) -> np.ndarray:
    """Our numba quantizer's super-blocks: uint8 (n_blocks, type_size), after checking the numpy twin agrees."""
    t = DTYPES[dtype]
    ours = np.asarray(t.quantize(np.ascontiguousarray(x, dtype=F32).reshape(-1))).reshape(-1, t.type_size)
    np.testing.assert_array_equal(ours, t.quantize_reference(x))
    return ours


def branch_blocks(seed: int = 11) -> np.ndarray:
    """float32 (n, 256): super-blocks aimed at the K quantizers' branches."""
    rng = np.random.default_rng(seed)
    rows = []
    base = rng.standard_normal((4, 256)).astype(F32)
    for g in (16, 32):  # some groups (of 16 or 32) zero, -0.0, constant, or below GROUP_MAX_EPS
        for fill in (0.0, -0.0, 0.5, -2.0, 1e-16, -3e-16):
            r = base[0].copy()
            r[g: 3 * g] = F32(fill)
            rows.append(r)
    for top in (65504.0 * 4, 65504.0 * 15, 65504.0 * 32, 65504.0 * 63, 65504.0 * 128, 65504.0 * 4096, 1e9, 4e12):
        for f in (0.999, 1.0, 1.001):  # around the super-block scale's f16 overflow, per type
            r = rng.uniform(-1, 1, 256).astype(F32) * F32(top * f)
            rows.append(r)
            rows.append(np.abs(r) + F32(top * f * 0.25))  # all positive: min clamped to 0, dmin 0
            rows.append(-np.abs(r))
    for m in (1e-20, 1e-25, 1e-30, 1e-38, 1e-42, 1e19, 2e19, 1e30):  # x*x, x*x*x underflow / overflow
        rows.append((rng.standard_normal(256) * m).astype(F32))
    r = (rng.integers(-4, 4, 256) * F32(0.5)).astype(F32)  # exactly on 3-bit levels (ties in the search)
    rows.append(r)
    rows.append((rng.integers(0, 4, 256) * F32(0.25) - F32(0.25)).astype(F32))  # on 2-bit levels with a min
    rows.append((rng.integers(-32, 32, 256) / F32(32)).astype(F32))  # on 6-bit levels
    r = np.zeros(256, F32)
    r[::16] = F32(1.0)  # one non-zero per group of 16
    rows.append(r)
    rows.append(np.where(np.arange(256) % 32 == 5, F32(-7.0), F32(0.01)).astype(F32))  # a negative outlier per 32
    return np.stack(rows)


@pytest.mark.parametrize("dtype", K_TYPES)
def test_branch_blocks_numba_matches_numpy(dtype: str) -> None:
    _rows(branch_blocks(), dtype)


@pytest.mark.parametrize("dtype", ("q2_k", "q3_k", "q5_k", "q6_k"))
def test_partial_chunks_and_shapes(dtype: str) -> None:
    x = np.random.default_rng(3).standard_normal(256 * 37).astype(F32)  # not a multiple of the task chunk
    ours = _rows(x, dtype)
    t = DTYPES[dtype]
    via_kernels = quantize(x.reshape(37, 256), dtype)
    assert via_kernels.shape == (37, t.type_size)
    np.testing.assert_array_equal(via_kernels, ours)
    assert t.quantize(np.zeros(0, F32)).size == 0


def test_zero_super_blocks() -> None:
    z = np.zeros((2, 256), F32)
    z[1] = -0.0
    assert not _rows(z, "q6_k").any()  # memset(&y[i], 0, ...) below GROUP_MAX_EPS
    assert not _rows(np.full((1, 256), F32(9e-16)), "q6_k").any()
    q3 = _rows(z, "q3_k")  # d = 0, scales 0; make_q3_quants' L = 0 is code -4: no high bits, qs 0
    assert not q3.any()
    assert not _rows(z, "q2_k").any()
    for dtype in ("q4_k", "q5_k"):
        assert not _rows(z, dtype).any()


@pytest.mark.parametrize("dtype", K_TYPES)
def test_round_trip_within_ggml_limits(dtype: str) -> None:
    # tests/test-quantize-fns.cpp: data 0.1 + 2*cos(i + offset), 4096 values, sqrt(sum diff^2)/n
    errs = []
    for offset in (0.0, 0.5, 1.0, 7.5, 100.0):
        x = (0.1 + 2 * np.cos(np.arange(4096, dtype=np.float64) + offset)).astype(F32)
        raw = quantize(x, dtype)
        y = quants.dequantize(raw, T(DTYPES[dtype].ggml_type)).reshape(-1)
        np.testing.assert_array_equal(dequantize(raw, dtype, (4096,)).view(np.uint32), y.view(np.uint32))
        errs.append(np.sqrt(np.sum((y.astype(np.float64) - x) ** 2)) / x.size)
    assert max(errs) < GGML_ROUND_TRIP_LIMIT[dtype], errs


def test_more_bits_less_error() -> None:
    x = np.random.default_rng(4).standard_normal((64, 1024)).astype(F32)
    err = {}
    for dtype in K_TYPES:
        y = dequantize(quantize(x, dtype), dtype, x.shape)
        err[dtype] = float(np.sqrt(np.mean((y - x) ** 2)))
    assert err["q2_k"] > err["q3_k"] > err["q4_k"] > err["q5_k"] > err["q6_k"] > 0, err
    assert err["q6_k"] < 0.02 and err["q2_k"] < 0.5, err


# ---------------------------------------------------------------- the shared helpers against their references


@njit(cache=True)
def _qkx2_rows(x, w, nmax, rmin, rdelta, nstep, use_mad):
    """make_qkx2_quants on every row of x (S, n): -> scale, the_min float32 (S,), L uint8 (S, n)."""
    s, n = x.shape
    flat = x.reshape(-1)
    L = np.empty(s * n, dtype=np.uint8)
    laux = np.empty(n, dtype=np.uint8)
    scale = np.empty(s, dtype=np.float32)
    the_min = np.empty(s, dtype=np.float32)
    for r in range(s):
        scale[r], the_min[r] = _blocks256.make_qkx2_quants(flat, r * n, n, w[r], L, r * n, laux, nmax, rmin, rdelta,
                                                           nstep, use_mad)  # python floats: coerced to float32
    return scale, the_min, L.reshape(s, n)


@njit(cache=True)
def _absmax_rows(x):
    out = np.empty((x.shape[0], 2), dtype=np.float32)
    flat = x.reshape(-1)
    for r in range(x.shape[0]):
        out[r, 0], out[r, 1] = _blocks256.signed_absmax(flat, r * x.shape[1], x.shape[1])
    return out


# (n, nmax, rmin, rdelta, nstep, use_mad) as quantize_row_q2_K_ref, q4_K_ref and q5_K_ref call it
QKX2_PARAMS = [(16, 3, -0.5, 0.1, 15, True), (32, 15, -1.0, 0.1, 20, False), (32, 31, -0.5, 0.1, 15, False)]


@pytest.mark.parametrize("params", QKX2_PARAMS)
def test_make_qkx2_quants_numba_matches_reference(params: tuple) -> None:
    n, nmax, rmin, rdelta, nstep, use_mad = params
    rng = np.random.default_rng(n + nmax)
    x = np.concatenate([
        rng.standard_normal((300, n)), rng.uniform(0.5, 2, (50, n)), -rng.uniform(0, 1, (50, n)),
        np.full((4, n), 3.0), np.zeros((2, n)), rng.integers(-2, 3, (50, n)) * 0.5, rng.standard_normal((20, n)) * 1e25,
    ]).astype(F32)  # fmt: skip
    w = np.abs(x) if use_mad else (np.abs(x) + F32(0.3)).astype(F32)
    with np.errstate(all="ignore"):
        ref = _blocks256.make_qkx2_quants_reference(x, w, nmax, rmin, rdelta, nstep, use_mad)
    ours = _qkx2_rows(x, w, nmax, rmin, rdelta, nstep, use_mad)
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_array_equal(a, b)
    assert ours[2].max() <= nmax
    flat = np.all(x == x[:, :1], axis=1) & (x[:, 0] <= 0)  # max == min after clamping min to <= 0
    assert (ours[0][flat] == 0).all() and (ours[2][flat] == 0).all()


def test_signed_absmax_first_largest_magnitude_with_sign() -> None:
    x = np.array([[1, -3, 3, 2], [-0.0, 0, 0, 0], [0.5, -0.5, 0.25, -0.5], [2, 1, -2, 0]], F32)
    amax, mx = _blocks256.signed_absmax_reference(x)
    np.testing.assert_array_equal(amax, [3, 0, 0.5, 2])
    np.testing.assert_array_equal(mx, [-3, 0, 0.5, 2])  # the first to reach the max wins a tie
    np.testing.assert_array_equal(_absmax_rows(x), np.stack([amax, mx], axis=1))


def test_nearest_int_matches_reference_and_rounds_half_even() -> None:
    v = np.array([0.5, 1.5, 2.5, -0.5, -2.5, 31.5, -32.5, 4194303.0, 1e10, -1e10, 0.49999997], F32)
    ref = _blocks256.nearest_int_reference(v)
    np.testing.assert_array_equal(ref[:7], [0, 2, 2, 0, -2, 32, -32])
    np.testing.assert_array_equal([_blocks256.nearest_int(e) for e in v], ref)


# ---------------------------------------------------------------- ggml itself (development machines only)


@pytest.mark.skipif(not ggml_oracle.available(), reason="libggml-base not found (see fixtures/ggml_oracle.py)")
@pytest.mark.parametrize("dtype", K_TYPES)
def test_live_ggml_oracle(dtype: str) -> None:
    rng = np.random.default_rng()  # fresh data each run: a fuzz, not a fixed vector
    seed = int(rng.integers(1 << 31))
    rng = np.random.default_rng(seed)
    scales = np.exp(rng.uniform(-30, 30, (64, 1))).astype(F32)
    cases = {
        "branches": branch_blocks(seed),
        "normal": rng.standard_normal((64, 1024)).astype(F32),
        "row-scaled": (rng.standard_normal((64, 1024)) * scales).astype(F32),
        "heavy": (rng.standard_t(2, (64, 1024))).astype(F32),
        "f16-edge": (rng.uniform(-1, 1, (64, 256)) * np.exp(rng.uniform(0, 25, (64, 1)))).astype(F32),
        "levels": (rng.integers(-8, 8, (64, 256)) * F32(0.125)).astype(F32),
    }
    t = DTYPES[dtype]
    for kind, x in cases.items():
        want = ggml_oracle.quantize(x, t.ggml_type).reshape(-1, t.type_size)
        got = _rows(x, dtype)
        bad = np.nonzero((got != want).any(axis=1))[0]
        assert bad.size == 0, f"{dtype} {kind} (seed {seed}): super-blocks {bad[:10]} differ from ggml"
