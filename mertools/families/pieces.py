"""The forward pieces a family is made of, written once for two backends.

Each piece takes the config, a layer's `LayerWeights` and an `Ops` backend: the runtime's (float32,
GGML bytes multiplied by the numba kernels, each sequence of a batch on its own rows) or the
reference's (float64 numpy on dequantized weights). What a family varies is chosen by config fields
(`qk_norm`, biases present, a shared expert and its gate, `norm_topk_prob`, the gating function, a
correction bias, expert groups, routed scaling, partial rotary, YaRN, the routed experts' GLU); a family
whose attention or routing is of another kind brings its own functions in its module and names them in
its `Pieces`. (Attention itself, with its per-layer window and sinks, is the runtime's kernel and the
reference's numpy.)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..layout.config import GatingFunc, GroupScore, ModelConfig, QKNorm, RopeScaling

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

    def glu(self, cfg: ModelConfig, g: np.ndarray, u: np.ndarray) -> np.ndarray:
        """A routed expert's gated activation (`glu`) of its gate and up pre-activations (n, d_ff)."""

    def softmax(self, x: np.ndarray) -> np.ndarray:
        """Softmax over the last axis (a router's scores)."""

    def per_head(self, w: Any, x: np.ndarray) -> np.ndarray:
        """x (n, heads, cols) -> (n, heads, rows): head h's slice times its own (rows, cols) block of W, a model
        matrix of (heads * rows, cols) (latent attention's k_b and v_b)."""


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


def sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-x)) in x's own precision; exp(-x) = inf for very negative x gives 0, as it should."""
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-x))


def router_scores(cfg: ModelConfig, w: LayerWeights, h: np.ndarray, ops: Ops) -> np.ndarray:
    """Router scores (n, n_experts) of normalised hidden states h: softmax over every expert, or each
    expert's own sigmoid, as `cfg.gating_func` says."""
    logits = ops.dense(h, w.router)
    if w.router_bias is not None:  # a router that is a Linear with a bias
        logits = logits + w.router_bias.astype(logits.dtype)
    return ops.softmax(logits) if cfg.gating_func is GatingFunc.SOFTMAX else sigmoid(logits)


def choice_scores(cfg: ModelConfig, w: LayerWeights, scores: np.ndarray) -> np.ndarray:
    """What experts are chosen by (n, n_experts): the scores plus the layer's correction bias (when it has
    one), and with expert groups, -inf outside each token's best `n_groups_used` groups, a group scored by
    the sum of its best two (DeepSeek-V3's rule, which GLM-4.5 shares) or by its best (DeepSeek-V2's), as
    `cfg.group_score` says."""
    choice = scores if w.expert_bias is None else scores + w.expert_bias.astype(scores.dtype)
    if cfg.n_groups > 1:
        n = choice.shape[0]
        groups = choice.reshape(n, cfg.n_groups, -1)  # (n, groups, experts per group)
        if cfg.group_score is GroupScore.MAX:
            group_score = groups.max(axis=-1)  # (n, groups)
        else:
            group_score = np.sort(groups, axis=-1)[..., -2:].sum(axis=-1)
        keep = np.argsort(-group_score, axis=1, kind="stable")[:, :cfg.n_groups_used]
        kept = np.zeros(group_score.shape, dtype=bool)
        np.put_along_axis(kept, keep, True, axis=1)
        choice = np.where(kept[:, :, None], groups, -np.inf).reshape(n, -1)
    return choice


def top_k(cfg: ModelConfig, w: LayerWeights, scores: np.ndarray, chosen: np.ndarray | None = None
          ) -> tuple[np.ndarray, np.ndarray]:
    """(experts (n, k), weights (n, k)), best first. Experts are chosen by `choice_scores` (exact ties go
    to the lower index: a stable sort); weights are the unbiased scores of the chosen, renormalised when
    `norm_topk_prob`, then times `routed_scaling` (transformers' order). `chosen` replaces the choice
    (benchmarks replay routing) and keeps the router's weights of it."""
    if chosen is None:
        chosen = np.argsort(-choice_scores(cfg, w, scores), axis=1, kind="stable")[:, :cfg.n_experts_used]
    weights = scores[np.arange(len(chosen))[:, None], chosen]  # take_along_axis's values, without its Python
    if cfg.norm_topk_prob:  # + 1e-20 as transformers' sigmoid routers: all-zero sigmoid weights stay finite
        weights = weights / (weights.sum(axis=1, keepdims=True) + 1e-20)
    if cfg.routed_scaling != 1.0:
        weights = weights * cfg.routed_scaling
    return chosen, weights


