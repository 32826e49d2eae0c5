"""A forward step's batch: the new tokens of several sequences, each with its own KV cache."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..families import mla
from ..kernels import quantize
from ..kernels.attention import attend
from ..layout.config import ModelConfig

# what a KV cache may hold: f16 (the default) halves f32's bytes; q8_0 (blocks of 32: an f16 scale and 32 int8,
# llama.cpp's --cache-type q8_0) takes 34/64 of f16's; f32 is exact
KV_DTYPES = ("f16", "f32", "q8_0")
KV_STORAGE = {"f16": np.uint16, "f32": np.float32, "q8_0": np.uint8}  # the arrays each KV type is kept in
_BYTES_PER_VALUE = {"f16": 2.0, "f32": 4.0, "q8_0": 34 / 32}
PREFILL_CHUNK = 512  # prompt tokens per forward step (generate(), a draft model catching up): scores stay chunk x context


def kv_bytes_per_token(cfg: ModelConfig, dtype: str = "f16") -> int:
    """What a KVCache of `dtype` holds per position of context (every layer)."""
    return round(mla.kv_bytes_per_token(cfg, 1)[0] * _BYTES_PER_VALUE[dtype])


def check_kv_dtype(cfg: ModelConfig, dtype: str) -> None:
    """ValueError unless a KV cache of this model may hold `dtype` (q8_0: key/value widths in whole blocks of 32)."""
    if dtype not in KV_DTYPES:
        raise ValueError(f"KV cache type must be one of {', '.join(KV_DTYPES)}, got {dtype!r}")
    widths = (cfg.qk_rope_dim, cfg.kv_lora_rank) if cfg.mla else (cfg.head_dim,)
    if dtype == "q8_0" and any(w % 32 for w in widths):
        raise ValueError(f"a q8_0 KV cache needs key/value widths that are multiples of 32, got {widths}")


class KVCache:
    """One sequence's keys and values: per layer (capacity, n_kv_heads, head_dim) as f16 bits (uint16), float32 or
    q8_0 blocks (uint8, head_dim / 32 x 34 bytes),
    `length` positions filled; sized for the context asked for (`reserve`), grown by doubling past it. With
    latent attention (cfg.mla) only keys are kept, one (qk_rope_dim + kv_lora_rank)-wide vector per token and
    layer: the rotary key, then the latent, which is also every head's value (families/mla.py)."""

    def __init__(self, cfg: ModelConfig, capacity: int = 256, dtype: str = "f16", layers: int | None = None) -> None:
        """`layers`: how many layers it holds (default the model's; an MTP drafter's cache holds its blocks')."""
        check_kv_dtype(cfg, dtype)
        n_layers = cfg.n_layers if layers is None else layers
        self.length = 0
        self.dtype = dtype
        self.divisor = cfg.softmax_divisor
        store = KV_STORAGE[dtype]
        width = (lambda n: n // 32 * 34) if dtype == "q8_0" else (lambda n: n)  # a row's storage units
        capacity = max(1, capacity)
        if cfg.mla:
            self.voff = width(cfg.qk_rope_dim)
            self.k = np.zeros((n_layers, capacity, 1, width(cfg.qk_rope_dim + cfg.kv_lora_rank)), store)
            self.v: np.ndarray | None = None
        else:
            self.voff = 0
            shape = (n_layers, capacity, cfg.n_kv_heads, width(cfg.head_dim))
            self.k = np.zeros(shape, store)
            self.v = np.zeros(shape, store)

    @property
    def bytes_per_token(self) -> int:
        """What one more cached position costs, every layer's keys and values together."""
        per = self.k[:, 0].nbytes
        return per if self.v is None else per + self.v[:, 0].nbytes

    @property
    def nbytes(self) -> int:
        """What the cache holds now (its capacity, not its length)."""
        return self.k.nbytes + (0 if self.v is None else self.v.nbytes)

    def reserve(self, total: int) -> None:
        """Room for exactly `total` positions (a request's prompt and output), grown once if it has less."""
        if total > self.k.shape[1]:
            self.k = _grown(self.k, total)
            if self.v is not None:
                self.v = _grown(self.v, total)

    def _stored(self, x: np.ndarray) -> np.ndarray:
        if self.dtype == "f16":
            return x.astype(np.float16).view(np.uint16)
        if self.dtype == "q8_0":  # ggml's q8_0 of each row (kernels.quantize, bit-exact with ggml)
            rows = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
            return quantize(rows, "q8_0").reshape(*x.shape[:-1], -1)
        return x

    def ensure(self, total: int) -> None:
        cap = self.k.shape[1]
        if total <= cap:
            return
        new = max(total, 2 * cap)
        self.k = _grown(self.k, new)
        if self.v is not None:
            self.v = _grown(self.v, new)

    def attend(self, layer: int, q: np.ndarray, k: np.ndarray, v: np.ndarray, pos: np.ndarray, window: int,
               sinks: np.ndarray | None = None, rows_apart: bool = False) -> np.ndarray:
        """Store k/v (n, nkv, hd) at positions pos (consecutive), then q (n, nh, hd) attends -> (n, nh * dv)
        (a sliding window when window > 0; sinks (nh,): attention sinks, or None). With latent attention v is
        the keys' last part and is not stored again. `rows_apart`: each query alone, over the keys up to its
        own position, as a decode step computes it (bit for bit)."""
        start, total = int(pos[0]), int(pos[-1]) + 1
        self.k[layer, start:total] = self._stored(k)
        if self.v is not None:
            self.v[layer, start:total] = self._stored(v)
        if rows_apart and len(q) > 1:
            return np.concatenate([self._attend(layer, q[i:i + 1], pos[i:i + 1], window, sinks) for i in range(len(q))])
        return self._attend(layer, q, pos, window, sinks)

    def _attend(self, layer: int, q: np.ndarray, pos: np.ndarray, window: int, sinks: np.ndarray | None) -> np.ndarray:
        total = int(pos[-1]) + 1
        keys = self.k[layer, :total]
        if self.v is None:
            return attend(q, keys, keys, pos, window, sinks, self.divisor, self.voff)
        return attend(q, keys, self.v[layer, :total], pos, window, sinks, self.divisor)


def _grown(old: np.ndarray, capacity: int) -> np.ndarray:
    grown = np.zeros((old.shape[0], capacity, *old.shape[2:]), old.dtype)
    grown[:, :old.shape[1]] = old
    return grown


@dataclass(frozen=True)
class SeqRows:
    """A sequence's new tokens: rows start..start+n of the batch, appended to `kv`."""

    kv: KVCache
    start: int
    n: int
    # every row computed alone, as a one-token decode step would compute it (bit for bit): speculative decoding's
    # verification, where each row's logits must be exactly those of decoding that token
    apart: bool = False

    @property
    def rows(self) -> slice:
        return slice(self.start, self.start + self.n)


@dataclass(frozen=True)
class Batch:
    seqs: tuple[SeqRows, ...]
    positions: np.ndarray  # (N,) int64: each row's position in its sequence
    ids: np.ndarray  # (N,) int64 token ids
    observed: bool = True  # its routing goes to the trace, the history and the cache's and prefetcher's estimates

    @classmethod
    def of(cls, items: Sequence[tuple[KVCache, np.ndarray]], apart: Sequence[bool] | None = None,
           observed: bool = True) -> Batch:
        """Sequences (kv cache, new ids) in order; positions continue each cache. `apart`: per sequence, whether
        its rows are computed one by one (SeqRows.apart); `observed` False: a warm-up step, not part of the run."""
        seqs, pos, ids, r0 = [], [], [], 0
        for i, (kv, new) in enumerate(items):
            n = len(new)
            kv.ensure(kv.length + n)
            seqs.append(SeqRows(kv, r0, n, bool(apart[i]) if apart is not None else False))
            pos.append(np.arange(kv.length, kv.length + n))
            ids.append(np.asarray(new, np.int64))
            r0 += n
        return cls(tuple(seqs), np.concatenate(pos), np.concatenate(ids), observed)

    def per_seq(self, fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> np.ndarray:
        """fn over each sequence's rows of x apart (each row alone in a sequence computed `apart`), concatenated."""
        if len(self.seqs) == 1 and not (self.seqs[0].apart and len(x) > 1):
            return fn(x)
        parts = []
        for s in self.seqs:
            rows = [slice(r, r + 1) for r in range(s.start, s.start + s.n)] if s.apart else [s.rows]
            parts += [fn(np.ascontiguousarray(x[r])) for r in rows]
        return np.concatenate(parts)

    def commit(self) -> None:
        """The step is done: every sequence's cache now holds its new tokens."""
        for s in self.seqs:
            s.kv.length += s.n
