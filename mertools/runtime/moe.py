"""The family-agnostic streaming MoE block: route, read the chosen experts through the cache (each once
per step, whatever number of tokens chose it), compute, and start reading the next layer's guesses.
With an `Approx` that is not exact, the family's choice is adjusted (approx.py: skipped choices,
resident substitutes) before anything is read; the trace, the cache's statistics and the prefetcher see
the adjusted choice. With stand-ins on, a missing expert of small share is read from the stand-ins' own
tier (a second, smaller store and cache) and computed in its low-bit type."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from ..dtypes import DTYPES, KIND
from ..families.base import Family
from ..families.pieces import choice_scores, expert_mlp
from ..families.weights import LayerWeights, Mlp
from ..kernels import int8
from ..kernels.experts8 import experts8
from ..kernels.gemm_kernels import GEMM_MIN_N
from ..kernels.matmul import layout_weight, swiglu_weights
from ..layout.config import ModelConfig
from ..layout.manifest import ExpertEntry
from . import approx as approx_mod
from .approx import Approx, ApproxStats
from .batch import Batch
from .cache import ExpertCache
from .hooks import ModelHooks
from .ops import RuntimeOps, glu_act
from .prefetch import AHEAD_CHANCE, Prefetcher
from .store import ExpertStore

ROLES = ("gate", "up", "down")
BIAS_ROLES = ("gate_bias", "up_bias", "down_bias")  # with config.expert_mlp_bias, in the same file


def _shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    return {"gate": (cfg.d_ff, cfg.d_model), "up": (cfg.d_ff, cfg.d_model), "down": (cfg.d_model, cfg.d_ff)}


def _int8(cfg: ModelConfig, entry: ExpertEntry) -> tuple[bool, bool, bool]:
    """Which of an expert's (gate, up, down) the 8-bit kernels take (`int8.takes`)."""
    shapes = _shapes(cfg)
    return tuple(int8.takes(entry.tensors[r].dtype, *shapes[r]) for r in ROLES)


def expert_packer(cfg: ModelConfig) -> Callable[[ExpertEntry, np.ndarray], None] | None:
    """The store's `prepare` for the 8-bit kernels: each tensor of a loaded slot they take prepared in place (a
    packed type packed), whichever piece computes the experts (`_expert` gives a family's own piece the prepared
    weights)."""
    shapes = _shapes(cfg)

    def prepare(entry: ExpertEntry, buf: np.ndarray) -> None:
        for role, fast in zip(ROLES, _int8(cfg, entry), strict=True):
            if fast:
                t = entry.tensors[role]
                int8.prepare(buf[t.offset:t.offset + t.nbytes].reshape(shapes[role][0], -1), t.dtype)

    return prepare


@dataclass(frozen=True)
class Tier:
    """Where a set of expert files is read from and kept: the experts, or their low-bit stand-ins."""

    cache: ExpertCache
    store: ExpertStore
    dtypes: dict[tuple[int, int], tuple[str, str, str]]  # each expert's (gate, up, down) types, looked up once
    int8: dict[tuple[int, int], tuple[bool, bool, bool]]  # which of them run on the 8-bit kernels (store prepared)
    # per role (gate, up, down): [byte offset in the slot, type code, row bytes, its bias's offset (-1: none)], for
    # experts8 and the compiled step
    geometry: dict[tuple[int, int], np.ndarray]  # int64 (3, 4)

    @classmethod
    def of(cls, cache: ExpertCache, store: ExpertStore, cfg: ModelConfig, kernels: str = "exact") -> Tier:
        """`kernels` "int8": each tensor the 8-bit kernels take runs on them, but a packed type's only if the store
        prepares (packs) the slots: not when they are mappings of the files."""
        def flags(e: ExpertEntry) -> tuple[bool, bool, bool]:
            if kernels != "int8":
                return (False, False, False)
            return tuple(f and (store.prepare is not None or DTYPES[e.tensors[r].dtype].int8_pack is None)
                         for r, f in zip(ROLES, _int8(cfg, e), strict=True))

        shapes = _shapes(cfg)

        def kind(e: ExpertEntry, role: str) -> int:  # a prepared slot's K type is packed (int8.prepared_kind)
            dtype = e.tensors[role].dtype
            if kernels == "int8" and store.prepare is not None and int8.takes(dtype, *shapes[role]):
                return int8.prepared_kind(dtype, *shapes[role])
            return KIND[dtype]

        def geometry(e: ExpertEntry) -> np.ndarray:
            return np.array([[e.tensors[r].offset, kind(e, r), DTYPES[e.tensors[r].dtype].row_bytes(shapes[r][1]),
                              e.tensors[b].offset if cfg.expert_mlp_bias else -1]
                             for r, b in zip(ROLES, BIAS_ROLES, strict=True)], np.int64)

        entries = store.entries.items()
        return cls(cache, store, {k: tuple(e.tensors[r].dtype for r in ROLES) for k, e in entries},
                   {k: flags(e) for k, e in entries}, {k: geometry(e) for k, e in entries})


