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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _common as common  # noqa: E402


def child(src: str, out: str, dtype: str) -> None:
    """Runs in its own process so ru_maxrss is this conversion's alone."""
    from mertools.convert.pipeline import ConvertOptions, convert

    s = convert(src, out, ConvertOptions(dtype=dtype, force=True, progress=False))
    print(json.dumps({**s.to_dict(), "peak_rss_mb": common.peak_rss_mb()}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--workdir", default=common.WORKDIR)
    ap.add_argument("--dtypes", default="q4_0,q8_0")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    work = Path(args.workdir)
    src = common.synth_gguf(work, args.layers)
    size = src.stat().st_size
    rows = []
    for dtype in args.dtypes.split(","):
        out = work / f"layout-{dtype}"
        cold = common.drop_caches()
        d = common.run_child(__file__, ["--child", str(src), str(out), dtype])
        if "error" in d:
            sys.exit(f"converting to {dtype}: {d['error']}")
        rows.append((dtype, d, cold))
        print(dtype, d)
        shutil.rmtree(out, ignore_errors=True)
    lines = [
        f"Machine: {common.machine_description()}",
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
    common.publish("convert", "Conversion", "\n".join(lines))


if __name__ == "__main__":
    main()
