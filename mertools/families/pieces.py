"""The forward pieces a family is made of, written once for two backends.

Each piece takes the config, a layer's `LayerWeights` and an `Ops` backend: the runtime's (float32,
GGML bytes multiplied by the numba kernels, each sequence of a batch on its own rows) or the
reference's (float64 numpy on dequantized weights). What a family varies is chosen by config fields
(`qk_norm`, biases present, a shared expert and its gate, `norm_topk_prob`); a family whose attention or
routing is of another kind brings its own functions in its module and names them in its `Pieces`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..layout.config import ModelConfig, QKNorm

if TYPE_CHECKING:
    from .weights import LayerWeights, Mlp


class Ops(Protocol):
    """The arithmetic a piece may use; rows of x are tokens."""

    def linear(self, w: Any, x: np.ndarray) -> np.ndarray:
        """x (n, cols) @ W.T -> (n, rows) for a model matrix W as the backend holds it."""

    def dense(self, x: np.ndarray, a: np.ndarray) -> np.ndarray:
        """x (n, cols) @ a.T -> (n, rows) for a float32 array a (routers, gates)."""

    def mlp(self, m: Mlp, x: np.ndarray) -> np.ndarray:
        """A SwiGLU MLP on x (n, d_model) -> (n, d_model)."""

    def rms_norm(self, x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
        """RMSNorm over the last axis, times w."""


def attention_inputs(cfg: ModelConfig, w: LayerWeights, h: np.ndarray, ops: Ops) -> tuple[np.ndarray, ...]:
    """h (n, d_model) -> q (n, n_heads, hd), k and v (n, n_kv_heads, hd), before rotary: projections,
    biases when the layer has them, and RMSNorm of q and k as `cfg.qk_norm` says."""
    n, hd = h.shape[0], cfg.head_dim
    q, k, v = ops.linear(w.attn_q, h), ops.linear(w.attn_k, h), ops.linear(w.attn_v, h)
    if w.q_bias is not None:
        q, k, v = q + w.q_bias, k + w.k_bias, v + w.v_bias
    if cfg.qk_norm is QKNorm.FULL:  # over the whole projection, before the split into heads
        q, k = ops.rms_norm(q, w.q_norm, cfg.norm_eps), ops.rms_norm(k, w.k_norm, cfg.norm_eps)
    q, k, v = q.reshape(n, cfg.n_heads, hd), k.reshape(n, cfg.n_kv_heads, hd), v.reshape(n, cfg.n_kv_heads, hd)
    if cfg.qk_norm is QKNorm.HEAD:  # each head over its head_dim
        q, k = ops.rms_norm(q, w.q_norm, cfg.norm_eps), ops.rms_norm(k, w.k_norm, cfg.norm_eps)
    return q, k, v


def softmax(x: np.ndarray) -> np.ndarray:
    """Over the last axis, max-subtracted (-inf entries give 0), in x's own precision."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def softmax_scores(cfg: ModelConfig, w: LayerWeights, h: np.ndarray, ops: Ops) -> np.ndarray:
    """Router probabilities (n, n_experts) of normalised hidden states h: softmax over every expert."""
    return softmax(ops.dense(h, w.router))


def top_k(cfg: ModelConfig, scores: np.ndarray, chosen: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(experts (n, k), weights (n, k)), best first. Exact ties go to the lower index (a stable sort);
    `chosen` replaces the choice (benchmarks replay routing) and keeps the router's weights of it."""
    if chosen is None:
        chosen = np.argsort(-scores, axis=1, kind="stable")[:, :cfg.n_experts_used]
    weights = np.take_along_axis(scores, chosen, axis=1)
    if cfg.norm_topk_prob:
        weights = weights / weights.sum(axis=1, keepdims=True)
    return chosen, weights


def shared_expert(cfg: ModelConfig, w: LayerWeights, h: np.ndarray, ops: Ops) -> np.ndarray | None:
    """The always-resident shared expert's contribution (n, d_model), scaled by sigmoid(h . gate) when
    the layer has a gate; None when the layer has no shared expert."""
    if w.shared is None:
        return None
    y = ops.mlp(w.shared, h)
    if w.shared_gate is not None:
        with np.errstate(over="ignore"):  # exp(-g) = inf for very negative g: the gate is 0, as it should be
            y = y * (1.0 / (1.0 + np.exp(-ops.dense(h, w.shared_gate)))).astype(y.dtype)
    return y


@dataclass(frozen=True)
class Pieces:
    attention_inputs: Callable[..., tuple[np.ndarray, ...]] = attention_inputs
    router_scores: Callable[..., np.ndarray] = softmax_scores  # (cfg, w, h, ops) -> (n, n_experts)
    select_experts: Callable[..., tuple[np.ndarray, np.ndarray]] = top_k  # (cfg, scores, chosen) -> experts, weights
    shared_expert: Callable[..., np.ndarray | None] = shared_expert


STANDARD = Pieces()
