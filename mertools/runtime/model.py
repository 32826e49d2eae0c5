"""The MoE forward pass (HF MixtralForCausalLM semantics, plus the per-family pieces of blocks.py:
Qwen2-MoE, Qwen3-MoE, OLMoE) over a layout: dense weights resident, experts through the cache.
Prefill groups tokens by expert so each expert is read once per step."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numba import njit, prange

from ..kernels.matmul import get_rows, swiglu_expert
from ..kernels.simd import prefetch
from ..layout.config import ModelConfig
from ..layout.reader import Layout
from . import blocks
from .blocks import Linear, linear, per_span, rms_norm  # noqa: F401 - Linear: part of this module's API
from .cache import ExpertCache
from .prefetch import Prefetcher
from .store import ExpertStore

# (positions (n,), layer, chosen experts (n, k), their weights (n, k))
TraceFn = Callable[[np.ndarray, int, np.ndarray, np.ndarray], None]


@njit(parallel=True, nogil=True, cache=True, fastmath={"reassoc", "contract", "nsz", "arcp"})
def _attend_one(q, keys, vals, pos, window, out):
    """Decode attention of one new token: q (nh, hd) at position pos over keys/vals (pos + 1, nkv, hd)
    -> out (nh, hd): what `MoEModel._attend` computes for n = 1 (causal; sliding window if window > 0)
    in one parallel pass over kv heads, each key and value row read once for its group of query
    heads. fastmath without nnan/ninf: sums are reassociated (vectorised); inf/NaN still propagate."""
    nh, hd = q.shape
    nkv = keys.shape[1]
    group = nh // nkv
    scale = np.float32(np.sqrt(hd))
    lo = max(0, pos - window + 1) if window > 0 else 0
    kb = keys.reshape(-1).view(np.uint8)  # for prefetching: a head's rows are nkv*hd*4 bytes apart, one
    vb = vals.reshape(-1).view(np.uint8)  # page each, which the hardware prefetcher does not follow
    row = hd * 4
    for g in prange(nkv):
        s = np.empty((group, pos + 1), np.float32)  # scores, then probabilities
        for j in range(lo, pos + 1):
            ahead = ((min(j + 8, pos) * nkv) + g) * row
            for c in range(0, row, 64):
                prefetch(kb, ahead + c)
            for i in range(group):
                acc = np.float32(0.0)
                for d in range(hd):
                    acc += q[g * group + i, d] * keys[j, g, d]
                s[i, j] = acc / scale
        for i in range(group):
            m = s[i, lo]
            for j in range(lo + 1, pos + 1):
                m = max(m, s[i, j])
            tot = np.float32(0.0)
            for j in range(lo, pos + 1):
                s[i, j] = np.exp(s[i, j] - m)
                tot += s[i, j]
            for j in range(lo, pos + 1):
                s[i, j] = s[i, j] / tot
            out[g * group + i, :] = 0.0
        for j in range(lo, pos + 1):
            ahead = ((min(j + 8, pos) * nkv) + g) * row
            for c in range(0, row, 64):
                prefetch(vb, ahead + c)
            for i in range(group):
                p = s[i, j]
                for d in range(hd):
                    out[g * group + i, d] += p * vals[j, g, d]


class KVCache:
    """Per layer (capacity, n_kv, head_dim) float32 keys and values, grown by doubling."""

    def __init__(self, cfg: ModelConfig, capacity: int = 256) -> None:
        self.cfg = cfg
        self.length = 0
        shape = (cfg.n_layers, capacity, cfg.n_kv_heads, cfg.head_dim)
        self.k = np.zeros(shape, np.float32)
        self.v = np.zeros(shape, np.float32)

    def ensure(self, total: int) -> None:
        cap = self.k.shape[1]
        if total <= cap:
            return
        new = max(total, 2 * cap)
        for name in ("k", "v"):
            old = getattr(self, name)
            grown = np.zeros((old.shape[0], new, *old.shape[2:]), np.float32)
            grown[:, :cap] = old
            setattr(self, name, grown)


class MoEModel:
    def __init__(self, layout: Layout, cache: ExpertCache, store: ExpertStore, prefetcher: Prefetcher) -> None:
        cfg = self.cfg = layout.manifest.config
        self.cache, self.store, self.prefetcher = cache, store, prefetcher
        dense = layout.manifest.dense
        self.embd = linear(layout, "token_embd.weight")
        self.output = linear(layout, "output.weight") if "output.weight" in dense else self.embd
        self.output_norm = blocks.f32_tensor(layout, "output_norm.weight")
        self.layers = [blocks.load_layer(layout, cfg, i) for i in range(cfg.n_layers)]
        self.dtypes = {r: layout.manifest.experts[0].tensors[r].dtype for r in ("gate", "up", "down")}
        self.kv = KVCache(cfg)
        self.trace: TraceFn | None = None
        # (layer, positions (n,)) -> experts (n, k): replaces the router's choice (its weights are
        # still the router's probabilities of those experts). For I/O benchmarks only: random-weight
        # checkpoints route almost every token to the same experts, which flatters any cache.
        self.routing_override: Callable[[int, np.ndarray], np.ndarray] | None = None
        half = cfg.head_dim // 2
        self.inv_freq = 1.0 / cfg.rope_theta ** (np.arange(half, dtype=np.float64) * 2 / cfg.head_dim)  # (hd/2,)

    # ------------------------------------------------------------------ pieces
    def router_probs(self, layer: int, h: np.ndarray) -> np.ndarray:
        """Softmax router probabilities (n, n_experts) of `layer` for normalised hidden states h."""
        logits = h @ self.layers[layer]["router"].T
        logits = logits - logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(axis=1, keepdims=True)

    def lookahead_router(self, layer: int, x: np.ndarray) -> np.ndarray:
        if "router" not in self.layers[layer]:  # a dense-MLP layer: nothing to guess
            return np.zeros((x.shape[0], self.cfg.n_experts))
        return self.router_probs(layer, rms_norm(x, self.layers[layer]["ffn_norm"], self.cfg.norm_eps))

    def _rope(self, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """Rotate-half ("neox") rotary on (n, heads, hd) at positions pos (n,)."""
        ang = pos[:, None].astype(np.float64) * self.inv_freq[None, :]  # (n, hd/2)
        cos, sin = np.cos(ang).astype(np.float32)[:, None, :], np.sin(ang).astype(np.float32)[:, None, :]
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

    def _attention(self, layer: int, h: np.ndarray, spans: list[tuple[KVCache, int, int]], pos: np.ndarray) -> np.ndarray:
        """h (N, d) holds the new tokens of every sequence; spans: (kv cache, first row, rows)."""
        cfg, w = self.cfg, self.layers[layer]
        n_all, hd, nh = h.shape[0], cfg.head_dim, cfg.n_heads
        q_all, k_all, v_all = blocks.qkv(cfg, w, h, spans)  # (N, nh, hd), (N, nkv, hd) x2: biases, q/k norms
        q_all, k_all = self._rope(q_all, pos), self._rope(k_all, pos)
        out = np.empty((n_all, nh * hd), np.float32)
        for kv, r0, n in spans:
            out[r0:r0 + n] = self._attend(layer, kv, q_all[r0:r0 + n], k_all[r0:r0 + n], v_all[r0:r0 + n], pos[r0:r0 + n])
        return per_span(w["o"], out, spans)

    def _attend(self, layer: int, kv: KVCache, q: np.ndarray, k: np.ndarray, v: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """One sequence: q (n, nh, hd), k/v (n, nkv, hd) at positions pos -> (n, nh * hd)."""
        cfg = self.cfg
        n, hd, nh, nkv = q.shape[0], cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
        start = int(pos[0])
        total = start + n
        kv.k[layer, start:total] = k
        kv.v[layer, start:total] = v
        keys, vals = kv.k[layer, :total], kv.v[layer, :total]  # (T, nkv, hd)
        if n == 1:
            out = np.empty((nh, hd), np.float32)
            _attend_one(np.ascontiguousarray(q[0]), keys, vals, start, cfg.sliding_window or 0, out)
            return out.reshape(1, nh * hd)
        group = nh // nkv
        qg = q.reshape(n, nkv, group, hd).transpose(1, 2, 0, 3)  # (nkv, group, n, hd)
        scores = qg @ keys.transpose(1, 2, 0)[:, None] / np.float32(np.sqrt(hd))  # (nkv, group, n, T)
        j = np.arange(total)[None, :]
        allowed = j <= pos[:, None]  # causal (n, T)
        if cfg.sliding_window:
            allowed &= j > pos[:, None] - cfg.sliding_window
        scores = np.where(allowed, scores, np.float32(-np.inf))
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        scores /= scores.sum(axis=-1, keepdims=True)
        out = scores @ vals.transpose(1, 0, 2)[:, None]  # (nkv, group, n, hd)
        return out.transpose(2, 0, 1, 3).reshape(n, nh * hd)

    def _moe(self, layer: int, x: np.ndarray, pos: np.ndarray, spans: list[tuple[KVCache, int, int]]) -> np.ndarray:
        cfg = self.cfg
        h = rms_norm(x, self.layers[layer]["ffn_norm"], cfg.norm_eps)
        probs = per_span(lambda rows: self.router_probs(layer, rows), h, spans)  # (n, E)
        k = cfg.n_experts_used
        chosen = np.argsort(-probs, axis=1, kind="stable")[:, :k]  # (n, k); ties -> lower index, like torch
        if self.routing_override is not None:  # benchmarks replay recorded or synthetic routing
            chosen = np.asarray(self.routing_override(layer, pos), dtype=np.int64).reshape(len(pos), k)
        weights = np.take_along_axis(probs, chosen, axis=1)
        if cfg.norm_topk_prob:
            weights = weights / weights.sum(axis=1, keepdims=True)
        weights = weights.astype(np.float32)
        if self.trace is not None:
            self.trace(pos, layer, chosen, weights)
        self.cache.record_routing(layer, chosen.ravel())
        self.prefetcher.observe(layer, chosen)
        experts = sorted({int(e) for e in chosen.ravel()})
        keys = [(layer, e) for e in experts]
        pending = self.cache.acquire(keys)  # demand reads start now, before the speculative ones
        # no guesses for a next layer without experts (a dense-MLP layer)
        guess = self.prefetcher.guess(layer, chosen, x, k) if cfg.is_moe_layer(layer + 1) else []
        if guess:
            self.cache.prefetch([(layer + 1, e) for e in guess], protect=keys)
        # per (token, choice) outputs summed in a fixed order afterwards, so the order in which
        # experts arrive from disk can never change the result
        contrib = np.zeros((x.shape[0], k, cfg.d_model), np.float32)
        for key, slot in pending:
            try:
                g, u, d = (self.store.tensor(slot, key, r) for r in ("gate", "up", "down"))
                # read once, computed per sequence: a sequence's result never depends on its neighbours
                for _, r0, n in spans:
                    tok, which = np.nonzero(chosen[r0:r0 + n] == key[1])
                    if len(tok) == 0:
                        continue
                    tok = tok + r0
                    y = swiglu_expert(np.ascontiguousarray(h[tok]), g, u, d, self.dtypes["gate"], self.dtypes["up"],
                                      self.dtypes["down"], cfg.d_ff, cfg.d_model)
                    contrib[tok, which] = y * weights[tok, which][:, None]
            finally:
                self.cache.release(key)
        out = contrib.sum(axis=1)
        if cfg.d_ff_shared:  # always resident, never routed (Qwen2-MoE)
            out = out + blocks.shared_expert(cfg, self.layers[layer], h, spans)
        return out

    def _ffn(self, layer: int, x: np.ndarray, pos: np.ndarray, spans: list[tuple[KVCache, int, int]]) -> np.ndarray:
        """The layer's feed-forward block: experts, or a resident dense SwiGLU MLP in a layer without them."""
        if self.cfg.is_moe_layer(layer):
            return self._moe(layer, x, pos, spans)
        return blocks.swiglu(self.layers[layer]["mlp"], rms_norm(x, self.layers[layer]["ffn_norm"], self.cfg.norm_eps), spans)

    # ------------------------------------------------------------------ forward
    def new_kv(self) -> KVCache:
        return KVCache(self.cfg)

    def forward_batch(self, batch: list[tuple[KVCache, np.ndarray]], all_logits: bool = False) -> list[np.ndarray]:
        """One step for several sequences: each (kv cache, new ids) appends its ids to its own cache.
        An expert needed by several sequences is read once; every computation runs on each
        sequence's rows separately, so a sequence gets bit-for-bit the logits it would get alone.
        Returns per sequence the logits (n, vocab) of every new position, or only of its last."""
        cfg = self.cfg
        spans, pos_parts, id_parts, r0 = [], [], [], 0
        for kv, ids in batch:
            n = len(ids)
            kv.ensure(kv.length + n)
            spans.append((kv, r0, n))
            pos_parts.append(np.arange(kv.length, kv.length + n))
            id_parts.append(np.asarray(ids, np.int64))
            r0 += n
        pos = np.concatenate(pos_parts)  # (N,)
        x = get_rows(self.embd.raw, self.embd.dtype, np.concatenate(id_parts), cfg.d_model)  # (N, d)
        for layer in range(cfg.n_layers):
            self.cache.note_layer(layer)
            x = x + self._attention(layer, rms_norm(x, self.layers[layer]["attn_norm"], cfg.norm_eps), spans, pos)
            x = x + self._ffn(layer, x, pos, spans)
        for kv, _, n in spans:
            kv.length += n
        out = []
        for _, a, n in spans:
            rows = x[a:a + n] if all_logits else x[a + n - 1:a + n]
            out.append(self.output(np.ascontiguousarray(rms_norm(rows, self.output_norm, cfg.norm_eps))))
        return out

    def forward(self, ids: np.ndarray, all_logits: bool = True) -> np.ndarray:
        """Append `ids` to the engine's own sequence; logits (n, vocab) of every new position (or the last)."""
        return self.forward_batch([(self.kv, ids)], all_logits=all_logits)[0]

    def reset(self) -> None:
        self.kv.length = 0
