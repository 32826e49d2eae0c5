"""How a model family is described: tensor-name tables, hyper-parameter keys and forward pieces.

A family is one module that builds one `Family`; the readers, the converter, the runtime, the
reference, `verify` and `inspect` read it through the registry and never mention a family by name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..layout.config import ModelConfig, QKNorm
from ..layout.manifest import expert_roles
from .pieces import STANDARD, Pieces

# Roles of dense tensors. Norms, biases and routers (the shared expert's gate is one) are small and
# precision-sensitive: they stay f32. "ffn" is a dense SwiGLU matrix (shared expert, dense-MLP layer).
DENSE_ROLES = ("embedding", "norm", "attn_q", "attn_k", "attn_v", "attn_o", "router", "output", "bias", "ffn")
KEEP_F32_ROLES = ("norm", "router", "bias")
REQUIRED = object()
# Which layers a per-layer tensor exists in: every layer, the MoE layers, the dense-MLP layers, or only the
# multi-token-prediction blocks after the main layers (config.nextn_layers; they also have the "all" and "moe" ones).
LAYER_KINDS = ("all", "moe", "dense", "mtp")
# Config conditions a tensor may depend on (DenseSpec.when), as data: name -> predicate.
CONDITIONS: dict[str, Callable[[ModelConfig], bool]] = {
    "attn_bias": lambda c: c.attn_bias,
    "shared_expert": lambda c: c.d_ff_shared > 0,
    "shared_expert_gate": lambda c: c.shared_expert_gate,
    "qk_norm": lambda c: c.qk_norm is not QKNorm.NONE,
    "expert_bias": lambda c: c.expert_bias,
    "attn_o_bias": lambda c: c.attn_o_bias,
    "attn_sinks": lambda c: c.attn_sinks,
    "router_bias": lambda c: c.router_bias,
    "q_lora": lambda c: c.q_lora_rank > 0,
    "no_q_lora": lambda c: c.q_lora_rank == 0,
}


@dataclass(frozen=True)
class HeadSplit:
    """A dense tensor that checkpoints store as one part of a per-head tensor: the source (heads, sum(parts) rows
    per head, cols) gives each head's rows of part `part`, transposed per head when `transposed`. MLA's kv_b
    (HF's kv_b_proj, llama.cpp's older attn_kv_b) holds per head k_b (qk_nope rows) then v_b (v_head_dim rows);
    llama.cpp now stores k_b transposed per head and v_b as they are, which a layout holds."""

    gguf: str  # the whole tensor's name in older GGUFs (the HF name is the spec's `hf`)
    parts: tuple[str, ...]  # ModelConfig attributes: rows per head of each part, in order
    part: int
    transposed: bool = False


@dataclass(frozen=True)
class DenseSpec:
    name: str  # layout name (llama.cpp's GGUF name), "{L}" for the layer
    hf: str  # HF safetensors name template
    role: str
    shape: tuple[str, ...]  # ModelConfig attributes giving the (rows, cols) or (n,) shape
    field: str  # where the loaded tensor goes: a ModelWeights / LayerWeights field, "mlp.gate" for an Mlp's
    per_layer: bool = False
    optional: bool = False  # absent when tied (lm_head) or for some checkpoints
    layers: str = "all"  # per-layer tensors: "all", "moe" or "dense" layers (LAYER_KINDS)
    when: str | None = None  # a CONDITIONS name: the tensor exists only when the config says so
    split: HeadSplit | None = None  # cut from a per-head tensor in HF and older GGUFs

    def __post_init__(self) -> None:
        if self.role not in DENSE_ROLES:
            raise ValueError(f"unknown dense role {self.role!r} for {self.name}")
        if self.layers not in LAYER_KINDS or (self.layers != "all" and not self.per_layer):
            raise ValueError(f"{self.name}: layers must be one of {LAYER_KINDS} (and only for per-layer tensors)")
        if self.when is not None and self.when not in CONDITIONS:
            raise ValueError(f"{self.name}: unknown condition {self.when!r} (known: {', '.join(CONDITIONS)})")
        if not self.field:
            raise ValueError(f"{self.name}: no weights field")

    def applies(self, cfg: ModelConfig, layer: int | None) -> bool:
        if self.when is not None and not CONDITIONS[self.when](cfg):
            return False
        if layer is None:
            return True
        mtp = layer >= cfg.n_layers
        if mtp or self.layers == "mtp":  # an MTP block has its own tensors and an MoE layer's; no other layer has them
            return mtp and self.layers != "dense"
        if self.layers == "all":
            return True
        return cfg.is_moe_layer(layer) == (self.layers == "moe")


@dataclass(frozen=True)
class HFMerged:
    """How an expert's tensor is cut from an HF tensor holding every expert of a layer (expert outermost), as
    OpenAI's open-weight MoE stores them: expert E's slice, transposed when stored (in, out) (a Parameter
    used as x @ W), then every `step`-th output feature from `start` (gate and up interleaved in one tensor).
    OpenAI's MXFP4 checkpoints hold `<hf>_blocks` (E, out, in/32, 16) and `<hf>_scales` (E, out, in/32)
    instead, never transposed."""

    transposed: bool = False
    start: int = 0
    step: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.step:
            raise ValueError(f"HFMerged: start {self.start} must lie in [0, step {self.step})")


@dataclass(frozen=True)
class ExpertSpec:
    role: str  # "gate" | "up" | "down", or with config.expert_mlp_bias "gate_bias" | "up_bias" | "down_bias"
    hf: str  # "model.layers.{L}.block_sparse_moe.experts.{E}.w1.weight"
    gguf_merged: str  # "blk.{L}.ffn_gate_exps.weight": all experts, expert as the outer dimension
    gguf_split: str  # "blk.{L}.ffn_gate.{E}.weight": the older one-tensor-per-expert layout ("" if never written)
    shape: tuple[str, ...]
    hf_merged: HFMerged | None = None  # `hf` (no {E}) holds the whole layer's experts

    def __post_init__(self) -> None:
        if (self.hf_merged is None) != ("{E}" in self.hf):
            raise ValueError(f"expert {self.role}: {self.hf!r} must name expert {{E}} exactly when not merged")


@dataclass(frozen=True)
class ConfigKey:
    """Where a ModelConfig field comes from. `hf` keys may be dotted paths into nested objects;
    `gguf` keys use `{arch}` for general.architecture. A field named "_x" is no config field: a raw
    value only the family's finish_config reads (e.g. a factor it turns into a field), dropped after it."""

    field: str
    hf: tuple[str, ...] = ()
    gguf: tuple[str, ...] = ()
    default: Any = REQUIRED


