"""Quantizer / dequantizer throughput: mertools' numba kernels vs gguf-py's numpy code, same run.

Run: python benchmarks/bench_quant.py [--rows 4096 --cols 4096 --repeat 5]
Writes the "quantizers" section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numba  # noqa: E402
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf import quants  # noqa: E402

from benchmarks._common import machine_description, write_section  # noqa: E402
from mertools.dtypes.q4_k import quantize_reference as numpy_q4_k  # noqa: E402
from mertools.kernels import dequantize, quantize  # noqa: E402

GGUF_TYPE = {"f16": T.F16, "q4_0": T.Q4_0, "q8_0": T.Q8_0, "q4_k": T.Q4_K}


def best_time(fn: Callable[[], object], repeat: int) -> float:
    """Best wall time of `repeat` calls, after one warm-up call (numba compile / cache load)."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def mbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-write", action="store_true", help="print only, leave docs/BENCHMARKS.md alone")
    args = ap.parse_args()
    warnings.simplefilter("ignore", RuntimeWarning)

    x = (np.random.default_rng(0).standard_normal((args.rows, args.cols)) * 0.02).astype(np.float32)
    nbytes = x.nbytes  # MB/s below are of float32 weights (quantize input, dequantize output)
    rows = []
    for dtype in ("f16", "q4_0", "q8_0", "q4_k"):
        raw = quantize(x, dtype)
        q_ours = best_time(lambda d=dtype: quantize(x, d), args.repeat)
        if dtype == "q4_k":
            q_gguf = None
            q_note = "gguf-py has no Q4_K quantizer"
            q_np = best_time(lambda: numpy_q4_k(x), 1)
            q_note += f"; our numpy transcription: {mbps(nbytes, q_np):,.0f} MB/s"
        else:
            q_gguf = best_time(lambda d=dtype: quants.quantize(x, GGUF_TYPE[d]), max(1, args.repeat // 2))
            q_note = "f16: numpy astype in both" if dtype == "f16" else ""
        dq_ours = best_time(lambda d=dtype, r=raw: dequantize(r, d, x.shape), args.repeat)
        dq_gguf = best_time(lambda d=dtype, r=raw: quants.dequantize(r, GGUF_TYPE[d]), max(1, args.repeat // 2))
        rows.append(("quantize", dtype, q_ours, q_gguf, q_note))
        rows.append(("dequantize", dtype, dq_ours, dq_gguf, ""))

    lines = [
        f"Machine: {machine_description()}",
        "",
        f"Command: `python benchmarks/bench_quant.py --rows {args.rows} --cols {args.cols} --repeat {args.repeat}`",
        "",
        f"A {args.rows}x{args.cols} float32 matrix (N(0, 0.02²), {nbytes / 1e6:.1f} MB). Throughput is MB/s of "
        "float32 weights (quantizer input, dequantizer output), best of the repeats after a warm-up call. "
        f"mertools: numba kernels on {numba.get_num_threads()} threads, including the NaN/Inf scan; "
        "gguf-py 0.19 `gguf.quants` (numpy) in the same process. Outputs are byte-identical. Both "
        "dequantizers allocate a fresh float32 output, whose page faults bound them at this size.",
        "",
        "| operation | dtype | mertools (numba) MB/s | gguf-py (numpy) MB/s | speed-up | note |",
        "|---|---|---:|---:|---:|---|",
    ]
    for op, dtype, ours, theirs, note in rows:
        g = f"{mbps(nbytes, theirs):,.0f}" if theirs else "—"
        ratio = f"{theirs / ours:.1f}×" if theirs else "—"
        lines.append(f"| {op} | {dtype} | {mbps(nbytes, ours):,.0f} | {g} | {ratio} | {note} |")
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section("quantizers", "## Quantizers\n\n" + text)


if __name__ == "__main__":
    main()
