"""Approximate routing: opt-in modes that read fewer expert bytes per token, at some cost in fidelity.
Pure functions on arrays, no I/O (the residency of a layer's experts is handed in by the caller).

Three modes, each off by default (`Approx()` is exact: the runtime then never calls into this module):

- **adaptive top-k** (`topk_tau` = τ): a chosen expert whose *share* of the token's routed mixture is
  below τ is skipped. A choice's share is its routing weight over the sum of the token's routing weights
  (the weights `select_experts` gives, so its renormalisation and routed scaling cancel out): the same
  number whether the family renormalises its top-k weights (`norm_topk_prob`) or not, so one τ means the
  same thing for every family. The choice with the largest share is always kept (a token never loses all
  its experts; with τ <= 1/k it is above τ anyway). The kept experts' weights are then what the family's
  own `select_experts` gives for that smaller choice: renormalised over the kept ones where the family
  renormalises (the mixture still sums to `routed_scaling`), and left as they were where it does not
  (`norm_topk_prob` false: OLMoE, Qwen2-MoE, DeepSeek-V2; the model was trained on an unnormalised sum,
  so a skipped expert's term is simply left out rather than spread over the others).

- **cache-aware substitution** (`resident_delta` = δ): a chosen expert that is neither resident nor
  already on its way in is replaced by one that is, when the router nearly chose it: an expert c not
  among the token's choices replaces its choice j when

      choice_score(j) - choice_score(c) <= δ · Σ_{i chosen} score(i)

  where the choice score is what the family chooses by (the router score plus the correction bias, -inf
  outside a token's kept groups: `pieces.choice_scores`) and the right-hand side is the token's routed
  mass (the unbiased scores of its k choices, what `norm_topk_prob` divides by). δ is thus relative, in
  the same unit as τ: for a softmax router without a correction bias, choosing c instead of j moves at
  most a δ share of the token's mixture before renormalisation, whatever the number of experts (an
  absolute score difference would mean far more with 8 experts than with 128, whose probabilities are
  16 times smaller). Among several candidates, the nearest (highest choice score) wins, each expert at
  most once per token. The substitute's weight is computed from its own score by the family's
  `select_experts` (renormalised with the token's other choices where the family renormalises). The
  token's top-1 choice (highest choice score) is never replaced unless `resident_top1`.

  In a step of several tokens (a prefill, or the server's batch), what is free is what the step reads
  anyway: resident and in-flight experts, plus those a protected choice (a top-1) needs; and a
  substitution whose displaced expert the step still reads for another token is undone, since it would
  save nothing. So substitution, unlike the exact routing, depends on the cache's state and on the
  other sequences of a batch.

- **stand-ins on a miss** (`standin_share` = σ): a chosen expert that is neither resident nor on its way in,
  and whose share is below σ for every token choosing it (σ = 1: any), is computed with its low-bit copy
  (`convert --standins`; `standin_choices` picks them). The routing is the family's own; only the weights
  used for those choices are lower-bit. The stand-ins are read through a tier of their own (runtime/moe.py).

The output keeps a rectangular shape: a token whose choices were skipped has them replaced by its first
kept expert with weight 0 and `live` False (the MoE block skips them), so traces and prefetchers, which
see the final choice, still get (n, k') arrays.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# (rows (m,), chosen (m, c)) -> weights (m, c): the family's weights of exactly that choice for those rows
# (`pieces.select_experts(cfg, w, scores[rows], chosen)`), renormalisation and routed scaling included
Reweigh = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Approx:
    """The approximate-routing settings given to `Engine.open(..., approx=...)`; the defaults are exact."""

    topk_tau: float = 0.0  # skip a choice whose share of the token's routed mixture is below this
    resident_delta: float = 0.0  # replace a non-resident choice by a resident expert within this share
    resident_top1: bool = False  # let substitution replace the token's top-1 choice too
    # a chosen expert that misses (not resident, not on its way) and whose share is below this is computed with
    # its low-bit stand-in (`convert --standins`); 1 = every miss. `standin_fill`: also load the full expert
    # in the background, for later tokens
    standin_share: float = 0.0
    standin_fill: bool = False
    standin_cache: float = 0.5  # with stand-ins: the share of the expert cache's budget that holds stand-ins

    def __post_init__(self) -> None:
        if not isinstance(self.topk_tau, (int, float)) or not math.isfinite(self.topk_tau) or not 0 <= self.topk_tau < 1:
            raise ValueError(f"topk_tau must lie in [0, 1), got {self.topk_tau!r}")
        if not isinstance(self.resident_delta, (int, float)) or not math.isfinite(self.resident_delta) \
                or self.resident_delta < 0:
            raise ValueError(f"resident_delta must be a finite number >= 0, got {self.resident_delta!r}")
        if not isinstance(self.resident_top1, bool):
            raise ValueError(f"resident_top1 must be a bool, got {self.resident_top1!r}")
        if self.resident_top1 and self.resident_delta == 0:
            raise ValueError("resident_top1 only applies to cache-aware substitution: give resident_delta > 0 too")
        if not isinstance(self.standin_share, (int, float)) or not 0 <= self.standin_share <= 1:
            raise ValueError(f"standin_share must lie in [0, 1], got {self.standin_share!r}")
        if not isinstance(self.standin_fill, bool):
            raise ValueError(f"standin_fill must be a bool, got {self.standin_fill!r}")
        if not isinstance(self.standin_cache, (int, float)) or not 0 < self.standin_cache < 1:
            raise ValueError(f"standin_cache must lie in (0, 1), got {self.standin_cache!r}")
        if self.standin_fill and self.standin_share == 0:
            raise ValueError("standin_fill only applies to stand-ins: give standin_share > 0 too")

    @property
    def exact(self) -> bool:
        """No mode on: the routing is the family's own, bit for bit."""
        return self.topk_tau == 0 and self.resident_delta == 0 and self.standin_share == 0

    @property
    def reroutes(self) -> bool:
        """A mode that changes which experts are used (skips or substitutes), not only how they are read."""
        return self.topk_tau > 0 or self.resident_delta > 0

    def describe(self) -> str:
        """"exact", or the settings that are on ("topk_tau=0.1 resident_delta=0.05 resident_top1")."""
        if self.exact:
            return "exact"
        parts = [f"topk_tau={self.topk_tau:g}"] if self.topk_tau else []
        if self.resident_delta:
            parts.append(f"resident_delta={self.resident_delta:g}")
        if self.resident_top1:
            parts.append("resident_top1")
        if self.standin_share:
            parts.append(f"standin_share={self.standin_share:g} standin_cache={self.standin_cache:g}"
                         + (" standin_fill" if self.standin_fill else ""))
        return " ".join(parts)


