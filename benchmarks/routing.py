"""Routing traces for the beyond-RAM benchmark, and replaying them through cache policies.

Synthetic traces stand in for a trained model's routing (documented as such): per layer a mildly
skewed popularity (Dirichlet), and temporal locality (a token reuses one of the previous token's
experts with probability `stickiness`), the two properties a cache can exploit. Policies are the
runtime's own ExpertCache driven by an instant fake loader; Belady's rule (evict the expert whose
next use is farthest) gives the optimum at the same capacity.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path

import numpy as np

from mertools.runtime.cache import ExpertCache
from mertools.runtime.prefetch import Prefetcher, RouterFn, make_prefetcher

Trace = list[list[list[int]]]  # token -> layer -> experts chosen


def synthetic_trace(n_tokens: int, n_layers: int, n_experts: int, k: int, seed: int = 0,
                    concentration: float = 4.0, stickiness: float = 0.3) -> Trace:
    rng = np.random.default_rng(seed)
    pops = rng.dirichlet(np.full(n_experts, concentration), size=n_layers)  # (L, E)
    trace: Trace = []
    prev: list[list[int]] | None = None
    for _ in range(n_tokens):
        token = []
        for layer in range(n_layers):
            chosen: list[int] = []
            if prev is not None and rng.random() < stickiness:
                chosen.append(int(rng.choice(prev[layer])))
            p = pops[layer].copy()
            p[chosen] = 0
            chosen += [int(e) for e in rng.choice(n_experts, k - len(chosen), replace=False, p=p / p.sum())]
            token.append(chosen)
        trace.append(token)
        prev = token
    return trace


def trace_from_records(records: Sequence[dict], n_layers: int) -> Trace:
    """A `run --trace-out` file's records -> Trace (positions in order)."""
    by_pos: dict[int, list[list[int]]] = {}
    for r in records:
        if "experts" in r:  # not the closing reads record
            by_pos.setdefault(r["token"], [[] for _ in range(n_layers)])[r["layer"]] = list(r["experts"])
    return [by_pos[p] for p in sorted(by_pos)]


def routing_stats(trace: Trace, n_experts: int) -> list[dict]:
    n_layers = len(trace[0])
    out = []
    for layer in range(n_layers):
        c = np.bincount([e for t in trace for e in t[layer]], minlength=n_experts).astype(float)
        p = c[c > 0] / c.sum()
        out.append({"layer": layer, "distinct": int((c > 0).sum()), "entropy_bits": float(-(p * np.log2(p)).sum())})
    return out


class _Instant:
    """An executor that runs the loader at once: policy replay without I/O or threads."""

    def submit(self, fn, *args):  # noqa: ANN001, ANN201
        f: Future = Future()
        fn(*args)
        f.set_result(None)
        return f


def replay_policy(trace: Trace, n_experts: int, slots: int, policy: str) -> float:
    cache = ExpertCache(slots, len(trace[0]), n_experts, lambda key, slot, cancel: None, _Instant(), policy=policy)
    return _drive(cache, trace)


def _drive(cache: ExpertCache, trace: Trace) -> float:
    """Replay the trace's lookups through the cache, as the forward pass makes them; the hit rate."""
    for token in trace:
        for layer, experts in enumerate(token):
            cache.note_layer(layer)
            cache.record_routing(layer, experts)
            for key, _ in cache.acquire([(layer, e) for e in experts]):
                cache.release(key)
    return cache.stats.hit_rate


def belady(trace: Trace, slots: int, count_from: int = 0) -> float:
    """Optimal hit rate: on a miss with a full cache, evict the resident expert used farthest ahead
    (never one needed by the current step). Lookups of tokens before `count_from` warm the cache uncounted."""
    steps = [[(la, e) for e in experts] for token in trace for la, experts in enumerate(token)]
    first = sum(len(token) for token in trace[:count_from])  # steps are (token, layer) pairs
    uses: dict[tuple[int, int], list[int]] = {}
    for i, step in enumerate(steps):
        for key in step:
            uses.setdefault(key, []).append(i)
    ptr = dict.fromkeys(uses, 0)
    resident: set[tuple[int, int]] = set()
    hits = lookups = 0
    for i, step in enumerate(steps):
        for key in step:
            ptr[key] += 1  # uses[key][ptr[key]] is now this key's next use after this step
        for key in step:
            lookups += i >= first
            if key in resident:
                hits += i >= first
                continue
            if len(resident) >= slots:
                def next_use(k: tuple[int, int]) -> int:
                    u = uses[k]
                    return u[ptr[k]] if ptr[k] < len(u) else 1 << 60
                victim = max((k for k in resident if k not in step), key=next_use)
                resident.remove(victim)
            resident.add(key)
    return hits / lookups


