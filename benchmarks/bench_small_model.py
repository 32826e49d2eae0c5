"""A small model held in RAM, where each token costs its Python more than its bytes: the trained fixture
(fixtures/trained, 4 layers, d_model 256, 8 experts top-2) decoded by mertools and by llama.cpp on the same
weights, warm, in the same run.

    python benchmarks/bench_small_model.py [--llama-python /tmp/venv-bench/bin/python]
        [--convert /tmp/sdist/llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py]
        [--before /path/to/an/older/checkout]

The checkpoint goes to GGUF with llama.cpp's own converter (f16; it needs torch) and to Q4_0 with llama.cpp's
quantizer; mertools converts that Q4_0 GGUF into its layout, so both run the same blocks. Each engine runs in a
process of its own, every weight resident, after a warm-up: a 16-token prompt, then the same forced ids one at a
time (tok/s of the decode, best of --rounds); llama.cpp with its default repacked weights and with repacking off.
mertools also generates (sampling and detokenising each token, as `mertools run` does) to compare with its bare
forward loop. `--before DIR` adds the same mertools rows from another checkout (e.g. a worktree of an earlier
commit), run interleaved with this one. Writes the "small_model" section of docs/BENCHMARKS.md (--no-write).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _common as common  # noqa: E402

CHECKPOINT = common.ROOT / "fixtures" / "trained" / "tiny-shakespeare-moe"
CONVERT = "/tmp/sdist/llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py"
N_PROMPT = 16
BATCH = 4  # sequences decoding together in the batched column
QUANTIZE = """
import sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype, p.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, 2
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))
"""


def child(tool: str, path: str, tokens: int, rounds: int, threads: int, root: str) -> None:
    if root:  # another checkout's mertools
        sys.path.insert(0, root)
    ids = common.random_ids(N_PROMPT + tokens, 5, vocab=2048, bos=True)
    out: dict[str, float] = {}
    if tool.startswith("mertools"):
        from mertools.runtime.engine import Engine

        kw = {"kernels": "int8"} if tool.startswith("mertools-int8") else {}  # an older checkout (--before) has neither
        if tool == "mertools-int8-pieces":
            kw["compiled_step"] = False
        eng = Engine.open(path, threads=threads, prefetch="lookahead", **kw)
        cfg = eng.config  # every expert read before anything is timed (a model in RAM after its first tokens)
        eng.cache.prefetch([(la, e) for la in range(cfg.n_layers) for e in range(cfg.n_experts)])
        while len(eng.cache.resident()) < cfg.n_layers * cfg.n_experts:
            time.sleep(0.01)
        step = eng.forward
    else:
        llm = common.open_llama(path, threads, repack=tool == "llama-repack", n_ctx=len(ids) + 8)
        step = llm.eval
    best = best_gen = 0.0
    for r in range(rounds + 1):  # the first a warm-up; mertools' generate alternates with the forced ids (a shared
        if tool.startswith("mertools"):  # host's speed moves within seconds: both see the same moments)
            eng.reset()
        else:
            llm.reset()
        _, decode_s = common.forced_decode(step, ids, N_PROMPT)
        if r:
            best = max(best, tokens / decode_s)
        if r and tool.startswith("mertools"):
            eng.times.decode_s, eng.times.generated_tokens = 0.0, 0
            list(eng.generate(ids[:N_PROMPT], max_tokens=tokens))
            best_gen = max(best_gen, eng.stats()["decode_tok_s"])
    out["decode_tok_s"] = best
    if best_gen:
        out["generate_tok_s"] = best_gen
        out["batch_tok_s"] = batched(eng, ids, tokens, rounds)
    if tool.startswith("mertools"):
        out["compiled_steps"] = eng.stats().get("compiled_steps", 0)
    print(json.dumps(out))


def batched(eng, ids: list[int], tokens: int, rounds: int) -> float:  # noqa: ANN001 - an Engine
    """Aggregate tok/s of BATCH sequences decoding together (the server's steps: `Engine.step`), the same forced
    ids shifted per sequence, after each sequence's prompt; best of `rounds` after a warm-up."""
    best = 0.0
    for r in range(rounds + 1):
        seqs = [eng.new_sequence(N_PROMPT + tokens) for _ in range(BATCH)]
        eng.step([(s, ids[i:i + N_PROMPT]) for i, s in enumerate(seqs)])
        t = time.perf_counter()
        for j in range(N_PROMPT, N_PROMPT + tokens - BATCH):
            eng.step([(s, [ids[j + i]]) for i, s in enumerate(seqs)])
        if r:
            best = max(best, BATCH * (tokens - BATCH) / (time.perf_counter() - t))
    return best


def build(work: Path, convert: str, llama_python: str) -> tuple[Path, Path]:
    from mertools.convert.pipeline import ConvertOptions
    from mertools.convert.pipeline import convert as to_layout

    f16, q4 = work / "trained-llamacpp-f16.gguf", work / "trained-llamacpp-q4_0.gguf"
    lay = work / "trained-from-llamacpp-q4_0"
    if not q4.exists():
        subprocess.run([sys.executable, convert, str(CHECKPOINT), "--outtype", "f16", "--outfile", str(f16)], check=True,
                       capture_output=True)
        subprocess.run([llama_python, "-c", QUANTIZE, str(f16), str(q4)], check=True, capture_output=True)
    if not (lay / "manifest.json").exists():
        to_layout(q4, lay, ConvertOptions(force=True, progress=False))
    return q4, lay


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-python", default="/tmp/venv-bench/bin/python")
    ap.add_argument("--convert", default=CONVERT, help="llama.cpp's convert_hf_to_gguf.py")
    ap.add_argument("--before", help="another checkout of mertools, measured beside this one")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--workdir", default=common.WORKDIR)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child[0], a.child[1], a.tokens, a.rounds, a.threads, a.child[2])
        return 0
    t0 = time.perf_counter()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    gguf, lay = build(work, a.convert, a.llama_python)
    runs = [("llama.cpp (repacked, its default)", "llama-repack", gguf, a.llama_python, ""),
            ("llama.cpp (repacking off)", "llama-plain", gguf, a.llama_python, ""),
            ("mertools (exact kernels)", "mertools", lay, sys.executable, ""),
            ("mertools (int8 kernels, each step piece by piece)", "mertools-int8-pieces", lay, sys.executable, ""),
            ("mertools (int8 kernels, run's default: decode steps in one compiled call)", "mertools-int8", lay,
             sys.executable, "")]
    if a.before:  # named by its commit when it is a git checkout
        rev = subprocess.run(["git", "-C", a.before, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        name = rev.stdout.strip() if rev.returncode == 0 else Path(a.before).name
        runs.append((f"mertools at {name} (--before)", "mertools", lay, sys.executable, a.before))
    res: dict[str, list[dict]] = {label: [] for label, *_ in runs}
    for rnd in range(2):  # two interleaved passes, every other one reversed: each row keeps its best
        for label, tool, path, python, root in runs if rnd % 2 == 0 else runs[::-1]:
            common.wait_quiet(30)
            r = common.run_child(__file__, ["--child", tool, str(path), root, "--tokens", str(a.tokens), "--rounds",
                                            str(a.rounds), "--threads", str(a.threads)], python=python)
            res[label].append(r)
            print(label, r, file=sys.stderr, flush=True)
    best = {label: max((r for r in rs if "error" not in r), key=lambda r: r["decode_tok_s"], default=rs[-1])
            for label, rs in res.items()}
    llama = best["llama.cpp (repacked, its default)"].get("decode_tok_s")
    rows = ["| engine | decode tok/s (forced ids) | vs llama.cpp default | generate tok/s (sampling, text) | generate / decode "
            f"| {BATCH} sequences together, tok/s |", "|---|---:|---:|---:|---:|---:|"]
    for label, r in best.items():
        if "error" in r:
            rows.append(f"| {label} | error: {r['error']} | | | | |")
            continue
        # each column's best over the processes (a shared host: a process's figures move together)
        gen = max((x.get("generate_tok_s") or 0.0 for x in res[label] if "error" not in x), default=0.0) or None
        dec = r["decode_tok_s"]
        gen_cells = f"{gen:.0f} | {gen / dec:.2f}" if gen else "- | -"
        batch = max((x.get("batch_tok_s") or 0.0 for x in res[label] if "error" not in x), default=0.0)
        rows.append(f"| {label} | {dec:.0f} | {dec / llama:.2f}x | {gen_cells} | {f'{batch:.0f}' if batch else '-'} |")
    body = (f"Machine: {common.machine_description()}\n\nCommand: `python benchmarks/bench_small_model.py"
            f"{' --before ' + a.before if a.before else ''}` (took {(time.perf_counter() - t0) / 60:.0f} min)\n\n"
            f"The trained fixture through llama.cpp's converter (f16) and quantizer (Q4_0), the same GGUF converted to a "
            f"layout; every weight resident, {a.threads} threads, a {N_PROMPT}-token prompt then {a.tokens} forced ids "
            f"decoded one at a time, best of {a.rounds} passes after a warm-up, two processes per engine (interleaved), each "
            "column's best kept. `generate` (its passes alternating with the forced ones) is mertools' own "
            "loop with greedy sampling and detokenising (what `mertools run` "
            f"reports). The last column: {BATCH} sequences decoding the forced ids together (`Engine.step`, as "
            "`mertools serve` steps them), their aggregate tok/s.\n\n" + "\n".join(rows))
    common.publish("small_model", "A small model in RAM: the per-token overhead", body, write=not a.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
