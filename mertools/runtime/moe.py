"""The family-agnostic streaming MoE block: route, read the chosen experts through the cache (each once
per step, whatever number of tokens chose it), compute, and start reading the next layer's guesses.
With an `Approx` that is not exact, the family's choice is adjusted (approx.py: skipped choices,
resident substitutes) before anything is read; the trace, the cache's statistics and the prefetcher see
the adjusted choice."""

from __future__ import annotations

import numpy as np

from ..families.base import Family
from ..families.pieces import choice_scores
from ..families.weights import LayerWeights, Mlp
from ..kernels.matmul import swiglu_expert
from ..layout.config import ModelConfig
from . import approx as approx_mod
from .approx import Approx, ApproxStats
from .batch import Batch
from .cache import ExpertCache
from .hooks import ModelHooks
from .ops import Linear, RuntimeOps
from .prefetch import Prefetcher
from .store import ExpertStore

ROLES = ("gate", "up", "down")
BIAS_ROLES = ("gate_bias", "up_bias", "down_bias")  # with config.expert_mlp_bias, in the same file


class StreamingMoE:
    def __init__(self, family: Family, cfg: ModelConfig, cache: ExpertCache, store: ExpertStore, hooks: ModelHooks) -> None:
        self.family, self.cfg, self.cache, self.store, self.hooks = family, cfg, cache, store, hooks
        self.approx = hooks.approx or Approx()  # approximate routing; exact settings leave the routing untouched
        self.approx_stats = ApproxStats()
        # the layer whose calls count tokens for the statistics (the first with experts)
        self._first_moe = next((i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)), 0)
        # each expert tensor's own type (files mix them layer by layer and role by role), looked up once
        self.dtypes = {(e.layer, e.expert): tuple(e.tensors[r].dtype for r in ROLES) for e in store.manifest.experts}

    def __call__(self, layer: int, w: LayerWeights, h: np.ndarray, x: np.ndarray, batch: Batch, ops: RuntimeOps,
                 prefetcher: Prefetcher) -> np.ndarray:
        """h (N, d_model): the layer's normalised hidden states; x: its input (for the prefetch guess)."""
        cfg, pieces = self.cfg, self.family.pieces
        scores = pieces.router_scores(cfg, w, h, ops)  # (N, n_experts)
        override = None
        if self.hooks.routing_override is not None:  # benchmarks replay recorded or synthetic routing
            override = np.asarray(self.hooks.routing_override(layer, batch.positions), np.int64).reshape(len(h), -1)
        chosen, weights = pieces.select_experts(cfg, w, scores, override)  # (N, k) each
        live = None  # (N, k') bool where approximate routing left slots that only pad a row
        if not self.approx.exact:
            chosen, weights, live = self._approximate(layer, w, scores, chosen, weights)
        weights = weights.astype(np.float32)
        if self.hooks.trace is not None:
            self.hooks.trace(batch.positions, layer, chosen, weights)
        self.cache.record_routing(layer, chosen.ravel())
        prefetcher.observe(layer, chosen)
        keys = [(layer, int(e)) for e in np.unique(chosen)]
        pending = self.cache.acquire(keys)  # demand reads start now, before the speculative ones
        # no guesses for a next layer without experts (a dense-MLP layer)
        guess = prefetcher.guess(layer, chosen, x, chosen.shape[1]) if cfg.is_moe_layer(layer + 1) else []
        if guess:
            self.cache.prefetch([(layer + 1, e) for e in guess], protect=keys)
        # per (token, choice) outputs summed in a fixed order afterwards, so the order in which
        # experts arrive from disk can never change the result
        contrib = np.zeros((h.shape[0], chosen.shape[1], cfg.d_model), np.float32)
        for key, slot in pending:
            try:
                self._expert(key, slot, h, chosen, weights, batch, contrib, live)
            finally:
                self.cache.release(key)
        out = contrib.sum(axis=1)
        shared = pieces.shared_expert(cfg, w, h, ops)
        return out if shared is None else out + shared

    def _approximate(self, layer: int, w: LayerWeights, scores: np.ndarray, chosen: np.ndarray, weights: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The approximate routing of this step (approx.apply), and its counts in `approx_stats`."""
        cfg, a, select = self.cfg, self.approx, self.family.pieces.select_experts
        resident = np.zeros(cfg.n_experts, bool)
        choice = scores
        if a.resident_delta > 0:
            resident[self.cache.held(layer)] = True
            choice = choice_scores(cfg, w, scores)
        r = approx_mod.apply(a, chosen, weights, scores, choice, resident,
                             lambda rows, c: select(cfg, w, scores[rows], c)[1])
        st = self.approx_stats
        if layer == self._first_moe:
            st.tokens += len(chosen)
        st.dropped += r.dropped
        st.substituted += r.substituted
        return r.chosen, r.weights, None if r.live.all() else r.live

    def _expert(self, key: tuple[int, int], slot: int, h: np.ndarray, chosen: np.ndarray, weights: np.ndarray,
                batch: Batch, contrib: np.ndarray, live: np.ndarray | None = None) -> None:
        """One resident expert applied to the rows that chose it, sequence by sequence: read once,
        computed per sequence, so a sequence's result never depends on its neighbours."""
        cfg = self.cfg
        g, u, d = (self.store.tensor(slot, key, r) for r in ROLES)
        dg, du, dd = self.dtypes[key]
        mlp = None
        if not cfg.plain_swiglu:  # expert biases and/or a clamped GLU: the family's expert piece on the slot's bytes
            biases = {r: self.store.tensor(slot, key, r).view(np.float32) for r in BIAS_ROLES} if cfg.expert_mlp_bias else {}
            mlp = Mlp(Linear(g, dg, cfg.d_ff, cfg.d_model), Linear(u, du, cfg.d_ff, cfg.d_model),
                      Linear(d, dd, cfg.d_model, cfg.d_ff), **biases)
        for s in batch.seqs:
            hit = chosen[s.rows] == key[1]
            tok, which = np.nonzero(hit if live is None else hit & live[s.rows])
            if len(tok) == 0:
                continue
            tok = tok + s.start
            x = np.ascontiguousarray(h[tok])
            if mlp is None:
                y = swiglu_expert(x, g, u, d, dg, du, dd, cfg.d_ff, cfg.d_model)
            else:  # one sequence's rows at a time already: ops without a batch
                y = self.family.pieces.expert_mlp(cfg, mlp, x, RuntimeOps())
            contrib[tok, which] = y * weights[tok, which][:, None]
