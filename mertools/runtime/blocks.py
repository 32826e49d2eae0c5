"""Pieces of the forward pass shared by the MoE families, selected by explicit config fields (never by
the family's name): q/k/v biases (Qwen2-MoE), RMSNorm of q and k per head (Qwen3-MoE) or over the
whole projection (OLMoE), dense SwiGLU layers without experts (Qwen's mlp_only_layers) and an
always-resident shared expert scaled by a sigmoid gate (Qwen2-MoE). Dense weights are resident."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..kernels.matmul import matmul, swiglu_expert
from ..layout.config import ModelConfig
from ..layout.reader import Layout


@dataclass(frozen=True)
class Linear:
    raw: np.ndarray  # uint8 raw GGML bytes of a (rows, cols) weight
    dtype: str
    rows: int
    cols: int

    def __call__(self, x: np.ndarray) -> np.ndarray:  # (n, cols) -> (n, rows)
        return matmul(x, self.raw, self.dtype, self.rows, self.cols)


def f32_tensor(layout: Layout, name: str) -> np.ndarray:
    t = layout.manifest.dense[name]
    raw = layout.read_dense(name)
    if t.dtype == "f32":
        return raw.view(np.float32).reshape(t.shape)
    from ..kernels import dequantize

    return dequantize(raw, t.dtype, tuple(t.shape))


def linear(layout: Layout, name: str) -> Linear:
    t = layout.manifest.dense[name]
    return Linear(layout.read_dense(name).reshape(t.shape[0], -1), t.dtype, t.shape[0], t.shape[1])


def per_span(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, spans: list) -> np.ndarray:
    """fn over each sequence's rows separately: kernels may take another path (and round
    differently) for another number of rows, and a request's output must not depend on its batch."""
    if len(spans) == 1:
        return fn(x)
    return np.concatenate([fn(np.ascontiguousarray(x[r0:r0 + n])) for _, r0, n in spans])


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    var = np.mean(x * x, axis=-1, keepdims=True, dtype=np.float32)
    return (x / np.sqrt(var + np.float32(eps))) * w


def load_layer(layout: Layout, cfg: ModelConfig, i: int) -> dict[str, Any]:
    """Resident weights of layer i: norms and attention always; the router and (if any) the shared expert
    in a MoE layer, the dense SwiGLU MLP in a dense one; biases and q/k norms when the config has them."""
    p = f"blk.{i}."
    w: dict[str, Any] = {
        "attn_norm": f32_tensor(layout, p + "attn_norm.weight"), "ffn_norm": f32_tensor(layout, p + "ffn_norm.weight"),
        "q": linear(layout, p + "attn_q.weight"), "k": linear(layout, p + "attn_k.weight"),
        "v": linear(layout, p + "attn_v.weight"), "o": linear(layout, p + "attn_output.weight"),
    }
    if cfg.attn_bias:
        w.update({f"b{x}": f32_tensor(layout, f"{p}attn_{x}.bias") for x in "qkv"})  # (rows,) each
    if cfg.qk_norm != "none":
        w["q_norm"], w["k_norm"] = f32_tensor(layout, p + "attn_q_norm.weight"), f32_tensor(layout, p + "attn_k_norm.weight")
    if not cfg.is_moe_layer(i):
        w["mlp"] = tuple(linear(layout, f"{p}ffn_{r}.weight") for r in ("gate", "up", "down"))
        return w
    w["router"] = f32_tensor(layout, p + "ffn_gate_inp.weight")  # (n_experts, d_model)
    if cfg.d_ff_shared:
        w["shared"] = tuple(linear(layout, f"{p}ffn_{r}_shexp.weight") for r in ("gate", "up", "down"))
    if cfg.shared_expert_gate:
        w["shared_gate"] = f32_tensor(layout, p + "ffn_gate_inp_shexp.weight").reshape(-1)  # (d_model,)
    return w


def qkv(cfg: ModelConfig, w: dict[str, Any], h: np.ndarray, spans: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """h (N, d) -> q (N, nh, hd), k and v (N, nkv, hd), before rotary: projections, biases, q/k norms."""
    n, hd = h.shape[0], cfg.head_dim
    q, k, v = (per_span(w[x], h, spans) for x in "qkv")  # (N, nh*hd), (N, nkv*hd) x2
    if cfg.attn_bias:
        q, k, v = q + w["bq"], k + w["bk"], v + w["bv"]
    if cfg.qk_norm == "full":  # OLMoE: over the whole projection, before the split into heads
        q, k = rms_norm(q, w["q_norm"], cfg.norm_eps), rms_norm(k, w["k_norm"], cfg.norm_eps)
    q, k, v = q.reshape(n, cfg.n_heads, hd), k.reshape(n, cfg.n_kv_heads, hd), v.reshape(n, cfg.n_kv_heads, hd)
    if cfg.qk_norm == "head":  # Qwen3: each head over its head_dim
        q, k = rms_norm(q, w["q_norm"], cfg.norm_eps), rms_norm(k, w["k_norm"], cfg.norm_eps)
    return q, k, v


def swiglu(mlp: tuple[Linear, Linear, Linear], h: np.ndarray, spans: list) -> np.ndarray:
    """A resident SwiGLU MLP (gate, up, down) on h (N, d) -> (N, d), per sequence."""
    g, u, d = mlp
    return per_span(lambda rows: swiglu_expert(rows, g.raw, u.raw, d.raw, g.dtype, u.dtype, d.dtype, g.rows, g.cols),
                    h, spans)


def shared_expert(cfg: ModelConfig, w: dict[str, Any], h: np.ndarray, spans: list) -> np.ndarray:
    """The shared expert's contribution (N, d) for normalised hidden states h, gated when the config says."""
    y = swiglu(w["shared"], h, spans)
    if cfg.shared_expert_gate:
        gate = h @ w["shared_gate"]  # (N,)
        y = y * (1.0 / (1.0 + np.exp(-gate)))[:, None].astype(np.float32)
    return y