@dataclass(frozen=True)
class Family:
    name: str
    hf_architectures: tuple[str, ...]
    hf_model_types: tuple[str, ...]
    gguf_architectures: tuple[str, ...]
    dense: tuple[DenseSpec, ...]
    experts: tuple[ExpertSpec, ...]
    config_keys: tuple[ConfigKey, ...]
    gguf_permutes_qk: bool  # llama.cpp permuted q/k rows for its adjacent-pair rotary when writing GGUF
    # fills derived fields (e.g. head_dim) and rejects unsupported options; gets the raw values
    finish_config: Callable[[dict[str, Any], Mapping[str, Any]], None] = field(default=lambda v, raw: None)
    # ModelConfig -> keyword arguments of the transformers config class (for the transformers reference)
    hf_config: Callable[[ModelConfig], dict[str, Any]] | None = None
    # which of hf_architectures / hf_model_types is transformers' class for a config (DeepSeek: V2 or V3)
    hf_class: Callable[[ModelConfig], int] = field(default=lambda c: 0)
    # layers may be dense MLPs instead of MoE; a GGUF has no key for it: a layer without a router is one
    dense_mlp_layers: bool = False
    # the forward pieces (attention inputs, routing, shared expert), written once for the runtime and
    # the float64 reference; the standard ones unless the family brings its own
    pieces: Pieces = field(default_factory=lambda: STANDARD)

    def dense_names(self, cfg: ModelConfig) -> list[tuple[DenseSpec, int | None]]:
        """Every dense tensor the config implies, as (spec, layer or None)."""
        out: list[tuple[DenseSpec, int | None]] = []
        for spec in self.dense:
            if spec.per_layer:  # the MTP blocks after the main layers too
                out.extend((spec, layer) for layer in range(cfg.n_layers + cfg.nextn_layers) if spec.applies(cfg, layer))
            elif spec.applies(cfg, None):
                out.append((spec, None))
        # order: globals first (embedding), then layer by layer, then the rest (norm, output)
        return sorted(out, key=lambda s: (_order(s[0]), -1 if s[1] is None else s[1]))

    def layer_specs(self, cfg: ModelConfig, layer: int) -> list[DenseSpec]:
        """The per-layer dense tensors layer `layer` has."""
        return [s for s in self.dense if s.per_layer and s.applies(cfg, layer)]

    def global_specs(self, cfg: ModelConfig) -> list[DenseSpec]:
        return [s for s in self.dense if not s.per_layer and s.applies(cfg, None)]

    def expert_specs(self, cfg: ModelConfig) -> list[ExpertSpec]:
        """The expert tensors each expert of this config has (its biases only with expert_mlp_bias)."""
        roles = expert_roles(cfg)
        return [e for e in self.experts if e.role in roles]

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
    "o_dim": lambda c: c.n_heads * (c.v_head_dim or c.head_dim),  # the heads' outputs, into the output projection
    "qk_nope_dim": lambda c: c.head_dim - c.qk_rope_dim,
    "kv_a_dim": lambda c: c.kv_lora_rank + c.qk_rope_dim,  # MLA's compressed kv: latent, then the rotary key
    "k_b_rows": lambda c: c.n_heads * c.kv_lora_rank,
    "v_b_rows": lambda c: c.n_heads * c.v_head_dim,
    "one": lambda c: 1,
    "two_d_model": lambda c: 2 * c.d_model,  # an MTP block's input: [embedding; hidden state]
}


def fmt(template: str, layer: int | None = None, expert: int | None = None) -> str:
    return template.replace("{L}", str(layer)).replace("{E}", str(expert))


def build_config(arch: Family, lookup: Callable[[ConfigKey], Any], raw: Mapping[str, Any], where: str,
                 has_router: Callable[[int], bool] | None = None) -> ModelConfig:
    """Build a ModelConfig from a source's key lookup (HF or GGUF), with the arch's defaults.

    `raw` is the HF config (empty for GGUF); `has_router(layer)` tells, for sources without metadata
    for it (GGUF), whether a layer has a router (else it is a dense-MLP layer)."""
    values: dict[str, Any] = {"arch": arch.name}
    for key in arch.config_keys:
        value = lookup(key)
        if value is None:
            if key.default is REQUIRED:
                names = key.hf or key.gguf
                raise ValueError(f"{where}: missing hyper-parameter {names[0] if names else key.field!r}")
            value = key.default
        values[key.field] = value
    if arch.dense_mlp_layers and has_router is not None and isinstance(values.get("n_layers"), int):
        values["dense_layers"] = tuple(la for la in range(values["n_layers"]) if not has_router(la))
    arch.finish_config(values, raw)
    return ModelConfig(**{k: v for k, v in values.items() if not k.startswith("_")})
