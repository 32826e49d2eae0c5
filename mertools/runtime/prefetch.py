"""Guessing the next layer's experts while this layer computes. No I/O, no numba.

- lookahead: apply layer L+1's router to layer L's hidden state (the residual stream changes
  little between adjacent layers, so the next router's choice on it is a good guess); with depth D > 1
  also layers L+2..L+D's routers, whose weaker guesses are read only while the disk is idle;
- markov: a transition model learned online, experts chosen at L -> experts chosen at L+1;
- none.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

PREFETCH_MODES = ("lookahead", "markov", "none")
PREFETCH_DEPTH = 8  # layers the lookahead guesses ahead by default (docs/BENCHMARKS.md, "Full size: notes")
# the chance a guess two or more layers ahead is used, as the cache policy weighs it against what it would evict
AHEAD_CHANCE = 0.5
# (layer, hidden (n, d_model)) -> router probabilities (n, n_experts) of that layer
RouterFn = Callable[[int, np.ndarray], np.ndarray]


class Prefetcher:
    """Base: guesses nothing."""

    mode = "none"

    def guess(self, layer: int, chosen: np.ndarray, hidden: np.ndarray, k: int) -> list[int]:
        """Experts of layer `layer + 1` to read now; `chosen` (n, top_k) are layer `layer`'s choices."""
        return []

    def guess_ahead(self, layer: int, hidden: np.ndarray, k: int) -> Iterator[tuple[int, list[int]]]:
        """(layer, experts) guesses for layers `layer + 2` onwards, nearest layer first, each layer's most wanted
        first, computed as they are asked for: what an idle disk may read after the next layer's guesses
        (ExpertCache.prefetch_idle)."""
        return iter(())

    def observe(self, layer: int, chosen: np.ndarray) -> None:
        """Layer `layer` chose `chosen` (n, top_k)."""

    def predicted_shares(self, layer: int, hidden: np.ndarray, experts: list[int], k: int) -> np.ndarray | None:
        """Each guessed expert's predicted share of its tokens' mixture at layer `layer + 1` (the largest over the
        tokens), or None when this prefetcher cannot tell (stand-ins then prefetch the full experts)."""
        return None


class LookaheadPrefetcher(Prefetcher):
    mode = "lookahead"

    def __init__(self, router: RouterFn, n_layers: int, extra: int = 0, depth: int = 1) -> None:
        if depth < 1:
            raise ValueError(f"prefetch depth must be at least 1, got {depth}")
        self.router, self.n_layers, self.extra, self.depth = router, n_layers, extra, depth

    def guess(self, layer: int, chosen: np.ndarray, hidden: np.ndarray, k: int) -> list[int]:
        if layer + 1 >= self.n_layers:
            return []
        probs = self.router(layer + 1, hidden)  # (n, n_experts)
        want = k + self.extra
        if len(probs) == 1:  # one token (decode): its top choices, most-wanted first (what the union below gives)
            order = np.argsort(-probs[0], kind="stable")[:want]
            return [int(e) for e in order if probs[0, e] > 0]
        # for a batch (prefill), the union of each token's top choices, most-wanted first
        order = np.argsort(-probs, axis=1, kind="stable")[:, :want]  # (n, want)
        score = np.zeros(probs.shape[1])
        np.add.at(score, order.ravel(), np.take_along_axis(probs, order, axis=1).ravel())
        return [int(e) for e in np.argsort(-score, kind="stable") if score[e] > 0]

    def guess_ahead(self, layer: int, hidden: np.ndarray, k: int) -> Iterator[tuple[int, list[int]]]:
        for ahead in range(layer + 2, min(layer + self.depth, self.n_layers - 1) + 1):
            probs = self.router(ahead, hidden)  # (n, n_experts); zeros for a layer without experts
            order = np.argsort(-probs, axis=1, kind="stable")[:, :k]  # each token's top choices
            experts = [int(e) for e in dict.fromkeys(order.T.ravel().tolist()) if probs[:, e].max() > 0]
            if experts:  # every token's first choice, then every token's second...
                yield ahead, experts

    def predicted_shares(self, layer: int, hidden: np.ndarray, experts: list[int], k: int) -> np.ndarray | None:
        if layer + 1 >= self.n_layers or not experts:
            return None
        probs = np.asarray(self.router(layer + 1, hidden), np.float64)  # (n, n_experts)
        top = -np.sort(-probs, axis=1)[:, :k].sum(axis=1, keepdims=True)  # each token's routed mass
        share = np.divide(probs, top, out=np.zeros_like(probs), where=top > 0)
        return share[:, experts].max(axis=0)


class MarkovPrefetcher(Prefetcher):
    mode = "markov"

    def __init__(self, n_layers: int, n_experts: int, decay: float = 0.999) -> None:
        # counts[l, i, j]: how often expert i at layer l was followed by expert j at layer l + 1
        self.counts = np.zeros((n_layers, n_experts, n_experts))
        self.prev: dict[int, np.ndarray] = {}
        self.decay = decay

    def observe(self, layer: int, chosen: np.ndarray) -> None:
        if layer > 0 and layer - 1 in self.prev:
            c = self.counts[layer - 1]
            c *= self.decay
            for prev_row, row in zip(self.prev[layer - 1], chosen, strict=False):
                for i in prev_row:
                    c[i, row] += 1.0
        self.prev[layer] = np.asarray(chosen)

    def guess(self, layer: int, chosen: np.ndarray, hidden: np.ndarray, k: int) -> list[int]:
        if layer + 1 >= self.counts.shape[0]:
            return []
        score = self.counts[layer][np.asarray(chosen).ravel()].sum(axis=0)  # (n_experts,)
        if not score.any():
            return []
        n_tokens = max(1, len(chosen))
        return [int(e) for e in np.argsort(-score, kind="stable")[: k * n_tokens] if score[e] > 0]


def make_prefetcher(mode: str, router: RouterFn, n_layers: int, n_experts: int, depth: int = 1) -> Prefetcher:
    """`depth`: layers the lookahead guesses ahead (1: the next layer only)."""
    if mode == "lookahead":
        return LookaheadPrefetcher(router, n_layers, depth=depth)
    if mode == "markov":
        return MarkovPrefetcher(n_layers, n_experts)
    if mode == "none":
        return Prefetcher()
    raise ValueError(f"prefetch must be one of {PREFETCH_MODES}, got {mode!r}")
