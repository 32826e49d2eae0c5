"""Layout format constants; the tensor dtypes (GGML block geometry) come from the registry, `mertools.dtypes`."""

from __future__ import annotations

from ..dtypes import DTYPES, EXPERT_DTYPES, GGML_TYPE_TO_DTYPE, DType

FORMAT_NAME = "mertools.layout"
# Version 2 adds the config fields of more MoE families (q/k norms, attention biases, shared experts,
# dense MLP layers that have no expert files). A layout that needs none of them is still written as
# version 1, byte for byte as before; readers accept both.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST_NAME = "manifest.json"
# O_DIRECT needs offsets, lengths and buffers aligned to the logical block size; 4 KiB covers
# every common device and the page size.
ALIGNMENT = 4096
EXPERTS_DIR = "experts"
STANDINS_DIR = "standins"  # low-bit copies of the experts (optional)
DENSE_FILE = "dense.bin"
TOKENIZER_DIR = "tokenizer"

__all__ = [
    "ALIGNMENT", "DENSE_FILE", "DTYPES", "DType", "EXPERTS_DIR", "EXPERT_DTYPES", "FORMAT_NAME", "FORMAT_VERSION",
    "GGML_TYPE_TO_DTYPE", "MANIFEST_NAME", "READABLE_VERSIONS", "STANDINS_DIR", "TOKENIZER_DIR", "align_up",
]  # fmt: skip


def align_up(n: int, alignment: int = ALIGNMENT) -> int:
    return (n + alignment - 1) // alignment * alignment
