"""Expert-parallel serving on Ray: the experts split among shards (Ray actors), the dense part in the driver.

Each shard owns a set of (layer, expert) pairs and serves them with mertools' own store, cache and kernels (read
from its copy of the layout: every one resident, or streamed under a budget). For each MoE layer of a step the
driver sends every shard holding one of the chosen experts the layer's hidden states and routing, one call per
shard, all in flight at once; each shard computes its experts' weighted outputs for the (row, choice)s that chose
them exactly as the single-process step does (`StreamingMoE.contributions`) and returns them; the driver puts them
in place and sums every row's choices in the same fixed order as the single-process path, so the logits are the
same bits. A shard that dies fails the step that was using it (ShardError names it); Ray restarts the actor, which
reopens its experts, for the steps after.

Placement is a plan (`Plan`): a shard per (layer, expert), round-robin by default (`Plan.round_robin`), or from
measured expert use (`Plan.by_frequency`, e.g. a routing history's counts), kept in a small JSON file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MertoolsError, RuntimeConfigError

PUT_BYTES = 1 << 20  # hidden states larger than this go through Ray's object store once, not with every call
RESTART_TIMEOUT = 300.0  # seconds a step waits for a restarted shard to have read its experts again


class ShardError(MertoolsError):
    """An expert shard failed (its actor died, its node went away, or it raised)."""


@dataclass(frozen=True)
class Plan:
    """owner[layer][expert]: the shard (0..n_shards-1) that holds that expert."""

    n_shards: int
    owner: tuple[tuple[int, ...], ...]

    @classmethod
    def round_robin(cls, n_layers: int, n_experts: int, n_shards: int) -> Plan:
        """Expert e of layer l on shard (l + e) % n: each layer's experts spread over every shard, and each shard
        holds the same count of experts (to within one per layer)."""
        if n_shards < 1:
            raise ValueError(f"shards must be >= 1, got {n_shards}")
        return cls(n_shards, tuple(tuple((layer + e) % n_shards for e in range(n_experts)) for layer in range(n_layers)))

    @classmethod
    def by_frequency(cls, counts: np.ndarray, n_shards: int) -> Plan:
        """Per layer, the experts in order of use (counts (n_layers, n_experts), e.g. a routing history's) dealt to the
        least loaded shard so far: each shard gets about the same share of the traffic of every layer."""
        owner = []
        for row in np.asarray(counts, np.float64):
            load, mine = np.zeros(n_shards), [0] * len(row)
            for e in np.argsort(-row, kind="stable"):
                s = int(np.argmin(load))
                mine[e], load[s] = s, load[s] + row[e] + 1e-9  # ties broken towards an even count
            owner.append(tuple(mine))
        return cls(n_shards, tuple(owner))

    def keys(self, shard: int) -> list[tuple[int, int]]:
        return [(layer, e) for layer, row in enumerate(self.owner) for e, s in enumerate(row) if s == shard]

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"n_shards": self.n_shards, "owner": [list(r) for r in self.owner]}))

    @classmethod
    def load(cls, path: str | Path, n_layers: int, n_experts: int) -> Plan:
        try:
            d = json.loads(Path(path).read_text())
            plan = cls(int(d["n_shards"]), tuple(tuple(int(s) for s in row) for row in d["owner"]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise RuntimeConfigError(f"{path}: not a shard plan ({e})") from None
        if len(plan.owner) != n_layers or any(len(r) != n_experts for r in plan.owner) \
                or any(not 0 <= s < plan.n_shards for r in plan.owner for s in r):
            raise RuntimeConfigError(f"{path}: a plan of {len(plan.owner)} layers for {plan.n_shards} shards; the layout "
                                     f"has {n_layers} layers of {n_experts} experts, each owner in [0, n_shards)")
        return plan


class ExpertShard:
    """One shard: its experts of the layout, a store and cache of its own (every one resident unless `cache_mb`),
    the same expert computation as the single-process engine. Runs as a Ray actor (or in-process, for tests)."""

    def __init__(self, layout_dir: str, index: int, keys: list[tuple[int, int]], kernels: str = "exact",
                 cache_mb: float | None = None, threads: int | None = None, io: str = "direct") -> None:
        from concurrent.futures import ThreadPoolExecutor as Pool

        from ..families import get_family
        from ..layout.reader import Layout
        from .cache import ExpertCache
        from .hooks import ModelHooks
        from .moe import StreamingMoE, expert_packer
        from .sizing import one_blas_thread
        from .store import ExpertStore

        if threads is not None:
            import numba

            numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
        one_blas_thread()
        layout = Layout.open(layout_dir)
        cfg, want = layout.manifest.config, set(keys)
        entries = [e for e in layout.manifest.experts if (e.layer, e.expert) in want]
        if not entries:
            raise RuntimeConfigError(f"{layout_dir}: shard {index} holds no expert")
        slot = max(e.nbytes for e in entries)
        slots = len(entries) if cache_mb is None else min(len(entries), max(cfg.n_experts_used, int(cache_mb * 2**20) // slot))
        resident = slots == len(entries)
        # packed as the single-process engine packs them when it holds every expert: the same kernels, the same bits
        prepare = expert_packer(cfg) if kernels == "int8" and resident else None
        store = ExpertStore(layout, slots, entries=entries, direct=io == "direct", prepare=prepare)
        cache = ExpertCache(slots, cfg.n_layers + cfg.nextn_layers, cfg.n_experts, store.load, Pool(max_workers=4))
        self.index, self.store, self.cache = index, store, cache
        self.moe = StreamingMoE(get_family(cfg.arch), cfg, cache, store, ModelHooks(), None, kernels)
        if resident:  # every expert read now, before the first step
            for key, _ in cache.acquire(sorted(want & set(store.entries))):
                cache.release(key)

    def compute(self, layer: int, h: np.ndarray, chosen: np.ndarray, weights: np.ndarray, live: np.ndarray | None,
                seqs: list[tuple[int, int, bool]], experts: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows, choices, outputs (pairs, d_model)): `experts`' weighted outputs where they were chosen."""
        from .batch import Batch, SeqRows

        batch = Batch(tuple(SeqRows(None, start, n, apart) for start, n, apart in seqs),  # type: ignore[arg-type]
                      np.zeros(len(h), np.int64), np.zeros(len(h), np.int64))
        contrib = self.moe.contributions(layer, experts, h, chosen, weights, batch, live)
        mine = np.isin(chosen, experts) if live is None else np.isin(chosen, experts) & live
        t, c = np.nonzero(mine)
        return t, c, contrib[t, c]

    def stats(self) -> dict[str, Any]:
        """This shard's counts: its experts and slots, its cache's counters (CacheStats' fields) and bytes read."""
        from dataclasses import fields

        st = self.cache.stats
        counts = {f.name: getattr(st, f.name) for f in fields(st) if f.name != "load_latency"}
        return {"shard": self.index, "experts": len(self.store.entries), "slots": self.cache.n_slots,
                "bytes_read": self.store.bytes_read, **counts}

    def ping(self) -> int:
        return self.index


class ShardedExperts:
    """The driver's side: `RemoteExperts` over `plan.n_shards` ExpertShard actors on a Ray cluster (`ray_address`;
    None: a Ray instance started for this process, never a stale or foreign one found on the machine; "auto": the
    one running on this machine)."""

    def __init__(self, layout_dir: str, plan: Plan, kernels: str = "exact", cache_mb: float | None = None,
                 threads: int | None = None, ray_address: str | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise RuntimeConfigError("expert shards need Ray: pip install 'mertools[distributed]'") from None
        if not ray.is_initialized():  # no address: a Ray of this process's own ("auto" joins one running here)
            ray.init(address=ray_address or "local", include_dashboard=False, log_to_driver=False, configure_logging=False)
        self.ray, self.plan = ray, plan
        # restarted by Ray when it dies (its experts read again); a call in flight then fails, never retried
        actor = ray.remote(ExpertShard).options(num_cpus=0, max_restarts=-1, max_task_retries=0)
        self.actors = [actor.remote(layout_dir, i, plan.keys(i), kernels, cache_mb, threads) for i in range(plan.n_shards)]
        try:
            ray.get([a.ping.remote() for a in self.actors])
        except Exception as e:
            self.close()
            raise ShardError(f"expert shards of {layout_dir} did not start: {e}") from None
        self.owner = np.array(plan.owner, np.int64)
        self.down: set[int] = set()  # shards whose last call failed

    def _await_back(self, s: int, timeout: float = RESTART_TIMEOUT) -> None:
        """Wait for shard `s`'s actor to answer again (Ray restarts a dead one, which reads its experts again)."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            try:
                self.ray.get(self.actors[s].ping.remote(), timeout=timeout)
                self.down.discard(s)
                return
            except Exception as e:  # unavailable while restarting; gone for good after max_restarts
                if time.monotonic() > deadline or type(e).__name__ == "ActorDiedError":
                    raise ShardError(f"expert shard {s} is not back: {type(e).__name__}: {e}") from None
                time.sleep(0.2)

    def __call__(self, layer: int, h: np.ndarray, chosen: np.ndarray, weights: np.ndarray, live: np.ndarray | None,
                 batch: Any) -> np.ndarray:  # noqa: ANN401 - a Batch
        ray = self.ray
        contrib = np.zeros((h.shape[0], chosen.shape[1], h.shape[1]), np.float32)
        used = chosen if live is None else chosen[live]
        experts = sorted(set(used.ravel().tolist()))
        by_shard: dict[int, list[int]] = {}
        for e in experts:
            by_shard.setdefault(int(self.owner[layer, e]), []).append(e)
        for s in [s for s in by_shard if s in self.down]:
            self._await_back(s)
        seqs = [(s.start, s.n, s.apart) for s in batch.seqs]
        h = np.ascontiguousarray(h, np.float32)
        # a prompt's states put in Ray's object store once for every shard; a decode step's few rows go inline with each
        # call (a put costs more than the copies: 1.8 ms against 1 ms per call here, /tmp script)
        h_ref = ray.put(h) if h.nbytes > PUT_BYTES and len(by_shard) > 1 else h
        calls = self._submit(layer, h_ref, chosen, weights, live, seqs, by_shard)
        for s, ref in calls.items():
            try:
                t, c, y = ray.get(ref)
            except Exception as e:  # RayActorError (died, node lost), or the shard's own exception
                self.down.add(s)  # the next step waits for Ray to have restarted it
                raise ShardError(f"expert shard {s} (layer {layer}, experts {by_shard[s]}) failed: "
                                 f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
            contrib[t, c] = y
        return contrib

    def _submit(self, layer: int, h_ref: Any, chosen: np.ndarray, weights: np.ndarray, live: np.ndarray | None,  # noqa: ANN401
                seqs: list[tuple[int, int, bool]], by_shard: dict[int, list[int]]) -> dict[int, Any]:
        """Every shard's call of this layer, in flight at once: {shard: its result's ObjectRef}."""
        return {s: self.actors[s].compute.remote(layer, h_ref, chosen, weights, live, seqs, mine)
                for s, mine in by_shard.items()}

    def stats(self) -> list[dict[str, Any]]:
        return self.ray.get([a.stats.remote() for a in self.actors])

    def close(self) -> None:
        for a in self.actors:
            try:
                self.ray.kill(a, no_restart=True)
            except Exception:  # already gone
                pass


def open_shards(layout_dir: str, cfg: Any, shards: int | None, plan: str | Path | Plan | None, kernels: str,  # noqa: ANN401
                cache_mb: float | None, threads: int | None, ray_address: str | None, approx: Any) -> ShardedExperts:
    """Engine.open's `shards` / `plan`: the shards' actors started and their experts read."""
    if approx is not None and (approx.reroutes or approx.standin_share > 0):
        raise RuntimeConfigError("approximate routing reads what this process holds: not with expert shards")
    layers = cfg.n_layers + cfg.nextn_layers
    if plan is None:
        p = Plan.round_robin(layers, cfg.n_experts, shards or 1)
    else:
        p = plan if isinstance(plan, Plan) else Plan.load(plan, layers, cfg.n_experts)
        if shards is not None and shards != p.n_shards:
            raise RuntimeConfigError(f"the plan has {p.n_shards} shards, not {shards}")
    return ShardedExperts(layout_dir, p, kernels, cache_mb, threads, ray_address)
