"""Decode near the memory bandwidth: quantized matvecs beside the machine's read bandwidth, and
end-to-end prefill/decode tokens/s of the Engine beside llama.cpp (llama-cpp-python) on the same GGUF.

Run: python benchmarks/bench_decode.py [--workdir /tmp/mertools-bench] [--layers 4] [--tokens 32]
Builds the synthetic Mixtral-shaped Q4_0 GGUF and its layout under the work dir if absent, then
writes the "decode" section of docs/BENCHMARKS.md. llama.cpp runs in --llama-python (a Python with
llama-cpp-python, the `bench` extra); without it those columns are left out, with a note.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _common as common  # noqa: E402

ROTATE_BYTES = 320 * 2**20  # each call reads the next of several copies of W: bytes come from DRAM
PROMPT_SEED = 0
WARM = 4  # decode tokens run before the timed ones
MERTOOLS = {"mertools": "exact", "mertools-int8": "int8"}  # engine name -> Engine.open's kernels


def prompt_ids(n: int) -> list[int]:
    """BOS then n - 1 seeded ids of the synthetic checkpoint's vocabulary (only ids matter to both engines)."""
    return common.random_ids(n, PROMPT_SEED, bos=True)


# ---------------------------------------------------------------- children (one engine per process)


def child_mertools(layout: str, n_prompt: int, tokens: int, threads: int, kernels: str) -> dict:
    t0 = time.perf_counter()
    from mertools import Engine

    eng = Engine.open(layout, cache_mb=1 << 20, threads=threads, kernels=kernels)
    cfg = eng.config
    keys = [(layer, e) for layer in range(cfg.n_layers) for e in range(cfg.n_experts)]
    for key, _ in eng.cache.acquire(keys):  # every expert resident: compute only, like llama.cpp's no-mmap load
        eng.cache.release(key)
    t_open = time.perf_counter() - t0
    ids = prompt_ids(n_prompt)
    eng.forward(ids, all_logits=False)  # kernels compiled or loaded from numba's cache for every path the prompt takes
    eng.reset()
    misses = eng.cache.stats.misses
    t = time.perf_counter()
    logits = eng.forward(ids, all_logits=False)
    prefill_s = time.perf_counter() - t
    tok, times = int(np.argmax(logits[-1])), []
    for _ in range(WARM + tokens):
        t = time.perf_counter()
        logits = eng.forward([tok], all_logits=False)
        tok = int(np.argmax(logits[-1]))
        times.append(time.perf_counter() - t)
    times = times[WARM:]
    stats = eng.stats()
    eng.close()
    return {"prefill_s": prefill_s, "token_s": times, "open_s": t_open, "misses": eng.cache.stats.misses - misses,
            "peak_rss_mb": stats["peak_rss_mb"]}


def child_llama(gguf: str, n_prompt: int, tokens: int, threads: int, repack: bool) -> dict:
    t0 = time.perf_counter()
    llm = common.open_llama(gguf, threads, repack=repack, n_ctx=n_prompt + tokens + 16, n_batch=n_prompt,
                            n_ubatch=n_prompt, use_mmap=False)
    t_open = time.perf_counter() - t0
    ids = prompt_ids(n_prompt)
    llm.eval(ids)  # the same untimed warm-up as mertools' child
    llm.reset()
    t = time.perf_counter()
    llm.eval(ids)
    prefill_s = time.perf_counter() - t
    vocab = llm.n_vocab()

    def last_logits() -> np.ndarray:  # without logits_all, Llama.scores is not filled: read llama.cpp's
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))

    tok, times = int(np.argmax(last_logits())), []
    for _ in range(WARM + tokens):
        t = time.perf_counter()
        llm.eval([tok])
        tok = int(np.argmax(last_logits()))
        times.append(time.perf_counter() - t)
    return {"prefill_s": prefill_s, "token_s": times[WARM:], "open_s": t_open, "peak_rss_mb": common.peak_rss_mb()}


# ---------------------------------------------------------------- bandwidth and matvecs


