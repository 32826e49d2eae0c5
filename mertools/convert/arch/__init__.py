"""Registry of supported architectures; each module holds one ArchSpec of data."""

from __future__ import annotations

from .base import ArchSpec
from .mixtral import ARCH as MIXTRAL

ARCHS: dict[str, ArchSpec] = {a.name: a for a in (MIXTRAL,)}


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
