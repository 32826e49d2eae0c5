"""When a decode step runs in one compiled call (`kernels.step.decode_step`), and the Python around it.

It applies to models of the standard pieces (Mixtral-, Qwen3-MoE-, OLMoE- and gpt-oss-like: softmax router, top-k,
SwiGLU experts or the GLU of `pieces.glu`, grouped-query attention with rotary, q/k norms per head or over the
projection, biases on q/k/v/o, the router and the experts, attention sinks, sliding windows), every layer with routed
experts and nothing else (no shared expert, no dense MLP layer, no correction bias), in the 8-bit mode with every
matrix on the 8-bit kernels (experts included: packed where the cache holds every expert, else a type they read as
it is, Q4_K / Q5_K / Q6_K; a streamed Q4_0 slot is not packed), exact routing, no stand-ins; the slots are the cache's
arena, or mappings of the files with `--io mmap` / `auto`, their addresses kept by the store. Per step,
to one sequence decoding one token with an f16 or float32 KV cache (a step of several such sequences, the server's
decode, runs one call per sequence). The call goes layer by layer until a layer chooses an expert that is not resident
yet (a model's first tokens read its experts); it returns with that layer's routing and attention done, Python looks
the layer's experts up and waits for them as the general path would (`StreamingMoE.fetch`: misses read, the routing
observed, the next layer's guesses prefetched), and a compiled call goes on from that layer's experts (`_go_on`).
Before, the general path computed that layer (~9 ms of Python per layer on Qwen3-30B-A3B's shape, most of a miss's
cost there). Several sequences' step that stops goes to the general path, whose layer then goes on compiled (`resume`).
Slots cannot change under the call: the engine's thread is in it, and only that thread evicts (the background fill,
fill.py, takes free slots only; a victim is chosen by `acquire` / `prefetch` on this thread, between calls, and its
slot_of entry is -1 from then on); a load completing meanwhile only turns a slot from -1 to its number. So a cache
smaller than the experts (streaming) steps compiled too: each miss is a stop. The layers a call goes through make no
prefetch guesses, so more of the misses are waited for, yet the tokens went faster (docs/BENCHMARKS.md, "Full size:
notes", stop 50). Several sequences' steps take the general path while streaming: their calls would mostly stop and
the step be taken again.

What the call leaves to Python, afterwards and in layer order, is what the general path does per layer around
its kernels: the trace, the routing history, the cache's usage estimates and the prefetcher's (`_observe`), and the
cache's lookups and hits (`ExpertCache.touch`). The layers it goes through make no prefetch guesses: only a layer
with an expert to read does (in `fetch`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import xxhash

from ..families.pieces import STANDARD, _cos_sin
from ..kernels import step as kstep
from ..kernels.attention import _no_sinks
from ..layout.buffers import page_aligned
from ..layout.config import GatingFunc, QKNorm, RopeScaling
from .batch import KVCache
from .prefetch import Prefetcher

if TYPE_CHECKING:
    from .model import MoEModel

ALIGN = 64  # each dense matrix starts on a cache line of the arena
# a streaming cache's decode steps run compiled while they average fewer expert reads per layer than this (a decayed
# mean over the steps); above it the general path's per-layer prefetch guesses are worth more (docs/BENCHMARKS.md)
STEP_READS = 0.25
READS_DECAY = 0.7
ROPE_CHUNK = 256  # positions whose rotary angles are computed at once


class DenseArena:
    """Every dense matrix's bytes in one buffer, in load order, each at a 64-byte aligned offset: the compiled step
    reaches all of them through one array and offsets (the matrices are views of it, packed in place as before). `buf`:
    an earlier arena's bytes, already filled and packed (a packed copy, runtime/packed.py); `plan` then tells whether
    this load took the same pieces in the same order."""

    def __init__(self, nbytes: int, buf: np.ndarray | None = None) -> None:
        # reads into it copy fast only page-aligned (layout/buffers.py)
        self.buf = page_aligned(max(nbytes, 1)) if buf is None else buf
        self.filled = buf is not None
        self.used = 0
        self._plan = xxhash.xxh3_64()

    @staticmethod
    def size_for(sizes: list[int]) -> int:
        return sum(-(-n // ALIGN) * ALIGN for n in sizes)

    def take(self, nbytes: int, name: str) -> np.ndarray:
        if self.used + nbytes > self.buf.size:
            raise ValueError(f"dense arena: {name}'s {nbytes} bytes do not fit after {self.used} of {self.buf.size}")
        out = self.buf[self.used:self.used + nbytes]
        self._plan.update(f"{name}:{self.used}:{nbytes};".encode())
        self.used += -(-nbytes // ALIGN) * ALIGN
        return out

    def plan(self) -> str:
        """The pieces taken so far, their offsets and sizes, as a digest."""
        return self._plan.hexdigest()

    def offset(self, a: np.ndarray) -> int | None:
        """a's byte offset in the arena, or None when a is not a view of it."""
        off = a.ctypes.data - self.buf.ctypes.data
        return off if 0 <= off and off + a.nbytes <= self.buf.size and np.may_share_memory(a, self.buf) else None


