"""Quantizers: numba kernels == numpy transcriptions == gguf-py == ggml's C reference, byte for byte."""

from __future__ import annotations

import hashlib
import json
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from numba import njit

from fixtures.ggml_oracle import DET_KINDS, NEEDS_IMATRIX, det_data
from mertools.dtypes import DTYPES, QUANT_TYPES, q4_k
from mertools.errors import QuantizationError
from mertools.kernels import dequantize, quantize
from mertools.kernels.common import f32_to_f16_bits

QUANTIZED = tuple(d for d in QUANT_TYPES if DTYPES[d].quantize is not None)  # block types with a quantizer
GGUF_TYPE = {name: T(DTYPES[name].ggml_type) for name in QUANTIZED}
REF = {name: DTYPES[name].quantize_reference for name in QUANTIZED}
BLOCK = {name: DTYPES[name].block_size for name in QUANTIZED}
F32 = np.float32


def gguf_quantize(x: np.ndarray, dtype: str) -> np.ndarray:
    with warnings.catch_warnings():  # gguf casts NaN/Inf (from an infinite 1/d) to ints
        warnings.simplefilter("ignore", RuntimeWarning)
        return quants.quantize(x, GGUF_TYPE[dtype])


def zero_sign_free(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Block bytes (n_blocks, type_size) with the sign of every zero f16 scale cleared. gguf-py and C
    disagree on it (numpy's min/max/argmax may pick a -0.0 where C's scan keeps +0.0 or the first
    zero): q4_0 follows gguf-py there, the other quantizers C (ggml's SHA table holds C's)."""
    t = DTYPES[dtype]
    b = np.array(raw, dtype=np.uint8).reshape(-1, t.type_size)
    if t.scale_format == "f16":
        for o in t.scale_offsets:
            b[(b[:, o] == 0) & ((b[:, o + 1] & 0x7F) == 0), o + 1] = 0
    return b


def outcome(fn, x: np.ndarray, dtype: str) -> np.ndarray | str:
    """fn(x), or "aborts" where ggml's quantizer aborts: the imatrix types' search overflows float32 on huge weights
    (ggml asserts; ours raise, naming it), every other type quantizes all."""
    try:
        return np.asarray(fn(x))
    except QuantizationError as e:
        if dtype not in NEEDS_IMATRIX or "aborts" not in str(e):
            raise
        return "aborts"


def same_outcome(a: np.ndarray | str, b: np.ndarray | str, msg: str = "") -> None:
    if isinstance(a, str) or isinstance(b, str):
        assert (a, b) == ("aborts", "aborts"), msg
    else:
        np.testing.assert_array_equal(a.reshape(-1), b.reshape(-1), err_msg=msg)  # the references return blocks


def gguf_has_quantizer(dtype: str) -> bool:
    try:
        quants.quantize(np.zeros(BLOCK[dtype], F32), GGUF_TYPE[dtype])
    except NotImplementedError:
        return False
    return True


GGUF_QUANTIZED = tuple(d for d in QUANTIZED if gguf_has_quantizer(d))  # types gguf-py can quantize too


def random_weights(n: int, seed: int) -> dict[str, np.ndarray]:
    """Several distributions, float32 (n,) each."""
    rng = np.random.default_rng(seed)
    span = np.exp(rng.uniform(np.log(1e-30), np.log(1e30), n)) * rng.choice([-1.0, 1.0], n)
    return {
        "normal": rng.standard_normal(n).astype(F32),
        "uniform": rng.uniform(-1, 1, n).astype(F32),
        "cauchy": rng.standard_cauchy(n).astype(F32),
        "span": span.astype(F32),
        # whole 32-blocks scaled over 1e-38..1e38: subnormal 1/d, overflowing x*x in Q4_K, ...
        "blockscale": (rng.standard_normal(n) * np.repeat(np.exp(rng.uniform(-87.5, 87.5, n // 32)), 32)).astype(F32),
    }


def edge_blocks(bs: int) -> np.ndarray:
    """Edge cases, float32 (n_cases, bs): each row is one block (Q4_0/Q8_0) or super-block (Q4_K)."""
    rng = np.random.default_rng(5)
    z = np.zeros(bs, F32)
    rows = [z, -z]
    neg_first = z.copy()
    neg_first[0] = -0.0  # gguf and C disagree on d's sign here (see dtypes.q4_0.quantize_reference)
    rows.append(neg_first)
    for c in (1.0, -1.0, 3.5, -1e-3, 7e30, -7e30, 1e-40, -1e-40, 2.5e-38, -5e-38, 1e-45, 65504, 65520, 1e5):
        rows.append(np.full(bs, c, F32))  # constant blocks
    for pos in (0, 5, bs - 1):
        for c in (1.0, -2.0, 1e-38, 3e38, -3e38, 1e-45):
            r = z.copy()
            r[pos] = c  # a single non-zero
            rows.append(r)
    for m in (1.0, 8.0, 1e-20, 3e38, 1e-38, 6e-39):  # ties in max magnitude, +m first then -m first
        r = rng.uniform(-m, m, bs).astype(F32)
        r[3], r[bs - 3] = m, -m
        rows.append(r.copy())
        r[3], r[bs - 3] = -m, m
        rows.append(r.copy())
    for m in (1e-39, 1e-42, 1e-44, 2e-38, 3e-37, 1e-36, 1.5e-36, 1e30, 3.4e38, 1e19, 2e19):
        rows.append(np.clip(rng.standard_normal(bs) * m, -3.4e38, 3.4e38).astype(F32))  # tiny and huge
        rows.append((rng.uniform(0, 1, bs) * m).astype(F32))
    for s in (1.0, 0.25, 3.0):  # values landing exactly on .5 rounding points
        r = (rng.integers(-254, 255, bs) / 2 * s).astype(F32)
        r[0] = 127 * s
        rows.append(r)
        for top in (-8 * s, 8 * s):
            r = (rng.integers(-16, 17, bs) / 2 * s).astype(F32)
            r[0] = top
            rows.append(r)
    rows.append(np.linspace(-1, 1, bs).astype(F32))
    rows.append(np.where(np.arange(bs) % 2 == 0, F32(-1), F32(1)).astype(F32))
    rows.append(rng.integers(0, 16, bs).astype(F32))
    rows.append((rng.integers(0, 16, bs) * F32(0.1) - F32(0.7)).astype(F32))
    return np.stack(rows)


# SHA-256 of ggml's output (ggml_quantize_chunk -> quantize_row_*_ref, libggml-base of llama-cpp-python
# 0.3.36; the same as ggml-quants.c built with gcc -O2 -ffp-contract=off) on det_data(65536, kind) as 16
# rows, for every block type; written by `python -m fixtures.ggml_oracle --write-sha`.
C_REFERENCE_SHA256 = json.loads((Path(__file__).parent / "data" / "ggml_quant_sha256.json").read_text())


@pytest.fixture(scope="module")
def weights() -> dict[str, np.ndarray]:
    return random_weights(1 << 18, seed=0)  # 5 distributions x 262144 = 1.3M weights


@pytest.mark.parametrize("dtype", GGUF_QUANTIZED)
def test_random_match_gguf(weights: dict[str, np.ndarray], dtype: str) -> None:
    for kind, x in weights.items():
        m = x.reshape(-1, 1024)
        ours = quantize(m, dtype, name=kind)
        assert ours.shape == (256, DTYPES[dtype].row_bytes(1024))
        expected = gguf_quantize(m, dtype)
        assert np.array_equal(ours, expected), kind
        assert np.array_equal(REF[dtype](m).reshape(ours.shape), expected), kind


@pytest.mark.parametrize("dtype", QUANTIZED)
def test_random_numba_matches_numpy(weights: dict[str, np.ndarray], dtype: str) -> None:
    for kind, x in weights.items():
        m = x.reshape(-1, 4096)
        ours = outcome(partial(quantize, dtype=dtype, name=kind), m, dtype)
        assert isinstance(ours, str) or ours.shape == (64, DTYPES[dtype].row_bytes(4096))
        same_outcome(ours, outcome(REF[dtype], m, dtype), kind)
        # only the kinds scaled up to 1e30 ("span") and 2^126 ("blockscale") may overflow a search
        assert not isinstance(ours, str) or kind in ("span", "blockscale"), kind


@pytest.mark.parametrize("dtype", QUANTIZED)
def test_edge_cases(dtype: str) -> None:
    x = edge_blocks(BLOCK[dtype])
    if dtype in NEEDS_IMATRIX:  # row by row: a row ggml aborts on must not hide the others
        for i, row in enumerate(x):
            same_outcome(outcome(partial(quantize, dtype=dtype), row, dtype), outcome(REF[dtype], row, dtype), f"row {i}")
        return
    ours = quantize(x, dtype)
    ref = REF[dtype](x).reshape(ours.shape)
    np.testing.assert_array_equal(ours, ref)
    if dtype in GGUF_QUANTIZED:
        np.testing.assert_array_equal(zero_sign_free(ours, dtype), zero_sign_free(gguf_quantize(x, dtype), dtype))


@pytest.mark.parametrize("kind", DET_KINDS)
@pytest.mark.parametrize("dtype", QUANTIZED)
def test_matches_ggml_c_reference(kind: str, dtype: str) -> None:
    x = det_data(1 << 16, kind).reshape(16, -1)
    key = f"{kind}/{dtype}"
    if key not in C_REFERENCE_SHA256:  # ggml aborts there, so it has no digest: ours must refuse too
        assert dtype in NEEDS_IMATRIX and kind == "blockscale", key
        for fn in (partial(quantize, dtype=dtype), REF[dtype]):
            assert outcome(fn, x, dtype) == "aborts"
        return
    for out in (quantize(x, dtype), REF[dtype](x)):
        assert hashlib.sha256(np.ascontiguousarray(out).tobytes()).hexdigest() == C_REFERENCE_SHA256[key]


@pytest.mark.parametrize("offset", [0.0, 0.5, 1.0, 7.5, 100.0])
@pytest.mark.parametrize("dtype", QUANTIZED)
def test_round_trip_within_ggml_threshold(dtype: str, offset: float) -> None:
    # tests/test-quantize-fns.cpp: data 0.1 + 2*cos(i + offset), 4096 values, its limit per type
    x = (0.1 + 2 * np.cos(np.arange(4096, dtype=np.float64) + offset)).astype(F32)
    raw = quantize(x, dtype)
    y = quants.dequantize(raw, GGUF_TYPE[dtype]).reshape(-1)
    err = np.sqrt(np.sum((y.astype(np.float64) - x) ** 2)) / x.size
    assert err <= ROUND_TRIP_LIMIT.get(dtype, 0.002)
    np.testing.assert_array_equal(raw.reshape(-1, DTYPES[dtype].type_size), REF[dtype](x).reshape(-1, DTYPES[dtype].type_size))
    # and the numba dequantizer reproduces gguf's
    assert np.array_equal(dequantize(raw, dtype, (4096,)).view(np.uint32), y.view(np.uint32))


ROUND_TRIP_LIMIT = {"q2_k": 0.0075, "iq2_xxs": 0.0075, "q3_k": 0.0040}  # ggml's _2BITS and _3BITS limits; else 0.002
finite_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False, allow_subnormal=True)


@settings(max_examples=150, deadline=None)
@given(
    arrays(np.float32, st.tuples(st.integers(1, 3), st.sampled_from([32, 64])), elements=finite_f32),
    st.floats(min_value=1e-38, max_value=1e30),
)
def test_property_gguf_quantized(x: np.ndarray, scale: float) -> None:
    for arr in (x, (x / F32(np.abs(x).max() or 1) * F32(scale)).astype(F32)):
        for dtype in GGUF_QUANTIZED:
            expected = zero_sign_free(gguf_quantize(arr, dtype), dtype)
            assert np.array_equal(zero_sign_free(quantize(arr, dtype), dtype), expected)
            assert np.array_equal(zero_sign_free(REF[dtype](arr), dtype), expected)


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, (256,), elements=finite_f32), st.sampled_from([1.0, 1e-3, 1e-20, 1e20]))
def test_property_numba_matches_numpy(x: np.ndarray, scale: float) -> None:
    small = (x / F32(np.abs(x).max() or 1) * F32(scale)).astype(F32)
    for arr in (x, small):
        for dtype in QUANTIZED:
            same_outcome(outcome(partial(quantize, dtype=dtype), arr, dtype), outcome(REF[dtype], arr, dtype))


def test_nearest_int_bit_trick_out_of_range() -> None:
    vals = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 4194303.0, 4194304.0, -4194305.0, 1e9, -1e9, 3e38,
                     np.inf, -np.inf, np.nan, 1e-45, 7.4999995], dtype=F32)
    ours = np.array([q4_k.nearest_int(v) for v in vals])
    np.testing.assert_array_equal(ours, q4_k.nearest_int_reference(vals))
    np.testing.assert_array_equal(ours[:5], [0, 2, 2, 0, -2])  # round half to even, as 1.5*2^23 does


@njit(cache=True)
def _f16_bits_array(x: np.ndarray) -> np.ndarray:
    # an array loop: passing NaN scalars from Python would go through a double and get quieted
    out = np.empty(x.size, dtype=np.uint16)
    for i in range(x.size):
        out[i] = f32_to_f16_bits(x[i])
    return out


def test_f32_to_f16_matches_numpy() -> None:
    rng = np.random.default_rng(7)
    bits = rng.integers(0, 2**32, 1 << 16, dtype=np.uint64).astype(np.uint32)
    # every exponent with mantissas at and around the rounding points (halfway = ...1000 in 13 bits)
    exps = np.arange(256, dtype=np.uint32) << 23
    mants = np.array([0, 1, 0xFFF, 0x1000, 0x1001, 0x2000, 0x3000, 0x7FE000, 0x7FF000, 0x7FFFFF,
                      0x400000, 0x3FF000, 0x201000], dtype=np.uint32)
    grid = (exps[:, None] | mants[None, :]).ravel()
    bits = np.concatenate([bits, grid, grid | np.uint32(0x80000000)])
    with np.errstate(all="ignore"):
        expected = bits.view(F32).astype(np.float16).view(np.uint16)
    ours = _f16_bits_array(bits.view(F32))
    np.testing.assert_array_equal(ours, expected)


def test_f16_and_f32_outputs() -> None:
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((8, 64)) * 1000).astype(F32)
    x[0, :4] = [65504, 65519.996, -65504, 1e-8]
    assert np.array_equal(quantize(x, "f16").view(np.float16), x.astype(np.float16))
    assert np.array_equal(quantize(x, "f32").view(F32), x)
    h = x.astype(np.float16)  # float16 input is accepted and quantized from its float32 value
    assert np.array_equal(quantize(h, "q8_0"), gguf_quantize(h.astype(F32), "q8_0"))
    assert np.array_equal(quantize(h, "f16"), h.view(np.uint8))
    assert quantize(x[0], "q4_0").shape == (1, 36)  # 1-D is one row


def test_wrong_cols_raises_with_name() -> None:
    x = np.zeros((2, 48), F32)
    for dtype, bs in BLOCK.items():
        with pytest.raises(QuantizationError) as e:
            quantize(x, dtype, name="blk.0.ffn_up.weight")
        msg = str(e.value)
        assert "blk.0.ffn_up.weight" in msg and dtype in msg and str(bs) in msg and "48" in msg


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [d for d, t in DTYPES.items() if t.quantize is not None])
def test_non_finite_raises_with_name_and_index(bad: float, dtype: str) -> None:
    x = np.ones((3, 256), F32)
    x[2, 17] = bad
    x[2, 200] = bad
    with pytest.raises(QuantizationError) as e:
        quantize(x, dtype, name="blk.3.attn_q.weight")
    assert "blk.3.attn_q.weight" in str(e.value) and str(2 * 256 + 17) in str(e.value)


@pytest.mark.parametrize("big", [65520.0, -65520.0, 1e6, 3e38])
def test_f16_overflow_raises(big: float) -> None:
    x = np.ones((2, 32), F32)
    x[0, 7] = 65519.99  # the largest float32 below 65520 still rounds to 65504
    x[1, 3] = big  # rounds to inf in half precision
    with pytest.raises(QuantizationError, match=r"output\.weight.*index 35.*float16"):
        quantize(x, "f16", name="output.weight")
    assert quantize(x, "q8_0").shape == (2, 34)  # fine for the other types


def test_unknown_dtype_and_bad_input() -> None:
    with pytest.raises(QuantizationError):
        quantize(np.zeros((1, 32), F32), "q7_0")
    with pytest.raises(QuantizationError):
        quantize(np.zeros((1, 32), np.int32), "q4_0")


def test_parallel_kernel_handles_partial_chunks() -> None:
    x = random_weights(256 * 37, seed=3)["normal"]  # 37 super-blocks: not a multiple of the chunk
    np.testing.assert_array_equal(q4_k.quantize(x).reshape(-1, 144), q4_k.quantize_reference(x))
