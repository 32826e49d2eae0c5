"""Beyond RAM: disk, cache policy and end-to-end decode with budgets below the expert bytes,
beside llama.cpp (mmap) capped at the same memory in a cgroup, all in one run.

    python benchmarks/bench_beyond_ram.py [--layers 4] [--tokens 24] [--workdir /tmp/mertools-bench]

Needs root (drop_caches, cgroup v1 memory controller) for cold-cache and capped figures; llama.cpp
through llama-cpp-python (the `bench` extra) for the comparison (skipped with a note when absent).
Routing: the synthetic checkpoint's random router sends almost every token to the same experts,
which flatters any cache, so mertools replays the routing of the trained fixture (fixtures/trained,
the same 4 x 8 top-2 expert grid), recorded here while it generates sampled text, and the guesses
its lookahead prefetcher made; llama.cpp cannot be made to, and routes as the random router says —
its figures are therefore, if anything, flattered.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _common as common  # noqa: E402
from benchmarks.disk import dd_read, first_touch_s_per_gib, odirect_read, store_load  # noqa: E402
from benchmarks.routing import (  # noqa: E402
    Replay,
    RoutingRecorder,
    belady,
    best_online,
    lookahead_accuracy,
    record_trained_routing,
    replay_policy,
    routing_stats,
    synthetic_trace,
)

N_PROMPT = 8  # prompt tokens before the timed decode steps


def child_mertools(layout: str, cache_mb: float, prefetch: str, ids_path: str, routing: str) -> None:
    """Prefill N_PROMPT ids, then decode the rest one by one (forced, so both tools see the same tokens).
    routing "-": the checkpoint's own router; else a recorded routing (and lookahead guesses) replayed."""
    from mertools.layout import Layout
    from mertools.runtime.engine import Engine

    ids = json.loads(Path(ids_path).read_text())
    replay = None
    if routing != "-":
        rec = json.loads(Path(routing).read_text())
        replay = Replay(rec["trace"], rec["guesses"])
    recorder = RoutingRecorder(Layout.open(layout).manifest.config.n_layers)  # the routing actually used, reported
    # replayed lookahead: the trained model's own guesses, recorded beside its routing
    mode = replay.prefetcher if replay is not None and prefetch == "lookahead" else prefetch
    eng = Engine.open(layout, cache_mb=cache_mb, prefetch=mode, trace=recorder,
                      routing_override=replay.override if replay is not None else None)

    def step(tokens: list[int]) -> None:
        eng.forward(tokens, all_logits=False)

    def counters() -> list[float]:
        c = eng.cache.stats
        return [eng.store.bytes_read, c.wait_seconds, c.misses, c.prefetch_issued, c.prefetch_used, c.lookups,
                c.prefetch_cancelled]

    before: list[float] = []
    prefill_s, decode_s = common.forced_decode(step, ids, N_PROMPT, after_prefill=lambda: before.extend(counters()))
    s = eng.stats()
    d = [b - a for a, b in zip(before, counters(), strict=True)]
    s.update(decode_tok_s=(len(ids) - N_PROMPT) / decode_s, prefill_s=prefill_s, decode_s=decode_s, decode_bytes=d[0],
             decode_wait_s=d[1], decode_misses=d[2], decode_prefetch_issued=d[3], decode_prefetch_used=d[4],
             decode_lookups=d[5], decode_prefetch_cancelled=d[6], slot_bytes=eng.store.slot_bytes,
             trace=recorder.trace())
    if eng.cache.n_slots >= len(eng.layout.manifest.experts):  # all fit: the same stream again, warm
        recorder.active = False
        eng.reset()
        s.update(warm_decode_s=common.forced_decode(step, ids, N_PROMPT)[1])
    eng.close()
    print(json.dumps(s))