def _next_visit_odds(trace: Trace, n_experts: int) -> np.ndarray:
    """(L, E, 2): each expert's probability of being chosen at its layer's next visit, given whether it was chosen
    at the last one, counted over the whole trace (what no online policy has)."""
    n_layers = len(trace[0])
    hit = np.zeros((n_layers, n_experts, 2))
    seen = np.zeros((n_layers, n_experts, 2))
    for prev, cur in zip(trace, trace[1:], strict=False):
        for layer in range(n_layers):
            for e in range(n_experts):
                was = int(e in prev[layer])
                seen[layer, e, was] += 1
                hit[layer, e, was] += e in cur[layer]
    return np.maximum(hit / np.maximum(seen, 1), 1e-3)


def best_online(trace: Trace, n_experts: int, slots: int) -> float:
    """Hit rate of the "lfd" rule (keep the highest p / distance) fed with statistics no online policy
    has: each expert's probability of being chosen at its layer's next visit, given whether it was
    chosen at the last one, counted over the whole trace. A ceiling for policies that predict from
    frequency and recency, as the runtime's does; the gap to Belady is what knowing the future buys."""
    n_layers = len(trace[0])
    q = _next_visit_odds(trace, n_experts)

    class Oracle(ExpertCache):
        def _score(self, e) -> float:  # noqa: ANN001
            layer, expert = e.key
            distance = (layer - self.current_layer) % self.n_layers or self.n_layers
            return float(q[layer, expert, int(self.last_chosen[layer, expert])]) / distance

    return _drive(Oracle(slots, n_layers, n_experts, lambda key, slot, cancel: None, _Instant()), trace)


def routing_known(trace: Trace, n_experts: int, slots: int, tokens: int) -> float:
    """Hit rate of the "lfd" rule when, from each token's first layer on, the whole routing of that token and the
    next tokens - 1 is known (a predictor's ceiling): an expert chosen within them scores 1 / its distance in layer
    steps, one not chosen there `best_online`'s odds at its first visit past them over that distance. With every
    token known this is Belady's rule (tests/test_routing.py); tokens=1 is what predicting a token's routing at its
    start could give, tokens=2 what knowing the next token's one token early could."""
    n_layers = len(trace[0])
    q = _next_visit_odds(trace, n_experts)
    at = [0]  # the token being replayed

    class Known(ExpertCache):
        def _score(self, e) -> float:  # noqa: ANN001
            layer, expert = e.key
            t, now = at[0], at[0] * n_layers + self.current_layer
            for u in range(t, min(t + tokens, len(trace))):
                if u * n_layers + layer > now and expert in trace[u][layer]:
                    return 1.0 / (u * n_layers + layer - now)
            u = t + tokens  # the first visit of its layer past the known tokens
            if u >= len(trace):
                return 0.0
            was = int(expert in trace[u - 1][layer])
            return float(q[layer, expert, was]) / (u * n_layers + layer - now)

    cache = Known(slots, n_layers, n_experts, lambda key, slot, cancel: None, _Instant())
    for t, token in enumerate(trace):
        at[0] = t
        _drive(cache, [token])
    return cache.stats.hit_rate


class RoutingRecorder:
    """A trace hook (`Engine.open(trace=...)`): per position, each layer's chosen experts. Switched off with
    `active = False` (a benchmark's second, timed pass over the same stream need not pay for it)."""

    def __init__(self, n_layers: int) -> None:
        self.n_layers, self.active, self.pos = n_layers, True, 0
        self.chosen: dict[int, list[list[int]]] = {}

    def __call__(self, pos: np.ndarray, layer: int, experts: np.ndarray, weights: np.ndarray) -> None:
        if not self.active:
            return
        for p, row in zip(pos.tolist(), experts.tolist(), strict=True):
            self.chosen.setdefault(p, [[] for _ in range(self.n_layers)])[layer] = row
        self.pos = int(pos[-1])

    def trace(self) -> Trace:
        return [self.chosen[p] for p in sorted(self.chosen)]


class GuessRecorder(Prefetcher):
    """Wraps a prefetcher and keeps its guesses of decode steps, per position (from `recorder`) and layer;
    prefill guesses are unions over the prompt, so not kept."""

    def __init__(self, inner: Prefetcher, recorder: RoutingRecorder) -> None:
        self.inner, self.recorder, self.mode = inner, recorder, inner.mode
        self.guesses: dict[int, list[list[int]]] = {}

    def observe(self, layer: int, chosen: np.ndarray) -> None:
        self.inner.observe(layer, chosen)

    def guess(self, layer: int, chosen: np.ndarray, hidden: np.ndarray, k: int) -> list[int]:
        g = self.inner.guess(layer, chosen, hidden, k)
        if len(chosen) == 1:
            self.guesses.setdefault(self.recorder.pos, [[] for _ in range(self.recorder.n_layers)])[layer] = list(g)
        return g


