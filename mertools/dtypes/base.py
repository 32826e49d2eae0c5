"""What one tensor type is (`DType`): GGML block geometry, what convert and verify need to know about
it, and its quantize / dequantize functions; plus the numpy helpers the type modules' references share."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

Codec = Callable[[np.ndarray], np.ndarray]
SCALE_BYTES = {"f16": 2, "e8m0": 1}  # bytes of one block scale in each scale format


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
class Int8Pack:
    """How the 8-bit-activation kernels (`mertools.kernels.int8`) take a type with blocks of 32 weights and one
    scale at byte 0 (the type's scale_format: f16, or an E8M0 byte): weight k of a block is d * (u_k - offset) with
    u_k an unsigned byte (a nibble, a table's byte for a nibble, or an int8 offset by 128 when packed), its 32 quants
    in `parts` runs of 16 bytes after the scale."""

    parts: int  # 16-byte runs of quants per block: 1 (two nibbles a byte) or 2 (a byte each)
    offset: int  # u - offset is the signed quant: 8 for a nibble, 128 for an int8 packed as unsigned
    flip: int  # XOR applied to each quant byte when packing (0x80 turns an int8 into int8 + 128)
    # plain numpy: uint8 (rows, row_bytes) -> (signed quants int32 (rows, nb, 32), scales float32 (rows, nb))
    blocks: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] = field(compare=False, repr=False)
    codes: tuple[int, ...] | None = None  # u for each nibble when nibbles index a table (mxfp4: its values + offset)

    def __post_init__(self) -> None:
        if self.offset & (self.offset - 1) or not 0 < self.offset <= 128:
            raise ValueError(f"Int8Pack: offset {self.offset} is not a power of two up to 128 (the kernels shift by it)")
        if self.codes is not None and (self.parts != 1 or len(self.codes) != 16 or not all(0 <= c < 256 for c in self.codes)):
            raise ValueError("Int8Pack: a table needs nibbles (parts 1) and 16 byte values")


@dataclass(frozen=True)
class DType:
    """One tensor type. The geometry comes first (all that `mertools.layout` uses); the functions map
    flat arrays: quantize float32 (n,) -> uint8 (n / block_size * type_size,), dequantize back."""

    name: str  # layout name, e.g. "f16"
    ggml_type: int  # GGMLQuantizationType value; also the kernels' dispatch code (it never changes)
    block_size: int  # weights per block
    type_size: int  # bytes per block
    float_dtype: str | None = None  # numpy dtype of a float type's elements ("<f2"), "bf16" (numpy has none:
    # read values with `floats`); None for block types
    scale_offsets: tuple[int, ...] = ()  # byte offsets of a block's scales: NaN/Inf there spoils the block
    scale_format: str = "f16"  # how those scales are stored: "f16", or "e8m0" (one exponent byte, mxfp4)
    expert: bool = True  # an expert tensor may have this type in a layout
    limit: float = math.inf  # quantize refuses |x| >= limit (a float type: values that would round to inf)
    verify: Thresholds | None = None  # verify's default limits for a layout whose experts have this type
    int8_pack: Int8Pack | None = None  # how the 8-bit-activation kernels take it packed (kernels/int8.py)
    # or, for a type whose 8-bit kernel reads the file's blocks (a K type), that kernel's numpy twin: (q8_K activation
    # quants int32 (n, cols/256, 256), their scales (n, cols/256) and scale * each 32's sum (n, cols/32) float32,
    # uint8 (rows, row_bytes)) -> (n, rows)
    int8_reference: Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray] | None = field(
        default=None, compare=False, repr=False)
    quantize: Codec | None = field(default=None, compare=False, repr=False)  # numba (or numpy for floats)
    dequantize: Codec | None = field(default=None, compare=False, repr=False)
    quantize_reference: Codec | None = field(default=None, compare=False, repr=False)  # plain numpy
    dequantize_reference: Codec | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not (self.block_size > 0 and self.type_size > 0 and self.ggml_type >= 0):
            raise ValueError(f"{self.name}: block_size, type_size must be positive and ggml_type >= 0")
        if (self.float_dtype is None) == (self.block_size == 1):
            raise ValueError(f"{self.name}: exactly the types with blocks of one weight are float types")
        if self.scale_format not in SCALE_BYTES:
            raise ValueError(f"{self.name}: scale format {self.scale_format!r} is not one of {', '.join(SCALE_BYTES)}")
        if any(not 0 <= o <= self.type_size - SCALE_BYTES[self.scale_format] for o in self.scale_offsets):
            raise ValueError(f"{self.name}: scale offsets {self.scale_offsets} outside a {self.type_size}-byte block")

    def floats(self, raw: np.ndarray) -> np.ndarray:
        """A float type's raw little-endian bytes (uint8, any shape) -> its values, float32 (n,) (exact)."""
        flat = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
        if self.float_dtype == "bf16":
            return (flat.view("<u2").astype(np.uint32) << 16).view(np.float32)
        return flat.view(self.float_dtype).astype(np.float32)

    def bad_blocks(self, blocks: np.ndarray) -> np.ndarray:
        """uint8 (n_blocks, type_size) -> bool (n_blocks,): blocks a scale spoils. An f16 scale that is
        NaN/Inf; an E8M0 exponent >= 253, where ggml's weights (table values up to 12 times 2^(e-128))
        may overflow to inf (255 is also OCP's NaN)."""
        if self.scale_format == "e8m0":
            at = np.array(self.scale_offsets, dtype=np.intp)
            return (blocks[:, at] >= 253).any(axis=1)
        at = np.array([[o, o + 1] for o in self.scale_offsets], dtype=np.intp).reshape(-1)  # bytes of every scale
        scales = np.ascontiguousarray(blocks[:, at]).view("<f2")  # (n_blocks, number of scales)
        return ~np.isfinite(scales).all(axis=1)

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