class StreamingMoE:
    def __init__(self, family: Family, cfg: ModelConfig, cache: ExpertCache, store: ExpertStore, hooks: ModelHooks,
                 standins: Tier | None = None, kernels: str = "exact") -> None:
        self.family, self.cfg, self.cache, self.store, self.hooks = family, cfg, cache, store, hooks
        self.approx = hooks.approx or Approx()  # approximate routing; exact settings leave the routing untouched
        if self.approx.standin_share > 0 and standins is None:
            raise ValueError("standin_share needs the stand-ins' tier")
        self.approx_stats = ApproxStats()
        # the layer whose calls count tokens for the statistics (the first with experts)
        self._first_moe = next((i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)), 0)
        self.full = Tier.of(cache, store, cfg, kernels)  # files mix types layer by layer and role by role
        # a step of few rows whose experts are all resident runs them together (experts8), when the family's experts
        # are the standard piece's (plain SwiGLU, or pieces.glu with biases)
        self._fused = kernels == "int8" and family.pieces.expert_mlp is expert_mlp
        self.act = glu_act(cfg)  # experts8's, the same as the one-at-a-time path's (RuntimeOps.glu)
        self._ops = RuntimeOps(compiled=kernels == "int8")  # a family's expert piece on one sequence's rows
        self.standins = standins

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
        if self.approx.reroutes:
            chosen, weights, live = self._approximate(layer, w, scores, chosen, weights)
        weights = weights.astype(np.float32)
        if batch.observed:  # a warm-up step's routing is no part of the run
            self._observe(layer, batch.positions, chosen, weights, live, prefetcher)
        elif self.standins is not None:
            self.standins.cache.note_layer(layer)
        if self.hooks.experts is not None:  # computed elsewhere (expert shards): the same bits, summed here alike
            out = self.hooks.experts(layer, h, chosen, weights, live, batch).sum(axis=1)
            shared = pieces.shared_expert(cfg, w, h, ops)
            return out if shared is None else out + shared
        experts = sorted(set(chosen.ravel().tolist()))  # np.unique's list, without its Python
        low: list[int] = []  # computed with their stand-ins
        if self.standins is not None:
            low = self._standins(layer, chosen, weights, live)
            experts = [e for e in experts if e not in low]
        keys = [(layer, e) for e in experts]
        # every row on the 8-bit kernels (below GEMM_MIN_N rows), every expert resident: one call for them all
        fused = self._fusable(keys, len(h))
        # demand reads start now, before the speculative ones
        steps = [(self.full, self.cache.acquire(keys))]
        if low:
            steps.append((self.standins, self.standins.cache.acquire([(layer, e) for e in low])))
            if self.approx.standin_fill:  # the full experts for later tokens, as prefetches (called off if unneeded)
                self.cache.prefetch([(layer, e) for e in low], protect=keys)
        # no guesses for a next layer without experts (a dense-MLP layer)
        guess = prefetcher.guess(layer, chosen, x, chosen.shape[1]) if cfg.is_moe_layer(layer + 1) else []
        if guess:
            self._prefetch(layer + 1, guess, prefetcher.predicted_shares(layer, x, guess, chosen.shape[1])
                           if self.standins is not None else None, protect=keys)
        if self.standins is None:  # (stand-ins prefetch by their own rule)
            self._prefetch_ahead(layer, x, chosen.shape[1], prefetcher, keys, guess)
        # per (token, choice) outputs summed in a fixed order afterwards, so the order in which
        # experts arrive from disk can never change the result
        contrib = np.zeros((h.shape[0], chosen.shape[1], cfg.d_model), np.float32)
        for tier, pending in steps:
            self._run(tier, pending, fused and tier is self.full, h, chosen, weights, batch, contrib, live)
        out = contrib.sum(axis=1)
        shared = pieces.shared_expert(cfg, w, h, ops)
        return out if shared is None else out + shared

    def fetch(self, layer: int, positions: np.ndarray, chosen: np.ndarray, weights: np.ndarray, x: np.ndarray,
              observed: bool, prefetcher: Prefetcher) -> None:
        """What `__call__` does around the experts' kernels for a layer whose routing the compiled decode step made
        (runtime/fused.py: chosen, weights (N, k), x (N, d_model) its input plus its attention), without computing them:
        the routing observed, the experts looked up and waited for (read if needed), the next layer's guesses
        prefetched. The compiled step then computes them, resident."""
        self.cache.note_layer(layer)
        if observed:
            self._observe(layer, positions, chosen, weights, None, prefetcher)
        keys = [(layer, e) for e in sorted(set(chosen.ravel().tolist()))]
        pending = self.cache.acquire(keys)
        guess = prefetcher.guess(layer, chosen, x, chosen.shape[1]) if self.cfg.is_moe_layer(layer + 1) else []
        if guess:
            self.cache.prefetch([(layer + 1, e) for e in guess], protect=keys)
        self._prefetch_ahead(layer, x, chosen.shape[1], prefetcher, keys, guess)
        for key, _ in pending:
            self.cache.release(key)

    def _fusable(self, keys: list[tuple[int, int]], n_rows: int) -> bool:
        """Whether these experts' rows run in one call (experts8): the 8-bit kernels take every one of them, they are
        all resident, and the rows are few."""
        return bool(self._fused and keys and n_rows < GEMM_MIN_N and all(all(self.full.int8[k]) for k in keys)
                    and self.cache.all_resident(keys))

    def _run(self, tier: Tier, pending: Iterator[tuple[tuple[int, int], int]], fused: bool, h: np.ndarray,
             chosen: np.ndarray, weights: np.ndarray, batch: Batch, contrib: np.ndarray, live: np.ndarray | None) -> None:
        """Each acquired expert's contributions into contrib, released as it is done: all in one call when `fused`
        (every one resident, few rows), else one by one in the order they arrive."""
        if fused:
            got = list(pending)  # resident: no wait
            try:
                self._experts_fused(got, h, chosen, weights, contrib, live)
            finally:
                for key, _ in got:
                    tier.cache.release(key)
            return
        for key, slot in pending:
            try:
                self._expert(tier, key, slot, h, chosen, weights, batch, contrib, live)
            finally:
                tier.cache.release(key)

    def contributions(self, layer: int, experts: list[int], h: np.ndarray, chosen: np.ndarray, weights: np.ndarray,
                      batch: Batch, live: np.ndarray | None) -> np.ndarray:
        """contrib (N, k, d_model): the weighted outputs of `experts` (of `layer`) for the (row, choice)s that chose
        them, zero elsewhere, as the single-process step computes them (what an expert shard does for the driver);
        read on demand, no prefetch."""
        keys = [(layer, e) for e in experts]
        fused = self._fusable(keys, len(h))
        contrib = np.zeros((h.shape[0], chosen.shape[1], self.cfg.d_model), np.float32)
        self._run(self.full, self.cache.acquire(keys), fused, h, chosen, weights, batch, contrib, live)
        return contrib

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

    def _prefetch(self, layer: int, guess: list[int], shares: np.ndarray | None, protect: list[tuple[int, int]]) -> None:
        """Start reading the guesses for `layer`: each the way it would be read if chosen, the full expert, or its
        stand-in when its predicted share is below standin_share and the full expert is not held."""
        if shares is None:
            self.cache.prefetch([(layer, e) for e in guess], protect=protect)
            return
        held = set(self.cache.held(layer))
        cut = self.approx.standin_share
        low = [e for e, s in zip(guess, shares, strict=True) if e not in held and (s < cut or cut >= 1)]
        self.cache.prefetch([(layer, e) for e in guess if e not in low], protect=protect)
        self.standins.cache.prefetch([(layer, e) for e in low])

    def _prefetch_ahead(self, layer: int, x: np.ndarray, k: int, prefetcher: Prefetcher, keys: list[tuple[int, int]],
                        guess: list[int]) -> None:
        """While no read is in flight, one read of a guess for a layer beyond the next (prefetch depth > 1): an
        expert read takes several layers' compute, so a guess one layer ahead alone leaves the disk idle and then
        waits. Guessed only when the cache cannot hold every expert and the disk is idle (the routers cost); this
        layer's experts (`keys`) and the next layer's guesses are never its victims."""
        if not self.cache.learns or self.cache.busy():
            return
        for ahead, experts in prefetcher.guess_ahead(layer, x, k):  # a router for each layer looked at
            wanted = [(ahead, e) for e in experts]
            if not self.cache.holds(wanted):
                self.cache.prefetch_idle(wanted, AHEAD_CHANCE, protect=keys + [(layer + 1, e) for e in guess])
                return

    def _standins(self, layer: int, chosen: np.ndarray, weights: np.ndarray, live: np.ndarray | None) -> list[int]:
        """The experts of this step to compute with their stand-ins (approx.standin_choices), counted."""
        held = np.zeros(self.cfg.n_experts, bool)
        held[self.cache.held(layer)] = True
        low, served = approx_mod.standin_choices(chosen, weights, live, held, self.approx.standin_share)
        st = self.approx_stats
        if layer == self._first_moe and not self.approx.reroutes:  # else _approximate counts the tokens
            st.tokens += len(chosen)
        st.standins += served
        return low

    def _observe(self, layer: int, positions: np.ndarray, chosen: np.ndarray, weights: np.ndarray,
                 live: np.ndarray | None, prefetcher: Prefetcher) -> None:
        """The step's routing to the trace, the routing history, the caches' and the prefetcher's estimates."""
        if self.hooks.trace is not None:
            self.hooks.trace(positions, layer, chosen, weights)
        self.cache.record_routing(layer, chosen.ravel())
        if self.hooks.history is not None:
            self.hooks.history.record(layer, chosen, live)
        if self.standins is not None:  # the stand-ins' cache learns the same usage (its policy's estimates)
            self.standins.cache.note_layer(layer)
            self.standins.cache.record_routing(layer, chosen.ravel())
        prefetcher.observe(layer, chosen)

    def _experts_fused(self, got: list[tuple[tuple[int, int], int]], h: np.ndarray, chosen: np.ndarray,
                       weights: np.ndarray, contrib: np.ndarray, live: np.ndarray | None) -> None:
        """Every (row, choice) of the step's resident experts in two parallel regions (experts8): each row alone, the
        same bits as `_expert` computing it on the 8-bit kernels."""
        tier = self.full
        rows, cols = [], []
        for key, _ in got:
            hit = chosen == key[1]
            t, c = np.nonzero(hit if live is None else hit & live)
            rows.append(t)
            cols.append(c)
        counts = [len(t) for t in rows]
        t, c = np.concatenate(rows), np.concatenate(cols)
        if len(t) == 0:
            return
        geo = np.repeat(np.stack([tier.geometry[key] for key, _ in got]), counts, axis=0)  # (pairs, roles, 4)
        base = np.repeat(tier.store.slot_addr[[slot for _, slot in got]], counts)[:, None]  # each pair's slot address
        bias = np.where(geo[:, :, 3] >= 0, geo[:, :, 3] + base, 0)  # the biases' addresses (0: none)
        y = experts8(np.ascontiguousarray(h, np.float32), t, geo[:, :, 0] + base, np.ascontiguousarray(geo[:, :, 1]),
                     np.ascontiguousarray(geo[:, :, 2]), self.cfg.d_ff, bias, self.act)
        contrib[t, c] = y * weights[t, c][:, None]

    def _expert(self, tier: Tier, key: tuple[int, int], slot: int, h: np.ndarray, chosen: np.ndarray, weights: np.ndarray,
                batch: Batch, contrib: np.ndarray, live: np.ndarray | None = None) -> None:
        """One resident expert applied to the rows that chose it, sequence by sequence: read once,
        computed per sequence, so a sequence's result never depends on its neighbours."""
        cfg, store = self.cfg, tier.store
        g, u, d = (store.tensor(slot, key, r) for r in ROLES)
        dg, du, dd = tier.dtypes[key]
        pg, pu, pd = tier.int8[key]
        # the slot's bytes, sized by the manifest and prepared by the store: shaped, not checked again per call
        kg, ku, kd = (int(k) for k in tier.geometry[key][:, 1])  # the type codes the kernels take the slot by
        wg, wu, wd = (layout_weight(g, dg, cfg.d_ff, cfg.d_model, pg, kg), layout_weight(u, du, cfg.d_ff, cfg.d_model, pu, ku),
                      layout_weight(d, dd, cfg.d_model, cfg.d_ff, pd, kd))
        mlp = None
        if not cfg.plain_swiglu:  # expert biases and/or a clamped GLU: the family's expert piece on those weights
            biases = {r: store.tensor(slot, key, r).view(np.float32) for r in BIAS_ROLES} if cfg.expert_mlp_bias else {}
            mlp = Mlp(wg, wu, wd, **biases)
        for s in batch.seqs:
            hit = chosen[s.rows] == key[1]
            tok, which = np.nonzero(hit if live is None else hit & live[s.rows])
            if len(tok) == 0:
                continue
            tok = tok + s.start
            # rows apart (speculative verification): each token as its own decode step computes it
            for t, c in [(tok[i:i + 1], which[i:i + 1]) for i in range(len(tok))] if s.apart else [(tok, which)]:
                x = np.ascontiguousarray(h[t], np.float32)
                if mlp is None:
                    y = swiglu_weights(x, wg, wu, wd)
                else:  # one sequence's rows at a time already: ops without a batch
                    y = self.family.pieces.expert_mlp(cfg, mlp, x, self._ops)
                contrib[t, c] = y * weights[t, c][:, None]
