"""What one tensor type is (`DType`): GGML block geometry, what convert and verify need to know about
it, and its quantize / dequantize functions; plus the numpy helpers the type modules' references share."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

Codec = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Thresholds:
    """`mertools verify` limits on a layout's logits against its source's."""

    kl_mean: float  # mean KL(reference || layout), nats per token
    top1: float  # minimum share of positions whose argmax agrees
    ppl_ratio: float  # maximum layout/reference perplexity ratio (and minimum 1/ratio)

    def __post_init__(self) -> None:
        if not (self.kl_mean >= 0 and 0 <= self.top1 <= 1 and self.ppl_ratio >= 1):
            raise ValueError(f"thresholds out of range: {self}")


@dataclass(frozen=True)
class DType:
    """One tensor type. The geometry comes first (all that `mertools.layout` uses); the functions map
    flat arrays: quantize float32 (n,) -> uint8 (n / block_size * type_size,), dequantize back."""

    name: str  # layout name, e.g. "f16"
    ggml_type: int  # GGMLQuantizationType value; also the kernels' dispatch code (it never changes)
    block_size: int  # weights per block
    type_size: int  # bytes per block
    float_dtype: str | None = None  # numpy dtype of a float type's elements ("<f2"); None for block types
    scale_offsets: tuple[int, ...] = ()  # byte offsets of a block's f16 scales: NaN/Inf there spoils the block
    expert: bool = True  # an expert tensor may have this type in a layout
    limit: float = math.inf  # quantize refuses |x| >= limit (a float type: values that would round to inf)
    verify: Thresholds | None = None  # verify's default limits for a layout whose experts have this type
    quantize: Codec | None = field(default=None, compare=False, repr=False)  # numba (or numpy for floats)
    dequantize: Codec | None = field(default=None, compare=False, repr=False)
    quantize_reference: Codec | None = field(default=None, compare=False, repr=False)  # plain numpy
    dequantize_reference: Codec | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not (self.block_size > 0 and self.type_size > 0 and self.ggml_type >= 0):
            raise ValueError(f"{self.name}: block_size, type_size must be positive and ggml_type >= 0")
        if (self.float_dtype is None) == (self.block_size == 1):
            raise ValueError(f"{self.name}: exactly the types with blocks of one weight are float types")
        if any(not 0 <= o <= self.type_size - 2 for o in self.scale_offsets):
            raise ValueError(f"{self.name}: scale offsets {self.scale_offsets} outside a {self.type_size}-byte block")

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.type_size / self.block_size

    def row_bytes(self, cols: int) -> int:
        return (cols // self.block_size) * self.type_size

    def nbytes(self, shape: tuple[int, ...] | list[int]) -> int:
        rows = 1
        for d in shape[:-1]:
            rows *= int(d)
        return rows * self.row_bytes(int(shape[-1]))


# ---------------------------------------------------------------- numpy helpers of the references


def cast_low_byte(v: np.ndarray) -> np.ndarray:
    """Float -> int8/uint8 as numpy casts on x86 (via int32): NaN, Inf and out-of-range give 0.

    v: float32 (...) -> int64 (...) in 0..255.
    """
    ok = np.isfinite(v) & (v >= np.float32(-2147483648.0)) & (v < np.float32(2147483648.0))
    return np.where(ok, np.trunc(np.where(ok, v, np.float32(0))).astype(np.int64), 0) & 0xFF


def f16_bytes(d: np.ndarray) -> np.ndarray:
    """d: float32 (n,) -> uint8 (n, 2), GGML_FP32_TO_FP16 (round to nearest even), little-endian."""
    with np.errstate(over="ignore"):  # |d| > 65504 is stored as inf, as in ggml
        return d.astype("<f2").view(np.uint8).reshape(-1, 2)


def f16_from_bytes(b: np.ndarray) -> np.ndarray:
    """b: uint8 (n, 2) -> float32 (n, 1)."""
    return np.ascontiguousarray(b).view("<f2").astype(np.float32).reshape(-1, 1)
