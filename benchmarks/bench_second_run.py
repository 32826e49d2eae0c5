"""A second run right after a first, where mmap readers start warm: mertools (`--io auto`: mapped expert
files when the layout fits, and O_DIRECT for contrast) against llama.cpp (mmap, repacking off) on a layout
that fits in memory, same forced token stream, one fresh process per run, the page cache dropped before
each tool's first run.

    python benchmarks/bench_second_run.py --gguf /tmp/mertools-bench/mixtral-4L-q4_0-diverse.gguf \\
        --layout /tmp/mertools-bench/layout-4L-diverse --llama-python /tmp/venv-bench/bin/python

Reported per run: the whole process's seconds from start to the last token (load, prompt, decode: what a
one-shot `mertools run` user waits for), decode tok/s and GB read from the disk by the process
(/proc/self/io read_bytes: reads the page cache served are not counted); for each count of decoded tokens asked
(`--tokens`, default 24 and `mertools run`'s 64).
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import shutil
import sys
import time
from pathlib import Path

T0 = time.perf_counter()  # the child's start, as close to the exec as Python allows
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import _common as common  # noqa: E402


def _read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def child(tool: str, path: str, io: str, n_prompt: int, n_tokens: int, threads: int, kernels: str) -> None:
    ids = common.random_ids(n_prompt + n_tokens, seed=11)
    if tool == "mertools":
        from mertools.runtime.engine import Engine

        eng = Engine.open(path, threads=threads, io=io, context=len(ids), kernels=kernels)
        step = eng.forward
    else:
        llm = common.open_llama(path, threads, repack=False, n_ctx=len(ids) + 8, use_mmap=True)
        step = llm.eval
    ready_s = time.perf_counter() - T0  # imports and opening the model
    prefill_s, decode_s = common.forced_decode(step, ids, n_prompt)
    out = {"total_s": time.perf_counter() - T0, "ready_s": ready_s, "prefill_s": prefill_s,
           "decode_tok_s": n_tokens / decode_s, "read_gb": _read_bytes() / 1e9}
    if tool == "mertools":
        out["o_direct"] = eng.store.o_direct
        out["io"] = "mmap" if eng.store.mapped else "buffered" if eng.store.keep_pages else "direct"  # what auto chose
        eng.close()
        out["closed_s"] = time.perf_counter() - T0  # the packed copies a first run queued are written by then
        if (copies := eng.store.copies) is not None:  # packed copies (runtime/packed.py) mapped and written
            out["copies"] = f"{copies.mapped} packed copies mapped, {copies.written} written"
    print(json.dumps(out))


def _median_run(runs: list[dict]) -> dict:
    """The run of median whole-process seconds (an error, if any run failed)."""
    bad = [r for r in runs if "error" in r]
    return bad[0] if bad else sorted(runs, key=lambda r: r["total_s"])[len(runs) // 2]


def _cell(r: dict) -> str:
    if "error" in r:
        return f"error: {r['error']}"
    return (f"{r['total_s']:.1f} s ({r['ready_s']:.2f} + {r['prefill_s']:.2f}), {r['decode_tok_s']:.2f} tok/s, "
            f"{r['read_gb']:.2f} GB" + (f", {r['io']}" if "io" in r else "") + (f", {r['copies']}" if "copies" in r else "")
            + (f", closed at {r['closed_s']:.1f} s" if "closed_s" in r else ""))


def _measure(a: argparse.Namespace, tokens: int) -> tuple[list[tuple[str, list[dict]]], float]:
    """Each tool's first run and `a.repeats` runs after it, decoding `tokens`; (rows, llama.cpp's median second-run
    seconds / mertools auto's)."""
    rows = []
    for label, tool, path, io, python in (("mertools --io auto", "mertools", a.layout, "auto", sys.executable),
                                          ("mertools --io direct", "mertools", a.layout, "direct", sys.executable),
                                          ("llama.cpp (mmap)", "llama", a.gguf, "-", a.llama_python)):
        common.drop_caches()
        if tool == "mertools":  # a first run finds no packed copies (runtime/packed.py) either
            from mertools.runtime.packed import DIR  # not at the top: llama.cpp's children run without mertools' needs

            shutil.rmtree(Path(path) / DIR, ignore_errors=True)
        runs = []
        for _ in range(1 + a.repeats):
            common.wait_quiet(30)
            runs.append(common.run_child(__file__, ["--child", tool, path, io, "--prompt-tokens", str(a.prompt_tokens),
                                                    "--tokens", str(tokens), "--threads", str(a.threads),
                                                    "--kernels", a.kernels],
                                         python=python))
        rows.append((label, runs))
        print(tokens, label, runs, flush=True)
    second = {label: _median_run(runs[1:]).get("total_s") for label, runs in rows}
    ratio = (second["llama.cpp (mmap)"] / second["mertools --io auto"]) if all(second.values()) else float("nan")
    return rows, ratio


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf")
    p.add_argument("--layout")
    p.add_argument("--llama-python")
    p.add_argument("--prompt-tokens", type=int, default=8)
    p.add_argument("--tokens", type=int, nargs="+", default=[24, 64],
                   help="tokens decoded after the prompt, one measurement each (64: `mertools run`'s default)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--repeats", type=int, default=3, help="runs after each tool's first (their median is reported)")
    common.add_kernels_option(p)
    p.add_argument("--no-doc", action="store_true")
    p.add_argument("--child", nargs=3, metavar=("TOOL", "PATH", "IO"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a.child[0], a.child[1], a.child[2], a.prompt_tokens, a.tokens[0], a.threads, a.kernels)
        return 0
    if not (a.gguf and a.layout and a.llama_python):
        p.error("--gguf, --layout and --llama-python are required")
    # mertools' bytecode, as pip compiles an installed package's (llama-cpp-python's was, at its install): a checkout
    # under PYTHONDONTWRITEBYTECODE (this sandbox's) would recompile every source at each start
    compileall.compile_dir(str(Path(__file__).resolve().parent.parent / "mertools"), quiet=1)
    table = ["| decoded | tool | first run: s in all (imports + open, prompt), decode tok/s, GB read | "
             f"a run after it: the same (the median of {a.repeats}; all runs' seconds) |", "|---|---|---|---|"]
    ratios = []
    for tokens in a.tokens:
        rows, ratio = _measure(a, tokens)
        ratios.append(f"{ratio:.2f} decoding {tokens}")
        for label, runs in rows:
            again = " ".join(f"{r['total_s']:.1f}" for r in runs[1:] if "error" not in r)
            table.append(f"| {tokens} | {label} | {_cell(runs[0])} | {_cell(_median_run(runs[1:]))} ({again}) |")
    body = (f"{common.machine_description()}\n\nCommand: `python benchmarks/bench_second_run.py --gguf {a.gguf} --layout "
            f"{a.layout} --llama-python {a.llama_python}` ({a.prompt_tokens}-token prompt, then "
            f"{' and '.join(map(str, a.tokens))} tokens decoded (64: `mertools run`'s default), {a.threads} threads; "
            f"mertools with {common.KERNELS[a.kernels]}, "
            "its bytecode compiled as an installed package's is, the io mode `auto` chose after each run's figures)."
            "\n\n" + "\n".join(table) +
            "\n\nA run after the first, whole process: llama.cpp's median seconds / mertools --io auto's = "
            f"{', '.join(ratios)} (above 1: "
            "mertools finishes first). `--io auto` (the CLI's default) maps the expert files when the layout fits in memory "
            "beside the process: nothing is copied into an arena, and the second run finds the pages where the first "
            "left them. With the 8-bit kernels, which pack the experts after their read, it reads them buffered and "
            "keeps what it packed as packed copies in the layout's packed/ directory (runtime/packed.py; written on a "
            "low-priority thread, finished when the engine closes: 'closed at'); a later run maps those copies from the "
            "page cache: no read, no packing, and the dense weights' copy makes the open 0.03-0.12 s. Without copies it "
            "reads buffered until the page cache holds the files, then maps them (the experts then on the exact "
            "kernels), and on a CPU without AVX-512 always reads and packs them. A layout that does not fit is "
            "read with O_DIRECT, which never uses the page cache (on this VM the host caches re-read data, so O_DIRECT "
            "re-reads are fast too); `direct` writes no copies.")
    common.publish("second_run", "A second run right after a first", body, write=not a.no_doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
