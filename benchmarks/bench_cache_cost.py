"""What the expert cache's own bookkeeping costs per token (no I/O, no compute): the "lfd" policy's lookups, usage
updates and victim searches, for Mixtral's shape and for Qwen3-30B-A3B's (48 layers, 8 of 128 experts per token),
with diverse random routing and a quarter of the experts as slots, so most choices miss and evict.

    python benchmarks/bench_cache_cost.py [--tokens 12] [--before /path/to/an/older/checkout]

Loads complete at once (the loader does nothing), so every millisecond is the cache's Python under its lock.
`--before DIR` measures another checkout's cache in the same run. Writes the "cache_cost" section of
docs/BENCHMARKS.md (--no-write: print only).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _common as common  # noqa: E402

SHAPES = {"Mixtral 8x7B (32 layers, 2 of 8)": (32, 8, 2), "Qwen3-30B-A3B (48 layers, 8 of 128)": (48, 128, 8)}


def child(root: str, layers: int, experts: int, k: int, tokens: int) -> None:
    if root:
        sys.path.insert(0, root)
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from mertools.runtime.cache import ExpertCache

    slots = layers * experts // 4
    pool = ThreadPoolExecutor(2)
    cache = ExpertCache(slots, layers, experts, lambda key, slot, cancel: None, pool)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for _ in range(tokens):
        for layer in range(layers):
            cache.note_layer(layer)
            chosen = rng.choice(experts, k, replace=False).tolist()
            cache.record_routing(layer, chosen)
            for key, _slot in cache.acquire([(layer, e) for e in chosen]):
                cache.release(key)
    dt = (time.perf_counter() - t0) / tokens
    pool.shutdown()
    print(json.dumps({"ms_per_token": dt * 1e3, "evictions_per_token": cache.stats.evictions / tokens, "slots": slots}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=12)
    ap.add_argument("--before", help="another checkout of mertools, measured beside this one")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child[0], int(a.child[1]), int(a.child[2]), int(a.child[3]), a.tokens)
        return 0
    roots = [("mertools", "")]
    if a.before:
        rev = subprocess.run(["git", "-C", a.before, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        roots.append((f"mertools at {rev.stdout.strip() or Path(a.before).name} (--before)", a.before))
    rows = ["| shape | cache | slots | evictions per token | ms of cache bookkeeping per token |", "|---|---|---:|---:|---:|"]
    for shape, (layers, experts, k) in SHAPES.items():
        for label, root in roots:
            common.wait_quiet(30)
            r = common.run_child(__file__, ["--child", root, str(layers), str(experts), str(k), "--tokens", str(a.tokens)])
            print(shape, label, r, file=sys.stderr, flush=True)
            rows.append(f"| {shape} | {label} | {r.get('slots', '-')} | {r.get('evictions_per_token', 0):.0f} | "
                        f"{r['ms_per_token']:.1f} |" if "error" not in r else f"| {shape} | {label} | error: {r['error']} | | |")
    body = (f"Machine: {common.machine_description()}\n\nCommand: `python benchmarks/bench_cache_cost.py"
            f"{' --before ' + a.before if a.before else ''}`\n\n"
            f"The \"lfd\" ExpertCache alone, a quarter of the experts as slots, uniformly random routing (distinct experts per "
            f"layer), loads that complete at once: {a.tokens} tokens, the cache's Python per token (one process each).\n\n"
            + "\n".join(rows))
    common.publish("cache_cost", "The expert cache's own cost per token", body, write=not a.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
