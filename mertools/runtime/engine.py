"""Engine: the public runtime API used by the CLI, the server and the tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import RuntimeConfigError
from ..kernels import int8
from ..kernels.gemm_kernels import GEMM_MIN_N
from ..kernels.simd import AVX512
from ..layout.reader import Layout
from . import generation, preload
from .approx import Approx
from .batch import check_kv_dtype, kv_bytes_per_token
from .cache import CacheStats, ExpertCache
from .fill import BackgroundFill
from .fused import STEP_READS
from .generation import GeneratedToken, checked
from .history import RoutingHistory
from .hooks import ModelHooks, PrefetcherFactory, RoutingOverride, TraceFn
from .memory import available_bytes, cached_shares, peak_rss_bytes, total_bytes
from .model import KVCache, MoEModel
from .moe import Tier, expert_packer
from .mtp import MtpDrafter
from .packed import PackedCopies, copies_wanted, lowest_priority
from .prefetch import PREFETCH_DEPTH, PREFETCH_MODES
from .sampling import SamplingParams
from .shards import Plan, ShardedExperts, open_shards
from .sizing import MARGIN, draft_footprint, fits_beside, model_bytes, one_blas_thread
from .speculative import Drafter, ModelDrafter, NgramDrafter, SpecStats
from .stats import RunStats, RunTimes
from .store import ExpertStore
from .text import check_ids

__all__ = ["Engine", "GeneratedToken", "RuntimeConfigError", "IO_MODES", "KERNEL_MODES", "draft_footprint", "model_bytes"]

CACHE_COUNTS = ("lookups", "hits", "misses", "loads", "evictions", "prefetch_issued", "prefetch_used", "prefetch_wasted",
                "prefetch_cancelled", "prefetch_ahead", "wait_seconds")  # CacheStats' counters, summed over expert shards
DEFAULT_CONTEXT = 256  # a KV cache's first size when no context is asked for
IO_MODES = ("direct", "buffered", "mmap", "auto")  # --io: Engine.open's `io`
KERNEL_MODES = ("exact", "int8")  # --kernels: Engine.open's `kernels`


WARM = 0.9  # a file this much in the page cache was read whole by an earlier process


def auto_io(layout: Layout, fits: bool, packs: bool, always_pack: bool = False) -> str:
    """Engine.open's io "auto". A budget below the experts, or a layout that does not fit in memory, asks for a
    bound the page cache would not keep: direct. Otherwise map the files (nothing copied, the page cache shared with
    the next process), unless the 8-bit kernels would pack the slots after their read and the files are not in the
    page cache yet: then read them buffered, so that the next process finds them there and maps them (a one-shot run
    gains more from not reading than from packed kernels). "There": whole expert files in the page cache, most of
    what is (an earlier run read the experts it used; stray pages do not count). `always_pack`: buffered even then."""
    if not fits:
        return "direct"
    if not packs:
        return "mmap"
    if always_pack:
        return "buffered"
    shares = cached_shares([layout.path(e.file) for e in layout.manifest.experts])
    whole = sum(size for size, share in shares if share >= WARM)
    return "mmap" if whole and whole >= WARM * sum(size * share for size, share in shares) else "buffered"


class Engine:
    def __init__(self, layout: Layout, store: ExpertStore, cache: ExpertCache, model: MoEModel,
                 prefetch: str, threads: int | None, history: RoutingHistory | None = None, preloaded: int = 0,
                 shards: ShardedExperts | None = None, loading: threading.Thread | None = None,
                 first_kernels: tuple[list[Any], str] | None = None, filler: BackgroundFill | None = None) -> None:
        self.layout, self.store, self.cache, self.model = layout, store, cache, model
        self.filler = filler  # the background fill (fill.py), stopped at close
        self.loading = loading  # the thread loading cached kernels (preload.py), joined at close
        # (dispatchers, KV type): the first step's kernels, which this thread loads as `loading` does (preload.load)
        # before that step wherever it gets ahead of it: numba's own first load would refresh its registries first
        self._first_kernels = first_kernels
        self.shards = shards  # experts computed by Ray actors (shards.py); None: here
        self.history, self.preloaded = history, preloaded  # the learning cache, experts it had loaded at open
        self.config = layout.manifest.config
        self.prefetch_mode = prefetch
        self.threads = threads
        self._tokenizer = None
        self.times = RunTimes()
        self.spec = SpecStats()  # speculative decoding's counts (generate with a draft)
        self.closed = False  # a closed engine's slots are unmapped and zeroed: no step may run on them

    @classmethod
    def open(cls, layout_dir: str | Path, cache_mb: float | None = None, prefetch: str | PrefetcherFactory = "lookahead",
             threads: int | None = None, *, policy: str = "lfd", io: str = "direct", verify: bool = True,
             io_depth: int = 8, trace: TraceFn | None = None, routing_override: RoutingOverride | None = None,
             kv_dtype: str = "f16", context: int | None = None, approx: Approx | None = None,
             reserve_bytes: int = 0, history: str | Path | None = None, kernels: str = "exact",
             compiled_step: bool = True, shards: int | None = None, plan: str | Path | Plan | None = None,
             ray_address: str | None = None, long_lived: bool = False, packed_copies: bool | None = None,
             fill: bool = False, step_reads: float = STEP_READS, prefetch_depth: int = PREFETCH_DEPTH) -> Engine:
        """`prefetch` is a mode name or a factory of a prefetcher of one's own; `trace` is called with
        every layer's routing, `routing_override` replaces the router's choices (benchmarks); `approx` turns on approximate
        routing (runtime/approx.py: skipped and resident-substituted expert choices; exact by default). The KV cache
        holds `kv_dtype` ("f16", "q8_0" or the exact "f32"), sized for `context` positions (default 256, grown as
        needed); without `cache_mb`, the expert cache gets what is left after the dense weights, that KV
        cache, a margin and `reserve_bytes` (a draft model's, `draft_footprint`). `io`: "direct" (O_DIRECT reads
        into the cache's arena), "buffered" (reads that keep their pages for the next process), "mmap" (slots
        map the expert files: nothing copied, the page cache shared with other processes) or "auto" (`auto_io`): mmap when
        the cache holds every expert and the whole layout fits in memory beside the KV cache and a margin
        (`fits_beside`), else direct (a budget below the experts is a bound the page cache would not keep); with the
        8-bit kernels, whose packing a mapping cannot take, buffered until the files are in the page cache, and always
        for a `long_lived` process (a server: the read costs once, the packed kernels gain at every token) or, on a
        CPU without AVX-512, for Q4_0 / Q8_0 / MXFP4 experts (mapped, they would run slower exact kernels).
        `history`: the learning cache's file (history.py): the experts it saw used most are loaded now and ranked
        by the cache policy from the first token; this run's routing is added to it when the engine closes.
        `kernels`: "exact" (the float kernels, bit-exact with ggml's dequantization) or "int8" (activations quantized
        to 8 bits as ggml's q8_0 or q8_K, integer dot products: kernels/int8.py, kernels/act8.py). Q4_0 / Q8_0 /
        MXFP4 weights are then packed once, dense ones at open and expert slots as they load when the cache holds
        every expert and reads them (so "auto" io's first run reads such experts into the cache's own memory, and a run
        that finds the files in the page cache maps them; "mmap", or a cache smaller than the experts, leaves them on
        the exact kernels); the K types are read as they are. With "int8", decode steps run in one compiled call per
        sequence where the model's pieces allow (runtime/fused.py; the same bits); `compiled_step` False takes every
        step piece by piece (tests and benchmarks compare the two). A cache smaller than the experts steps compiled too while its
        recent decode steps read fewer than `step_reads` experts per layer (the general path's prefetch guesses pay
        above that; float("inf"): always, 0: never). `packed_copies` (default: on unless MERTOOLS_PACKED_COPIES=0):
        where reads keep their pages and the slots are packed, the packed experts and dense weights are kept as files
        in the layout's packed/ directory, which later engines map instead of reading and packing (runtime/packed.py);
        once they exist, "auto" reads buffered (maps them). `fill`: when the cache holds every expert, read the ones not
        used yet on a thread of the lowest priority (fill.py: it reads when the compute leaves a core idle, as a
        server does between requests; `serve` fills, `run --fill` too). Opening an engine limits numpy's BLAS to one
        thread in this process (`one_blas_thread`)."""
        layout = Layout.open(layout_dir)
        m = layout.manifest
        learned = RoutingHistory.open(history, layout) if history is not None else None
        cfg = m.config
        if io not in IO_MODES:
            raise RuntimeConfigError(f"io must be one of {', '.join(IO_MODES)}, got {io!r}")
        if kernels not in KERNEL_MODES:
            raise RuntimeConfigError(f"kernels must be one of {', '.join(KERNEL_MODES)}, got {kernels!r}")
        if isinstance(prefetch, str) and prefetch not in PREFETCH_MODES:
            raise RuntimeConfigError(f"prefetch must be one of {', '.join(PREFETCH_MODES)}, got {prefetch!r}")
        if prefetch_depth < 1:
            raise RuntimeConfigError(f"prefetch depth must be at least 1, got {prefetch_depth}")
        if approx is not None and not isinstance(approx, Approx):
            raise RuntimeConfigError(f"approx must be an Approx, got {type(approx).__name__}")
        if threads is not None:
            import numba

            numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
        try:
            check_kv_dtype(cfg, kv_dtype)
        except ValueError as e:
            raise RuntimeConfigError(f"{layout_dir}: {e}") from None
        if context is not None and not 0 < context <= cfg.context_length:
            raise RuntimeConfigError(f"context {context} must lie in [1, the model's {cfg.context_length}]")
        kv_capacity = context or DEFAULT_CONTEXT
        kv_bytes = kv_capacity * kv_bytes_per_token(cfg, kv_dtype)
        slot_bytes = max(e.nbytes for e in m.experts)
        need = cfg.n_experts_used
        remote = None
        if shards is not None or plan is not None:  # the experts on Ray actors, each shard's budget cache_mb
            remote = open_shards(str(layout_dir), cfg, shards, plan, kernels, cache_mb, threads, ray_address, approx)
            cache_mb, prefetch = need * slot_bytes / 2**20, "none"  # this process reads no expert
        if cache_mb is None:
            dense = sum(t.nbytes for t in m.dense.values())
            budget = available_bytes() - dense - MARGIN - kv_bytes - reserve_bytes
        else:
            budget = int(cache_mb * 2**20)
        standin_slots = standin_bytes = 0
        if approx is not None and approx.standin_share > 0:
            if not m.standins:
                raise RuntimeConfigError(f"{layout_dir}: carries no stand-ins for standin_share; add them with "
                                         "`mertools convert SRC OUT --standins q2_k` or `mertools standins LAYOUT q2_k`")
            standin_slot = max(e.nbytes for e in m.standins)
            # every miss a stand-in and no fill: full experts are never read, so stand-ins get all the main cache spares
            share = 1.0 if approx.standin_share >= 1 and not approx.standin_fill else approx.standin_cache
            room = min(int(budget * share), budget - need * slot_bytes)  # the main cache keeps one layer's choices
            # at least one layer's choices, and no more than there are stand-ins
            standin_slots = min(len(m.standins), max(need, room // standin_slot))
            standin_bytes = standin_slots * standin_slot
            budget -= standin_bytes
        if cache_mb is None:
            slots = max(need, min(len(m.experts), budget // slot_bytes))
        else:
            slots = min(len(m.experts), budget // slot_bytes)
            if slots < need:
                raise RuntimeConfigError(
                    f"--cache-mb {cache_mb:g} is smaller than one layer's active experts: {need} x "
                    f"{slot_bytes / 2**20:.1f} MiB = {need * slot_bytes / 2**20:.1f} MiB"
                    + (f", once {standin_bytes / 2**20:.1f} MiB are set aside for stand-ins" if standin_bytes else "")
                )
        # the 8-bit kernels pack some types' slots in place after their read, which a mapping of the file cannot take
        dtypes = {t.dtype for e in m.experts for t in e.tensors.values()}  # per tensor: GGUF presets mix them
        packs = kernels == "int8" and any(int8.repacks(t) for t in dtypes)
        # without AVX-512 the exact kernels that a mapped Q4_0 / Q8_0 / MXFP4 expert falls back to trail its packed
        # 8-bit ones (docs/BENCHMARKS.md "Decode: notes", the AVX2-only host): such experts are read and packed even
        # when the page cache holds them
        slow_exact = packs and not AVX512 and any(int8.needs_packing(t) for t in dtypes)
        # the packed slots and dense weights kept as files for the next process (packed.py), where reads keep pages;
        # once an earlier run wrote them, reading buffered maps them, packed, where a mapping of the files is not
        packed = (PackedCopies.of(layout.root) if packs and remote is None
                  and (copies_wanted() if packed_copies is None else packed_copies) else None)
        copied = packed is not None and packed.any()
        if io == "auto":
            io = auto_io(layout, slots == len(m.experts) and fits_beside(m, 0, kv_bytes), packs,
                         always_pack=long_lived or slow_exact or copied)
        direct, keep, mapped = io == "direct", io == "buffered", io == "mmap"
        # experts of a packed type are packed after their read only when the cache holds every expert: streaming, each
        # load's packing took the kernels' cores and the run was slower than on the exact kernels (docs/BENCHMARKS.md,
        # "Decode: notes"); mapped, they stay exact too (the others read the file's blocks as they are)
        prepare = expert_packer(cfg) if kernels == "int8" and not mapped and slots == len(m.experts) else None
        copies = packed if prepare is not None and keep else None
        copied = copied and copies is not None
        # numba's cached kernels loaded on the other core while this thread reads the dense weights (preload.py)
        # (the compiled step where the experts run on the 8-bit kernels as loaded: packed, or a type read as it is)
        stepped = kernels == "int8" and compiled_step and remote is None and (
            prepare is not None or not any(int8.needs_packing(t) for t in dtypes))
        loading = preload.start(preload.entry_points(kernels, stepped), kv_dtype)
        one_blas_thread()
        # address space for as many slots as the machine's memory holds, so `resize_cache` can grow the cache later
        capacity = len(m.experts) if mapped else min(len(m.experts), max(slots, total_bytes() // slot_bytes))
        store = ExpertStore(layout, slots, direct=direct, keep_pages=keep, verify=verify, io_depth=io_depth,
                            mapped=mapped, prepare=prepare, capacity=capacity, copies=copies)
        # the slots a first token fills, faulted in while the dense weights load (store.prefault); not for slots that
        # will map packed copies
        if remote is None and not copied:
            store.start_prefault(need * (cfg.n_layers + cfg.nextn_layers))
        pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="mertools-load")
        layers = cfg.n_layers + cfg.nextn_layers  # the MTP blocks' experts are cached like any layer's
        cache = ExpertCache(slots, layers, cfg.n_experts, store.load, pool, policy=policy, capacity=capacity)
        standins = None
        if standin_slots:
            s_store = ExpertStore(layout, standin_slots, direct=direct, keep_pages=keep, verify=verify,
                                  io_depth=io_depth, entries=m.standins, mapped=mapped, prepare=prepare)
            s_cache = ExpertCache(standin_slots, layers, cfg.n_experts, s_store.load, pool, policy=policy)
            standins = Tier.of(s_cache, s_store, cfg, kernels)
        hooks = ModelHooks(trace=trace, routing_override=routing_override, approx=approx, history=learned, experts=remote)
        if not copied:  # this thread packs the dense weights now: their kernels loaded first, as the thread loads its
            preload.load(preload.packing(kernels), kv_dtype)  # (numba's own first load refreshes its registries)
        model = MoEModel(layout, cache, store, prefetch=prefetch, hooks=hooks, kv_dtype=kv_dtype, kv_capacity=kv_capacity,
                         standins=standins, kernels=kernels, compiled_step=compiled_step, copies=copies,
                         step_reads=step_reads, prefetch_depth=prefetch_depth)
        preloaded = 0
        if learned is not None and (seed := learned.seed()) is not None:
            for c in (cache, standins.cache if standins else None):
                if c is not None:
                    c.seed(*seed)
            preloaded = cache.prefetch(learned.hot(slots, need))  # loads in the background while the prompt is read
        filler = None
        if fill and remote is None and slots == len(m.experts):
            filler = BackgroundFill(cache, low_priority=lowest_priority).start()
        return cls(layout, store, cache, model, prefetch if isinstance(prefetch, str) else model.prefetcher.mode, threads,
                   learned, preloaded, remote, loading, (preload.prompt(kernels), kv_dtype), filler)

    # ------------------------------------------------------------------ API
    @property
    def tokenizer(self):  # noqa: ANN201 - mertools.runtime.tokenizer.Tokenizer
        if self._tokenizer is None:
            from .tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(self.layout.root, self.layout.manifest.tokenizer)
        return self._tokenizer

    @property
    def position(self) -> int:
        return self.model.kv.length

    def forward(self, token_ids: Sequence[int], all_logits: bool = True) -> np.ndarray:
        """Logits (len(token_ids), vocab) float32, appending the tokens to the KV cache."""
        ids = self._check_ids(self.model.kv, token_ids)
        self._before_first_step()
        t0 = time.perf_counter()
        try:
            return self.model.forward(ids, all_logits=all_logits)
        finally:
            self.times.forward_s += time.perf_counter() - t0

    def reset(self) -> None:
        self.model.reset()

    def _before_first_step(self) -> None:
        if self._first_kernels is not None:
            dispatchers, kv_dtype = self._first_kernels
            self._first_kernels = None
            preload.load(dispatchers, kv_dtype)

    def warmup(self, prompt: str | Sequence[int] = "Hello") -> float:
        """Run every kernel path once before anything is timed, on a sequence of its own: numba compiles the kernels
        on a machine's first run (~10-20 s) and loads them from its cache after (~1 s), which would otherwise land
        in the first prefill and decode figures. Up to 16 of the prompt's tokens in one step (the GEMM path), then 3,
        then 1 (the few-row and decode paths), unobserved (no trace, history or estimates learn its routing); the
        experts read count in the statistics (the prompt's first tokens': its prefill needs them anyway), the time
        only in `warmup_s`. Returns the seconds taken."""
        self._before_first_step()
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        ids = (ids * 16)[:GEMM_MIN_N] or [0] * GEMM_MIN_N
        t0 = time.perf_counter()
        kv = self.model.new_kv(2 * GEMM_MIN_N)
        for part in (ids, ids[:3], ids[:1]):
            self.model.forward_batch([(kv, self._check_ids(kv, part))], observed=False)
        if self.model.fused is not None:  # compiled now, though the experts may not all be resident yet
            self.model.fused.warmup(kv, ids[0])
        self.times.warmup_s += (took := time.perf_counter() - t0)
        return took

    def resize_cache(self, cache_mb: float | None) -> int:
        """Give the expert cache a new budget (MiB; None: grow into what is free now, keeping the margin) and return its
        slots. Shrinking evicts the experts of the slots given up and returns their memory at once; growing fills
        the new slots as experts are read. Call between steps, from the thread that steps. Within the address space
        reserved at open (the machine's memory); stand-ins keep their share."""
        slot, need, cache = self.store.slot_bytes, self.config.n_experts_used, self.cache
        if cache_mb is None:
            slots = min(cache.capacity, cache.n_slots + max(0, available_bytes() - MARGIN) // slot)
        else:
            standins = self.model.moe.standins
            budget = int(cache_mb * 2**20) - (standins.store.n_slots * standins.store.slot_bytes if standins else 0)
            slots = min(len(self.layout.manifest.experts), budget // slot)
            if slots < need:
                raise RuntimeConfigError(f"cache_mb {cache_mb:g} is smaller than one layer's active experts: {need} x "
                                         f"{slot / 2**20:.1f} MiB")
            if slots > cache.capacity:
                raise RuntimeConfigError(f"cache_mb {cache_mb:g} is more than this process can grow its cache to "
                                         f"({cache.capacity * slot / 2**20:.0f} MiB, the machine's memory); restart")
        self.store.discard(cache.resize(slots))
        self.store.use_slots(slots)
        return slots

    def _check_ids(self, kv: KVCache, token_ids: Sequence[int]) -> np.ndarray:
        if self.closed:
            raise RuntimeConfigError(f"{self.layout.root}: the engine is closed")
        return checked(check_ids, token_ids, self.config.vocab_size, self.config.context_length, position=kv.length)

    # ------------------------------------------------------------------ batching (the server's API)
    def new_sequence(self, context: int | None = None) -> KVCache:
        """A sequence of its own (its KV cache, room for `context` positions), for `step`; drop it when done."""
        return self.model.new_kv(context)

    def step(self, items: Sequence[tuple[KVCache, Sequence[int]]], verify: Sequence[bool] | None = None
             ) -> list[np.ndarray]:
        """One forward step over several sequences at once (continuous batching): each item appends
        its new ids (a prompt chunk, or one sampled token) to its own sequence. Returns, per item, the
        logits (vocab,) float32 of its last new position; for an item whose `verify` is true (a token and its
        drafted successors), the logits (n, vocab) of every row, each computed as a decode step would.
        Not thread-safe: call from one thread."""
        batch = [(kv, self._check_ids(kv, ids)) for kv, ids in items]
        self._before_first_step()
        t0 = time.perf_counter()
        try:
            outs = self.model.forward_batch(batch, all_logits=False, apart=verify)
            return [out if verify is not None and verify[i] else out[-1] for i, out in enumerate(outs)]
        finally:
            self.times.forward_s += time.perf_counter() - t0

    def generate(self, prompt: str | Sequence[int], max_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, stop: Sequence[str] = (),
                 add_bos: bool | None = None, draft: Drafter | None = None,
                 draft_tokens: int = 4) -> Iterator[GeneratedToken]:
        """Reset, prefill the prompt, then yield tokens as they are sampled. With a `draft` (speculative.py: an
        NgramDrafter, or a ModelDrafter from `open_drafter`), up to `draft_tokens` drafted tokens are checked per
        forward step: greedy output is token for token the same, sampled output has the same distribution."""
        return generation.generate(self, prompt, max_tokens, SamplingParams(temperature, top_k, top_p, seed), stop,
                                   add_bos, draft, draft_tokens)

    def open_drafter(self, spec: str) -> Drafter:
        """`--draft`: "ngram" (prompt lookup), "mtp" (the layout's own multi-token-prediction block), or the path of a
        small layout sharing this model's tokenizer (opened with every expert resident if it fits, its KV cache in this
        engine's type)."""
        if spec == "ngram":
            return NgramDrafter()
        if spec == "mtp":
            if not self.config.nextn_layers:
                raise RuntimeConfigError(f"{self.layout.root}: has no multi-token-prediction layers for --draft mtp; "
                                         "convert with --mtp from a checkpoint that has them (DeepSeek-V3, GLM-4.5)")
            return MtpDrafter(self.model)
        m = Layout.open(spec).manifest
        draft = Engine.open(spec, cache_mb=sum(e.nbytes for e in m.experts) / 2**20 + 1, prefetch="none",
                            threads=self.threads, kv_dtype=self.model.kv_dtype, kernels=self.model.kernels)  # all resident
        mine, theirs = self.layout.manifest, draft.layout.manifest
        ours = {p: mine.files[p].xxh3 for p in mine.tokenizer["files"]}
        other = {p: theirs.files[p].xxh3 for p in theirs.tokenizer["files"]}
        if mine.config.vocab_size != theirs.config.vocab_size or ours != other:
            draft.close()
            raise RuntimeConfigError(f"{spec}: its tokenizer is not {self.layout.root}'s (vocabulary "
                                     f"{theirs.config.vocab_size} vs {mine.config.vocab_size}, or other tokenizer files); "
                                     "a draft model must share the target's tokenizer")
        return ModelDrafter(draft)

    def verify(self, ids: list[int]) -> np.ndarray:
        """Logits (len(ids), vocab) of every row, each computed as a one-token decode step would."""
        checked = self._check_ids(self.model.kv, ids)
        t0 = time.perf_counter()
        try:
            return self.model.forward(checked, all_logits=True, rows_apart=True)
        finally:
            self.times.forward_s += time.perf_counter() - t0

    def run_stats(self) -> RunStats:
        s, t = self.store, self.times
        standins = self.model.moe.standins
        # lookups, hits, prefetches and waits of both tiers: with stand-ins, an expert is served by either cache
        c = self.cache.stats if standins is None else self.cache.stats.plus(standins.cache.stats)
        shard_bytes = 0
        if self.shards is not None:  # the experts are the shards': their counts, summed
            for sh in self.shards.stats():
                c = c.plus(CacheStats(**{k: sh[k] for k in CACHE_COUNTS}))
                shard_bytes += sh["bytes_read"]
        lat = s.read_latency
        gen = t.generated_tokens
        return RunStats(
            prompt_tokens=t.prompt_tokens,
            prefill_tok_s=t.prompt_tokens / t.prefill_s if t.prefill_s else 0.0, warmup_s=t.warmup_s,
            generated_tokens=gen,
            decode_tok_s=(gen - 1) / t.decode_s if t.decode_s and gen > 1 else 0.0,
            ttft_s=t.ttft_s,
            expert_lookups=c.lookups, expert_hits=c.hits, expert_misses=c.misses, hit_rate=c.hit_rate,
            bytes_read=s.bytes_read + (standins.store.bytes_read if standins else 0) + shard_bytes,
            standin_bytes_read=standins.store.bytes_read if standins else 0,
            read_mb_s=s.bytes_read / 1e6 / lat.sum if lat.sum else 0.0,
            read_latency_ms={p: lat.percentile(p) * 1e3 for p in (50, 95, 99)},
            read_wait_share=c.wait_seconds / t.forward_s if t.forward_s else 0.0,
            prefetch_issued=c.prefetch_issued, prefetch_used=c.prefetch_used, prefetch_wasted=c.prefetch_wasted,
            prefetch_cancelled=c.prefetch_cancelled, prefetch_ahead=c.prefetch_ahead,
            prefetch_depth=self.model.prefetch_depth,
            read_retries=s.retried,
            cache_slots=self.cache.n_slots,
            cache_mb=(self.cache.n_slots * s.slot_bytes + (standins.store.n_slots * standins.store.slot_bytes
                                                           if standins else 0)) / 2**20,
            prefetch=self.prefetch_mode, o_direct=s.o_direct, keep_pages=s.keep_pages, mapped=s.mapped,
            packed_copies_mapped=s.copies.mapped if s.copies else 0,
            packed_copies_written=s.copies.queued if s.copies else 0,
            peak_rss_mb=peak_rss_bytes() / 2**20,
            **self._approx_stats(),
            kv_dtype=self.model.kv_dtype, kernels=self.model.kernels, kv_bytes_per_token=self.model.kv.bytes_per_token,
            compiled_steps=self.model.fused.steps if self.model.fused is not None else 0,
            experts_filled=self.cache.stats.filled,
            kv_mb=self.model.kv.nbytes / 2**20,
            history_preloaded=self.preloaded, history_tokens=self.history.tokens if self.history else 0.0,
            spec_steps=self.spec.steps, draft_proposed=self.spec.drafted, draft_accepted=self.spec.accepted,
            draft_acceptance=self.spec.acceptance_rate, tokens_per_step=self.spec.tokens_per_step,
        )

    def _approx_stats(self) -> dict[str, Any]:
        """RunStats' approximate-routing fields."""
        moe, cfg = self.model.moe, self.config
        st = moe.approx_stats
        return dict(approx=moe.approx.describe(),
                    expert_choices_per_token=cfg.n_experts_used * sum(cfg.is_moe_layer(i) for i in range(cfg.n_layers)),
                    approx_dropped=st.dropped, approx_substituted=st.substituted,
                    approx_dropped_per_token=st.per_token(st.dropped),
                    approx_substituted_per_token=st.per_token(st.substituted),
                    approx_standins=st.standins, approx_standins_per_token=st.per_token(st.standins))

    def stats(self) -> dict[str, Any]:
        """The figures `mertools run` prints and writes with --json (read latencies estimated from a
        fixed-size histogram: see stats.LatencyHistogram)."""
        return self.run_stats().to_dict()

    def close(self) -> None:
        """Stop the loaders, close the files and unmap the slots; then write the routing history (--history) with this
        run's. Once: a second call does nothing."""
        if self.closed:
            return
        self.closed = True
        if self.filler is not None:
            self.filler.stop()
        self.cache.executor.shutdown(wait=True)
        if self.loading is not None:
            self.loading.join()
        self.store.close()
        if self.model.moe.standins is not None:
            self.model.moe.standins.store.close()
        if self.shards is not None:
            self.shards.close()
        if self.history is not None:
            self.history.save()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
