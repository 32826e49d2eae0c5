"""The registry of model families: one module each, listed here; everything else derives from it."""

from __future__ import annotations

from . import deepseek2, glm4_moe, gpt_oss, mixtral, olmoe, qwen2_moe, qwen3_moe
from .base import Family
from .weights import check_fields

FAMILIES: dict[str, Family] = {m.FAMILY.name: m.FAMILY for m in (mixtral, qwen2_moe, qwen3_moe, olmoe, glm4_moe,
                                                               gpt_oss, deepseek2)}
for _family in FAMILIES.values():
    check_fields(_family)


def supported() -> str:
    """For messages: the supported families, HF and GGUF names."""
    return "; ".join(f"{a.name} ({', '.join(a.hf_architectures)}; GGUF {', '.join(a.gguf_architectures)})"
                     for a in FAMILIES.values())


def family_for_hf(architectures: list[str], model_type: str | None) -> Family | None:
    for a in FAMILIES.values():
        if any(x in a.hf_architectures for x in architectures) or (model_type and model_type in a.hf_model_types):
            return a
    return None


def family_for_gguf(gguf_arch: str) -> Family | None:
    for a in FAMILIES.values():
        if gguf_arch in a.gguf_architectures:
            return a
    return None


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r} (known: {', '.join(FAMILIES)})") from None