@dataclass(frozen=True)
class ApproxRouting:
    """A step's adjusted routing: chosen and weights (n, k'), k' <= k; `live` (n, k') False where a slot
    only pads a token that kept fewer experts than others (its expert is the token's first kept one, its
    weight 0); `dropped` and `substituted` count the step's choices skipped and replaced."""

    chosen: np.ndarray
    weights: np.ndarray
    live: np.ndarray
    dropped: int
    substituted: int


def standin_choices(chosen: np.ndarray, weights: np.ndarray, live: np.ndarray | None, held: np.ndarray,
                    share: float) -> tuple[list[int], int]:
    """Which of a step's experts to compute with their stand-ins: those not held (resident or in flight; `held`
    (E,) bool) whose every live choice has a share below `share` (any share when `share` is 1). Returns the
    experts (sorted) and the number of (token, choice) pairs they serve."""
    s = shares(weights)
    use = np.ones(chosen.shape, bool) if live is None else np.asarray(live, bool)
    # per expert, its largest share among the live choices of this step
    top = np.full(held.shape, -1.0)
    np.maximum.at(top, chosen[use], s[use])
    below = (top >= 0) & ~held & ((top < share) | (share >= 1))
    experts = [int(e) for e in np.nonzero(below)[0]]
    return experts, int(below[chosen[use]].sum())


def shares(weights: np.ndarray) -> np.ndarray:
    """Each choice's share (n, k) of its token's routed mixture: weight / the row's sum. A row whose weights
    sum to 0 (sigmoid scores that all underflowed) gets equal shares."""
    w = np.asarray(weights, np.float64)
    total = w.sum(axis=1, keepdims=True)
    k = w.shape[1]
    return np.divide(w, total, out=np.full(w.shape, 1.0 / k if k else 0.0), where=total > 0)


def adaptive_topk(weights: np.ndarray, tau: float) -> np.ndarray:
    """live (n, k) bool: the choices whose share is at least tau, and always each row's largest share
    (the first of equal ones)."""
    s = shares(weights)
    live = s >= tau
    live[np.arange(len(s)), s.argmax(axis=1)] = True
    return live


def top1_column(chosen: np.ndarray, choice: np.ndarray) -> np.ndarray:
    """(n,) the column of each row's top-1 choice: the chosen expert with the highest choice score (the first
    of equal ones; the router's best when routing is its own, whatever the column order)."""
    return np.take_along_axis(choice, chosen, axis=1).argmax(axis=1)


