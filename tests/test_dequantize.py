"""Dequantizers: numba kernels == numpy reference == gguf-py, bit for bit (NaN payloads included)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from numba import njit

from mertools.dtypes import DTYPES
from mertools.errors import QuantizationError
from mertools.kernels import dequantize, quantize
from mertools.kernels.common import f16_bits_to_f32

NAMES = tuple(DTYPES)
GGUF_TYPE = {name: T(t.ggml_type) for name, t in DTYPES.items()}
REF = {name: t.dequantize_reference for name, t in DTYPES.items()}
GEOMETRY = {name: (t.block_size, t.type_size) for name, t in DTYPES.items()}  # (weights, bytes)


def bits(a: np.ndarray) -> np.ndarray:
    """Compare floats as bit patterns, so NaN payloads and signed zeros count."""
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def gguf_dequantize(raw: np.ndarray, dtype: str) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # inf * 0 and friends in random headers
        return quants.dequantize(raw, GGUF_TYPE[dtype])


def random_blocks(dtype: str, n_blocks: int, seed: int, finite_scales: bool) -> np.ndarray:
    """uint8 (n_blocks, type_size) of random bytes; optionally with ordinary f16 scales."""
    _, tb = GEOMETRY[dtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (n_blocks, tb), dtype=np.uint8)
    if finite_scales:
        for o in DTYPES[dtype].scale_offsets:
            d = (rng.standard_normal(n_blocks) * 0.01).astype("<f2")
            raw[:, o : o + 2] = d.view(np.uint8).reshape(n_blocks, 2)
    return raw


@pytest.mark.parametrize("finite_scales", [True, False])
@pytest.mark.parametrize("dtype", NAMES)
def test_random_bytes_match_gguf_and_reference(dtype: str, finite_scales: bool) -> None:
    bs, tb = GEOMETRY[dtype]
    cols = 4096
    raw = random_blocks(dtype, 64 * cols // bs, seed=list(GEOMETRY).index(dtype), finite_scales=finite_scales)
    raw = raw.reshape(64, cols // bs * tb)
    ours = dequantize(raw, dtype, (64, cols))
    assert ours.shape == (64, cols) and ours.dtype == np.float32
    expected = gguf_dequantize(raw, dtype)
    np.testing.assert_array_equal(bits(ours), bits(expected))
    np.testing.assert_array_equal(bits(REF[dtype](raw.reshape(-1)).reshape(64, cols)), bits(expected))


@pytest.mark.parametrize("dtype", [d for d in NAMES if DTYPES[d].quantize is not None])
def test_round_trip_matches_gguf(dtype: str) -> None:
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((32, 512)) * 0.05).astype(np.float32)
    raw = quantize(x, dtype)
    np.testing.assert_array_equal(bits(dequantize(raw, dtype, x.shape)), bits(gguf_dequantize(raw, dtype)))


@njit(cache=True)
def _f16_to_f32_array(h: np.ndarray) -> np.ndarray:
    out = np.empty(h.size, dtype=np.float32)
    for i in range(h.size):
        out[i] = f16_bits_to_f32(h[i])
    return out


def test_every_half_value() -> None:
    h = np.arange(65536, dtype=np.uint16)
    expected = h.view(np.float16).astype(np.float32)
    np.testing.assert_array_equal(bits(_f16_to_f32_array(h)), bits(expected))
    np.testing.assert_array_equal(bits(dequantize(h.view(np.uint8), "f16", (65536,))), bits(expected))


def test_shapes_f32_and_raw_layouts() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 256)).astype(np.float32)
    raw = quantize(x, "q4_k")
    assert raw.shape == (2, 3, 144)
    y = dequantize(raw.reshape(-1), "q4_k", (2, 3, 256))  # raw may be flat or any shape
    np.testing.assert_array_equal(bits(y), bits(gguf_dequantize(raw, "q4_k")))
    f = dequantize(quantize(x, "f32"), "f32", x.shape)
    np.testing.assert_array_equal(f, x)
    assert not np.shares_memory(f, raw)


def test_dequantize_errors() -> None:
    raw = np.zeros(18 * 4, np.uint8)
    with pytest.raises(QuantizationError):
        dequantize(raw, "q4_0", (4, 33))  # not a multiple of the block size
    with pytest.raises(QuantizationError):
        dequantize(raw, "q4_0", (5, 32))  # wrong number of bytes
    with pytest.raises(QuantizationError):
        dequantize(raw, "iq2_xs", (4, 32))


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(NAMES), st.integers(1, 4), st.data())
def test_property_random_blocks(dtype: str, n_blocks: int, data: st.DataObject) -> None:
    bs, tb = GEOMETRY[dtype]
    raw = data.draw(arrays(np.uint8, (n_blocks * tb,)))
    ours = dequantize(raw, dtype, (n_blocks * bs,))
    expected = gguf_dequantize(raw, dtype).reshape(-1)
    assert np.array_equal(bits(ours), bits(expected))
    assert np.array_equal(bits(REF[dtype](raw)), bits(expected))
