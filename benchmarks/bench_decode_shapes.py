"""Decode in RAM on a many-small-experts shape beside llama.cpp, for --layers layers: Qwen3-30B-A3B's layer
(--shape qwen3: d_model 2048, 128 experts of width 768, top-8, Q4_K; 48 layers in the real model), where a token
runs 8 experts per layer and pays mertools' per-call Python 8 times per layer; or gpt-oss-20b's (--shape gpt_oss:
d_model 2880, 32 experts of width 2880, top-4, MXFP4 experts and Q8_0 attention; 24 layers in the real model).

    python benchmarks/bench_decode_shapes.py [--shape qwen3] [--layers 12] [--workdir /tmp/mertools-bench]

The GGUF is written by benchmarks/full_size_checkpoints.py (random weights, llama.cpp's names for the arch) and
converted to a layout; each engine runs in a process of its own with every weight resident (bench_decode.py's
children: mertools with every expert loaded first, llama.cpp without mmap, repacked as by default and not): a
--prompt-token prompt, then --tokens decode steps, the median step kept; --rounds processes per engine,
interleaved, the best kept. Writes the shape's section of docs/BENCHMARKS.md, "decode_shapes" or
"decode_shapes_gpt_oss" (--no-write).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _common as common  # noqa: E402
from benchmarks import bench_decode  # noqa: E402
from benchmarks.full_size_checkpoints import GPT_OSS, QWEN3, Shape, sizes, write_gguf  # noqa: E402


@dataclass(frozen=True)
class Variant:
    shape: Shape
    stem: str  # of the GGUF and layout file names in --workdir
    section: str  # of docs/BENCHMARKS.md
    layers_have: str  # what the report says of a layer beyond the numbers every shape has
    types: str  # the report's words for the weight types


VARIANTS = {
    "qwen3": Variant(QWEN3, "qwen3", "decode_shapes", "", "Q4_K"),
    "gpt_oss": Variant(GPT_OSS, "gptoss", "decode_shapes_gpt_oss",
                       f" of head_dim {GPT_OSS.head_dim}, sliding window {GPT_OSS.sliding_window} in every other layer "
                       "(full attention between), attention sinks, biases on q/k/v/o, the router and the experts",
                       "experts MXFP4, attention, embedding and output Q8_0 (llama.cpp's MXFP4_MOE preset), "
                       "norms, routers, biases and sinks F32"),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=list(VARIANTS), default="qwen3")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--llama-python", default="/tmp/venv-bench/bin/python")
    ap.add_argument("--workdir", default=common.WORKDIR)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    from mertools.convert.pipeline import ConvertOptions, convert

    t0 = time.perf_counter()
    v = VARIANTS[a.shape]
    s = v.shape
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    gguf, lay = work / f"{v.stem}-{a.layers}L-{s.qtype}.gguf", work / f"layout-{v.stem}-{a.layers}L"
    need = sizes(s, a.layers)["total"] * 2.2  # the GGUF, its layout, and room
    if not gguf.exists() and os.statvfs(work).f_bavail * os.statvfs(work).f_frsize < need:
        sys.exit(f"bench_decode_shapes: {work} has less than {need / 1e9:.1f} GB free")
    if not gguf.exists():
        write_gguf(gguf.with_name(gguf.name + ".partial"), s, a.layers, 0).rename(gguf)
    if not (lay / "manifest.json").exists():
        convert(gguf, lay, ConvertOptions(force=True, progress=False))
    engines = [("mertools (exact kernels)", "mertools", lay, sys.executable),
               ("mertools (int8 kernels, run/serve's default)", "mertools-int8", lay, sys.executable),
               ("llama.cpp (repacked, its default)", "llama-repack", gguf, a.llama_python),
               ("llama.cpp (repacking off)", "llama-norepack", gguf, a.llama_python)]
    runs: dict[str, list[dict]] = {label: [] for label, *_ in engines}
    for rnd in range(a.rounds):
        for label, kind, path, python in engines if rnd % 2 == 0 else engines[::-1]:
            common.wait_quiet(60)
            r = common.run_child(bench_decode.__file__, ["--child", kind, str(path), str(a.prompt), str(a.tokens),
                                                         str(a.threads)], python=python)
            runs[label].append(r)
            print(label, {k: v for k, v in r.items() if k != "token_s"}, file=sys.stderr, flush=True)
    rows = ["| engine | decode tok/s (median step) | vs llama.cpp default | ms per token | prefill tok/s | peak RSS MiB |",
            "|---|---:|---:|---:|---:|---:|"]
    best: dict[str, dict] = {}
    for label, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        best[label] = max(ok, key=lambda r: 1 / statistics.median(r["token_s"])) if ok else {"error": rs[-1]["error"]}
    ref = best["llama.cpp (repacked, its default)"]
    ref_tps = 1 / statistics.median(ref["token_s"]) if "error" not in ref else float("nan")
    for label, r in best.items():
        if "error" in r:
            rows.append(f"| {label} | error: {r['error']} | | | | |")
            continue
        tps = 1 / statistics.median(r["token_s"])
        prefill = max(a.prompt / x["prefill_s"] for x in runs[label] if "error" not in x)  # each figure's best run
        rows.append(f"| {label} | {tps:.2f} | {tps / ref_tps:.2f}x | {1e3 / tps:.1f} | {prefill:.1f} | "
                    f"{r['peak_rss_mb']:.0f} |")
    z = sizes(s, a.layers)
    flags = ("" if a.shape == "qwen3" else f" --shape {a.shape}") + f" --layers {a.layers}" + "".join(
        f" --{k} {v}" for k, v, default in (("rounds", a.rounds, 2), ("prompt", a.prompt, 32), ("tokens", a.tokens, 24))
        if v != default)
    body = (f"Machine: {common.machine_description()}\n\nCommand: `python benchmarks/bench_decode_shapes.py{flags}` "
            f"(took {(time.perf_counter() - t0) / 60:.0f} min)\n\nllama.cpp: {common.llama_build(a.llama_python)}\n\n"
            f"{a.layers} layers of {s.title}'s shape (d_model {s.d_model}, {s.n_expert} experts of width {s.d_ff}, "
            f"top-{s.n_expert_used}, {s.n_head} heads / {s.n_kv} KV heads{v.layers_have}, vocabulary {s.vocab:,}; "
            f"{v.types}, random weights): {z['total'] / 1e9:.2f} GB, every weight resident in both "
            f"engines, {a.threads} threads, a {a.prompt}-token prompt (after it once untimed) then {a.tokens} decode "
            f"steps, the median step; {a.rounds} processes per engine, interleaved, each figure's best kept. A token "
            f"runs {s.n_expert_used * a.layers} expert calls.\n\n" + "\n".join(rows))
    common.publish(v.section, f"Decode in RAM with many small experts ({s.title}'s shape)", body, write=not a.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