def substitute(chosen: np.ndarray, live: np.ndarray, scores: np.ndarray, choice: np.ndarray, resident: np.ndarray,
               delta: float, top1: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Cache-aware substitution (the rule in the module's docstring). chosen (n, k) experts, live (n, k) the
    choices still in use, scores (n, E) the router's scores, choice (n, E) what experts are chosen by,
    resident (E,) bool: the layer's experts resident or in flight. Returns (new chosen (n, k), replaced (n, k)
    bool). Only live choices are replaced, never by an expert among the row's original choices."""
    chosen = np.asarray(chosen)
    n, k = chosen.shape
    out = chosen.copy()
    replaced = np.zeros((n, k), bool)
    if n == 0 or k == 0 or delta <= 0:
        return out, replaced
    resident = np.asarray(resident, bool)
    protected = np.zeros((n, k), bool)
    if not top1:
        protected[np.arange(n), top1_column(chosen, choice)] = True
    need = live & ~resident[chosen]  # choices the step would read
    # free for anyone: resident experts, and the ones a protected choice reads anyway
    free = resident.copy()
    free[chosen[need & protected]] = True
    mass = np.take_along_axis(np.asarray(scores, np.float64), chosen, axis=1).sum(axis=1)
    choice64 = np.asarray(choice, np.float64)
    for t, j in zip(*np.nonzero(need & ~protected & ~free[chosen]), strict=True):
        if not mass[t] > 0:
            continue
        cand = free.copy()
        cand[chosen[t]] = False  # not one of the token's own choices...
        cand[out[t][replaced[t]]] = False  # ...nor a substitute it already took
        if not cand.any():
            continue
        row = np.where(cand, choice64[t], -np.inf)
        c = int(row.argmax())  # the nearest candidate (first of equal ones)
        if np.isfinite(row[c]) and choice64[t, chosen[t, j]] - row[c] <= delta * mass[t]:
            out[t, j], replaced[t, j] = c, True
    if replaced.any():  # undo what saves nothing: a displaced expert the step still reads for another choice
        still = np.zeros(resident.shape, bool)
        still[out[live & ~replaced & ~resident[out]]] = True
        undo = replaced & still[chosen]
        out[undo], replaced[undo] = chosen[undo], False
    return out, replaced


def compact(chosen: np.ndarray, live: np.ndarray, reweigh: Reweigh) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The live choices moved to the front of each row (order kept), weighed by `reweigh` per group of rows
    with as many live choices, padded to the widest row with the row's first kept expert at weight 0.
    Returns (chosen (n, k'), weights (n, k'), live (n, k'))."""
    n = chosen.shape[0]
    counts = live.sum(axis=1)
    width = int(counts.max()) if n else 0
    order = np.argsort(~live, axis=1, kind="stable")  # live columns first, in their order
    packed = np.take_along_axis(chosen, order, axis=1)[:, :width]
    out_live = np.arange(width)[None, :] < counts[:, None]
    out_chosen = np.where(out_live, packed, packed[:, :1])
    out_w: np.ndarray | None = None
    for c in np.unique(counts):
        rows = np.nonzero(counts == c)[0]
        w = np.asarray(reweigh(rows, np.ascontiguousarray(packed[rows, :c])))
        if out_w is None:
            out_w = np.zeros((n, width), w.dtype)
        out_w[rows, :c] = w
    return out_chosen, out_w if out_w is not None else np.zeros((n, width), np.float32), out_live


def apply(approx: Approx, chosen: np.ndarray, weights: np.ndarray, scores: np.ndarray, choice: np.ndarray,
          resident: np.ndarray, reweigh: Reweigh) -> ApproxRouting:
    """The approximate routing of a step: chosen, weights (n, k) as the family's `select_experts` gave them,
    scores (n, E) the router's, choice (n, E) what experts are chosen by, resident (E,) bool the layer's
    experts resident or in flight, `reweigh` the family's weights of a given choice. Adaptive top-k first (on
    the router's weights), then substitution among the kept choices, then the kept choices re-weighed.
    Rows nothing changed keep their weights as given."""
    chosen = np.asarray(chosen)
    n, k = chosen.shape
    live = adaptive_topk(weights, approx.topk_tau) if approx.topk_tau > 0 else np.ones((n, k), bool)
    replaced = np.zeros((n, k), bool)
    new = chosen
    if approx.resident_delta > 0:
        new, replaced = substitute(chosen, live, scores, choice, resident, approx.resident_delta, approx.resident_top1)
    dropped, substituted = int((~live).sum()), int(replaced.sum())
    changed = (~live | replaced).any(axis=1)
    if not changed.any():
        return ApproxRouting(chosen, weights, np.ones((n, k), bool), 0, 0)
    rows = np.nonzero(changed)[0]
    sub_chosen, sub_w, sub_live = compact(new[rows], live[rows], lambda r, c: reweigh(rows[r], c))
    width = k if (~changed).any() else sub_chosen.shape[1]  # unchanged rows keep all k choices
    out_chosen = np.empty((n, width), chosen.dtype)
    out_w = np.zeros((n, width), np.result_type(weights.dtype, sub_w.dtype))
    out_live = np.zeros((n, width), bool)
    keep = np.nonzero(~changed)[0]
    if len(keep):
        out_chosen[keep], out_w[keep], out_live[keep] = chosen[keep], weights[keep], True
    w_sub = sub_chosen.shape[1]
    out_chosen[rows, :w_sub], out_w[rows, :w_sub], out_live[rows, :w_sub] = sub_chosen, sub_w, sub_live
    out_chosen[rows, w_sub:] = sub_chosen[:, :1]  # padding: the row's first kept expert, weight 0, not live
    return ApproxRouting(out_chosen, out_w, out_live, dropped, substituted)


@dataclass
class ApproxStats:
    """What approximate routing did over a run: tokens through the model, and how many of their expert choices
    (summed over MoE layers) were skipped or replaced."""

    tokens: int = 0
    dropped: int = 0
    substituted: int = 0
    standins: int = 0  # choices computed with a stand-in

    def per_token(self, count: int) -> float:
        return count / self.tokens if self.tokens else 0.0
