"""Multi-head latent attention (DeepSeek-V2/V3, Kimi K2) as family pieces, in the "absorbed" form.

HF's MLA, per token x and head h (nope = head_dim - rope):
    q_h        = q_b(norm(q_a(x)))_h  or  q_proj(x)_h                      (head_dim: nope, then rope)
    c, k_rope  = kv_a(x)  split (kv_lora_rank, rope);  c = norm(c)         (one latent, one rotary key)
    k_h, v_h   = kv_b(c)_h  split (nope, v_head_dim)                       (expanded per head)
    score      = (q_h[:nope] . k_h + rot(q_h[nope:]) . rot(k_rope)) * scale
Since k_h = K_h c with K_h (nope, rank), q_h[:nope] . k_h = (K_h^T q_h[:nope]) . c: folding k_b into q
("absorbing" it) lets every head attend over the cached (rope + rank)-wide vectors [rot(k_rope), c] with
queries [rot(q_rope), K_h^T q_nope], and values are c itself; v_b (V_h (v_head_dim, rank)) then maps each
head's weighted latent to its value. So the cache holds rope + rank floats per token and layer, not
n_heads * (head_dim + v_head_dim): that is MLA's point. llama.cpp does the same (its attn_k_b is K_h^T per
head, its attn_v_b V_h), and so do the layouts.

DeepSeek's rotary pairs adjacent dims (2i, 2i + 1) of the rope part; taking the even dims then the odd ones
of both q and k turns that into the rotate-half pairs (i, i + rope/2) the shared `rotary` piece rotates,
and leaves every q . k unchanged. The rope part goes first so that `rotary` (over the first
`cfg.rotary_dim` dims) rotates exactly it.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from ..layout.config import ModelConfig

if TYPE_CHECKING:
    from .pieces import Ops
    from .weights import LayerWeights


@lru_cache(maxsize=8)
def _pairs_first(rope: int) -> np.ndarray:
    """Index taking dims 0, 2, 4, ... then 1, 3, 5, ...: adjacent rotary pairs -> rotate-half pairs."""
    out = np.concatenate([np.arange(0, rope, 2), np.arange(1, rope, 2)])
    out.flags.writeable = False
    return out


def mla_attention_inputs(cfg: ModelConfig, w: LayerWeights, h: np.ndarray, ops: Ops) -> tuple[np.ndarray, ...]:
    """h (n, d_model) -> q (n, n_heads, rope + rank), k (n, 1, rope + rank) = [k_rope, latent], v (n, 1, rank) =
    the latent (what values are made of), before rotary (which turns the first rope dims of q and k)."""
    n, heads, rope, rank = h.shape[0], cfg.n_heads, cfg.qk_rope_dim, cfg.kv_lora_rank
    nope = cfg.head_dim - rope
    if w.attn_q_a is not None:
        q = ops.linear(w.attn_q_b, ops.rms_norm(ops.linear(w.attn_q_a, h), w.q_a_norm, cfg.norm_eps))
    else:
        q = ops.linear(w.attn_q, h)
    q = q.reshape(n, heads, cfg.head_dim)
    kv = ops.linear(w.attn_kv_a, h)  # (n, rank + rope)
    latent = ops.rms_norm(kv[:, :rank], w.kv_a_norm, cfg.norm_eps)  # (n, rank)
    pairs = _pairs_first(rope)
    q_latent = ops.per_head(w.attn_k_b, np.ascontiguousarray(q[:, :, :nope]))  # (n, heads, rank): K_h^T q_nope
    q = np.concatenate([q[:, :, nope:][..., pairs], q_latent.astype(q.dtype, copy=False)], axis=-1)
    k = np.concatenate([kv[:, rank:][:, pairs], latent], axis=-1)[:, None, :]
    return q, k, latent[:, None, :]


def mla_attention_output(cfg: ModelConfig, w: LayerWeights, out: np.ndarray, ops: Ops) -> np.ndarray:
    """The heads' weighted latents (n, n_heads * rank) -> (n, d_model): each head's value map V_h, then the
    output projection."""
    n = out.shape[0]
    v = ops.per_head(w.attn_v_b, out.reshape(n, cfg.n_heads, cfg.kv_lora_rank))  # (n, heads, v_head_dim)
    y = ops.linear(w.attn_o, np.ascontiguousarray(v.reshape(n, -1)))
    return y if w.o_bias is None else y + w.o_bias.astype(y.dtype)


def kv_bytes_per_token(cfg: ModelConfig, itemsize: int = 4) -> tuple[int, int]:
    """(bytes the runtime's KV cache holds per token of context, bytes full per-head keys and values would take),
    at `itemsize` bytes a value (4: float32, 2: f16): with latent attention (rope + rank) per layer against
    n_heads * (head_dim + v_head_dim); otherwise both are the keys and values of n_kv_heads."""
    full = cfg.n_layers * itemsize * cfg.n_kv_heads * (cfg.head_dim + (cfg.v_head_dim or cfg.head_dim))
    if not cfg.mla:
        return full, full
    return cfg.n_layers * itemsize * (cfg.qk_rope_dim + cfg.kv_lora_rank), full