def _unsupported(model: MoEModel) -> str | None:
    """Why the model's steps never run compiled, or None."""
    cfg, moe = model.cfg, model.moe
    if model.kernels != "int8":
        return "the exact kernels"
    if model.family.pieces != STANDARD or cfg.mla:
        return f"family {cfg.arch} has pieces of its own"
    if cfg.gating_func is not GatingFunc.SOFTMAX or cfg.n_groups > 1:
        return "a router other than softmax top-k"
    if moe.hooks.routing_override is not None or moe.approx.reroutes or moe.standins is not None:
        return "approximate or replayed routing"
    if moe.hooks.experts is not None:
        return "experts computed elsewhere (shards)"
    if not all(all(flags) for flags in moe.full.int8.values()):
        return "an expert type without 8-bit kernels"
    if cfg.rope_scaling not in (RopeScaling.NONE, RopeScaling.YARN):
        return f"rope scaling {cfg.rope_scaling}"
    for i, w in enumerate(model.layers):
        if w.router is None or w.mlp is not None or w.shared is not None or w.expert_bias is not None \
                or w.attn_q is None:
            return f"layer {i} is not a plain routed-experts layer"
        if any(not m.checked.int8 or model.dense_arena.offset(m.checked.w2) is None
               for m in (w.attn_q, w.attn_k, w.attn_v, w.attn_o)):
            return f"layer {i} has a matrix without 8-bit kernels"
    out = model.output.checked
    if not out.int8 or model.dense_arena.offset(out.w2) is None:
        return "an output matrix without 8-bit kernels"
    return None


