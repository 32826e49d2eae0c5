"""Next-token sampling: greedy, temperature, top-k, top-p, seeded for reproducibility."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


class Sampler:
    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray) -> int:
        """logits (vocab,) float32 -> token id."""
        if self.params.temperature == 0:
            return int(np.argmax(logits))  # first maximum on ties, deterministic
        order, probs = self._kept(logits)
        return int(order[self.rng.choice(len(probs), p=probs)])

    def _kept(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The tokens temperature, top-k and top-p keep, most likely first, and their probabilities."""
        p = self.params
        z = logits.astype(np.float64) / p.temperature
        order = np.argsort(-z, kind="stable")
        if p.top_k:
            order = order[: p.top_k]
        z = z[order]
        probs = np.exp(z - z[0])
        probs /= probs.sum()
        if p.top_p < 1.0:
            # smallest prefix whose mass reaches top_p (always at least one token)
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)
            probs = probs[:keep] / probs[:keep].sum()
            order = order[:keep]
        return order, probs

    def distribution(self, logits: np.ndarray) -> np.ndarray:
        """(vocab,) float64: the probability this sampler gives each token (one-hot at the argmax when greedy);
        speculative decoding's acceptance rule compares these."""
        out = np.zeros(logits.shape[-1], np.float64)
        if self.params.temperature == 0:
            out[int(np.argmax(logits))] = 1.0
            return out
        order, probs = self._kept(logits)
        out[order] = probs
        return out

    def draw(self, probs: np.ndarray) -> int:
        """A token drawn from a distribution over the vocabulary (this sampler's generator)."""
        return int(self.rng.choice(len(probs), p=probs / probs.sum()))
