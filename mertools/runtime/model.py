"""The forward pass over a layout: dense weights resident (typed, loaded through the family's name
tables), attention and the family's pieces on the runtime's float32 kernels, experts streamed through
the cache by the family-agnostic `StreamingMoE`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..families import get_family
from ..families.weights import GlobalWeights, LayerWeights, load_globals, load_layer
from ..kernels.matmul import get_rows
from ..layout.reader import Layout
from .batch import Batch, KVCache
from .cache import ExpertCache
from .fused import STEP_READS, DenseArena, FusedStep
from .hooks import ModelHooks, PrefetcherFactory
from .moe import StreamingMoE, Tier
from .ops import Linear, RuntimeOps, rms_norm
from .packed import DENSE_COPY, PackedCopies, dense_source
from .prefetch import PREFETCH_DEPTH, Prefetcher, make_prefetcher
from .store import ExpertStore


def _loaders(layout: Layout, kernels: str, arena: DenseArena):  # noqa: ANN202 - (matrix, vector, present)
    dense = layout.manifest.dense

    def matrix(name: str, role: str) -> Linear:
        t = dense[name]
        # an embedding's rows are looked up (get_rows) in the file's layout: never packed
        int8 = kernels == "int8" and role != "embedding"
        raw = arena.take(t.nbytes, name)
        if not arena.filled:  # else a packed copy's bytes: read and packed by an earlier process
            layout.read_dense(name, out=raw)
        return Linear(raw.reshape(t.shape[0], -1), t.dtype, t.shape[0], t.shape[1], int8=int8, packed=arena.filled)

    def vector(name: str) -> np.ndarray:
        t = dense[name]
        raw = layout.read_dense(name)
        if t.dtype == "f32":
            return raw.view(np.float32).reshape(t.shape)
        from ..kernels import dequantize

        return dequantize(raw, t.dtype, tuple(t.shape))

    return matrix, vector, dense.__contains__


NO_PREFETCH = Prefetcher()  # an MTP block guesses nothing for a next layer


class MoEModel:
    def __init__(self, layout: Layout, cache: ExpertCache, store: ExpertStore, *,
                 prefetch: str | PrefetcherFactory = "lookahead", hooks: ModelHooks | None = None,
                 kv_dtype: str = "f16", kv_capacity: int = 256, standins: Tier | None = None,
                 kernels: str = "exact", compiled_step: bool = True, copies: PackedCopies | None = None,
                 step_reads: float = STEP_READS, prefetch_depth: int = PREFETCH_DEPTH) -> None:
        cfg = self.cfg = layout.manifest.config
        self.family = get_family(cfg.arch)
        self.cache, self.store, self.hooks = cache, store, hooks or ModelHooks()
        self.kernels = kernels
        self._load_dense(layout, copies if kernels == "int8" else None)
        self.output = self.weights.output or self.weights.embed  # tied: the logits reuse the embedding
        self.last_x: np.ndarray | None = None  # the last forward step's final hidden states (N, d_model), before the norm
        self.moe = StreamingMoE(self.family, cfg, cache, store, self.hooks, standins, kernels)
        self.kv_dtype, self.kv_capacity = kv_dtype, kv_capacity
        self.kv = KVCache(cfg, kv_capacity, kv_dtype)
        self.prefetch_depth = prefetch_depth  # layers the lookahead guesses ahead (prefetch.py)
        self.prefetcher = (make_prefetcher(prefetch, self.lookahead_router, cfg.n_layers, cfg.n_experts, prefetch_depth)
                           if isinstance(prefetch, str) else prefetch(self.lookahead_router))
        # a decode step in one compiled call, where it applies (runtime/fused.py)
        self.fused = FusedStep.of(self, step_reads) if compiled_step else None

    def _load_dense(self, layout: Layout, copies: PackedCopies | None) -> None:
        """The dense weights: from a packed copy of an earlier process's arena where one holds the same pieces, else
        read (and packed) into a fresh arena, which then becomes the copy."""
        cfg, m = self.cfg, layout.manifest
        # every dense matrix in one buffer, which the compiled step reaches them through (sized by every dense tensor:
        # the vectors' and routers' share, loaded apart as float32, is never touched, so never committed)
        size = DenseArena.size_for([t.nbytes for t in m.dense.values()])
        source = dense_source(m)
        copy = copies.open(DENSE_COPY, source, size, self.store.verify) if copies is not None else None
        for arena in ([DenseArena(size, copy.data)] if copy else []) + [DenseArena(size)]:
            loaders = _loaders(layout, self.kernels, arena)
            self.dense_arena = arena
            self.weights: GlobalWeights[Linear] = load_globals(self.family, cfg, *loaders)
            self.layers: list[LayerWeights[Linear]] = [load_layer(self.family, cfg, i, *loaders)
                                                       for i in range(cfg.n_layers)]
            # multi-token-prediction blocks (layers n_layers..; a drafter's, never run by forward)
            self.mtp_layers = [load_layer(self.family, cfg, i, *loaders) for i in cfg.mtp_layers]
            if not arena.filled or arena.plan() == copy.plan:  # a copy of other pieces (older code): loaded anew
                break
        if copies is not None and not self.dense_arena.filled:
            copies.keep(DENSE_COPY, source, self.dense_arena.buf, self.dense_arena.plan())

    def set_prefetch(self, mode: str) -> None:
        """Guess the next layer's experts with `mode` (prefetch.PREFETCH_MODES) from the next step on; a learned
        Markov model starts afresh."""
        self.prefetcher = make_prefetcher(mode, self.lookahead_router, self.cfg.n_layers, self.cfg.n_experts,
                                          self.prefetch_depth)

    # ------------------------------------------------------------------ pieces
    def lookahead_router(self, layer: int, x: np.ndarray) -> np.ndarray:
        """Layer `layer`'s ranking (n, n_experts) of its experts for hidden states x (a prefetch guess)."""
        w = self.layers[layer]
        if w.router is None:  # a dense-MLP layer: nothing to guess
            return np.zeros((x.shape[0], self.cfg.n_experts))
        h = rms_norm(x, w.ffn_norm, self.cfg.norm_eps)
        return self.family.pieces.lookahead(self.cfg, w, h, RuntimeOps())

    def _attention(self, layer: int, w: LayerWeights[Linear], h: np.ndarray, batch: Batch, ops: RuntimeOps,
                   kv_layer: int | None = None) -> np.ndarray:
        """h (N, d_model) normalised -> (N, d_model); each sequence attends over its own cache (its layer `kv_layer`,
        by default `layer`)."""
        cfg = self.cfg
        q, k, v = self.family.pieces.attention_inputs(cfg, w, h, ops)  # (N, nh, hd), (N, nkv, hd), (N, nkv, dv)
        rotary = self.family.pieces.rotary  # over the first rotary_dim dims of each head (partial rotary)
        q, k = rotary(cfg, q, batch.positions), rotary(cfg, k, batch.positions)
        out = np.empty((h.shape[0], cfg.n_heads * v.shape[-1]), np.float32)  # v heads may differ from q/k heads
        window = cfg.window(layer)  # per layer: some models alternate sliding and full attention
        for s in batch.seqs:
            r = s.rows
            out[r] = s.kv.attend(layer if kv_layer is None else kv_layer, q[r], k[r], v[r], batch.positions[r], window,
                                 w.attn_sinks, s.apart)
        return self.family.pieces.attention_output(cfg, w, out, ops)

    def _ffn(self, layer: int, w: LayerWeights[Linear], x: np.ndarray, batch: Batch, ops: RuntimeOps,
             prefetcher: Prefetcher | None = None) -> np.ndarray:
        """The layer's feed-forward block: streamed experts, or a resident dense MLP in a layer without them."""
        h = rms_norm(x, w.ffn_norm, self.cfg.norm_eps)
        if w.mlp is not None:
            return ops.mlp(w.mlp, h)
        return self.moe(layer, w, h, x, batch, ops, self.prefetcher if prefetcher is None else prefetcher)

    # ------------------------------------------------------------------ forward
    def new_kv(self, capacity: int | None = None) -> KVCache:
        return KVCache(self.cfg, capacity or self.kv_capacity, self.kv_dtype)

    def forward_batch(self, items: Sequence[tuple[KVCache, np.ndarray]], all_logits: bool = False,
                      apart: Sequence[bool] | None = None, observed: bool = True) -> list[np.ndarray]:
        """One step for several sequences: each (kv cache, new ids) appends its ids to its own cache.
        An expert needed by several sequences is read once; every computation runs on each
        sequence's rows separately, so a sequence gets bit-for-bit the logits it would get alone.
        A sequence whose `apart` is true (speculative verification) has each row computed alone, its logits bit
        for bit those of a decode step of that token, and gets the logits of every row. Returns per sequence the
        logits (n, vocab) of every new position, or only of its last."""
        start, x, resumed = 0, None, False
        if self.fused is not None and (done := self.fused.run(items, observed)) is not None:
            if isinstance(done, list):
                return done
            # the compiled call stopped at layer `start` (an expert to read), its attention done: the rest here
            (start, x), resumed = done, True
        cfg = self.cfg
        batch = Batch.of(items, apart, observed)
        ops = RuntimeOps(batch, self.kernels == "int8")
        if x is None:
            embed = self.weights.embed
            x = get_rows(embed.raw, embed.dtype, batch.ids, cfg.d_model)  # (N, d_model)
        layer = start
        while layer < cfg.n_layers:
            w = self.layers[layer]
            self.cache.note_layer(layer)
            if not (resumed and layer == start):
                x = x + self._attention(layer, w, rms_norm(x, w.attn_norm, cfg.norm_eps), batch, ops)
            x = x + self._ffn(layer, w, x, batch, ops)
            layer += 1
            if resumed and layer < cfg.n_layers:  # its experts read: the compiled call goes on from the next layer
                kv, ids = items[0]
                done = self.fused.resume(kv, int(ids[0]), layer, x, observed)
                if isinstance(done, list):
                    return done
                start, x = done  # stopped again: that layer's experts here, then the compiled call again
                layer = start
        batch.commit()
        self.last_x = x
        out = []
        for s in batch.seqs:
            rows = x[s.rows] if all_logits or s.apart else x[s.start + s.n - 1:s.start + s.n]
            normed = np.ascontiguousarray(rms_norm(rows, self.weights.output_norm, cfg.norm_eps))
            out.append(np.concatenate([self.output(normed[i:i + 1]) for i in range(len(normed))]) if s.apart
                       else self.output(normed))
        return out

    def forward(self, ids: np.ndarray, all_logits: bool = True, rows_apart: bool = False) -> np.ndarray:
        """Append `ids` to the engine's own sequence; logits (n, vocab) of every new position (or the last)."""
        return self.forward_batch([(self.kv, ids)], all_logits=all_logits, apart=[rows_apart])[0]

    def reset(self) -> None:
        self.kv.length = 0

    # ------------------------------------------------------------------ multi-token prediction
    def new_mtp_kv(self, capacity: int | None = None) -> KVCache:
        """A KV cache for the MTP blocks alone (one layer each)."""
        return KVCache(self.cfg, capacity or self.kv_capacity, self.kv_dtype, layers=self.cfg.nextn_layers)

    def mtp_forward(self, kv: KVCache, ids: np.ndarray, hidden: np.ndarray, block: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """MTP block `block` over consecutive positions continuing `kv` (new_mtp_kv): row i joins the token ids[i] that
        follows position p_i with `hidden[i]`, the final hidden state at p_i (the main model's, normed by its output
        norm, or this block's own output when chaining), and predicts the token after ids[i]. Returns the logits
        (n, vocab) and the block's output hidden states (n, d_model)."""
        cfg, w = self.cfg, self.mtp_layers[block]
        layer = cfg.n_layers + block
        batch = Batch.of([(kv, ids)])
        ops = RuntimeOps(batch, self.kernels == "int8")
        table = w.mtp_embed or self.weights.embed  # DeepSeek's block holds its own copy; GLM's uses the model's
        e = get_rows(table.raw, table.dtype, batch.ids, cfg.d_model)
        e[batch.positions == 0] = 0.0  # position 0 has no token before it (as vLLM's MTP does)
        both = np.concatenate([rms_norm(e, w.mtp_enorm, cfg.norm_eps), rms_norm(hidden, w.mtp_hnorm, cfg.norm_eps)], axis=1)
        x = w.mtp_eh_proj(np.ascontiguousarray(both, np.float32))
        self.cache.note_layer(layer)
        x = x + self._attention(layer, w, rms_norm(x, w.attn_norm, cfg.norm_eps), batch, ops, kv_layer=block)
        x = x + self._ffn(layer, w, x, batch, ops, prefetcher=NO_PREFETCH)
        batch.commit()
        head = w.mtp_head or self.output
        return head(np.ascontiguousarray(rms_norm(x, w.mtp_head_norm, cfg.norm_eps))), x
