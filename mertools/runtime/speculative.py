"""Speculative decoding: a drafter proposes k tokens, the target model checks them all in one step (each expert
read once for all of them), and the standard acceptance rule keeps the output exactly the target's. No I/O and no
numba here: drafters and the rule work on token ids, logits and probabilities (the engine runs the models).

The verification step computes every row apart (`MoEModel.forward(..., rows_apart=True)`), so each row's logits are
bit for bit those a one-token decode step would give: greedy output is token for token the same with and without
speculation, whatever the drafter.

- greedy: accept the longest prefix of the draft equal to the target's argmax at each position, then take the
  target's own argmax after it (a correction, or a bonus token when all k were accepted);
- sampling (Leviathan et al. 2023, Chen et al. 2023): accept draft token d_i with probability min(1, p_i(d_i) /
  q_i(d_i)); at the first rejection draw from max(0, p_i - q_i) normalised and stop; when all are accepted draw the
  bonus token from p_{k+1}. p and q are the sampler's processed distributions (temperature, top-k, top-p), so every
  generated token has exactly the non-speculative sampler's distribution. A drafter that proposes deterministically
  (n-gram lookup, a greedy draft model) has q a point mass on its token: accept with probability p(d), else draw
  from p without d.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .batch import PREFILL_CHUNK

if TYPE_CHECKING:
    from .batch import KVCache
    from .engine import Engine
    from .sampling import Sampler


@dataclass(frozen=True)
class Draft:
    """k proposed tokens, and the distributions (k, vocab) they were drawn from, or None when each is certain
    (a point mass on the token)."""

    tokens: list[int]
    q: np.ndarray | None = None


class Drafter(Protocol):
    name: str

    def propose(self, context: Sequence[int], k: int, sampler: Sampler) -> Draft:
        """At most k tokens likely to follow `context` (every token so far, the last one not yet in the target's
        KV cache). May propose fewer, or none."""
        ...

    def observe(self, start: int, ids: Sequence[int], x: np.ndarray) -> None:
        """The target computed positions start.. for tokens `ids`, with final hidden states x (n, d_model) before its
        output norm (the MTP drafter feeds them to its block; the others ignore them)."""
        ...

    def for_sequence(self) -> Drafter:
        """A drafter for one more sequence of a batch (the server: one per running sequence): itself when it keeps
        no state, else one with state of its own over the same draft model."""
        ...

    def close(self) -> None: ...


class NgramDrafter:
    """Prompt lookup: the longest suffix of the context (max_n tokens down to min_n) that occurred earlier in it;
    propose the tokens that followed its most recent earlier occurrence, as many as asked (a repetition that reaches
    the context's end is continued with its period). Strong on code, edits, summaries and repetitive text; costs
    nothing to run."""

    name = "ngram"

    def __init__(self, max_n: int = 3, min_n: int = 1) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"n-gram sizes must satisfy 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.max_n, self.min_n = max_n, min_n

    def propose(self, context: Sequence[int], k: int, sampler: Sampler) -> Draft:
        ctx = np.asarray(context, np.int64)
        n_ctx = len(ctx)
        for n in range(min(self.max_n, n_ctx - 1), self.min_n - 1, -1):
            # windows that start early enough to have a continuation: starts 0 .. n_ctx - n - 1
            windows = sliding_window_view(ctx[:-1], n)
            hits = np.nonzero((windows == ctx[-n:]).all(axis=1))[0]
            if len(hits):
                start = int(hits[-1]) + n
                # the text repeats with period n_ctx - start: continue the repetition past the context's end, so a
                # pattern shorter than k (a token said again and again, a short refrain) still fills the draft
                period, out = n_ctx - start, []
                for i in range(k):
                    out.append(int(ctx[start + i]) if start + i < n_ctx else out[i - period])
                return Draft(out)
        return Draft([])

    def observe(self, start: int, ids: Sequence[int], x: np.ndarray) -> None:
        pass  # the context is all it reads

    def for_sequence(self) -> NgramDrafter:
        return self  # stateless

    def close(self) -> None:
        pass


class ModelDrafter:
    """A small model sharing the target's tokenizer (any layout: a smaller or lower-bit model), run by an Engine of
    its own. Its KV cache follows the target's context: each proposal first rolls back to what the two share and
    feeds what it has not seen. Greedy targets get greedy drafts; sampling targets get drafts drawn from the
    draft's own processed distribution (returned as q for the acceptance rule)."""

    name = "model"

    def __init__(self, engine: Engine, kv: KVCache | None = None) -> None:
        self.engine = engine
        self.owner = kv is None  # the first drafter over an engine uses its KV cache and closes it
        self.kv = engine.model.kv if kv is None else kv
        self.seen: list[int] = []  # the tokens in the draft's KV cache, in order (at most the request's context)

    def observe(self, start: int, ids: Sequence[int], x: np.ndarray) -> None:
        pass  # it runs its own model over the context

    def for_sequence(self) -> ModelDrafter:
        """The same draft model with a KV cache of its own (dropped with the drafter)."""
        return ModelDrafter(self.engine, self.engine.new_sequence())

    def _forward(self, ids: np.ndarray) -> np.ndarray:
        return self.engine.model.forward_batch([(self.kv, ids)], all_logits=False)[0][-1]

    def propose(self, context: Sequence[int], k: int, sampler: Sampler) -> Draft:
        eng, kv = self.engine, self.kv
        if not self.seen or len(self.seen) > len(context) or self.seen != list(context[:len(self.seen)]):
            shared = _common_prefix(self.seen, context)  # a new request, or the target rejected what we drafted
            self.seen, kv.length = self.seen[:shared], shared
        if len(self.seen) == len(context):  # everything seen: recompute the last position's logits
            self.seen.pop()
            kv.length -= 1
        room = eng.config.context_length - len(context)
        k = max(0, min(k, room))
        if k == 0:
            return Draft([])
        kv.reserve(len(context) + k)
        new = np.asarray(context[len(self.seen):], np.int64)
        for i in range(0, len(new), PREFILL_CHUNK):  # a long unseen stretch (the prompt) in chunks, as generate()
            logits = self._forward(new[i:i + PREFILL_CHUNK])
        self.seen = list(context)
        tokens: list[int] = []
        dists: list[np.ndarray] = []
        for i in range(k):
            if sampler.params.temperature == 0:
                tokens.append(int(np.argmax(logits)))
            else:
                q = sampler.distribution(logits)
                dists.append(q)
                tokens.append(sampler.draw(q))
            if i < k - 1:
                logits = self._forward(np.asarray(tokens[-1:], np.int64))
                self.seen.append(tokens[-1])
        return Draft(tokens, np.stack(dists) if dists else None)

    def close(self) -> None:
        if self.owner:
            self.engine.close()


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


# ---------------------------------------------------------------------- the acceptance rule


def accept_greedy(logits: np.ndarray, draft: Sequence[int]) -> tuple[int, int]:
    """logits (len(draft) + 1, vocab): the target's at the current token and at each drafted one. Returns (how many
    drafted tokens are accepted, the target's token after them)."""
    best = np.argmax(logits, axis=1)  # first maximum on ties, as the greedy sampler
    j = 0
    while j < len(draft) and int(best[j]) == int(draft[j]):
        j += 1
    return j, int(best[j])


def accept_sampled(p: np.ndarray, draft: Draft, rng: np.random.Generator) -> tuple[int, int]:
    """p (len(draft.tokens) + 1, vocab): the target's processed distributions; draft.q the drafter's (None: point
    masses). Returns (accepted count, the next token), drawn by the rejection rule in the module's docstring."""
    for i, d in enumerate(draft.tokens):
        q = None if draft.q is None else draft.q[i]
        qd = 1.0 if q is None else float(q[d])
        if rng.random() < min(1.0, float(p[i, d]) / qd if qd > 0 else 1.0):
            continue
        residual = p[i].copy()
        if q is None:
            residual[d] = 0.0
        else:
            residual = np.maximum(residual - q, 0.0)
        total = residual.sum()
        # p <= q everywhere cannot reject (p(d) >= q(d) somewhere with p's mass): only rounding gets here
        token = _draw(rng, residual / total) if total > 0 else _draw(rng, p[i])
        return i, token
    return len(draft.tokens), _draw(rng, p[len(draft.tokens)])


def _draw(rng: np.random.Generator, probs: np.ndarray) -> int:
    return int(rng.choice(len(probs), p=probs / probs.sum()))


class AdaptiveK:
    """How many tokens to draft next: a drafted row whose token is rejected still reads its experts, so drafting
    backs off when drafts fail and grows back when they pass. All accepted: one more (up to the most asked for);
    none accepted: half as many; at zero, one token every `probe` steps to notice when the text turns repetitive."""

    def __init__(self, most: int, probe: int = 4) -> None:
        if most < 1 or probe < 1:
            raise ValueError(f"draft tokens and probe interval must be >= 1, got {most}, {probe}")
        self.most, self.probe = most, probe
        self.k, self._idle = most, 0

    def next(self) -> int:
        if self.k > 0:
            return self.k
        self._idle += 1
        return 1 if self._idle % self.probe == 0 else 0

    def update(self, proposed: int, accepted: int) -> None:
        if proposed == 0:
            return
        if accepted == proposed:
            self.k = min(self.most, max(self.k, proposed) + 1)
        elif accepted == 0:
            self.k //= 2


@dataclass
class SpecStats:
    """Speculation over a run: verification steps, tokens drafted and accepted (each step also gives one token of
    the target's own)."""

    steps: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_step(self) -> float:
        return (self.accepted + self.steps) / self.steps if self.steps else 0.0


def settle(logits: np.ndarray, draft: Draft, sampler: Sampler, kv: KVCache, adapt: AdaptiveK,
           stats: SpecStats) -> tuple[int, int]:
    """A verification step's outcome, for the engine and the server alike: logits (len(draft.tokens) + 1, vocab)
    of the step's rows; returns (accepted count, the target's next token) by the greedy or the sampling rule (the
    draft's own q when it has one), after rolling `kv` back past the rejected rows and updating the draft length
    and the counts."""
    if sampler.params.temperature == 0:
        j, nxt = accept_greedy(logits, draft.tokens)
    else:
        j, nxt = accept_sampled(np.stack([sampler.distribution(row) for row in logits]), draft, sampler.rng)
    kv.length -= len(draft.tokens) - j  # the rejected rows' keys and values are forgotten
    adapt.update(len(draft.tokens), j)
    stats.steps += 1
    stats.drafted += len(draft.tokens)
    stats.accepted += j
    return j, nxt
