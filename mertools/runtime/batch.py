"""A forward step's batch: the new tokens of several sequences, each with its own KV cache."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..kernels.attention import attend
from ..layout.config import ModelConfig


class KVCache:
    """One sequence's keys and values: per layer (capacity, n_kv_heads, head_dim) float32, grown by
    doubling; `length` positions are filled. With latent attention (cfg.mla) only keys are kept, one
    (qk_rope_dim + kv_lora_rank)-wide vector per token and layer: the rotary key, then the latent, which is
    also every head's value (families/mla.py)."""

    def __init__(self, cfg: ModelConfig, capacity: int = 256) -> None:
        self.length = 0
        self.divisor = cfg.softmax_divisor
        if cfg.mla:
            self.voff = cfg.qk_rope_dim
            self.k = np.zeros((cfg.n_layers, capacity, 1, cfg.qk_rope_dim + cfg.kv_lora_rank), np.float32)
            self.v: np.ndarray | None = None
        else:
            self.voff = 0
            shape = (cfg.n_layers, capacity, cfg.n_kv_heads, cfg.head_dim)
            self.k = np.zeros(shape, np.float32)
            self.v = np.zeros(shape, np.float32)

    @property
    def bytes_per_token(self) -> int:
        """What one more cached position costs, every layer's keys and values together."""
        per = self.k[:, 0].nbytes
        return per if self.v is None else per + self.v[:, 0].nbytes

    def ensure(self, total: int) -> None:
        cap = self.k.shape[1]
        if total <= cap:
            return
        new = max(total, 2 * cap)
        self.k = _grown(self.k, new)
        if self.v is not None:
            self.v = _grown(self.v, new)

    def attend(self, layer: int, q: np.ndarray, k: np.ndarray, v: np.ndarray, pos: np.ndarray, window: int,
               sinks: np.ndarray | None = None) -> np.ndarray:
        """Store k/v (n, nkv, hd) at positions pos (consecutive), then q (n, nh, hd) attends -> (n, nh * dv)
        (a sliding window when window > 0; sinks (nh,): attention sinks, or None). With latent attention v is
        the keys' last part and is not stored again."""
        start, total = int(pos[0]), int(pos[-1]) + 1
        self.k[layer, start:total] = k
        keys = self.k[layer, :total]
        if self.v is None:
            return attend(q, keys, keys, pos, window, sinks, self.divisor, self.voff)
        self.v[layer, start:total] = v
        return attend(q, keys, self.v[layer, :total], pos, window, sinks, self.divisor)


def _grown(old: np.ndarray, capacity: int) -> np.ndarray:
    grown = np.zeros((old.shape[0], capacity, *old.shape[2:]), np.float32)
    grown[:, :old.shape[1]] = old
    return grown


@dataclass(frozen=True)
class SeqRows:
    """A sequence's new tokens: rows start..start+n of the batch, appended to `kv`."""

    kv: KVCache
    start: int
    n: int

    @property
    def rows(self) -> slice:
        return slice(self.start, self.start + self.n)


@dataclass(frozen=True)
class Batch:
    seqs: tuple[SeqRows, ...]
    positions: np.ndarray  # (N,) int64: each row's position in its sequence
    ids: np.ndarray  # (N,) int64 token ids

    @classmethod
    def of(cls, items: Sequence[tuple[KVCache, np.ndarray]]) -> Batch:
        """Sequences (kv cache, new ids) in order; positions continue each cache."""
        seqs, pos, ids, r0 = [], [], [], 0
        for kv, new in items:
            n = len(new)
            kv.ensure(kv.length + n)
            seqs.append(SeqRows(kv, r0, n))
            pos.append(np.arange(kv.length, kv.length + n))
            ids.append(np.asarray(new, np.int64))
            r0 += n
        return cls(tuple(seqs), np.concatenate(pos), np.concatenate(ids))

    def per_seq(self, fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> np.ndarray:
        """fn over each sequence's rows of x apart, concatenated."""
        if len(self.seqs) == 1:
            return fn(x)
        return np.concatenate([fn(np.ascontiguousarray(x[s.rows])) for s in self.seqs])

    def commit(self) -> None:
        """The step is done: every sequence's cache now holds its new tokens."""
        for s in self.seqs:
            s.kv.length += s.n