class Bandwidth:
    """Memory read bandwidth, GB/s reading a 1 GiB float32 array: a plain numba `prange` sum and a
    4-accumulator vector sum with software prefetch (mertools.kernels.simd), best of `repeat`."""

    def __init__(self) -> None:
        from numba import njit, prange

        from mertools.kernels.simd import prefetch, vadd, vhsum, vload, vzero

        @njit(parallel=True, nogil=True, fastmath=True)
        def plain(a):
            s = 0.0
            for i in prange(a.size):
                s += a[i]
            return s

        @njit(parallel=True, nogil=True)
        def vector(a, ab):
            tot = np.float32(0.0)
            for c in prange(a.size // 4096):
                s0 = s1 = s2 = s3 = vzero()
                for i in range(4096 * c, 4096 * c + 4096, 64):
                    prefetch(ab, min(4 * i + 2048, ab.size - 1))
                    prefetch(ab, min(4 * i + 2112, ab.size - 1))
                    prefetch(ab, min(4 * i + 2176, ab.size - 1))
                    prefetch(ab, min(4 * i + 2240, ab.size - 1))
                    s0, s1 = vadd(s0, vload(a, i)), vadd(s1, vload(a, i + 16))
                    s2, s3 = vadd(s2, vload(a, i + 32)), vadd(s3, vload(a, i + 48))
                tot += vhsum(vadd(vadd(s0, s1), vadd(s2, s3)))
            return tot

        self.a = np.ones(2**28, np.float32)
        ab = self.a.view(np.uint8)
        self.fns = {"plain": lambda: plain(self.a), "vector": lambda: vector(self.a, ab)}
        for fn in self.fns.values():
            fn()
        self.samples: list[float] = []  # every all-threads figure, for the reference

    def measure(self, threads: int, repeat: int) -> dict[str, float]:
        import numba

        before = numba.get_num_threads()
        numba.set_num_threads(threads)
        out = {name: self.a.nbytes / min(common.timings(lambda _, f=fn: f(), repeat, warmup=False)) / 1e9
               for name, fn in self.fns.items()}
        numba.set_num_threads(before)
        if threads == before:
            self.samples += out.values()
        return out


def _time_matvec(x: np.ndarray, ws: list[np.ndarray], dtype: str, rows: int, cols: int, repeat: int) -> list[float]:
    """Times of `repeat` calls x @ W.T, call i on ws[i % len(ws)], after one untimed call."""
    from mertools.kernels.matmul import matmul

    out = np.empty((1, rows), np.float32)
    return common.timings(lambda i: matmul(x, ws[i % len(ws)], dtype, rows, cols, out), repeat)


def random_blocks(dtype: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 (rows, row_bytes) of a type layouts only copy (no quantizer): random codes, ordinary scales
    (weights ~1e-2), so the kernel does the same work as on a real checkpoint's blocks."""
    from mertools.dtypes import DTYPES

    t = DTYPES[dtype]
    nb = cols // t.block_size
    raw = rng.integers(0, 256, (rows, nb, t.type_size), dtype=np.uint8)
    for o in t.scale_offsets:
        if t.scale_format == "e8m0":  # an exponent byte: 2^(e-128) scales
            raw[:, :, o] = 121
        else:
            raw[:, :, o:o + 2] = np.full((rows, nb), 1e-3, "<f2").view(np.uint8).reshape(rows, nb, 2)
    return raw.reshape(rows, nb * t.type_size)


def matvec_table(repeat: int, bw: Bandwidth) -> list[dict]:
    import numba

    from mertools.dtypes import DTYPES, EXPERT_DTYPES
    from mertools.kernels import int8, quantize
    from mertools.kernels.matmul import weight

    rng = np.random.default_rng(0)
    threads = numba.get_num_threads()
    rows_out = []
    for rows, cols in common.MIXTRAL.expert_matrices:
        w32 = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
        x = rng.standard_normal((1, cols)).astype(np.float32)
        for dtype in (*EXPERT_DTYPES, "f32"):  # every type a layout holds, and f32 as the float baseline
            bw.measure(threads, 3)  # the host's bandwidth drifts: sample it beside every row
            w = quantize(w32, dtype) if DTYPES[dtype].quantize is not None else random_blocks(dtype, rows, cols, rng)
            copies = [w] + [w.copy() for _ in range(max(1, -(-ROTATE_BYTES // w.nbytes) - 1))]
            t2 = _time_matvec(x, copies, dtype, rows, cols, repeat)
            numba.set_num_threads(1)
            t1 = _time_matvec(x, copies, dtype, rows, cols, max(5, repeat // 3))
            # compute ceiling: one thread, a ~1 MiB slice of W that stays in L2, called over and over
            small = [np.ascontiguousarray(w[: max(4, (2**20 // w.shape[1]) // 4 * 4)])]
            tc = _time_matvec(x, small, dtype, small[0].shape[0], cols, 100)
            numba.set_num_threads(threads)
            row = {"shape": f"{rows}x{cols}", "dtype": dtype, "mb": w.nbytes / 1e6,
                   "med": w.nbytes / statistics.median(t2) / 1e9, "best": w.nbytes / min(t2) / 1e9,
                   "one": w.nbytes / min(t1) / 1e9, "l2": small[0].nbytes / min(tc) / 1e9}
            if int8.takes(dtype, rows, cols):  # the same copies on the 8-bit kernels (packed ones packed first)
                fast = [weight(c.copy(), dtype, rows, cols, int8=True) for c in copies]
                t8 = common.timings(lambda i, f=fast, v=x: f[i % len(f)](v), repeat)
                row["int8"] = w.nbytes / statistics.median(t8) / 1e9
            rows_out.append(row)
    return rows_out


# ---------------------------------------------------------------- model files and start-up


def decode_bytes(layout: Path) -> float:
    """Weight bytes one decode token reads: attention and the active experts of every layer, and the
    output matrix (the embedding row is negligible)."""
    from mertools.layout.reader import Layout

    m = Layout.open(layout).manifest
    cfg = m.config
    dense = sum(t.nbytes for name, t in m.dense.items() if ".attn_" in name and not name.endswith("norm.weight"))
    out = m.dense["output.weight"].nbytes if "output.weight" in m.dense else m.dense["token_embd.weight"].nbytes
    expert = sum(e.nbytes for e in m.experts) / len(m.experts)
    return dense + out + cfg.n_layers * cfg.n_experts_used * expert


def ensure_model(workdir: Path, layers: int, qtype: str, llama_python: str) -> tuple[Path, Path]:
    """The shared synthetic Q4_0 GGUF, or llama.cpp's quantizer's `qtype` preset of it ("q4_k_m": requantized from
    the Q4_0 weights by llama_model_quantize, a Q4_K / Q6_K mix as users download), and its layout, converted in a
    child (its memory is not this process's)."""
    gguf = common.synth_gguf(workdir, layers)
    if qtype != "q4_0":
        from fixtures.llamacpp_presets import quantize

        preset = workdir / f"mixtral-{layers}L-{qtype}.gguf"
        if not preset.exists():
            print(f"quantizing {gguf} to {qtype} with llama.cpp ...", file=sys.stderr)
            quantize(llama_python, gguf, preset.with_name(preset.name + ".partial"), qtype.upper(), requantize=True)
            preset.with_name(preset.name + ".partial").rename(preset)
        gguf = preset
    layout = workdir / f"mixtral-{layers}L-{qtype}-layout"
    if not (layout / "manifest.json").exists():
        print(f"converting to {layout} ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "mertools.cli", "convert", str(gguf), str(layout), "--force", "--quiet"],
                       check=True, cwd=common.ROOT, env={**os.environ, "PYTHONPATH": str(common.ROOT)})
    return gguf, layout


def startup(layout: Path, threads: int) -> dict[str, float]:
    """Wall time of `mertools run LAYOUT -p Hello -n 1` with an empty numba cache directory (every
    kernel compiled) and then with it filled (every kernel loaded)."""
    out = {}
    with tempfile.TemporaryDirectory() as cache_dir:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache_dir, "PYTHONPATH": str(common.ROOT)}
        cmd = [sys.executable, "-m", "mertools.cli", "run", str(layout), "-p", "Hello", "-n", "1",
               "--threads", str(threads), "--prefetch", "none"]
        for name in ("cold", "warm", "warm2"):
            t = time.perf_counter()
            subprocess.run(cmd, check=True, env=env, capture_output=True)
            out[name] = time.perf_counter() - t
    return {"cold": out["cold"], "warm": min(out["warm"], out["warm2"])}


# ---------------------------------------------------------------- report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workdir", default=common.WORKDIR)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32, help="decode tokens timed per run")
    ap.add_argument("--prompt", type=int, default=512, help="prefill prompt tokens")
    ap.add_argument("--rounds", type=int, default=3, help="end-to-end runs per engine (interleaved); best kept")
    ap.add_argument("--wait-quiet", type=float, default=300, help="max seconds to wait for an idle machine per step")
    ap.add_argument("--repeat", type=int, default=30, help="matvec calls timed per case")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--llama-python", default="/tmp/venv-bench/bin/python")
    ap.add_argument("--types", default="q4_0,q4_k_m", help="models end to end: q4_0 (synthetic) and llama.cpp presets "
                    "quantized from it (q4_k_m needs --llama-python)")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        kind, path, n_prompt, tokens, threads = a.child[:5]
        if kind.startswith("mertools"):
            res = child_mertools(path, int(n_prompt), int(tokens), int(threads), MERTOOLS[kind])
        else:
            res = child_llama(path, int(n_prompt), int(tokens), int(threads), repack=kind == "llama-repack")
        print(json.dumps(res))
        return

    import numba

    numba.set_num_threads(min(a.threads, numba.config.NUMBA_NUM_THREADS))
    have_llama = Path(a.llama_python).exists()
    types = [t for t in a.types.split(",") if t == "q4_0" or have_llama]
    models = {t: ensure_model(Path(a.workdir), a.layers, t, a.llama_python) for t in types}
    noisy = 0
    noisy += not common.wait_quiet(a.wait_quiet)
    probe = Bandwidth()
    bw = {f"{k}_{t}": v for t in (a.threads, 1) for k, v in probe.measure(t, 7).items()}
    mv = matvec_table(a.repeat, probe)
    for t in (a.threads, 1):
        for k, v in probe.measure(t, 7).items():
            bw[f"{k}_{t}"] = max(bw[f"{k}_{t}"], v)
    ref_bw = max(probe.samples)
    bw["lowest"] = min(probe.samples)
    del probe

    engines = list(MERTOOLS)
    if have_llama:
        engines += ["llama-repack", "llama-norepack"]
    best: dict[str, dict[str, dict]] = {}
    for qtype, (gguf, layout) in models.items():
        e2e: dict[str, list[dict]] = {e: [] for e in engines}
        for _ in range(a.rounds):
            for e in engines:
                path = str(layout if e in MERTOOLS else gguf)
                py = sys.executable if e in MERTOOLS else a.llama_python
                noisy += not common.wait_quiet(a.wait_quiet)
                args = ["--child", e, path, str(a.prompt), str(a.tokens), str(a.threads)]
                e2e[e].append(common.run_child(__file__, args, python=py))
        best[qtype] = {e: _best(runs, a.prompt) for e, runs in e2e.items()}
    noisy += not common.wait_quiet(a.wait_quiet)
    su = startup(models["q4_0"][1], a.threads)
    token_bytes = {t: decode_bytes(lay) for t, (_, lay) in models.items()}
    text = report(a, mv, bw, ref_bw, best, su, have_llama, token_bytes, noisy)
    common.publish("decode", "Decode: matvec bandwidth and end-to-end tokens/s beside llama.cpp", text, write=not a.no_write)


def _best(runs: list[dict], prompt: int) -> dict:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[-1].get("error", "?")}
    return {"decode": max(1 / statistics.median(r["token_s"]) for r in ok),
            "decode_best": max(1 / min(r["token_s"]) for r in ok),
            "prefill": max(prompt / r["prefill_s"] for r in ok),
            "rss": max(r["peak_rss_mb"] for r in ok), "misses": max(r.get("misses", 0) for r in ok)}


def report(a, mv, bw, ref_bw, best, su, have_llama, token_bytes, noisy) -> str:  # noqa: ANN001
    t = a.threads
    lines = [
        f"Machine: {common.machine_description()}",
        "",
        f"Command: `python benchmarks/bench_decode.py --layers {a.layers} --tokens {a.tokens} --prompt {a.prompt}`",
        *(["", f"llama.cpp: {common.llama_build(a.llama_python)}"] if have_llama else []),
        "",
        "### Matvec (decode, n = 1) at Mixtral expert shapes",
        "",
        f"Memory read bandwidth, same run, over a 1 GiB float32 array, best of 7 before and after the table: a "
        f"numba `prange` sum **{bw[f'plain_{t}']:.1f} GB/s** on {t} threads ({bw['plain_1']:.1f} on 1); a 4-accumulator "
        f"vector sum with software prefetch **{bw[f'vector_{t}']:.1f} GB/s** ({bw['vector_1']:.1f} on 1). This "
        f"shared host's bandwidth drifts, so both sums also ran (best of 3) before every row of the table: on "
        f"{t} threads they ranged {bw['lowest']:.1f}-{ref_bw:.1f} GB/s. The highest figure of all, "
        f"**{ref_bw:.1f} GB/s**, is the reference of the \"of bandwidth\" column. `matmul` with x (1, cols): "
        f"GB/s of weight bytes per call, median and best of {a.repeat} calls on {t} threads, each call on the next "
        f"of several copies of W (≥ {ROTATE_BYTES >> 20} MiB) so bytes come from DRAM; then one thread from DRAM; "
        "then one thread on a 1 MiB slice of W that stays in L2 (the kernel's compute ceiling per core).",
        "",
        f"| W (rows x cols) | dtype | MB | GB/s {t} threads (median / best) | of bandwidth (median) | GB/s 1 thread "
        f"| GB/s 1 thread, W in L2 | 8-bit kernels: GB/s {t} threads (median) | int8 / exact |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in mv:
        fast = f"{r['int8']:.1f} | {r['int8'] / r['med']:.2f}×" if "int8" in r else "— | —"
        lines.append(f"| {r['shape']} | {r['dtype']} | {r['mb']:.1f} | {r['med']:.1f} / {r['best']:.1f} | "
                     f"{r['med'] / ref_bw:.0%} | {r['one']:.1f} | {r['l2']:.1f} | {fast} |")
    lines += ["", "### End to end", ""]
    lines.append(
        f"The synthetic Mixtral-shaped Q4_0 GGUF (`python -m fixtures.tiny_mixtral --synth OUT.gguf --layers "
        f"{a.layers}`: real dimensions, {a.layers} layers, every tensor Q4_0 but norms and routers) and its layout "
        "(`mertools convert`, Q4_0 blocks copied byte for byte); "
        + ("and llama.cpp's Q4_K_M of it (llama_model_quantize with allow_requantize from those Q4_0 weights: the "
           "Q4_K / Q6_K mix of the preset users download), converted likewise. " if "q4_k_m" in best else "")
        + f"Each engine runs in a fresh process with {t} threads: mertools `Engine` with every expert resident in its "
        "cache before timing (no disk reads while timed), once with its exact float kernels and once with its "
        "8-bit-activation kernels (kernels/int8.py: activations quantized as ggml's q8_0, or q8_K for the K types, "
        "vpdpbusd; Q4_0, Q8_0 and MXFP4 weights packed 16 rows per block at load, Q4_K and Q6_K 16 rows per super-block "
        "(a lane per row), Q5_K read as it is), as llama.cpp computes; llama.cpp "
        "through llama-cpp-python on the same GGUF (`use_mmap=False`: the file read into memory at load, so no page "
        "faults while timed either), once with its defaults (`use_extra_bufts` on: weights repacked at load for its "
        "AVX-512 kernels, `q4_0_8x8` / `q4_K_8x8`) and once with `use_extra_bufts=False` (the file's blocks). "
        f"Prefill: one {a.prompt}-token prompt in one call (llama.cpp: n_batch = n_ubatch = {a.prompt}), after the "
        "same prompt once untimed (numba compiles or loads every path it takes). Decode: "
        f"{WARM} untimed then {a.tokens} timed greedy tokens after it, one call each; tok/s = 1 / median token "
        "time (1 / best in brackets). "
        f"{a.rounds} interleaved rounds, the best kept; before each step the benchmark waits (≤ {a.wait_quiet:g} s) "
        "for the shared machine's other processes to go idle"
        + (f" — {noisy} step(s) ran without that, so figures may be low." if noisy else ".")
        + " The random router sends most tokens to the same "
        "experts; with all experts resident that does not change the work per token.")
    names = {"mertools": "mertools (`kernels=\"exact\"`)", "mertools-int8": "mertools (`kernels=\"int8\"`, run/serve's default)",
             "llama-repack": "llama.cpp (default, repacked)", "llama-norepack": "llama.cpp (`use_extra_bufts=False`)"}

    def ratios(m: dict, b: dict) -> str:
        return f"**{m['decode'] / b['decode']:.2f}×** | {m['prefill'] / b['prefill']:.2f}×" if "decode" in m else "— | —"

    for qtype, engines in best.items():
        tb = token_bytes[qtype]
        lines += ["", f"**{qtype.upper()}**: a decode token reads {tb / 1e6:,.0f} MB of weights (attention and "
                  f"{a.layers} x 2 active experts, output matrix): at {ref_bw:.1f} GB/s, at most "
                  f"**{ref_bw * 1e9 / tb:.1f} tok/s**.", "",
                  "| engine | decode tok/s | of the bandwidth bound | prefill tok/s | peak RSS MB "
                  "| mertools exact / it: decode | prefill | mertools int8 / it: decode | prefill |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for e, b in engines.items():
            if "error" in b:
                lines.append(f"| {names[e]} | error: {b['error']} | | | | | | | |")
                continue
            cells = " | ".join("— | —" if e in MERTOOLS else ratios(engines.get(m, {}), b) for m in MERTOOLS)
            lines.append(f"| {names[e]} | {b['decode']:.1f} ({b['decode_best']:.1f}) | {b['decode'] * tb / (ref_bw * 1e9):.0%} "
                         f"| {b['prefill']:.1f} | {b['rss']:,.0f} | {cells} |")
    if not have_llama:
        lines += ["", f"llama.cpp columns left out: no {a.llama_python} (install the `bench` extra there)."]
    q40 = [r for r in mv if r["dtype"] == "q4_0"]
    q4k = [r for r in mv if r["dtype"] == "q4_k"]

    def span(rows: list[dict], key: str, scale: float = 1.0, fmt: str = "{:.0f}") -> str:
        lo, hi = (fmt.format(f(r[key] * scale for r in rows)) for f in (min, max))
        return lo if lo == hi else f"{lo}-{hi}"

    lines += [
        "",
        f"Reading it: Q4_0 and Q4_K decode are compute-bound on one core (one thread from DRAM reaches about what the "
        f"L2 column shows: {span(q40, 'l2')} GB/s for Q4_0, {span(q4k, 'l2')} for Q4_K), so two cores top out near "
        f"twice that, whatever the memory can give: here {span(q40, 'med', 100 / ref_bw)}% of the bandwidth for "
        f"Q4_0 and {span(q4k, 'med', 100 / ref_bw)}% for Q4_K (median calls). Q8_0, F16 and F32 have fewer weights "
        "per byte and stay memory-bound. The 8-bit kernels multiply bytes, not floats: the same matrices at "
        f"{span([r for r in q40 if 'int8' in r], 'int8', fmt='{:.1f}')} GB/s for Q4_0 and "
        f"{span([r for r in q4k if 'int8' in r], 'int8', fmt='{:.1f}')} for Q4_K. How the kernels get there, what was "
        "tried, earlier kernels and where decode time goes: \"Decode: notes\" below this section.",
    ]
    lines += ["", f"Start-up, `mertools run LAYOUT -p Hello -n 1` wall time (process start to exit, one token; "
              f"includes reading the experts it routes to from disk): with an empty numba cache directory "
              f"(`NUMBA_CACHE_DIR`, every kernel compiled) **{su['cold']:.1f} s**; with the cache filled "
              f"(every kernel loaded) **{su['warm']:.1f} s**."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
