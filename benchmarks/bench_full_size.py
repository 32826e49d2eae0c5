"""Full size, beyond RAM: full-depth synthetic checkpoints larger than the memory they run in, decoded by
mertools and by llama.cpp (mmap) under the same memory caps, one command.

    python benchmarks/bench_full_size.py --shape all --workdir /tmp/mertools-full \\
        --llama-python /tmp/venv-bench/bin/python

Shapes (one at a time: written, run, then deleted unless --keep):
  mixtral  Mixtral 8x7B: 32 layers, d_model 4096, d_ff 14336, 8 experts top-2, 32 heads / 8 kv heads,
           vocab 32000; every matrix Q4_0 (fixtures/synth.py), ~26.3 GB.
  qwen3    Qwen3-30B-A3B: 48 layers, d_model 2048, 128 experts top-8 of width 768, 32 heads / 4 kv heads of
           128, per-head q/k norm, vocab 151936; arch qwen3moe, every matrix Q4_K (written here), ~17.2 GB.
Weights are random valid blocks with sane scales (no quantizer runs), written in chunks by a producer thread
(memory stays at a few chunks). Random routers send every token to the same experts, so each layer's router
is recalibrated (benchmarks/router_calibration.py's rule, in one forward pass here) and written into the GGUF;
the layout is then made by `mertools convert --dtype auto`.

For every memory cap (default 1/4, 1/2 and all of MemTotal), page cache dropped before each run, both tools
decode the same forced token stream (a prompt, then one token per step), each in a fresh process inside a
cgroup v1 memory group limited to the cap: mertools with --cache-mb = min(cap, MemAvailable) - dense bytes -
--margin-mb, llama.cpp through llama-cpp-python with use_mmap on and weight repacking off, same threads.
Reported: decode tok/s, GB read per decode token (mertools: its store's count; llama.cpp: /proc/self/io
read_bytes), peak RSS (VmHWM; mertools' is checked against the cap), start-up (load + prompt) seconds.

Needs root (drop_caches, the memory cgroup) and free disk for one shape's GGUF and layout (both ~ the
GGUF's size; checked up front). `--layers N` writes N layers instead of the full depth (a smoke test);
`--caps` also takes absolute sizes (e.g. 1.25GiB,2.5GiB) for such runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# stdlib only at import time: the llama.cpp child runs this file in a venv without mertools' dependencies
from benchmarks import _common as common  # noqa: E402
from benchmarks.full_size_checkpoints import BLOCKS, SHAPES, Shape, sizes, tensor_plan, write_gguf  # noqa: E402

SECTION = ("full_size", "Full size, beyond RAM")
SIDECAR_VERSION = 1  # bump when the checkpoint recipe changes: --reuse then rebuilds
GB = 1e9
GIB = 2**30
MIB = 2**20

# ---------------------------------------------------------------- router calibration (one pass)


def child_calibrate(layout_dir: str, ids_path: str, out_path: str, seed: int) -> None:
    """benchmarks/router_calibration.py's rule (router_rows) in one forward pass instead of one per layer: layer by
    layer (MoEModel.forward_batch's loop), after a layer's
    attention, its router is replaced by router_rows of the states entering its MoE block, which then routes
    with it, so later layers see calibrated routing. Saves the routers (L, E, d) as .npy; prints routing stats
    of the random routers (on the same states) and of the calibrated ones."""
    import numpy as np

    from benchmarks.router_calibration import router_rows
    from benchmarks.routing import RoutingRecorder, routing_stats
    from mertools.kernels.matmul import get_rows
    from mertools.layout import Layout
    from mertools.runtime.batch import Batch
    from mertools.runtime.engine import Engine
    from mertools.runtime.ops import RuntimeOps, rms_norm

    ids = json.loads(Path(ids_path).read_text())
    m = Layout.open(layout_dir).manifest
    cfg = m.config
    slot = max(e.nbytes for e in m.experts)
    rng = np.random.default_rng(seed)
    rec = RoutingRecorder(cfg.n_layers)
    random_trace: list[list[list[int]]] = [[] for _ in ids]
    routers = []
    t0 = time.perf_counter()
    # room for every expert of a layer twice over: one step acquires all the experts its tokens chose
    with Engine.open(layout_dir, cache_mb=2 * cfg.n_experts * slot / MIB + 1, prefetch="none", trace=rec) as eng:
        model = eng.model
        batch = Batch.of([(model.kv, np.asarray(ids, np.int64))])
        ops = RuntimeOps(batch)
        embed = model.weights.embed
        x = get_rows(embed.raw, embed.dtype, batch.ids, cfg.d_model)
        for layer, w in enumerate(model.layers):
            model.cache.note_layer(layer)
            x = x + model._attention(layer, w, rms_norm(x, w.attn_norm, cfg.norm_eps), batch, ops)
            h = rms_norm(x, w.ffn_norm, cfg.norm_eps).astype(np.float64)  # what the router sees
            top = np.argsort(-(h @ w.router.T.astype(np.float64)), axis=1)[:, :cfg.n_experts_used]
            for t, row in enumerate(top.tolist()):
                random_trace[t].append(row)
            w.router[...] = router_rows(h, cfg.n_experts, rng)
            routers.append(np.array(w.router))
            x = x + model._ffn(layer, w, x, batch, ops)
        batch.commit()
        read = eng.store.bytes_read
    np.save(out_path, np.stack(routers))
    print(json.dumps({"seconds": time.perf_counter() - t0, "bytes_read": read, "tokens": len(ids),
                      "random": routing_stats(random_trace, cfg.n_experts),
                      "calibrated": routing_stats(rec.trace(), cfg.n_experts)}))


# ---------------------------------------------------------------- the measured runs


def proc_read_bytes() -> int:
    """Bytes this process (all its threads) had fetched from storage: /proc/self/io read_bytes (O_DIRECT reads
    and page faults of mmapped files alike; page cache hits not counted)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def child_mertools(layout: str, cache_mb: float, ids_path: str, threads: int, n_prompt: int, kernels: str,
                   approx: str = "{}", fill: str = "0") -> None:
    """`kernels`: Engine.open's ("int8" is `mertools run`'s default); `approx`: JSON of Approx's keyword arguments
    (bench_full_size_modes.py), {} for the exact engine; `fill` "1": Engine.open's fill (`mertools run --fill`: a
    cache holding every expert reads the ones not used yet at the lowest priority)."""
    from benchmarks.routing import RoutingRecorder, belady, routing_stats
    from mertools.layout import Layout
    from mertools.runtime.approx import Approx
    from mertools.runtime.engine import Engine

    ids = json.loads(Path(ids_path).read_text())
    cfg = Layout.open(layout).manifest.config
    rec = RoutingRecorder(cfg.n_layers)
    t0 = time.perf_counter()
    kw = json.loads(approx)
    eng = Engine.open(layout, cache_mb=cache_mb, threads=threads, trace=rec, approx=Approx(**kw), kernels=kernels,
                      fill=fill == "1")
    open_s = time.perf_counter() - t0
    # numba compiles on a checkout's first run (its cache is per source path): never inside the timed steps; the
    # prompt's own tokens, whose experts its prefill reads anyway
    warmup_s = eng.warmup(ids[:n_prompt])

    def step(tokens: list[int]) -> None:
        eng.forward(tokens, all_logits=False)

    def counters() -> list[int]:
        r = eng.run_stats()  # both tiers' reads and lookups when stand-ins are on
        return [r.bytes_read, r.expert_misses, r.expert_hits, r.expert_lookups, r.prefetch_issued, r.prefetch_used,
                proc_read_bytes(), r.experts_filled]

    before: list[int] = []
    prefill_s, decode_s = common.forced_decode(step, ids, n_prompt, after_prefill=lambda: before.extend(counters()))
    d = [b - a for a, b in zip(before, counters(), strict=True)]
    n = len(ids) - n_prompt
    s = eng.stats()
    s.update(decode_tok_s=n / decode_s, tokens=n, open_s=open_s, warmup_s=warmup_s, prefill_s=prefill_s,
             decode_s=decode_s,
             decode_bytes=d[0], decode_misses=d[1], decode_hits=d[2], decode_lookups=d[3], decode_prefetch_issued=d[4],
             decode_prefetch_used=d[5], decode_io_bytes=d[6], decode_filled=d[7], slot_bytes=eng.store.slot_bytes,
             routing=routing_stats(rec.trace()[n_prompt:], cfg.n_experts))
    if not kw:  # what no cache policy can beat on this stream with these slots (the report's ceiling)
        s.update(slots=eng.cache.n_slots, belady_decode_hit=belady(rec.trace(), eng.cache.n_slots, count_from=n_prompt),
                 choices_per_token=cfg.n_layers * cfg.n_experts_used)
    eng.close()
    print(json.dumps(s))


def child_llama(gguf: str, ids_path: str, threads: int, n_prompt: int, n_decode: int) -> None:
    """The same forced stream (its first n_prompt + n_decode ids) through llama.cpp: mmap, repacking off."""
    ids = json.loads(Path(ids_path).read_text())[:n_prompt + n_decode]
    t0 = time.perf_counter()
    llm = common.open_llama(gguf, threads, repack=False, n_ctx=max(256, len(ids) + 8), use_mmap=True)
    load_s = time.perf_counter() - t0
    load_io = proc_read_bytes()
    llm.reset()
    io: list[int] = []
    prefill_s, decode_s = common.forced_decode(llm.eval, ids, n_prompt, after_prefill=lambda: io.append(proc_read_bytes()))
    n = len(ids) - n_prompt
    print(json.dumps({"decode_tok_s": n / decode_s, "tokens": n, "load_s": load_s, "prefill_s": prefill_s,
                      "decode_s": decode_s, "load_io_bytes": load_io, "decode_io_bytes": proc_read_bytes() - io[0],
                      "peak_rss_mb": common.peak_rss_mb()}))


def engine_margin_mb() -> int:
    """What Engine.open leaves beside its cache when given no budget (imported here: the llama.cpp child has no mertools)."""
    from mertools.runtime.sizing import MARGIN

    return MARGIN >> 20


def meminfo(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def cgroup_reset() -> None:
    """Zero the benchmark cgroup's peak usage and limit-hit counters before a run (run_child sets the limit)."""
    common.CGROUP.mkdir(exist_ok=True)
    for f in ("memory.max_usage_in_bytes", "memory.failcnt"):
        (common.CGROUP / f).write_text("0\n")


def cgroup_peak() -> int:
    """The cgroup's peak charge since cgroup_reset: the process's memory and the page cache it brought in."""
    return int((common.CGROUP / "memory.max_usage_in_bytes").read_text())


def run_caps(s: Shape, built: dict, caps: list[tuple[str, int]], a: argparse.Namespace, ids_path: Path) -> list[dict]:
    """Both tools at every cap, mertools first, page cache dropped before each."""
    rows = []
    dense = built["sizes"]["dense_layout"]
    for label, cap in caps:
        quiet = common.wait_quiet(a.wait_quiet)  # shared cores: a busy neighbour stalls every parallel region
        common.drop_caches()
        avail = meminfo("MemAvailable")  # the whole-machine cap cannot take what others hold
        cache_mb = (min(cap, avail) - dense - a.margin_mb * MIB) / MIB
        print(f"[{s.name}] cap {label} = {cap / GIB:.2f} GiB: mertools, --cache-mb {cache_mb:.0f} ...", file=sys.stderr,
              flush=True)
        cgroup_reset()
        t0 = time.perf_counter()
        m = common.run_child(__file__, ["--child-mertools", str(built["layout"]), f"{cache_mb:.1f}", str(ids_path),
                                        str(a.threads), str(a.prompt_tokens), a.kernels, "{}", str(int(a.fill))],
                             cgroup_bytes=cap,
                             timeout=a.run_timeout)
        m.update(wall_s=time.perf_counter() - t0, cgroup_peak=cgroup_peak(), cache_mb_asked=cache_mb, quiet=quiet)
        print(f"[{s.name}]   mertools: {_brief(m)}", file=sys.stderr, flush=True)
        quiet = common.wait_quiet(a.wait_quiet)
        common.drop_caches()
        print(f"[{s.name}] cap {label}: llama.cpp ...", file=sys.stderr, flush=True)
        cgroup_reset()
        t0 = time.perf_counter()
        n_llama = a.llama_tokens if a.llama_tokens is not None else a.tokens
        ll = common.run_child(__file__, ["--child-llama", str(built["gguf"]), str(ids_path), str(a.threads),
                                         str(a.prompt_tokens), str(n_llama)],
                              python=a.llama_python, cgroup_bytes=cap, timeout=a.run_timeout)
        ll.update(wall_s=time.perf_counter() - t0, cgroup_peak=cgroup_peak(), quiet=quiet)
        print(f"[{s.name}]   llama.cpp: {_brief(ll)}", file=sys.stderr, flush=True)
        rows.append({"cap_label": label, "cap": cap, "mertools": m, "llama": ll})
    return rows


def _brief(r: dict) -> str:
    if "error" in r:
        return f"error: {r['error']}"
    return (f"{r['decode_tok_s']:.3f} tok/s, {_read_per_token(r) / GB:.2f} GB read/token, "
            f"peak RSS {r['peak_rss_mb'] / 1024:.2f} GiB, {r['wall_s']:.0f} s in all")


def ceilings(runs: list[dict]) -> list[str]:
    """Per cap, what Belady's optimal cache would allow on the same stream: its reads a token at the rate this run's
    reads went (bytes / decode seconds), beside llama.cpp. A bound for exact mode: only reading fewer bytes beats it."""
    out = []
    for run in runs:
        m, ll = run["mertools"], run["llama"]
        if "belady_decode_hit" not in m or "error" in m:
            continue
        reads = (1 - m["belady_decode_hit"]) * m["choices_per_token"]
        need = reads * m["slot_bytes"]  # bytes a token at Belady's hit rate
        rate = m["decode_bytes"] / m["decode_s"]
        top = rate / need if need else float("inf")
        vs = f" = {top / ll['decode_tok_s']:.1f}x llama.cpp" if "error" not in ll else ""
        out.append(f"Ceiling at {run['cap_label']}: Belady's optimal hit rate on this stream with the cache's {m['slots']} "
                   f"slots is {m['belady_decode_hit']:.0%} ({reads:.1f} expert reads, {need / GB:.2f} GB a token); at "
                   f"the {rate / GB:.2f} GB/s this run's reads went, exact mode could reach {top:.3f} tok/s{vs}.")
    return out


def _read_per_token(r: dict) -> float:
    """Bytes read per decode token: mertools' store count where it has one, else /proc/self/io's."""
    return r.get("decode_bytes", r.get("decode_io_bytes", 0)) / max(1, r.get("tokens", 1))


# ---------------------------------------------------------------- building (or reusing) one shape


def paths(s: Shape, n_layers: int, work: Path, seed: int) -> dict[str, Path]:
    stem = f"{s.name}-{n_layers}L-{s.qtype}-seed{seed}"
    return {"gguf": work / f"{stem}.gguf", "partial": work / f"{stem}.partial.gguf", "layout": work / f"{stem}-layout",
            "base": work / f"{stem}-layout.base", "routers": work / f"{stem}-routers.npy",
            "calib_ids": work / f"{stem}-calib-ids.json", "sidecar": work / f"{stem}.json"}


def _manifest_sha(layout: Path) -> str:
    return hashlib.sha256((layout / "manifest.json").read_bytes()).hexdigest()


def _recipe(s: Shape, n_layers: int, a: argparse.Namespace) -> dict:
    return {"version": SIDECAR_VERSION, "shape": asdict(s), "n_layers": n_layers, "seed": a.seed,
            "calib_tokens": a.calib_tokens}


def reusable(p: dict[str, Path], recipe: dict) -> dict | None:
    """The sidecar's record if the files it describes are there as it left them (written last: a build that
    stopped half way has none). The GGUF is matched by size and mtime, the layout by its manifest's sha256
    (which holds every expert file's checksum)."""
    try:
        side = json.loads(p["sidecar"].read_text())
        g = p["gguf"].stat()
        ok = (side["recipe"] == recipe and side["gguf_bytes"] == g.st_size and side["gguf_mtime_ns"] == g.st_mtime_ns
              and side["manifest_sha256"] == _manifest_sha(p["layout"]))
    except (OSError, ValueError, KeyError):
        return None
    return side if ok else None


def remove(p: dict[str, Path]) -> None:
    for key, path in p.items():
        if key in ("layout", "base"):
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def mertools_convert(src: Path, out: Path, work: Path) -> dict:
    """`mertools convert SRC OUT --dtype auto` in a subprocess; its JSON summary."""
    summary = work / "convert-summary.json"
    cmd = [sys.executable, "-m", "mertools.cli", "convert", str(src), str(out), "--dtype", "auto", "--quiet", "--force",
           "--json", str(summary)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {res.stderr.strip()}")
    print(res.stdout.strip(), file=sys.stderr, flush=True)
    out_json = json.loads(summary.read_text())
    summary.unlink()
    return out_json


def build(s: Shape, n_layers: int, a: argparse.Namespace, p: dict[str, Path]) -> dict:
    """Write the GGUF (streaming), convert it, calibrate the routers on that layout and write them into the GGUF,
    convert again. Returns the sidecar record."""
    from benchmarks.router_calibration import write_routers

    recipe = _recipe(s, n_layers, a)
    if a.reuse and (side := reusable(p, recipe)) is not None:
        print(f"[{s.name}] reusing {p['gguf']} and {p['layout']}", file=sys.stderr, flush=True)
        return side
    remove(p)
    times = {}
    t0 = time.perf_counter()
    print(f"[{s.name}] writing {p['partial']} ({n_layers} layers) ...", file=sys.stderr, flush=True)
    write_gguf(p["partial"], s, n_layers, a.seed)
    times["write_s"] = time.perf_counter() - t0
    print(f"[{s.name}]   {p['partial'].stat().st_size / GB:.2f} GB in {times['write_s']:.0f} s; converting ...",
          file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    mertools_convert(p["partial"], p["base"], a.work)
    times["convert_base_s"] = time.perf_counter() - t0
    p["calib_ids"].write_text(json.dumps(common.random_ids(a.calib_tokens, a.seed, s.vocab)))
    print(f"[{s.name}] calibrating the routers over {a.calib_tokens} tokens ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    calib = common.run_child(__file__, ["--child-calibrate", str(p["base"]), str(p["calib_ids"]), str(p["routers"]),
                                        str(a.seed)], timeout=a.run_timeout)
    if "error" in calib:
        raise RuntimeError(f"router calibration failed: {calib['error']}")
    times["calibrate_s"] = time.perf_counter() - t0
    import numpy as np

    write_routers(p["partial"], list(np.load(p["routers"])))
    shutil.rmtree(p["base"])
    t0 = time.perf_counter()
    conv = mertools_convert(p["partial"], p["layout"], a.work)
    times["convert_s"] = time.perf_counter() - t0
    p["partial"].rename(p["gguf"])
    g = p["gguf"].stat()
    side = {"recipe": recipe, "gguf_bytes": g.st_size, "gguf_mtime_ns": g.st_mtime_ns,
            "manifest_sha256": _manifest_sha(p["layout"]), "times": times, "convert": conv,
            "calibration": calib}
    p["sidecar"].write_text(json.dumps(side))
    return side


def layout_sizes(layout: Path) -> dict[str, int]:
    from mertools.layout import Layout

    m = Layout.open(layout).manifest
    files = [f for f in layout.rglob("*") if f.is_file()]
    return {"experts_layout": sum(e.nbytes for e in m.experts), "dense_layout": sum(t.nbytes for t in m.dense.values()),
            "slot": max(e.nbytes for e in m.experts), "layout_bytes": sum(f.stat().st_size for f in files)}


# ---------------------------------------------------------------- planning: caps, disk, time


def parse_caps(spec: str, mem_total: int) -> list[tuple[str, int]]:
    """"1/4,1/2,1" (fractions of MemTotal), "0.5", or sizes "1.5GiB", "800MiB"."""
    out = []
    for item in spec.split(","):
        item = item.strip()
        units = {"gib": GIB, "mib": MIB, "gb": GB, "mb": 1e6}
        unit = next((u for u in units if item.lower().endswith(u)), None)
        if unit:
            out.append((item, int(float(item[:-len(unit)]) * units[unit])))
        else:
            num, _, den = item.partition("/")
            frac = float(num) / float(den or 1)
            out.append((f"{item} of RAM" if frac != 1 else "all RAM", int(frac * mem_total)))
    return out


def disk_need(s: Shape, n_layers: int) -> int:
    """Peak bytes of one shape's files: its GGUF beside a layout (the base one, then the final one), each about
    the tensor bytes (the layout aligns every tensor and expert file to 4 KiB), plus the vocabulary."""
    n_tensors = len(tensor_plan(s, n_layers))
    gguf = sizes(s, n_layers)["total"] + s.vocab * 64 + n_tensors * 4096
    return 2 * gguf + n_tensors * 4096 + n_layers * s.n_expert * 4096


def estimate_s(s: Shape, n_layers: int, caps: list[tuple[str, int]], a: argparse.Namespace, avail: int) -> dict[str, float]:
    """A rough wall-time estimate, from this machine's measured rates (docs/BENCHMARKS.md, smoke runs):
    write ~0.5 GB/s, convert ~0.25 GB/s (~0.12 with small expert files), reads ~1 GB/s, GEMM ~150 GFLOP/s.
    Reads per decode token: the active experts not cached (cache share = cache / expert bytes); the prompt
    reads the experts any of its tokens chose; llama.cpp also reads the whole file at load (MAP_POPULATE)."""
    z = sizes(s, n_layers)
    tot, exp = z["total"], z["experts"]
    per_tok = n_layers * s.n_expert_used * z["expert"]
    active_flop = 2 * (per_tok / BLOCKS[s.qtype][1] * BLOCKS[s.qtype][0] + z["dense"] / BLOCKS[s.qtype][1] * BLOCKS[s.qtype][0])
    prompt_share = 1 - (1 - s.n_expert_used / s.n_expert) ** a.prompt_tokens
    calib_reads = min(1.0, a.calib_tokens * s.n_expert_used / s.n_expert) * exp / 1e9
    est = {"write": tot / 0.5e9, "convert (x2)": 2 * tot / (0.25e9 if z["expert"] > 16 * MIB else 0.12e9),
           "calibrate": calib_reads + a.calib_tokens * active_flop / 150e9}
    n_llama = a.llama_tokens if a.llama_tokens is not None else a.tokens
    runs = 0.0
    for _, cap in caps:
        share = min(1.0, max(0.0, min(cap, avail) - z["dense"] - a.margin_mb * MIB) / exp)
        prompt = prompt_share * exp / 1e9
        runs += 15 + prompt + a.tokens * max((1 - share) * per_tok / 1e9, active_flop / 150e9)  # mertools
        runs += 15 + tot / 1e9 + prompt + n_llama * (1 - share) * per_tok / 0.7e9  # llama.cpp: page faults
    est["runs"] = runs
    return est


# ---------------------------------------------------------------- report


def report(done: list[dict], a: argparse.Namespace, mem_total: int, command: str, total_s: float) -> tuple[str, bool]:
    """The section's markdown, and whether mertools' peak RSS stayed within the cap in every run."""
    n_llama = a.llama_tokens if a.llama_tokens is not None else a.tokens
    out = [f"Machine: {common.machine_description()}", "", f"Command: `{command}`", "",
           f"Each checkpoint is written at full depth{'' if a.layers is None else f' (here: {a.layers} layers)'}, "
           "streamed to disk, with random valid weight blocks (no quantizer runs); random routers send every token to "
           f"the same experts, so each layer's router is recalibrated over {a.calib_tokens} random token ids "
           "(benchmarks/router_calibration.py's rule, in one forward pass) and written into the GGUF, which "
           "`mertools convert --dtype auto` then turns into a layout (blocks copied byte for byte). Each run is a fresh "
           "process in a memory cgroup (v1) limited to the cap, with the page cache dropped before it. Both tools "
           f"decode the same forced stream: a prompt of {a.prompt_tokens} tokens, then {a.tokens} tokens one at a time "
           f"(llama.cpp: the first {n_llama}), {a.threads} threads each. mertools: `--cache-mb` = min(cap, MemAvailable) "
           f"- dense bytes - {a.margin_mb} MiB, prefetch lookahead, {common.KERNELS[a.kernels]}. "
           "llama.cpp (llama-cpp-python): use_mmap on, weight "
           "repacking off (use_extra_bufts=False), so its weights are the file's pages in the page cache, which the "
           "cgroup limits; it maps the file with MAP_POPULATE, so loading reads the whole file.", ""]
    ok = True
    for d in done:
        s, z, side = d["shape"], d["sizes"], d["side"]
        cal = side["calibration"]

        def mean(stats: list[dict], key: str) -> float:
            return sum(x[key] for x in stats) / max(1, len(stats))

        out += [f"### {s.title}-shaped ({s.arch}, {s.qtype.upper()})", "",
                f"{d['n_layers']} layers, d_model {s.d_model}, {s.n_expert} experts of width {s.d_ff}, top-"
                f"{s.n_expert_used}, {s.n_head} heads / {s.n_kv} kv heads of {s.head_dim}, vocab {s.vocab}. GGUF "
                f"{side['gguf_bytes'] / GB:.2f} GB, layout {z['layout_bytes'] / GB:.2f} GB: experts "
                f"{z['experts_layout'] / GB:.2f} GB ({z['slot'] / 1e6:.2f} MB each), dense {z['dense_layout'] / GB:.2f} GB. "
                f"Built in {sum(side['times'].values()):.0f} s (write {side['times']['write_s']:.0f}, convert "
                f"{side['times']['convert_base_s']:.0f} + {side['times']['convert_s']:.0f}, calibrate "
                f"{side['times']['calibrate_s']:.0f}).", "",
                f"Routing over the {cal['tokens']} calibration tokens, per layer (mean over layers): random routers "
                f"{mean(cal['random'], 'entropy_bits'):.2f} bits, {mean(cal['random'], 'distinct'):.1f} distinct experts; "
                f"calibrated {mean(cal['calibrated'], 'entropy_bits'):.2f} bits, {mean(cal['calibrated'], 'distinct'):.1f} "
                f"distinct (uniform: {math.log2(s.n_expert):.2f} bits, {s.n_expert}).", "",
                "| cap | mertools cache | mertools tok/s | GB read/token | hit rate | peak RSS GiB (within cap) | start s | "
                "llama.cpp tok/s | GB read/token | peak RSS GiB | start s | mertools / llama.cpp |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in d["runs"]:
            m, ll, cap = r["mertools"], r["llama"], r["cap"]
            cells = [f"{r['cap_label']} ({cap / GIB:.1f} GiB)"]
            if "error" in m:
                ok = False
                cells += [f"error: {m['error']}", *["-"] * 5]
            else:
                within = m["peak_rss_mb"] * MIB <= cap
                ok &= within
                hit = m["decode_hits"] / m["decode_lookups"] if m["decode_lookups"] else 0.0
                cells += [f"{m['cache_mb'] / 1024:.1f} GiB ({m['cache_slots']} of {d['n_layers'] * s.n_expert})",
                          f"{m['decode_tok_s']:.3f}", f"{_read_per_token(m) / GB:.2f}", f"{hit:.0%}",
                          f"{m['peak_rss_mb'] / 1024:.2f} ({'yes' if within else 'NO'})",
                          f"{m['open_s'] + m['prefill_s']:.0f}"]
            if "error" in ll:
                cells += [f"error: {ll['error']}", *["-"] * 3, "-"]
            else:
                cells += [f"{ll['decode_tok_s']:.3f}", f"{_read_per_token(ll) / GB:.2f}", f"{ll['peak_rss_mb'] / 1024:.2f}",
                          f"{ll['load_s'] + ll['prefill_s']:.0f}",
                          f"{m['decode_tok_s'] / ll['decode_tok_s']:.1f}x" if "error" not in m else "-"]
            out.append("| " + " | ".join(cells) + " |")
        out += ["", *ceilings(d["runs"]), ""]
    out += ["![tok/s and GB read per token against the memory cap, mertools beside llama.cpp](img/bench-full-size.png)",
            ""]  # drawn by benchmarks/charts.py from the tables above
    out += [f"GB read/token: decode steps only; mertools' from its expert store (O_DIRECT), llama.cpp's from "
            "/proc/self/io read_bytes (page faults of the mmapped file, readahead included). Hit rate: mertools' expert "
            "cache during decode. Peak RSS: VmHWM (llama.cpp's counts the file pages it has mapped in). Start: load "
            "(mertools: dense weights; llama.cpp: mapping and populating the file) plus the prompt; mertools' warm-up "
            "before the prompt (`Engine.warmup` on the prompt's tokens: numba's compiling or loading) is left out. "
            f"mertools' peak RSS within its cap in every run: {'yes' if ok else 'NO'}. "
            f"MemTotal {mem_total / GIB:.1f} GiB; the whole run took {total_s / 60:.0f} min."]
    busy = sum(1 for d in done for r in d["runs"] for t in ("mertools", "llama") if not r[t].get("quiet", True))
    if busy:
        out += ["", f"{busy} run(s) started while other processes kept the shared CPUs busy (after waiting "
                f"{a.wait_quiet:.0f} s for them to go idle): their figures may be low."]
    return "\n".join(out), ok


# ---------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=[*SHAPES, "all"], default="all")
    ap.add_argument("--layers", type=int, help="layers to write (default: the model's full depth); for smoke tests")
    ap.add_argument("--tokens", type=int, default=32,
                    help="decode tokens after the prompt (the cache policy learns the stream over the first ~20)")
    ap.add_argument("--llama-tokens", type=int, help="decode tokens for llama.cpp (default: --tokens)")
    ap.add_argument("--prompt-tokens", type=int, default=8)
    ap.add_argument("--calib-tokens", type=int, default=256, help="token ids the routers are calibrated over")
    ap.add_argument("--caps", default="1/4,1/2,1", help="fractions of MemTotal, or sizes such as 1.5GiB")
    ap.add_argument("--margin-mb", type=int,
                    help="left under the cap for Python, numba, the KV cache and activations (default: the engine's own "
                         "margin, sizing.MARGIN)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--seed", type=int, default=0)
    common.add_kernels_option(ap)
    ap.add_argument("--workdir", default="/tmp/mertools-full")
    ap.add_argument("--llama-python", default="/tmp/venv-bench/bin/python", help="a Python with llama-cpp-python")
    ap.add_argument("--keep", action="store_true", help="keep each shape's GGUF and layout (disk: both shapes at once)")
    ap.add_argument("--reuse", action="store_true", help="skip building a shape whose files (and sidecar) match")
    ap.add_argument("--run-timeout", type=float, default=1800, help="seconds for one run")
    ap.add_argument("--wait-quiet", type=float, default=60,
                    help="before each run, wait up to this many seconds for other processes to leave the CPUs idle")
    ap.add_argument("--fill", action="store_true",
                    help="mertools with the background fill where the cache holds every expert (`mertools run --fill`)")
    ap.add_argument("--no-doc", action="store_true", help="print the section, leave docs/BENCHMARKS.md alone")
    ap.add_argument("--dry-run", action="store_true", help="check the disk, print the estimate, and stop")
    ap.add_argument("--child-mertools", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--child-llama", nargs=5, help=argparse.SUPPRESS)
    ap.add_argument("--child-calibrate", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child_mertools:
        lay, mb, ids, threads, n_prompt, kernels, *approx = a.child_mertools
        return child_mertools(lay, float(mb), ids, int(threads), int(n_prompt), kernels, *approx)
    if a.child_llama:
        g, ids, threads, n_prompt, n_dec = a.child_llama
        return child_llama(g, ids, int(threads), int(n_prompt), int(n_dec))
    if a.child_calibrate:
        lay, ids, out, seed = a.child_calibrate
        return child_calibrate(lay, ids, out, int(seed))

    a.margin_mb = engine_margin_mb() if a.margin_mb is None else a.margin_mb
    command = "python benchmarks/bench_full_size.py " + " ".join(
        x for x in sys.argv[1:] if x not in ("--no-doc", "--reuse", "--keep"))
    if os.geteuid() != 0:
        sys.exit("bench_full_size: needs root (drop_caches and a cgroup v1 memory group for the caps)")
    if not Path("/sys/fs/cgroup/memory").is_dir():
        sys.exit("bench_full_size: no cgroup v1 memory controller at /sys/fs/cgroup/memory")
    if not Path(a.llama_python).exists():
        sys.exit(f"bench_full_size: no Python at {a.llama_python} (--llama-python: one with llama-cpp-python)")
    a.work = work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    shapes = list(SHAPES.values()) if a.shape == "all" else [SHAPES[a.shape]]
    mem_total, avail = meminfo("MemTotal"), meminfo("MemAvailable")
    caps = parse_caps(a.caps, mem_total)

    # disk, up front: one shape's GGUF beside a layout at a time (all of them with --keep)
    plans = []
    for s in shapes:
        n = a.layers or s.n_layers
        p = paths(s, n, work, a.seed)
        need = 0 if a.reuse and reusable(p, _recipe(s, n, a)) else disk_need(s, n)
        plans.append((s, n, p, need))
    # shape by shape, in order: a build first removes the files of ours it replaces; without --keep each shape's files
    # go after its runs, so a shape reused now leaves its room to the next one's build
    have = free = shutil.disk_usage(work).free
    need = GIB  # the build that falls shortest of its room, with the room it has (need == GIB: no build yet)
    for _, _, q, size in plans:
        ours = q["gguf"].stat().st_size if q["gguf"].exists() else 0
        ours += sum(f.stat().st_size for f in q["layout"].rglob("*") if f.is_file()) if q["layout"].is_dir() else 0
        if size:
            free += ours
            if need == GIB or size + GIB - free > need - have:
                need, have = size + GIB, free
            free -= size if a.keep else 0
        elif not a.keep:
            free += ours
    print(f"disk: need {need / GB:.1f} GB in {work} ({', '.join(f'{s.name} {x / GB:.1f} GB' for s, _, _, x in plans)}, "
          f"+1 GiB slack{', all kept' if a.keep else ', one shape at a time'}), have {have / GB:.1f} GB free", file=sys.stderr)
    est = {s.name: {k: v for k, v in estimate_s(s, n, caps, a, avail).items() if need or k == "runs"}
           for s, n, _, need in plans}
    for name, e in est.items():
        print(f"estimate [{name}]: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in e.items()), file=sys.stderr)
    print(f"estimate in all: ~{sum(sum(e.values()) for e in est.values()) / 60:.0f} min (rough)", file=sys.stderr, flush=True)
    if need > have:
        sys.exit(f"bench_full_size: not enough free disk in {work}: need {need / GB:.1f} GB, have {have / GB:.1f} GB. "
                 "Free some space or pick another --workdir" + (", or run one --shape at a time." if a.keep else "."))
    if a.dry_run:
        return

    t_start = time.perf_counter()
    done = []
    for s, n, p, _ in plans:
        try:
            side = build(s, n, a, p)
            built = {"gguf": p["gguf"], "layout": p["layout"], "sizes": layout_sizes(p["layout"])}
            ids_path = work / f"{s.name}-decode-ids.json"  # the same forced stream for both tools, unseen in calibration
            ids_path.write_text(json.dumps(common.random_ids(a.prompt_tokens + a.tokens, a.seed + 1, s.vocab)))
            runs = run_caps(s, built, caps, a, ids_path)
            done.append({"shape": s, "n_layers": n, "sizes": built["sizes"], "side": side, "runs": runs})
            (work / f"results-{s.name}-{n}L.json").write_text(
                json.dumps({**done[-1], "shape": asdict(s)}, indent=1, default=str))
        finally:
            if not a.keep:
                remove(p)
    body, ok = report(done, a, mem_total, command, time.perf_counter() - t_start)
    common.publish(*SECTION, body, write=not a.no_doc)
    if not a.no_doc:
        common.draw_charts(SECTION[0])
    if not ok:
        sys.exit("bench_full_size: a mertools run failed or its peak RSS went over its cap (see the table)")


if __name__ == "__main__":
    main()
