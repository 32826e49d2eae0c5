"""Layout format constants and the table of tensor dtypes (GGML block geometry as data)."""

from __future__ import annotations

from dataclasses import dataclass

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
DENSE_FILE = "dense.bin"
TOKENIZER_DIR = "tokenizer"


@dataclass(frozen=True)
class DType:
    name: str  # layout name, e.g. "q4_0"
    ggml_type: int  # GGMLQuantizationType value
    block_size: int  # weights per block
    type_size: int  # bytes per block

    def row_bytes(self, cols: int) -> int:
        return (cols // self.block_size) * self.type_size

    def nbytes(self, shape: tuple[int, ...] | list[int]) -> int:
        rows = 1
        for d in shape[:-1]:
            rows *= int(d)
        return rows * self.row_bytes(int(shape[-1]))


DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        DType("f32", 0, 1, 4),
        DType("f16", 1, 1, 2),
        DType("q4_0", 2, 32, 18),
        DType("q8_0", 8, 32, 34),
        DType("q4_k", 12, 256, 144),
    )
}
# dtypes an expert tensor may have in a layout
EXPERT_DTYPES = ("q4_0", "q4_k", "q8_0", "f16")
GGML_TYPE_TO_DTYPE = {d.ggml_type: d.name for d in DTYPES.values()}


def align_up(n: int, alignment: int = ALIGNMENT) -> int:
    return (n + alignment - 1) // alignment * alignment
