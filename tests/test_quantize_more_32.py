"""Quantizers of q4_1, q5_0, q5_1, mxfp4, iq4_nl and iq4_xs: the pieces where C's arithmetic is easy to
get wrong (the IQ4 nearest-value search, MXFP4's floor(log2f), the sign of zero scales), known answers
taken from ggml, and a live fuzz against ggml when its library is at hand (tests/test_quantize.py
checks every quantizer against gguf-py, numpy and the SHA-256 of ggml's output)."""

from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from fixtures import ggml_oracle
from mertools import dtypes as registry
from mertools.dtypes import _iq4, mxfp4
from mertools.kernels import quantize, simd

TYPES = ("q4_1", "q5_0", "q5_1", "mxfp4", "iq4_nl", "iq4_xs")
F32 = np.float32
KV = [F32(k) for k in _iq4.KVALUES]


def c_best_index(x: np.float32) -> int:
    """ggml's best_index_int8(16, kvalues_iq4nl, x), line for line, in float32."""
    if x <= KV[0]:
        return 0
    if x >= KV[15]:
        return 15
    ml, mu = 0, 15
    while mu - ml > 1:
        mav = (ml + mu) // 2
        if x < KV[mav]:
            mu = mav
        else:
            ml = mav
    return mu - 1 if x - KV[mu - 1] < KV[mu] - x else mu


def search_values() -> np.ndarray:
    """float32 (n,), n % 32 == 0: the table values, the midpoints between neighbours and the floats
    a few ulps around both, zeros, infinities, NaN, extremes, and random values over the table's span."""
    k = np.array(KV, dtype=F32)
    points = np.concatenate([k, (k[:-1] + k[1:]) / F32(2.0), [0.0, -0.0, 1e-45, -1e-45, 3e38, -3e38]]).astype(F32)
    near = [points]
    for _ in range(3):
        near.append(np.nextafter(near[-1], F32(np.inf)))
    down = [points]
    for _ in range(3):
        down.append(np.nextafter(down[-1], F32(-np.inf)))
    rng = np.random.default_rng(11)
    v = np.concatenate([*near, *down, [np.inf, -np.inf, np.nan, -np.nan], rng.uniform(-140, 140, 4000)]).astype(F32)
    return np.concatenate([v, np.zeros(-v.size % 32, F32)])