def child_llama(gguf: str, ids_path: str, threads: int) -> None:
    """The same forced stream through llama.cpp (mmap, repacking off), cold then warm."""
    ids = json.loads(Path(ids_path).read_text())
    llm = common.open_llama(gguf, threads, repack=False, n_ctx=256, use_mmap=True)  # repacking copies weights out of the mmap
    llm.reset()
    cold = common.forced_decode(llm.eval, ids, N_PROMPT)[1]
    llm.reset()  # the same stream again: whatever the page cache kept is now warm
    warm = common.forced_decode(llm.eval, ids, N_PROMPT)[1]
    n = len(ids) - N_PROMPT
    print(json.dumps({"decode_tok_s": n / cold, "warm_decode_tok_s": n / warm, "peak_rss_mb": common.peak_rss_mb()}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=common.WORKDIR)
    ap.add_argument("--llama-python", default="/tmp/venv-bench/bin/python", help="a Python with llama-cpp-python")
    ap.add_argument("--child-mertools", nargs=5)
    ap.add_argument("--child-llama", nargs=2)
    a = ap.parse_args()
    if a.child_mertools:
        layout, mb, prefetch, ids_path, routing = a.child_mertools
        return child_mertools(layout, float(mb), prefetch, ids_path, routing)
    if a.child_llama:
        return child_llama(a.child_llama[0], a.child_llama[1], os.cpu_count() or 2)

    from benchmarks.router_calibration import diverse_checkpoint
    from mertools.convert.pipeline import ConvertOptions, convert
    from mertools.layout import Layout

    work = Path(a.workdir)
    base = common.synth_gguf(work, a.layers)
    # the random routers send every token to 2 experts per layer: recalibrate them (router_calibration.py)
    gguf, lay_dir = work / f"mixtral-{a.layers}L-q4_0-diverse.gguf", work / f"layout-{a.layers}L-diverse"
    if not gguf.exists() or not (lay_dir / "manifest.json").exists():
        diverse_checkpoint(base, gguf, lay_dir, common.random_ids(256, a.seed, common.MIXTRAL.vocab), a.seed)
    ids_path = work / "decode-ids.json"  # the same forced token stream for both tools, unseen in calibration
    ids_path.write_text(json.dumps(common.random_ids(N_PROMPT + a.tokens, a.seed + 1, common.MIXTRAL.vocab)))
    lay = Layout.open(lay_dir)
    m = lay.manifest
    cfg = m.config
    expert_bytes = sum(e.nbytes for e in m.experts)
    dense_bytes = sum(t.nbytes for t in m.dense.values())
    slot = m.experts[0].nbytes
    out = [f"Machine: {common.machine_description()}", "",
           f"Command: `python benchmarks/bench_beyond_ram.py --layers {a.layers} --tokens {a.tokens}`", "",
           f"Checkpoint: synthetic Mixtral-shaped (d_model {cfg.d_model}, d_ff {cfg.d_ff}, {cfg.n_experts} experts, "
           f"top-{cfg.n_experts_used}), {cfg.n_layers} layers, Q4_0: experts {expert_bytes / 1e9:.2f} GB "
           f"({slot / 1e6:.1f} MB each), dense {dense_bytes / 1e9:.2f} GB; random weights, routers recalibrated so "
           "that routing is diverse (benchmarks/router_calibration.py). Both tools decode the same forced stream of "
           f"{a.tokens} random token ids after an {N_PROMPT}-token prompt, each through the checkpoint's own router.", ""]

    # 1. disk
    files = sorted((lay_dir / "experts").rglob("*.bin"))
    cold = common.drop_caches()
    raw = {}
    for depth in (1, 2, 4, 8, 16):
        common.drop_caches()
        raw[depth] = odirect_read(files, depth)
    common.drop_caches()
    dd = dd_read(files[0])
    store = {}
    for c in (1, 2, 4):
        common.drop_caches()
        store[c] = store_load(lay_dir, c)
    best_raw = max(raw.values())
    out += ["### 1. Disk (O_DIRECT, page cache dropped before each: " + ("yes" if cold else "NO - not root") + ")", "",
            "| read | GB/s |", "|---|---|"]
    out += [f"| raw O_DIRECT, queue depth {d} (4 MiB reads) | {g:.2f} |" for d, g in raw.items()]
    out += [f"| dd iflag=direct bs=4M (one expert file) | {dd:.2f} |" if dd else "| dd | n/a |"]
    out += [f"| ExpertStore.load, {c} expert(s) in flight | {g:.2f} ({g / best_raw:.0%} of best raw) |" for c, g in store.items()]
    touch = first_touch_s_per_gib()
    out += ["", f"First touch of fresh anonymous memory (what filling an empty cache slot costs the kernel once): "
            f"{touch:.2f} s per GiB."]

    # runs: the checkpoint's own (recalibrated) router on the forced stream, at each budget; at 0.25x each
    # prefetch mode, and the trained fixture's recorded routing replayed (its lookahead guesses included)
    trained = work / "trained-f16"
    if not (trained / "manifest.json").exists():
        convert(common.ROOT / "fixtures/trained/tiny-shakespeare-moe", trained, ConvertOptions(force=True, progress=False))
    rec = record_trained_routing(trained, 400, a.seed)
    routing = work / "routing-trained.json"
    routing.write_text(json.dumps(rec))
    runs = {}
    plan = [(f, "own", "lookahead") for f in (0.25, 0.5, 1.0)] + [(0.25, "own", m) for m in ("markov", "none")]
    plan += [(0.25, "trained", m) for m in ("lookahead", "markov", "none")]
    for frac, src, prefetch in plan:
        common.drop_caches()
        args = ["--child-mertools", str(lay_dir), str(expert_bytes * frac / 2**20 + 1), prefetch, str(ids_path),
                "-" if src == "own" else str(routing)]
        runs[(frac, src, prefetch)] = common.run_child(__file__, args)
    llama = {}
    for frac in (0.25, 0.5, 1.0):
        r = runs[(frac, "own", "lookahead")]
        cap = int(r.get("peak_rss_mb", 0) * 2**20) if "peak_rss_mb" in r else None
        if Path(a.llama_python).exists() and cap and os.geteuid() == 0:
            common.drop_caches()
            llama[frac] = common.run_child(__file__, ["--child-llama", str(gguf), str(ids_path)], cgroup_bytes=cap,
                                           python=a.llama_python, timeout=3600)

    # 3. routing realism
    own_trace = runs[(1.0, "own", "lookahead")].get("trace")
    precision, recall = lookahead_accuracy(rec["trace"], rec["guesses"])
    out += ["", "### 3. Routing", "",
            f"Per layer, distinct experts used and routing entropy (uniform over {cfg.n_experts} experts: "
            f"{np.log2(cfg.n_experts):.2f} bits): the recalibrated checkpoint on the forced stream (decode steps of the "
            f"1x run), and the trained fixture (fixtures/trained, the same {cfg.n_layers} x {cfg.n_experts} top-"
            f"{cfg.n_experts_used} grid) generating {len(rec['trace'])} tokens of sampled text (temperature 1, seed "
            f"{a.seed}).", "", "| layer | checkpoint: distinct | checkpoint: entropy (bits) | trained: distinct | "
            "trained: entropy (bits) |", "|---|---|---|---|---|"]
    ts = routing_stats(rec["trace"], cfg.n_experts)
    cs = routing_stats(own_trace[N_PROMPT:], cfg.n_experts) if own_trace else [{"distinct": "-", "entropy_bits": 0}] * len(ts)
    out += [f"| {t['layer']} | {c['distinct']} | {c['entropy_bits']:.2f} | {t['distinct']} | {t['entropy_bits']:.2f} |"
            for c, t in zip(cs, ts, strict=False)]
    out += ["", f"The trained model's lookahead guesses (layer L+1's router on layer L's hidden state, recorded in the "
            f"same generation) have precision {precision:.0%} and recall {recall:.0%} against the next layer's choice. "
            "On the random checkpoint, whose residual stream barely changes between layers, lookahead is near "
            "perfect, which flatters prefetch; section 5 therefore also replays the trained model's routing and "
            "guesses through the same read path."]

    # 4. policies
    synth = synthetic_trace(400, cfg.n_layers, cfg.n_experts, cfg.n_experts_used, a.seed)
    n_all = cfg.n_layers * cfg.n_experts
    out += ["", "### 4. Cache policy: hit rate replaying routing traces, beside Belady's optimum", "",
            "| trace | budget | slots | LRU | lfd (default) | best online (oracle statistics) | Belady | lfd / Belady | "
            "best online / Belady |", "|---|---|---|---|---|---|---|---|---|"]
    for name, tr in (("trained", rec["trace"]), ("synthetic (sticky)", synth)):
        for frac in (0.25, 0.5, 1.0):
            slots = max(cfg.n_experts_used, int(n_all * frac))
            lru, lfd = replay_policy(tr, cfg.n_experts, slots, "lru"), replay_policy(tr, cfg.n_experts, slots, "lfd")
            best, opt = best_online(tr, cfg.n_experts, slots), belady(tr, slots)
            out.append(f"| {name} | {frac:g}x | {slots} | {lru:.3f} | {lfd:.3f} | {best:.3f} | {opt:.3f} | "
                       f"{lfd / opt:.0%} | {best / opt:.0%} |")
    out += ["", "Best online: the same rule fed with each expert's chance of being chosen at its layer's next visit, "
            "given whether it was chosen at the last one, counted over the whole trace (statistics no online policy "
            "has). Where it sits as far below Belady as lfd does, the gap is what knowing the future buys: routing "
            "near 3 bits of entropy leaves little to predict from the past."]

    # 2. end to end
    full = runs[(1.0, "own", "lookahead")]
    # compute per token: the all-experts budget's second, warm pass over the same stream (no reads)
    compute_s = full.get("warm_decode_s", full.get("decode_s", 0) - full.get("decode_wait_s", 0)) / a.tokens
    out += ["", f"### 2. Decode with cache budgets below the expert bytes ({a.tokens} forced tokens after an "
            f"{N_PROMPT}-token prompt, page cache dropped before each run)", "",
            "| budget | mertools tok/s | hit rate | GB read/token (needed) | waiting on reads | peak RSS MB | "
            "roofline tok/s | time / roofline | llama.cpp tok/s (cgroup = mertools peak RSS) | mertools / llama.cpp |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for frac in (0.25, 0.5, 1.0):
        r = runs[(frac, "own", "lookahead")]
        if "error" in r:
            out.append(f"| {frac:g}x | error: {r['error']} |")
            continue
        # needed and not resident in time: demand misses, and prefetches that were then used (read too)
        missed = (r["decode_misses"] + r["decode_prefetch_used"]) * r["slot_bytes"] / a.tokens
        roof_s = max(missed / (best_raw * 1e9), compute_s)
        lt = llama.get(frac, {})
        lts = lt.get("decode_tok_s")
        out.append(
            f"| {frac:g}x ({r['cache_mb']:.0f} MiB) | {r['decode_tok_s']:.2f} | {r['hit_rate']:.1%} | "
            f"{r['decode_bytes'] / a.tokens / 1e9:.2f} ({missed / 1e9:.2f}) | "
            f"{r['read_wait_share']:.0%} | {r['peak_rss_mb']:.0f} | {1 / roof_s:.2f} | "
            f"{1 / (r['decode_tok_s'] * roof_s):.2f}x | "
            + (f"{lts:.2f} | {r['decode_tok_s'] / lts:.1f}x |" if lts else f"{lt.get('error', 'not run')} | - |")
        )
    out += ["", "![tok/s and GB read per token against the cache budget, mertools beside llama.cpp]"
            "(img/bench-beyond-ram.png)"]  # drawn by benchmarks/charts.py from the table above
    out += ["", "Roofline (the issue's): max(bytes missed per token / best raw disk GB/s, compute per token = "
            "the 1x run's second, warm pass over the same stream); time / roofline is decode time over that bound (goal <= "
            "1.5). Bytes missed (\"needed\"): experts read because a token needed them, on demand or by a prefetch that "
            "was then used; GB read also counts wrong prefetches. The disk is a virtio device whose host caches recently "
            "read data, so re-reads can beat the cold raw figure. llama.cpp runs the same GGUF with mmap and weight "
            "repacking off, in a memory cgroup capped at mertools' peak RSS of the same budget."]

    lw = llama.get(1.0, {}).get("warm_decode_tok_s")
    if "warm_decode_s" in full and lw:
        mw = a.tokens / full["warm_decode_s"]
        out += ["", f"1x, second pass over the same stream (everything resident for mertools; for llama.cpp whatever "
                f"its page cache kept under the cap): mertools {mw:.2f} tok/s, llama.cpp {lw:.2f} tok/s ({mw / lw:.1f}x). "
                "The 1x row above starts cold, so it mostly measures first reads."]

    # what any cache could do at 0.25x: Belady's hit rate on the trained routing, reads at the best raw speed
    opt = belady(rec["trace"], max(cfg.n_experts_used, int(n_all * 0.25)))
    bound_tok_s = best_raw * 1e9 / ((1 - opt) * cfg.n_layers * cfg.n_experts_used * slot)
    lq = llama.get(0.25, {}).get("decode_tok_s")
    out += ["", f"Ceiling at 0.25x: even Belady's optimal hit rate on the trained routing ({opt:.3f}) leaves "
            f"{(1 - opt) * cfg.n_layers * cfg.n_experts_used:.1f} expert reads per token, so at the best raw disk "
            f"speed ({best_raw:.2f} GB/s) no cache of this size can decode faster than {bound_tok_s:.2f} tok/s"
            + (f", {bound_tok_s / lq:.1f}x llama.cpp's figure above." if lq else ".")]

    # 5. prefetch
    out += ["", "### 5. Prefetch at the 0.25x budget (decode steps)", "",
            "| routing | mode | decode tok/s | issued | used (precision) | recall | wasted (called off while loading) | "
            "GB read/token | waiting on reads | read time hidden |", "|---|---|---|---|---|---|---|---|---|---|"]
    serial_gbs = store.get(1, best_raw)
    for src in ("own", "trained"):
        for prefetch in ("lookahead", "markov", "none"):
            r = runs[(0.25, src, prefetch)]
            name = "checkpoint's router" if src == "own" else "trained, replayed"
            if "error" in r:
                out.append(f"| {name} | {prefetch} | error: {r['error']} |")
                continue
            iss, used, miss = r["decode_prefetch_issued"], r["decode_prefetch_used"], r["decode_misses"]
            read_s = r["decode_bytes"] / (serial_gbs * 1e9)
            hidden = max(0.0, 1 - r["decode_wait_s"] / read_s) if read_s else 0.0
            out.append(f"| {name} | {prefetch} | {r['decode_tok_s']:.2f} | {iss} | {used} ({used / iss if iss else 0:.0%}) | "
                       f"{used / (used + miss) if used + miss else 0:.0%} | {iss - used} ({r['decode_prefetch_cancelled']}) | "
                       f"{r['decode_bytes'] / a.tokens / 1e9:.2f} | {r['read_wait_share']:.0%} | "
                       f"{hidden:.0%} |")
    out += ["", "Replayed: the trained model's routing and its recorded lookahead guesses drive the checkpoint's "
            "read path; markov learns transitions online. Recall: prefetched experts used / (those + demand misses). "
            "Read time hidden: 1 - time waiting on reads / (bytes read / the store's one-in-flight GB/s)."]
    common.publish("beyond_ram", "Beyond RAM", "\n".join(out))
    common.draw_charts("beyond_ram")


if __name__ == "__main__":
    main()