def record_trained_routing(layout_dir: str | Path, n_tokens: int, seed: int, prompt: str = "ROMEO:") -> dict:
    """Generate `n_tokens` with the trained fixture (sampled, temperature 1) and record, per position and
    layer, the experts its router chose and the experts its lookahead prefetcher guessed for the next
    layer (the next layer's router applied to this layer's hidden state)."""
    from mertools.layout import Layout
    from mertools.runtime.engine import Engine

    cfg = Layout.open(layout_dir).manifest.config
    recorder = RoutingRecorder(cfg.n_layers)
    made: list[GuessRecorder] = []

    def lookahead(router: RouterFn) -> Prefetcher:
        made.append(GuessRecorder(make_prefetcher("lookahead", router, cfg.n_layers, cfg.n_experts), recorder))
        return made[-1]

    with Engine.open(layout_dir, prefetch=lookahead, trace=recorder) as eng:
        text = "".join(t.text for t in eng.generate(prompt, max_tokens=n_tokens, temperature=1.0, seed=seed))
    guesses = made[0].guesses
    positions = sorted(recorder.chosen)
    return {"trace": recorder.trace(),
            "guesses": [guesses.get(p, [[] for _ in range(cfg.n_layers)]) for p in positions],
            "text": text}


def lookahead_accuracy(trace: Trace, guesses: list[list[list[int]]]) -> tuple[float, float]:
    """Precision and recall of recorded next-layer guesses against the next layer's actual choice."""
    right = guessed = needed = 0
    for token, g in zip(trace, guesses, strict=True):
        for layer in range(len(token) - 1):
            if not g[layer]:
                continue
            want = set(token[layer + 1])
            right += len(want & set(g[layer]))
            guessed += len(g[layer])
            needed += len(want)
    return (right / guessed if guessed else 0.0), (right / needed if needed else 0.0)


class Replay:
    """Drives a benchmark engine with recorded routing: `override` is a routing override
    (`Engine.open(routing_override=...)`) and `prefetcher` a prefetcher factory (`Engine.open(prefetch=...)`)
    whose guesses are the ones recorded for the same position and layer."""

    def __init__(self, trace: Trace, guesses: list[list[list[int]]] | None = None) -> None:
        self.trace, self.guesses, self.pos = trace, guesses, 0

    def override(self, layer: int, pos: np.ndarray) -> np.ndarray:
        self.pos = int(pos[-1])
        return np.array([self.trace[int(p) % len(self.trace)][layer % len(self.trace[0])] for p in pos])

    def prefetcher(self, router: RouterFn | None = None) -> Prefetcher:
        """A factory: the model's own router is not used, the recorded guesses stand in for it."""
        replay = self

        class Recorded(Prefetcher):
            mode = "lookahead (recorded)"

            def guess(self, layer: int, chosen: np.ndarray, hidden: np.ndarray, k: int) -> list[int]:
                g = replay.guesses
                if g is None or layer + 1 >= len(g[0]):
                    return []
                return list(g[replay.pos % len(g)][layer])

        return Recorded()


def main() -> None:
    """Expert reads a token of each rule on synthetic traces of a shape (the exact mode's ceilings, docs/BENCHMARKS.md
    "Full size: notes"): `python benchmarks/routing.py --layers 32 --experts 8 --k 2 --slots 49 112`."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=120)
    ap.add_argument("--slots", type=int, nargs="+", default=[49, 112])
    ap.add_argument("--stickiness", type=float, nargs="+", default=[0.3, 0.5])
    ap.add_argument("--concentration", type=float, default=20.0)
    a = ap.parse_args()
    print("| stickiness | slots | lfd (runtime) | best_online | this token known | and the next | Belady |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for stick in a.stickiness:
        tr = synthetic_trace(a.tokens, a.layers, a.experts, a.k, seed=1, concentration=a.concentration, stickiness=stick)
        for slots in a.slots:
            hits = (replay_policy(tr, a.experts, slots, "lfd"), best_online(tr, a.experts, slots),
                    routing_known(tr, a.experts, slots, 1), routing_known(tr, a.experts, slots, 2), belady(tr, slots))
            print(f"| {stick:g} | {slots} | " + " | ".join(f"{(1 - h) * a.layers * a.k:.1f}" for h in hits) + " |", flush=True)


if __name__ == "__main__":
    main()
