"""The registry of tensor types (mertools.dtypes) is consistent with GGML and with itself."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants
from gguf.constants import GGML_QUANT_SIZES

from mertools import dtypes as registry
from mertools.dtypes import DTYPES, EXPERT_DTYPES, QUANT_TYPES, DType, auto_dtype
from mertools.kernels import SUPPORTED_DTYPES, dequantize, quantize
from mertools.kernels.matmul import MATMUL_DTYPES
from mertools.layout import constants
from mertools.verify.numerics import DEFAULT_THRESHOLDS


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_geometry_matches_ggml(dtype: str) -> None:
    t = DTYPES[dtype]
    assert T(t.ggml_type).name.lower() == t.name
    assert GGML_QUANT_SIZES[T(t.ggml_type)] == (t.block_size, t.type_size)
    assert registry.KIND[dtype] == t.ggml_type
    assert t.dequantize and t.dequantize_reference
    assert (t.quantize is None) == (t.quantize_reference is None)  # a quantizer comes with its reference


@pytest.mark.parametrize("finite_scales", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_numba_numpy_and_gguf_agree(dtype: str, finite_scales: bool) -> None:
    t = DTYPES[dtype]
    rng = np.random.default_rng([t.ggml_type, finite_scales])
    raw = rng.integers(0, 256, (2048 // t.block_size * 3, t.type_size), dtype=np.uint8)  # 3 x 2048 weights
    if finite_scales:
        for o in t.scale_offsets:
            raw[:, o : o + 2] = (rng.standard_normal(raw.shape[0]) * 0.01).astype("<f2").view(np.uint8).reshape(-1, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # inf * 0 in random scales
        expected = quants.dequantize(raw.reshape(3, -1), T(t.ggml_type)).reshape(-1)
        np.testing.assert_array_equal(bits(t.dequantize_reference(raw.reshape(-1))), bits(expected))
    np.testing.assert_array_equal(bits(t.dequantize(raw.reshape(-1))), bits(expected))
    np.testing.assert_array_equal(bits(dequantize(raw, dtype, (3, 2048))).reshape(-1), bits(expected))


@pytest.mark.parametrize("dtype", QUANT_TYPES)
def test_scale_offsets_are_the_scales(dtype: str) -> None:
    """A NaN at any declared scale offset spoils its whole block (what convert's check relies on)."""
    t = DTYPES[dtype]
    rng = np.random.default_rng(0)
    if t.scale_format == "e8m0":  # an exponent byte is never NaN, but from 253 on the weights may overflow
        raw = rng.integers(0, 256, (2, t.type_size), dtype=np.uint8)
        raw[:, list(t.scale_offsets)] = 127
        assert not t.bad_blocks(raw).any()
        raw[1, t.scale_offsets[0]] = 253
        raw[1, t.scale_offsets[0] + 1] = 0x77  # mxfp4: the first quant byte, two weights of 12
        y = dequantize(raw, dtype, (2, t.block_size))
        assert t.bad_blocks(raw).tolist() == [False, True] and np.isfinite(y[0]).all() and np.isinf(y[1]).any()
        return
    if t.quantize is not None:
        raw = quantize(rng.standard_normal((2, t.block_size)).astype(np.float32), dtype)
    else:  # a type layouts only copy: random blocks with ordinary scales
        raw = rng.integers(0, 256, (2, t.type_size), dtype=np.uint8)
        for o in t.scale_offsets:
            raw[:, o : o + 2] = np.array([0.01, -0.02], "<f2").view(np.uint8).reshape(2, 2)
    for o in t.scale_offsets:
        bad = raw.copy()
        bad[1, o : o + 2] = np.array([0x7E00], "<u2").view(np.uint8)  # a NaN half
        y = dequantize(bad, dtype, (2, t.block_size))
        assert np.isfinite(y[0]).all() and np.isnan(y[1]).all(), o


@pytest.mark.parametrize("dtype", [d for d, t in DTYPES.items() if t.quantize is not None])
def test_numba_quantizer_matches_numpy_reference(dtype: str) -> None:
    t = DTYPES[dtype]
    x = (np.random.default_rng(1).standard_normal((4, 1024)) * 0.1).astype(np.float32)
    ours = np.asarray(t.quantize(x.reshape(-1))).reshape(-1)
    np.testing.assert_array_equal(ours, np.asarray(t.quantize_reference(x)).reshape(-1))


def test_derived_tables() -> None:
    assert tuple(DTYPES) == SUPPORTED_DTYPES == MATMUL_DTYPES
    assert constants.DTYPES is DTYPES and constants.EXPERT_DTYPES == EXPERT_DTYPES and constants.DType is DType
    assert constants.GGML_TYPE_TO_DTYPE == {t.ggml_type: name for name, t in DTYPES.items()}
    assert registry.CONVERT_CHOICES == ("auto", *(d for d in EXPERT_DTYPES if DTYPES[d].quantize))
    bpw = [DTYPES[d].bits_per_weight for d in EXPERT_DTYPES]
    assert bpw == sorted(bpw)  # smallest first
    assert set(EXPERT_DTYPES) <= set(DEFAULT_THRESHOLDS)  # verify has limits for every expert dtype
    assert set(QUANT_TYPES) == {d for d, t in DTYPES.items() if t.float_dtype is None}
    assert len(set(registry.KIND.values())) == len(DTYPES)


def test_auto_dtype() -> None:
    for d in EXPERT_DTYPES:
        assert auto_dtype(d) == d
    for src in (s for s in ("f32", "bf16") if s not in EXPERT_DTYPES):  # floats no expert may hold: the expert float type
        assert auto_dtype(src) not in ("f32", "bf16") and DTYPES[auto_dtype(src)].float_dtype
    assert auto_dtype("iq2_xs") is None  # a GGML quantization no layout holds: refused, never requantized silently


def test_dtype_validation() -> None:
    with pytest.raises(ValueError, match="float types"):
        DType("x", 99, 32, 18, float_dtype="<f2")
    with pytest.raises(ValueError, match="scale offsets"):
        DType("x", 99, 32, 18, scale_offsets=(17,))
    with pytest.raises(ValueError, match="positive"):
        DType("x", 99, 0, 18)