class FusedStep:
    """The compiled decode step of one model: its tables, built once, and the Python around each call."""

    def __init__(self, model: MoEModel, step_reads: float = STEP_READS) -> None:
        self.model = model
        self.step_reads = step_reads
        # expert reads per layer of recent decode steps (decayed), from the cache's loads since the last one began;
        # None until a step is measured (that step goes the general way: a cold streaming cache reads at every layer)
        self.reads: float | None = None
        self._loads: int | None = None
        cfg, arena = model.cfg, model.dense_arena

        def mat(m) -> list[int]:  # noqa: ANN001 - (offset, type code, rows, row bytes) of a Linear in the arena
            w = m.checked
            return [arena.offset(w.w2), w.kind, w.rows, w.w2.nbytes // w.rows]

        self.mats = np.array([[mat(m) for m in (w.attn_q, w.attn_k, w.attn_v, w.attn_o)] for w in model.layers], np.int64)
        self.head = np.array(mat(model.output), np.int64)
        parts, at = [], 0
        self.vec_at = np.full((cfg.n_layers, kstep.VECTORS), -1, np.int64)
        for i, w in enumerate(model.layers):
            qkv_bias = None if w.q_bias is None else np.concatenate([w.q_bias, w.k_bias, w.v_bias])
            for slot, v in ((kstep.ATTN_NORM, w.attn_norm), (kstep.FFN_NORM, w.ffn_norm), (kstep.Q_NORM, w.q_norm),
                            (kstep.K_NORM, w.k_norm), (kstep.Q_BIAS, qkv_bias), (kstep.O_BIAS, w.o_bias),
                            (kstep.SINKS, w.attn_sinks), (kstep.ROUTER_BIAS, w.router_bias)):
                if v is not None:
                    self.vec_at[i, slot] = at
                    parts.append(np.asarray(v, np.float32).ravel())
                    at += parts[-1].size
        self.vec = np.concatenate(parts) if parts else np.zeros(1, np.float32)
        self.out_norm = np.ascontiguousarray(model.weights.output_norm, np.float32)
        # (L, E, d): a copy of the routers beside the layers' own (Qwen3-30B-A3B's 48 take 50 MB)
        self.routers = np.ascontiguousarray(np.stack([w.router for w in model.layers]), np.float32)
        qk = {QKNorm.NONE: 0, QKNorm.HEAD: 1, QKNorm.FULL: 2}[cfg.qk_norm]
        self.shape = np.array([cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.rotary_dim, qk, cfg.d_ff], np.int64)
        self.windows = np.array([cfg.window(i) for i in range(cfg.n_layers)], np.int64)
        self.sinks = _no_sinks(cfg.n_heads)
        tier = model.moe.full
        self.geometry = np.zeros((cfg.n_layers, cfg.n_experts, 3, 4), np.int64)
        for (layer, expert), g in tier.geometry.items():
            self.geometry[layer, expert] = g
        self.act = model.moe.act
        self.yarn = None
        if cfg.rope_scaling is RopeScaling.YARN:
            self.yarn = (cfg.rope_factor, cfg.rope_original_context, cfg.yarn_beta_fast, cfg.yarn_beta_slow,
                         cfg.yarn_truncate)
        self.embed = model.weights.embed.checked  # rows looked up as the file holds them (never packed)
        self._rope: tuple[int, np.ndarray, np.ndarray] = (-1, np.empty(0), np.empty(0))  # a chunk of positions' cos/sin
        self.divisor, self.eps = float(cfg.softmax_divisor), float(cfg.norm_eps)
        self.scaling = np.float32(cfg.routed_scaling)
        self.steps = 0  # tokens run compiled to the end
        self.partial = 0  # tokens a compiled call began and the general path took on (an expert it could not have)
        self.resumed = 0  # compiled calls that went on from a layer after an earlier call stopped there or before it
        self.fetched = 0  # layers whose experts a stopped call's token waited for between calls (`_go_on`)
        self.left = 0  # streaming decode steps left to the general path: they read too many experts (`_reads_few`)

    @classmethod
    def of(cls, model: MoEModel, step_reads: float = STEP_READS) -> FusedStep | None:
        return None if _unsupported(model) is not None else cls(model, step_reads)

    def run(self, items, observed: bool) -> list[np.ndarray] | tuple[int, np.ndarray] | None:  # noqa: ANN001
        """forward_batch's items -> the logits it returns; or, for one sequence, (layer, x (1, d_model)) when a call
        stopped at a layer whose experts it could not have (x: its input plus its attention, the keys and values
        stored); or None when this step is not one the compiled call takes. One sequence's call that stops at an expert
        to read waits for that layer's experts and goes on from them (`_go_on`). Several sequences of one token each
        (the server's decode steps) run one call each, each row alone as the general path computes it; if one of them
        stops at an expert to read, the general path takes the whole step again (the keys and values the calls stored
        are the ones it stores: the same bits at the same positions)."""
        if any(len(ids) != 1 or kv.dtype not in ("f16", "f32") for kv, ids in items):
            self._loads = None  # a prompt's reads are no decode step's
            return None
        if self.model.cache.learns and not self._reads_few(len(items), observed):
            return None
        slots, n = self.model.cache.slot_of, self.model.cfg.n_layers
        done = [self._call(kv, int(ids[0]), slots) for kv, ids in items]
        if len(done) == 1 and done[0].layers < n:
            kv, token = items[0][0], int(items[0][1][0])
            return self._finish(kv, self._go_on(kv, token, done[0], 0, observed), observed)
        if any(d.layers < n for d in done):
            self.partial += len(done) * observed
            return None
        for kv, _ in items:
            kv.length += 1
        self._account(done, observed, n)
        self.steps += len(done) * observed
        self.model.last_x = done[0].x.reshape(1, -1) if len(done) == 1 else np.stack([d.x for d in done])
        return [d.logits.reshape(1, -1) for d in done]

    def _reads_few(self, n_seqs: int, observed: bool) -> bool:
        """Whether a streaming cache's decode step runs compiled: one sequence (several sequences' calls would mostly
        stop at a miss and the general path take the step again), and recent steps' reads per layer below
        `step_reads` (inf: always; each miss stops the call, and the layers it goes through make no prefetch guesses)."""
        st = self.model.cache.stats
        loads = st.loads - st.prefetch_ahead  # reads ahead go while the disk is idle: not this rule's cost
        if n_seqs > 1:
            self._loads = None
            return False
        if observed and self._loads is not None:  # the reads since the last decode step began: that step's
            step = (loads - self._loads) / self.model.cfg.n_layers
            self.reads = step if self.reads is None else READS_DECAY * self.reads + (1 - READS_DECAY) * step
        self._loads = loads
        if self.step_reads < math.inf and (self.reads is None or self.reads >= self.step_reads):
            self.left += observed
            return False
        return True

    def resume(self, kv: KVCache, token: int, first: int, x: np.ndarray,
               observed: bool) -> list[np.ndarray] | tuple[int, np.ndarray]:
        """The compiled call again for one sequence's token from layer `first` on, x (1, d_model) the hidden state the
        general path left entering it (it took a layer whose experts the compiled call could not have): `run`'s
        result for that sequence."""
        one = self._call(kv, token, self.model.cache.slot_of, first, x.reshape(-1).copy())
        self.resumed += observed
        return self._finish(kv, self._go_on(kv, token, one, first, observed), observed)

    def _go_on(self, kv: KVCache, token: int, one: _Done, first: int, observed: bool) -> _Done:
        """The layers `one` (a call from layer `first`) went through accounted; then, while it stopped at a layer with an
        expert to read, that layer's experts looked up and waited for as the general path would (`StreamingMoE.fetch`:
        the next layer's guesses prefetched too) and a compiled call on from them. Returns the last call: through every
        layer, or stopped again at the layer just fetched (its experts taken meanwhile: the general path's then)."""
        model, n = self.model, self.model.cfg.n_layers
        self._account([one], observed, one.layers, first)
        positions = np.array([one.pos], np.int64)
        while one.layers < n:
            layer = one.layers
            model.moe.fetch(layer, positions, one.chosen[layer:layer + 1], one.weights[layer:layer + 1],
                            one.x.reshape(1, -1), observed, model.prefetcher)
            self.fetched += observed
            again = self._call(kv, token, model.cache.slot_of, layer, one.x.copy(), moe_first=True)
            self._account([again], observed, again.layers, layer + 1)  # the layer's own lookups were fetch's
            self.resumed += observed
            if again.layers == layer:
                return again
            one = again
        return one

    def _finish(self, kv: KVCache, one: _Done, observed: bool) -> list[np.ndarray] | tuple[int, np.ndarray]:
        """`run`'s result for one sequence whose last call is `one`."""
        if one.layers < self.model.cfg.n_layers:
            self.partial += observed  # a warm-up step (unobserved) is no part of the run's counts
            return one.layers, one.x.reshape(1, -1)
        kv.length += 1
        self.steps += observed
        self.model.last_x = one.x.reshape(1, -1)
        return [one.logits.reshape(1, -1)]

    def warmup(self, kv: KVCache, token: int) -> None:
        """Compile (or load) the step before anything is timed: one call on a scratch sequence `kv` (numba compiles
        the whole call at the first, however far it goes: it stops at the first expert not resident), its result
        thrown away, nothing recorded."""
        if kv.dtype in ("f16", "f32"):
            self._call(kv, token, self.model.cache.slot_of)

    def _call(self, kv: KVCache, token: int, slots: np.ndarray, first: int = 0, x: np.ndarray | None = None,
              moe_first: bool = False) -> _Done:
        """One compiled call for `token` at the next position of `kv` (its length not advanced), from layer `first` on
        (x: the hidden state entering it; with `moe_first`, entering its experts, its attention done)."""
        model, cfg = self.model, self.model.cfg
        pos = kv.length
        kv.ensure(pos + 1)
        x = np.empty(cfg.d_model, np.float32) if x is None else x
        cos, sin = self._rotary(pos)
        logits = np.empty(cfg.vocab_size, np.float32)
        k = cfg.n_experts_used
        chosen = np.empty((cfg.n_layers, k), np.int64)
        weights = np.empty((cfg.n_layers, k), np.float32)
        store = model.moe.store
        layers = kstep.decode_step(token, self.embed.w2, self.embed.kind, x, pos, model.dense_arena.buf, self.mats,
                                   self.head, self.vec, self.vec_at, self.out_norm, self.routers, self.shape, cos, sin,
                                   kv.k, kv.v, self.windows, self.sinks, self.divisor, self.eps, store.slot_addr,
                                   slots, self.geometry, self.act, k, cfg.norm_topk_prob, self.scaling,
                                   logits, chosen, weights, first, moe_first)
        return _Done(pos, layers, x, logits, chosen, weights)

    def _rotary(self, pos: int) -> tuple[np.ndarray, np.ndarray]:
        """cos and sin (rd / 2,) float32 at `pos`, as `pieces.rotary` computes them for that position alone: one
        computation per ROPE_CHUNK positions, the last chunk kept (numpy computes each row of a table as it computes
        that row alone; tests/test_fused_step.py holds it to that)."""
        chunk, cos, sin = self._rope
        if pos // ROPE_CHUNK != chunk:
            cfg, chunk = self.model.cfg, pos // ROPE_CHUNK
            positions = np.arange(chunk * ROPE_CHUNK, (chunk + 1) * ROPE_CHUNK, dtype=np.int64)
            cos, sin = _cos_sin.__wrapped__(cfg.rope_theta, cfg.rotary_dim, self.yarn, cfg.rope_attn_factor,
                                            positions.tobytes(), np.dtype(np.float32).str)
            cos, sin = cos[:, 0], sin[:, 0]
            self._rope = (chunk, cos, sin)
        return cos[pos % ROPE_CHUNK], sin[pos % ROPE_CHUNK]

    def _account(self, done: list[_Done], observed: bool, layers: int, first: int = 0) -> None:
        """What the general path records around its kernels for layers first..layers - 1 of these rows (a step's
        sequences, in order), per layer: `StreamingMoE._observe`'s trace, history, prefetcher and the cache's estimates,
        then the cache's lookups of the layer's experts (each once, whatever number of rows chose it)."""
        if layers <= first:
            return
        model = self.model
        hooks, cache, prefetcher = model.moe.hooks, model.cache, model.prefetcher
        if len(done) == 1:
            chosen, weights = done[0].chosen[first:layers, None], done[0].weights[first:layers, None]  # (layers, rows, k)
        else:
            chosen = np.stack([d.chosen[first:layers] for d in done], axis=1)
            weights = np.stack([d.weights[first:layers] for d in done], axis=1)
        # a step's hooks in layer order, where there are any (the base prefetcher observes nothing; the cache keeps
        # no usage estimates, holding every expert: ExpertCache.learns)
        if observed and (hooks.trace or hooks.history or type(prefetcher).observe is not Prefetcher.observe
                         or cache.learns):
            positions = np.array([d.pos for d in done], np.int64)
            for i, layer in enumerate(range(first, layers)):
                if hooks.trace is not None:
                    hooks.trace(positions, layer, chosen[i], weights[i])
                cache.record_routing(layer, chosen[i].ravel())
                if hooks.history is not None:
                    hooks.history.record(layer, chosen[i], None)
                prefetcher.observe(layer, chosen[i])
        cache.touch(chosen.reshape(layers - first, -1), first)


@dataclass(frozen=True)
class _Done:
    """One sequence's compiled call: its position, the layers it went through (n_layers: all, and the head), the final
    (or stopped-at) hidden state, the logits, and each layer's choice and weights."""

    pos: int
    layers: int
    x: np.ndarray  # (d_model,)
    logits: np.ndarray  # (vocab,)
    chosen: np.ndarray  # (n_layers, k)
    weights: np.ndarray  # (n_layers, k)
