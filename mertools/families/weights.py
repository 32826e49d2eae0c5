"""Typed weights of a model, loaded through a family's name tables (never through hand-written names).

Generic over how a matrix is held: the runtime holds raw GGML bytes it multiplies with its kernels
(`runtime.ops.Linear`), the float64 reference holds dequantized float32 arrays. Vectors (norms,
biases) and routers are float32 arrays in both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Generic, TypeVar

import numpy as np

from ..layout.config import ModelConfig
from .base import KEEP_F32_ROLES, DenseSpec, Family, fmt

M = TypeVar("M")  # a matrix: runtime Linear (raw bytes) or reference float32 array


@dataclass(frozen=True)
class Mlp(Generic[M]):
    """A SwiGLU MLP: down(silu(gate x) * up x); an expert may add biases (and its GLU may differ, pieces.glu)."""

    gate: M  # (d_ff, d_model)
    up: M  # (d_ff, d_model)
    down: M  # (d_model, d_ff)
    gate_bias: np.ndarray | None = None  # (d_ff,)
    up_bias: np.ndarray | None = None  # (d_ff,)
    down_bias: np.ndarray | None = None  # (d_model,)


@dataclass(frozen=True)
class LayerWeights(Generic[M]):
    """One decoder layer's resident weights; None where the family or the layer has no such tensor."""

    attn_norm: np.ndarray  # (d_model,)
    attn_o: M  # (d_model, n_heads * head_dim), latent attention: (d_model, n_heads * v_head_dim)
    ffn_norm: np.ndarray  # (d_model,)
    attn_q: M | None = None  # (n_heads * head_dim, d_model), HF row order; None with latent attention's q LoRA
    attn_k: M | None = None  # (n_kv_heads * head_dim, d_model), HF row order; None with latent attention
    attn_v: M | None = None  # (n_kv_heads * head_dim, d_model); None with latent attention
    q_bias: np.ndarray | None = None  # (n_heads * head_dim,)
    k_bias: np.ndarray | None = None  # (n_kv_heads * head_dim,)
    v_bias: np.ndarray | None = None  # (n_kv_heads * head_dim,)
    q_norm: np.ndarray | None = None  # (head_dim,) per head, or (n_heads * head_dim,) over the projection
    k_norm: np.ndarray | None = None  # (head_dim,) or (n_kv_heads * head_dim,)
    router: np.ndarray | None = None  # (n_experts, d_model); None in a dense-MLP layer
    expert_bias: np.ndarray | None = None  # (n_experts,): added to the scores for choosing experts only
    mlp: Mlp[M] | None = None  # a dense-MLP layer's MLP (d_ff_dense wide)
    shared: Mlp[M] | None = None  # an always-resident shared expert (d_ff_shared wide)
    shared_gate: np.ndarray | None = None  # (1, d_model): the shared expert is scaled by sigmoid(x . w)
    o_bias: np.ndarray | None = None  # (d_model,): the output projection's bias
    attn_sinks: np.ndarray | None = None  # (n_heads,): each head's extra softmax logit (attention sinks)
    router_bias: np.ndarray | None = None  # (n_experts,): added to the router's logits
    # multi-head latent attention (DeepSeek): q through a low-rank bottleneck (or attn_q), k/v from one latent
    attn_q_a: M | None = None  # (q_lora_rank, d_model)
    q_a_norm: np.ndarray | None = None  # (q_lora_rank,)
    attn_q_b: M | None = None  # (n_heads * head_dim, q_lora_rank)
    attn_kv_a: M | None = None  # (kv_lora_rank + qk_rope_dim, d_model): the latent, then the shared rotary key
    kv_a_norm: np.ndarray | None = None  # (kv_lora_rank,)
    attn_k_b: M | None = None  # (n_heads * kv_lora_rank, qk_nope): per head, q_nope -> the latent's space
    attn_v_b: M | None = None  # (n_heads * v_head_dim, kv_lora_rank): per head, latent -> value
    # a multi-token-prediction block's own (config.nextn_layers; families.common.MTP)
    mtp_eh_proj: M | None = None  # (d_model, 2 * d_model): [enorm(embedding); hnorm(hidden)] -> the block's input
    mtp_enorm: np.ndarray | None = None  # (d_model,)
    mtp_hnorm: np.ndarray | None = None  # (d_model,)
    mtp_head_norm: np.ndarray | None = None  # (d_model,)
    mtp_head: M | None = None  # (vocab_size, d_model); None: the model's output
    mtp_embed: M | None = None  # (vocab_size, d_model); None: the model's embedding


@dataclass(frozen=True)
class GlobalWeights(Generic[M]):
    embed: M  # (vocab_size, d_model)
    output_norm: np.ndarray  # (d_model,)
    output: M | None = None  # (vocab_size, d_model); None when tied to the embedding


Matrix = Callable[[str, str], Any]  # (layout name, role) -> a matrix as the caller holds it
Vector = Callable[[str], np.ndarray]  # layout name -> float32 array of the tensor's shape


def _load(specs: list[DenseSpec], layer: int | None, matrix: Matrix, vector: Vector,
          present: Callable[[str], bool]) -> dict[str, Any]:
    """field -> loaded tensor; "x.y" fields are grouped into an Mlp under "x"."""
    out: dict[str, Any] = {}
    groups: dict[str, dict[str, Any]] = {}
    for spec in specs:
        name = fmt(spec.name, layer)
        if spec.optional and not present(name):
            continue
        value = vector(name) if spec.role in KEEP_F32_ROLES else matrix(name, spec.role)
        if "." in spec.field:
            group, part = spec.field.split(".", 1)
            groups.setdefault(group, {})[part] = value
        else:
            out[spec.field] = value
    for group, parts in groups.items():
        out[group] = Mlp(**parts)
    return out


def load_layer(family: Family, cfg: ModelConfig, layer: int, matrix: Matrix, vector: Vector,
               present: Callable[[str], bool]) -> LayerWeights:
    return LayerWeights(**_load(family.layer_specs(cfg, layer), layer, matrix, vector, present))


def load_globals(family: Family, cfg: ModelConfig, matrix: Matrix, vector: Vector,
                 present: Callable[[str], bool]) -> GlobalWeights:
    return GlobalWeights(**_load(family.global_specs(cfg), None, matrix, vector, present))


def check_fields(family: Family) -> None:
    """Every spec's field names a weights field (checked once per family, at import)."""
    names = {f.name for cls in (LayerWeights, GlobalWeights) for f in fields(cls)}
    parts = {f.name for f in fields(Mlp)}
    for spec in family.dense:
        top, _, part = spec.field.partition(".")
        if top not in names or (part and part not in parts):
            raise ValueError(f"{family.name}: {spec.name} has field {spec.field!r}, which no weights class has")
