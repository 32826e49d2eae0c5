"""The background fill (runtime/fill.py) on a layout whose experts all fit: decode right after the open, and after
the engine has idled (a server between requests), with and without the fill, each in a fresh process with the page
cache dropped first.

    python benchmarks/bench_full_size.py --shape qwen3 --caps 1 --keep --no-doc   # builds the layout used here
    python benchmarks/bench_fill.py --layout /tmp/mertools-full/qwen3-48L-q4_k-seed0-layout

Settings: no fill (each expert read at its first use); the fill at its lowest priority (`serve`'s, `run --fill`),
decoding at once; the same after `--idle` seconds of idling; and the fill at normal priority, decoding at once (what
the lowest priority avoids). Reported: decode tok/s over each window of `--window` seconds of random tokens (8-token
prompt first), experts the fill read, misses.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import _common as common  # noqa: E402

SETTINGS = {  # name: (fill, lowest priority, idle first)
    "no fill": (False, True, False),
    "fill (lowest priority)": (True, True, False),
    "fill (lowest priority), after idling": (True, True, True),
    "fill (normal priority)": (True, False, False),
}


def child(layout: str, name: str, idle: float, windows: int, window: float, threads: int) -> None:
    import numpy as np

    import mertools.runtime.engine as engine_mod
    from mertools.runtime.engine import Engine

    fill, lowest, idle_first = SETTINGS[name]
    if not lowest:
        engine_mod.lowest_priority = lambda: None  # the fill's thread left at the process's priority
    rng = np.random.default_rng(5)
    t0 = time.perf_counter()
    eng = Engine.open(layout, kernels="int8", fill=fill, threads=threads)
    vocab = eng.config.vocab_size
    if idle_first:
        time.sleep(idle)
    filled_before = eng.cache.stats.filled
    eng.forward(rng.integers(0, vocab, 8).tolist(), all_logits=False)
    rates, n, start = [], 0, time.perf_counter()
    for _ in range(windows):
        w0, k = time.perf_counter(), 0
        while time.perf_counter() - w0 < window:
            eng.forward([int(rng.integers(0, vocab))], all_logits=False)
            k += 1
        rates.append(k / (time.perf_counter() - w0))
        n += k
    s = eng.stats()
    out = dict(rates=rates, tokens=n, decode_s=time.perf_counter() - start, filled=s["experts_filled"],
               filled_before=filled_before, misses=s["expert_misses"], slots=s["cache_slots"],
               experts=len(eng.layout.manifest.experts), total_s=time.perf_counter() - t0)
    eng.close()
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layout", default="/tmp/mertools-full/qwen3-48L-q4_k-seed0-layout")
    ap.add_argument("--idle", type=float, default=30.0, help="seconds the engine idles before the 'after idling' decode")
    ap.add_argument("--windows", type=int, default=6)
    ap.add_argument("--window", type=float, default=10.0, help="seconds per reported window")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-doc", action="store_true")
    ap.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        lay, name, idle, windows, window, threads = a.child
        return child(lay, name, float(idle), int(windows), float(window), int(threads))
    t_all = time.perf_counter()
    rows = []
    for name in SETTINGS:
        common.drop_caches()
        r = common.run_child(__file__, ["--child", a.layout, name, str(a.idle), str(a.windows), str(a.window),
                                        str(a.threads)])
        print(name, r, file=sys.stderr, flush=True)
        rows.append((name, r))
    head = " / ".join(f"{int(a.window * i)}-{int(a.window * (i + 1))} s" for i in range(a.windows))
    lines = [f"| setting | decode tok/s over {head} | experts the fill read (before the prompt) | misses |",
             "|---|---|---:|---:|"]
    for name, r in rows:
        if "error" in r:
            lines.append(f"| {name} | error: {r['error']} | - | - |")
            continue
        rates = " / ".join(f"{x:.2f}" for x in r["rates"])
        lines.append(f"| {name} | {rates} | {r['filled']} of {r['experts']} ({r['filled_before']}) | {r['misses']} |")
    cmd = "python benchmarks/bench_fill.py " + " ".join(x for x in sys.argv[1:] if x != "--no-doc")
    body = (f"Machine: {common.machine_description()}\n\nCommand: `{cmd}` (took "
            f"{(time.perf_counter() - t_all) / 60:.0f} min)\n\nLayout `{Path(a.layout).name}`, every expert fitting in "
            f"the cache, the 8-bit kernels, {a.threads} threads, a fresh process per setting with the page cache "
            f"dropped first; an 8-token prompt, then random tokens one at a time. 'after idling': the engine idles "
            f"{a.idle:g} s after its open (a server between requests) before the prompt.\n\n" + "\n".join(lines))
    common.publish("fill", "The background fill (a model held in RAM)", body, write=not a.no_doc)


if __name__ == "__main__":
    main()
