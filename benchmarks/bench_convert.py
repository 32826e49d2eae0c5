"""Conversion throughput and peak RSS on a Mixtral-shaped GGUF of a few GB.

    python benchmarks/bench_convert.py [--layers 4] [--workdir /tmp/mertools-bench]

Writes a synthetic Mixtral-shaped merged-layout Q4_0 GGUF at real dimensions (d_model 4096, d_ff 14336,
8 experts, 32 heads, 8 kv heads, vocab 32000), then converts it in a fresh process per case (page cache
dropped first when possible) and reports MB/s in and out and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._report import machine_description, write_section  # noqa: E402
from benchmarks.disk import drop_caches  # noqa: E402


def child(src: str, out: str, dtype: str) -> None:
    """Runs in its own process so ru_maxrss is this conversion's alone."""
    from mertools.convert.pipeline import ConvertOptions, convert

    s = convert(src, out, ConvertOptions(dtype=dtype, force=True, progress=False))
    d = s.to_dict()
    from mertools.runtime.memory import peak_rss_bytes

    d["peak_rss_mb"] = peak_rss_bytes() / 2**20
    print(json.dumps(d))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--workdir", default="/tmp/mertools-bench")
    ap.add_argument("--dtypes", default="q4_0,q8_0")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    from fixtures.tiny_mixtral import synth_mixtral_gguf

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    src = work / f"mixtral-{args.layers}L-q4_0.gguf"
    if not src.exists():
        t0 = time.perf_counter()
        synth_mixtral_gguf(src, n_layers=args.layers, seed=0)
        print(f"synthesised {src} ({src.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t0:.1f} s")
    size = src.stat().st_size
    rows = []
    for dtype in args.dtypes.split(","):
        out = work / f"layout-{dtype}"
        cold = drop_caches()
        res = subprocess.run(
            [sys.executable, __file__, "--child", str(src), str(out), dtype], capture_output=True, text=True, check=True
        )
        d = json.loads(res.stdout.strip().splitlines()[-1])
        rows.append((dtype, d, cold))
        print(dtype, d)
        shutil.rmtree(out, ignore_errors=True)
    lines = [
        f"Machine: {machine_description()}",
        "",
        f"Command: `python benchmarks/bench_convert.py --layers {args.layers} --dtypes {args.dtypes}`",
        "",
        f"Source: synthetic Mixtral-shaped merged-layout GGUF, Q4_0, {args.layers} layers, {size / 1e9:.2f} GB "
        "(fixtures.tiny_mixtral.synth_mixtral_gguf). Each conversion runs in a fresh process; page cache dropped "
        "first where marked cold.",
        "",
        "| target dtype | cache | tensors | copied as bytes | GB in | GB out | seconds | MB/s in | MB/s out | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for dtype, d, cold in rows:
        lines.append(
            f"| {dtype} | {'cold' if cold else 'warm'} | {d['tensors']} | {d['copied']} | {d['bytes_in'] / 1e9:.2f} | "
            f"{d['bytes_out'] / 1e9:.2f} | {d['seconds']:.1f} | {d['mb_per_s_in']:.0f} | {d['mb_per_s_out']:.0f} | "
            f"{d['peak_rss_mb']:.0f} |"
        )
    write_section("convert", "## Conversion\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
