"""The registry of tensor types: one module per type, and every table that derives from them.

A type module (`f32`, `f16`, `q4_0`, ...) holds all that is known about its type: block geometry,
where its scales sit, its plain-numpy quantize / dequantize references, its numba quantizer,
dequantizer and matmul decoders, and verify's default limits; its `TYPE` describes it (`DType`).
Adding a type: write its module, list it in `_MODULES` and give it a branch in `kernels.dispatch`.

`mertools.layout` reads only the geometry from here (re-exported by `layout.constants`); importing
the registry still loads numba, as the type modules define their kernels (nothing is compiled).
"""

from __future__ import annotations

from . import bf16, f16, f32, iq2_xxs, iq4_nl, iq4_xs, mxfp4, q2_k, q3_k, q4_0, q4_1, q4_k, q5_0, q5_1, q5_k, q6_k, q8_0
from .base import DType, Int8Pack, Thresholds

__all__ = [
    "CONVERT_CHOICES", "DTYPES", "DType", "EXPERT_DTYPES", "GGML_TYPE_TO_DTYPE", "KIND", "QUANT_TYPES", "TYPES",
    "Int8Pack", "Thresholds", "auto_dtype",
]  # fmt: skip

# in ggml type order
_MODULES = (f32, f16, q4_0, q4_1, q5_0, q5_1, q8_0, q2_k, q3_k, q4_k, q5_k, q6_k, iq2_xxs, iq4_nl, iq4_xs, bf16, mxfp4)
TYPES: tuple[DType, ...] = tuple(m.TYPE for m in _MODULES)
DTYPES: dict[str, DType] = {t.name: t for t in TYPES}
GGML_TYPE_TO_DTYPE: dict[int, str] = {t.ggml_type: t.name for t in TYPES}
if len(DTYPES) != len(TYPES) or len(GGML_TYPE_TO_DTYPE) != len(TYPES):
    raise ValueError("mertools.dtypes: two types share a name or a ggml type")

# dtypes an expert tensor may have in a layout, smallest first (the order `convert --dtype` lists them)
EXPERT_DTYPES: tuple[str, ...] = tuple(t.name for t in sorted((t for t in TYPES if t.expert), key=lambda t: t.bits_per_weight))
# `convert --dtype` / `--dense-dtype`: the expert dtypes that can be quantized to
CONVERT_CHOICES: tuple[str, ...] = ("auto", *(d for d in EXPERT_DTYPES if DTYPES[d].quantize is not None))
QUANT_TYPES: tuple[str, ...] = tuple(t.name for t in TYPES if t.block_size > 1)  # block types
# the kernels' dispatch code of each type: its ggml type number, which never changes, so that numba's
# cached dispatch (constants frozen at compile time) cannot go stale when types are added
KIND: dict[str, int] = {t.name: t.ggml_type for t in TYPES}


def auto_dtype(src_dtype: str) -> str | None:
    """`convert --dtype auto`: the layout dtype that loses nothing relative to the source type, or None
    for a type no layout holds (the converter refuses it rather than requantize it silently)."""
    if src_dtype in EXPERT_DTYPES:
        return src_dtype
    if src_dtype == "f32":  # the one float an expert does not hold: half precision loses only rounding
        return f16.TYPE.name
    return None
