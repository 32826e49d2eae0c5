"""Registry of supported architectures; each module holds one ArchSpec of data."""

from __future__ import annotations

from .base import ArchSpec
from .mixtral import ARCH as MIXTRAL
from .olmoe import ARCH as OLMOE
from .qwen2_moe import ARCH as QWEN2_MOE
from .qwen3_moe import ARCH as QWEN3_MOE

ARCHS: dict[str, ArchSpec] = {a.name: a for a in (MIXTRAL, QWEN2_MOE, QWEN3_MOE, OLMOE)}


def supported() -> str:
    """For messages: the supported architectures, HF and GGUF names."""
    return "; ".join(f"{a.name} ({', '.join(a.hf_architectures)}; GGUF {', '.join(a.gguf_architectures)})"
                     for a in ARCHS.values())


def arch_for_hf(architectures: list[str], model_type: str | None) -> ArchSpec | None:
    for a in ARCHS.values():
        if any(x in a.hf_architectures for x in architectures) or (model_type and model_type in a.hf_model_types):
            return a
    return None


def arch_for_gguf(gguf_arch: str) -> ArchSpec | None:
    for a in ARCHS.values():
        if gguf_arch in a.gguf_architectures:
            return a
    return None
