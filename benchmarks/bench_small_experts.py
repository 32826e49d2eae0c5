"""Expert-store load throughput for many small experts (Qwen3-MoE-shaped) against few big ones
(Mixtral-shaped), at several numbers of experts in flight, with the store's reads chunked the old way
(4 MiB: a small expert is one read) and the new way (small experts split into io_depth pieces).

    python benchmarks/bench_small_experts.py [--dir DIR] [--no-doc]

Writes two synthetic Q4_0 layouts (random bytes; the store checks only xxh3), drops the page cache
before every measurement (needs root; otherwise says so), and writes the "small-experts" section of
docs/BENCHMARKS.md. About 1.5 GB per layout.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import MIXTRAL, drop_caches, machine_description, publish  # noqa: E402
from benchmarks.disk import store_load_stats  # noqa: E402
from mertools.layout.config import ModelConfig  # noqa: E402
from mertools.layout.constants import ALIGNMENT  # noqa: E402
from mertools.layout.writer import EncodedTensor, LayoutWriter  # noqa: E402

# (name, config): Qwen3-30B-A3B's expert shape (d_model 2048, width 768, 128 experts) and Mixtral 8x7B's
SHAPES = {
    "qwen3-moe": ModelConfig(arch="qwen3_moe", vocab_size=151936, d_model=2048, d_ff=768, n_layers=4, n_heads=32,
                             n_kv_heads=4, head_dim=128, n_experts=128, n_experts_used=8, context_length=40960,
                             qk_norm="head"),
    "mixtral": MIXTRAL.model_config(n_layers=2),
}
LABELS = {"qwen3-moe": "Qwen3-MoE", "mixtral": "Mixtral"}
DEPTHS = (1, 2, 4, 8, 16)  # experts loading at once (the engine's loader pool has 4 workers)
FIXED = 4 << 20  # the store's chunk (mertools.runtime.store.CHUNK)
IO_DEPTH, MIN_SPLIT = 8, 256 << 10  # the split tried: io_depth pieces of at least 256 KiB


def split_chunk(nbytes: int) -> int:
    piece = -(-nbytes // IO_DEPTH)
    return min(FIXED, max(MIN_SPLIT, -(-piece // ALIGNMENT) * ALIGNMENT))


def q4_0_bytes(rows: int, cols: int) -> int:
    return rows * cols // 32 * 18


def write_layout(out: Path, cfg: ModelConfig, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    shapes = {"gate": (cfg.d_ff, cfg.d_model), "up": (cfg.d_ff, cfg.d_model), "down": (cfg.d_model, cfg.d_ff)}
    with LayoutWriter(out, force=True) as w:
        for layer in cfg.moe_layers:
            for e in range(cfg.n_experts):
                w.write_expert(layer, e, {r: EncodedTensor(np.frombuffer(rng.bytes(q4_0_bytes(*s)), np.uint8), "q4_0", s)
                                          for r, s in shapes.items()})
        w.commit(cfg, {"kind": "hf", "files": []}, {"kind": "synthetic"})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=Path("/tmp/mertools-bench-small-experts"))
    p.add_argument("--no-doc", action="store_true", help="print only; do not write docs/BENCHMARKS.md")
    p.add_argument("--keep", action="store_true", help="keep the synthetic layouts")
    p.add_argument("--repeat", type=int, default=5, help="runs per setting, before/after interleaved; medians reported")
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    p.add_argument("--depths", nargs="+", type=int, default=list(DEPTHS))
    args = p.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    dropped = drop_caches()
    rows = []
    try:
        for name in args.shapes:
            cfg = SHAPES[name]
            t0 = time.perf_counter()
            layout = write_layout(args.dir / name, cfg)
            from mertools.layout import Layout

            m = Layout.open(layout).manifest
            size = m.experts[0].nbytes
            adaptive = split_chunk(size)
            print(f"{name}: {len(m.experts)} experts of {size / 1e6:.2f} MB written in {time.perf_counter() - t0:.1f} s",
                  flush=True)
            for depth in args.depths:
                modes = (FIXED, adaptive)  # the same for Mixtral: then the pair measures the noise
                runs: list[list[tuple[float, float]]] = [[], []]
                for _ in range(args.repeat):  # interleaved, so a noisy neighbour hits both alike
                    for k, chunk in enumerate(modes):
                        dropped = drop_caches() and dropped
                        runs[k].append(store_load_stats(layout, depth, chunk_bytes=chunk, io_depth=IO_DEPTH))
                figs = [tuple(float(np.median([r[i] for r in rk])) for i in range(2)) for rk in runs]
                n_fixed, n_new = -(-size // FIXED), -(-size // adaptive)
                rows.append((name, size, len(m.experts), depth, n_fixed, figs[0], n_new, figs[1]))
                print(f"  {depth:2d} experts in flight: {figs[0][0]:.2f} GB/s ({n_fixed} read/expert) -> "
                      f"{figs[1][0]:.2f} GB/s ({n_new} reads/expert); ms/expert {figs[0][1]:.2f} -> {figs[1][1]:.2f}",
                      flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    ratios = {s: [r[7][0] / r[5][0] for r in rows if r[0] == s] for s in args.shapes}
    lines = [
        f"`python benchmarks/bench_small_experts.py` on {machine_description()}; page cache "
        + ("dropped before every measurement." if dropped else "NOT dropped (not root): O_DIRECT reads only."),
        "Synthetic Q4_0 layouts: " + " and ".join(
            f"{LABELS[name]}-shaped experts (d_model {c.d_model}, width {c.d_ff}: "
            f"{3 * q4_0_bytes(c.d_ff, c.d_model) / 1e6:.3g} MB a file, {c.n_layers} layers x {c.n_experts})"
            for name, c in SHAPES.items() if name in args.shapes) + ".",
        "Every expert is loaded once through `ExpertStore.load` (O_DIRECT, xxh3 checked), N experts in flight as",
        "the cache's loader pool issues them (the engine uses 4). *4 MiB*: the store's chunks (a small expert is one read);",
        "*split*: each file split into io_depth (8) reads of >= 256 KiB (`ExpertStore(chunk_bytes=...)`).",
        f"Medians of {args.repeat} runs each, the two chunkings interleaved (the machine is shared: expect noise).",
        "",
        "| shape | expert MB | experts in flight | reads/expert 4 MiB | GB/s 4 MiB | ms/expert 4 MiB "
        "| reads/expert split | GB/s split | ms/expert split |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, size, _n, depth, n_fixed, (g0, m0), n_new, (g1, m1) in rows:
        lines.append(f"| {name} | {size / 1e6:.2f} | {depth} | {n_fixed} | {g0:.2f} | {m0:.2f} | {n_new} | {g1:.2f} | {m1:.2f} |")
    lines += ["", "Split / 4 MiB throughput, per shape: " + "; ".join(
        f"{s} {min(r):.2f}-{max(r):.2f}x" for s, r in ratios.items() if r) + ". Mixtral's files are split into 4 MiB",
        "reads either way, so its two columns measure the same thing twice: their spread is this shared disk's noise.",
        "Earlier runs, and why the store keeps 4 MiB chunks: \"Small experts: notes\" below this section."]
    publish("small-experts", "Small experts: expert-store load throughput", "\n".join(lines), write=not args.no_doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