@pytest.mark.parametrize("avx512", [True, False])
def test_iq4_search_is_c_best_index(avx512: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The vector search (binary with vpermps on AVX-512, a compare chain elsewhere) gives C's index
    and value for every kind of input, NaN included; so does the numpy reference."""
    if avx512 and not simd.AVX512:
        pytest.skip("host has no AVX-512")
    monkeypatch.setattr(_iq4, "AVX512", avx512)

    @njit(cache=False)
    def codes(x, inv, out):  # out[16b:16b+16] = the nibbles of block b (intrinsics compile here, fresh)
        for b in range(x.size // 32):
            _iq4.nibbles32(x, 32 * b, inv, out, 16 * b)

    @njit(cache=False)
    def values(x, out):
        for i in range(0, x.size, 16):
            simd.vstore(out, i, _iq4.nearest16(simd.vload(x, i)))

    x = search_values()
    for inv in (F32(1.0), F32(0.37), F32(-2.5)):
        with np.errstate(over="ignore"):
            v = (inv * x).astype(F32)
        expected = np.array([c_best_index(e) for e in v])
        out = np.zeros(x.size // 2, np.uint8)
        codes(x, inv, out)
        blocks = out.reshape(-1, 16)
        got = np.concatenate([np.concatenate([b & 15, b >> 4]) for b in blocks]).astype(np.int64)
        np.testing.assert_array_equal(got, expected)
        np.testing.assert_array_equal(_iq4.best_index_reference(v), expected)
    val = np.zeros(x.size, F32)
    values(x, val)
    np.testing.assert_array_equal(val, np.array(KV, F32)[[c_best_index(e) for e in x]])


# mxfp4's exponent at the top of each binade, from ggml: for exponent field f (0: the subnormals just
# below 2^-126), the largest `count` mantissas have floorf(log2f(amax)) one above the binade's
_MXFP4_ROUND_UP = ((0, 0, 22), (1, 62, 44), (63, 94, 22), (95, 110, 11), (111, 118, 5), (119, 122, 2), (123, 124, 1),
                   (125, 128, 0), (129, 130, 1), (131, 134, 2), (135, 142, 5), (143, 158, 11), (159, 190, 22),
                   (191, 254, 44))  # fmt: skip


def test_mxfp4_exponent_at_binade_tops() -> None:
    amax, expected = [], []
    for first, last, count in _MXFP4_ROUND_UP:
        for field in range(first, last + 1):
            k = field - 127 if field else -127  # floor(log2) of the binade
            for i in range(count + 3):  # the round-up mantissas and three below them
                amax.append((field << 23) | (0x7FFFFF - i))
                expected.append((k + 125 + (i < count)) & 0xFF)
    a = np.array(amax, dtype=np.uint32).view(F32)
    x = np.zeros((a.size, 32), F32)
    x[:, 5] = a
    x[:, 9] = -a / F32(3.0)
    np.testing.assert_array_equal(mxfp4.quantize(x.reshape(-1)).reshape(-1, 17)[:, 0], expected)
    np.testing.assert_array_equal(mxfp4.quantize_reference(x)[:, 0], expected)


def test_mxfp4_known_exponents() -> None:
    """e = (uint8_t)(floorf(log2f(amax)) + 125): small amax wraps, FLT_MAX rounds up to 253 (ggml's bytes)."""
    cases = {1e-45: 232, 1e-40: 248, 2.0**-126: 255, 2.0**-127: 254, 2.0**-125: 0, 3.4e38: 252,
             float(np.finfo(F32).max): 253, 1.0: 125, 0.999999: 124, 0.0: 0}  # fmt: skip
    x = np.zeros((len(cases), 32), F32)
    x[:, 3] = list(cases)
    assert quantize(x, "mxfp4")[:, 0].tolist() == list(cases.values())


def test_zero_blocks_as_c_writes_them() -> None:
    """Blocks of zeros, the sign of zero as ggml keeps it (gguf-py may differ there; see q5_0, q4_1)."""
    neg_first = np.zeros(256, F32)
    neg_first[0] = -0.0
    for x in (np.zeros(256, F32), -np.zeros(256, F32), neg_first):
        got = {t: quantize(x, t).reshape(-1, registry.DTYPES[t].type_size)[0] for t in TYPES}
        assert got["q5_0"].tolist() == [0, 0x80, 255, 255, 255, 255] + [0] * 16  # d = 0.0/-16 = -0.0, q = 16
        m_sign = 0x80 if np.signbit(x[0]) else 0  # min: the first of the equal zeros, C's scan
        assert got["q4_1"].tolist() == [0, 0, 0, m_sign] + [0] * 16
        assert got["q5_1"].tolist() == [0, 0, 0, m_sign] + [0] * 20
        assert got["mxfp4"].tolist() == [0] * 17
        assert got["iq4_nl"].tolist() == [0, 0] + [0x88] * 16  # every 0 * x is nearest K[8] = 1
        assert got["iq4_xs"].tolist() == [0, 0x80, 0xAA, 0xAA, 0, 0, 0, 0] + [0x88] * 128  # d = -0/32; ls = 32


def test_iq4_partial_chunks_and_tiny_blocks() -> None:
    """Block counts that are not a multiple of the parallel chunk; sub-blocks below GROUP_MAX_EPS."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal(256 * 37).astype(F32)
    x[:32] *= F32(1e-16)  # below 1e-15: scale 0
    x[64:96] *= F32(2e-15)
    for t in ("iq4_nl", "iq4_xs"):
        dt = registry.DTYPES[t]
        np.testing.assert_array_equal(dt.quantize(x).reshape(-1, dt.type_size), dt.quantize_reference(x))


def test_every_type_is_a_convert_target() -> None:
    for t in TYPES:
        assert registry.DTYPES[t].quantize is not None and t in registry.CONVERT_CHOICES


# ---------------------------------------------------------------- live ggml (development machines)


def _fuzz_cases(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    nb = n // 32
    scale = np.repeat(np.exp(rng.uniform(-100, 88, nb)), 32)
    sparse = np.where(rng.random(n) < 0.2, rng.standard_normal(n), 0.0)
    sparse[rng.random(n) < 0.3] = -0.0
    outl = rng.standard_normal(n) * 1e-3
    outl[rng.integers(0, n, n // 64)] = rng.uniform(10, 1000, n // 64) * rng.choice([-1, 1], n // 64)
    kv = np.array(KV, np.float64)[rng.integers(0, 16, n)] * np.repeat(rng.uniform(1e-3, 10, nb), 32)
    cases = {
        "normal": rng.standard_normal(n),
        "scaled": np.clip(rng.standard_normal(n) * scale, -3e38, 3e38),
        "cauchy": rng.standard_cauchy(n),
        "all_negative": -rng.uniform(0.1, 5, n),
        "half_grid": rng.integers(-64, 65, n) / 2 * np.repeat(2.0 ** rng.integers(-10, 10, nb), 32),
        "table_multiples": kv,
        "outliers": outl,
        "sparse_signed_zeros": sparse,
        "subnormal": rng.standard_normal(n) * 1e-40,
        "f16_edges": rng.choice([65504, 65520, 1e5, 6.1e-5, 5.96e-8, 3e-8], n) * rng.choice([-1, 1], n),
        "huge": rng.uniform(-1, 1, n) * np.repeat(rng.choice([1e19, 2e19, 1e30, 3.4e38], nb), 32),
        "ties": np.repeat(rng.standard_normal(n // 4), 4),
    }
    return {k: v.astype(F32) for k, v in cases.items()}


@pytest.mark.skipif(not ggml_oracle.available(), reason="ggml's library (llama-cpp-python) not installed")
@pytest.mark.parametrize("dtype", TYPES)
def test_live_ggml_fuzz(dtype: str) -> None:
    """numba and numpy quantizers == ggml_quantize_chunk, byte for byte, on random and awkward data."""
    dt = registry.DTYPES[dtype]
    for seed in range(2):
        for kind, x in _fuzz_cases(np.random.default_rng(seed), 1 << 15).items():
            rows = x.reshape(-1, 1024)
            expected = ggml_oracle.quantize(rows, dt.ggml_type)
            np.testing.assert_array_equal(quantize(rows, dtype), expected, err_msg=kind)
            np.testing.assert_array_equal(dt.quantize_reference(rows).reshape(expected.shape), expected, err_msg=kind)
