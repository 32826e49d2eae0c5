"""How an architecture is described: tensor-name tables and hyper-parameter keys, as data.

A new MoE family is a new module that builds one ArchSpec; the readers and the converter never
mention a family by name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ...layout.config import ModelConfig

# Roles of dense tensors. Norms and routers are small and precision-sensitive: they stay f32.
DENSE_ROLES = ("embedding", "norm", "attn_q", "attn_k", "attn_v", "attn_o", "router", "output")
KEEP_F32_ROLES = ("norm", "router")
REQUIRED = object()


@dataclass(frozen=True)
class DenseSpec:
    name: str  # layout name (llama.cpp's GGUF name), "{L}" for the layer
    hf: str  # HF safetensors name template
    role: str
    shape: tuple[str, ...]  # ModelConfig attributes giving the (rows, cols) or (n,) shape
    per_layer: bool = False
    optional: bool = False  # absent when tied (lm_head) or for some checkpoints

    def __post_init__(self) -> None:
        if self.role not in DENSE_ROLES:
            raise ValueError(f"unknown dense role {self.role!r} for {self.name}")


@dataclass(frozen=True)
class ExpertSpec:
    role: str  # "gate" | "up" | "down"
    hf: str  # "model.layers.{L}.block_sparse_moe.experts.{E}.w1.weight"
    gguf_merged: str  # "blk.{L}.ffn_gate_exps.weight": all experts, expert as the outer dimension
    gguf_split: str  # "blk.{L}.ffn_gate.{E}.weight": the older one-tensor-per-expert layout
    shape: tuple[str, str]


@dataclass(frozen=True)
class ConfigKey:
    """Where a ModelConfig field comes from. `hf` keys may be dotted paths into nested objects;
    `gguf` keys use `{arch}` for general.architecture."""

    field: str
    hf: tuple[str, ...] = ()
    gguf: tuple[str, ...] = ()
    default: Any = REQUIRED


@dataclass(frozen=True)
class ArchSpec:
    name: str
    hf_architectures: tuple[str, ...]
    hf_model_types: tuple[str, ...]
    gguf_architectures: tuple[str, ...]
    dense: tuple[DenseSpec, ...]
    experts: tuple[ExpertSpec, ...]
    config_keys: tuple[ConfigKey, ...]
    rope_style: str  # the convention of the layout's q/k weights (HF order)
    gguf_permutes_qk: bool  # llama.cpp permuted q/k rows for "normal" rotary when writing GGUF
    # fills derived fields (e.g. head_dim) and rejects unsupported options; gets the raw values
    finish_config: Callable[[dict[str, Any], Mapping[str, Any]], None] = field(default=lambda v, raw: None)

    def dense_names(self, n_layers: int) -> list[tuple[DenseSpec, int | None]]:
        out: list[tuple[DenseSpec, int | None]] = []
        for spec in self.dense:
            if spec.per_layer:
                out.extend((spec, layer) for layer in range(n_layers))
            else:
                out.append((spec, None))
        # order: globals first (embedding), then layer by layer, then the rest (norm, output)
        return sorted(out, key=lambda s: (_order(s[0]), -1 if s[1] is None else s[1]))

    def expert(self, role: str) -> ExpertSpec:
        for e in self.experts:
            if e.role == role:
                return e
        raise KeyError(role)


def _order(spec: DenseSpec) -> int:
    return 0 if spec.role == "embedding" else 2 if spec.role == "output" or (spec.role == "norm" and not spec.per_layer) else 1


def resolve_shape(shape: tuple[str, ...], cfg: ModelConfig) -> tuple[int, ...]:
    return tuple(int(getattr(cfg, s) if hasattr(cfg, s) else DERIVED[s](cfg)) for s in shape)


DERIVED: dict[str, Callable[[ModelConfig], int]] = {
    "q_dim": lambda c: c.n_heads * c.head_dim,
    "kv_dim": lambda c: c.n_kv_heads * c.head_dim,
}


def fmt(template: str, layer: int | None = None, expert: int | None = None) -> str:
    return template.replace("{L}", str(layer)).replace("{E}", str(expert))


def build_config(arch: ArchSpec, lookup: Callable[[ConfigKey], Any], raw: Mapping[str, Any], where: str) -> ModelConfig:
    """Build a ModelConfig from a source's key lookup (HF or GGUF), with the arch's defaults."""
    values: dict[str, Any] = {"arch": arch.name, "rope_style": arch.rope_style}
    for key in arch.config_keys:
        value = lookup(key)
        if value is None:
            if key.default is REQUIRED:
                names = key.hf or key.gguf
                raise ValueError(f"{where}: missing hyper-parameter {names[0] if names else key.field!r}")
            value = key.default
        values[key.field] = value
    arch.finish_config(values, raw)
    return ModelConfig(**values)