def rotary(cfg: ModelConfig, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Rotate-half rotary (q/k rows in HF order) on x (n, heads, head_dim) at positions pos (n,), over the
    first `cfg.rotary_dim` dims of each head; the rest pass unchanged (partial rotary, as HF's
    apply_rotary_pos_emb). With YaRN, its frequencies and cos/sin times `rope_attn_factor` (mscale).
    Angles in float64; cos, sin and the products in x's precision."""
    rd = cfg.rotary_dim
    yarn = None
    if cfg.rope_scaling is RopeScaling.YARN:
        yarn = (cfg.rope_factor, cfg.rope_original_context, cfg.yarn_beta_fast, cfg.yarn_beta_slow, cfg.yarn_truncate)
    cos, sin = _cos_sin(cfg.rope_theta, rd, yarn, cfg.rope_attn_factor, np.ascontiguousarray(pos, np.int64).tobytes(),
                        np.dtype(x.dtype).str)
    half = rd // 2
    x1, x2 = x[..., :half], x[..., half:rd]
    parts = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
    if rd < x.shape[-1]:
        parts.append(x[..., rd:])
    return np.concatenate(parts, axis=-1)


@lru_cache(maxsize=16)
def _cos_sin(theta: float, rd: int, yarn: tuple[float, int, float, float, bool] | None, attn: float, pos: bytes,
             dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin (n, 1, rd/2) in `dtype` at positions `pos` (int64 bytes); cached: every layer's q and k of a step
    share them (a step's positions, a few steps' worth: bounded)."""
    ang = np.frombuffer(pos, np.int64)[:, None].astype(np.float64) * _inv_freq(theta, rd, yarn)[None, :]  # (n, rd/2)
    cos, sin = np.cos(ang), np.sin(ang)
    if attn != 1.0:
        cos, sin = cos * attn, sin * attn
    cos, sin = cos.astype(dtype)[:, None, :], sin.astype(dtype)[:, None, :]
    cos.flags.writeable = sin.flags.writeable = False
    return cos, sin


@lru_cache(maxsize=8)
def _inv_freq(theta: float, rd: int, yarn: tuple[float, int, float, float, bool] | None = None) -> np.ndarray:
    """1 / theta^(arange(0, rd, 2) / rd), (rd/2,) float64; cached: every layer's q and k use it every step.
    `yarn` = (factor, original context, beta_fast, beta_slow, truncate): transformers' _compute_yarn_parameters,
    the frequencies below the correction range divided by factor, a linear ramp across it."""
    out = 1.0 / theta ** (np.arange(0, rd, 2, dtype=np.float64) / rd)
    if yarn is not None:
        factor, original, fast, slow, truncate = yarn

        def dim(rotations: float) -> float:  # the dim whose wavelength fits `rotations` times in the original context
            return rd * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low, high = dim(fast), dim(slow)
        if truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, rd - 1)
        ramp = np.clip((np.arange(rd // 2, dtype=np.float64) - low) / ((high - low) or 0.001), 0.0, 1.0)
        out = out / factor * ramp + out * (1.0 - ramp)  # ramp 0: extrapolate (keep), 1: interpolate (/ factor)
    out.flags.writeable = False
    return out


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


def attention_output(cfg: ModelConfig, w: LayerWeights, out: np.ndarray, ops: Ops) -> np.ndarray:
    """The heads' outputs (n, n_heads * head_dim) -> (n, d_model): the output projection, plus its bias."""
    y = ops.linear(w.attn_o, out)
    return y if w.o_bias is None else y + w.o_bias.astype(y.dtype)


def glu(cfg: ModelConfig, g: np.ndarray, u: np.ndarray) -> np.ndarray:
    """A routed expert's gated activation of its gate and up pre-activations (n, d_ff), in their precision:
    (u + offset) * g * sigmoid(alpha * g), g clamped above and u on both sides at `swiglu_limit` (when > 0).
    The defaults give silu(g) * u; alpha 1.702, limit 7, offset 1 is transformers' GptOssExperts._apply_gate."""
    if cfg.swiglu_limit:
        g, u = np.minimum(g, cfg.swiglu_limit), np.clip(u, -cfg.swiglu_limit, cfg.swiglu_limit)
    return (u + cfg.swiglu_up_offset) * (g * sigmoid(cfg.swiglu_alpha * g))


def expert_mlp(cfg: ModelConfig, m: Mlp, x: np.ndarray, ops: Ops) -> np.ndarray:
    """A routed expert on x (n, d_model) -> (n, d_model): the backend's SwiGLU when the experts are plain,
    else gate and up with their biases, `glu`, down with its bias."""
    if cfg.plain_swiglu:
        return ops.mlp(m, x)
    g, u = ops.linear(m.gate, x), ops.linear(m.up, x)
    if m.gate_bias is not None:
        g, u = g + m.gate_bias.astype(g.dtype), u + m.up_bias.astype(u.dtype)
    y = ops.linear(m.down, ops.glu(cfg, g, u))
    return y if m.down_bias is None else y + m.down_bias.astype(y.dtype)


@dataclass(frozen=True)
class Pieces:
    attention_inputs: Callable[..., tuple[np.ndarray, ...]] = attention_inputs
    rotary: Callable[..., np.ndarray] = rotary  # (cfg, x (n, heads, hd), positions (n,)) -> x rotated
    router_scores: Callable[..., np.ndarray] = router_scores  # (cfg, w, h, ops) -> (n, n_experts)
    select_experts: Callable[..., tuple[np.ndarray, np.ndarray]] = top_k  # (cfg, w, scores, chosen) -> experts, weights
    shared_expert: Callable[..., np.ndarray | None] = shared_expert
    attention_output: Callable[..., np.ndarray] = attention_output  # (cfg, w, heads' out, ops) -> (n, d_model)
    expert_mlp: Callable[..., np.ndarray] = expert_mlp  # (cfg, expert Mlp, x, ops) -> (n, d_model)

    def lookahead(self, cfg: ModelConfig, w: LayerWeights, h: np.ndarray, ops: Ops) -> np.ndarray:
        """A prefetch guess's ranking (n, n_experts) of a layer's experts, positive for the wanted: its scores
        when they choose directly; with a correction bias or groups, the chosen experts' weights (0 elsewhere)."""
        scores = self.router_scores(cfg, w, h, ops)
        if w.expert_bias is None and cfg.n_groups == 1:
            return scores
        chosen, weights = self.select_experts(cfg, w, scores)
        out = np.zeros_like(scores)
        np.put_along_axis(out, chosen, weights.astype(out.dtype), axis=1)
        return out


STANDARD = Pieces()
