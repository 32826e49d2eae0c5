"""Speculative decoding with experts streamed: generated tokens/s and expert bytes per generated token with and
without drafts, acceptance rates, tokens per verification step; one command:

    python benchmarks/bench_speculative.py [--full-size] [--workdir /tmp/mertools-full]

(a) The trained fixture (fixtures/trained) as q4_0, an expert cache of 1/4 of its experts (8 of 32), lookahead
prefetch; greedy, --tokens generated after each prompt: a repetitive one (a verse repeated, as in editing or
summarising) and the held-out Julius Caesar snippet (prose the model has not seen); drafters: none, prompt lookup
(`ngram`) and the trained draft model shipped beside the fixture (fixtures/trained/tiny-shakespeare-draft as q4_0:
2 layers, d_model 128, the fixture's tokenizer; all its experts stay in memory). One process per setting, --rounds
rounds interleaved; tok/s is their median (range in brackets). Writes the "speculative" section.
(b) --full-size: the Mixtral-shaped Q4_0 checkpoint of bench_full_size.py (built, or --reuse'd), under a memory
cgroup of 1/4 of MemTotal, page cache dropped before each run: greedy generation after a repetitive prompt (64
random token ids, three times over), without drafts and with `ngram`. The random-weight model continues the
repetition only as far as its own argmax does, so the acceptance rate is whatever the model gives. Writes the
"speculative_full" section. Both sections are in docs/BENCHMARKS.md (--no-write: print only).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _common as common  # noqa: E402

TRAINED = common.ROOT / "fixtures" / "trained"
VERSE = ("ROMEO:\nBut soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n"
         "Arise, fair sun, and kill the envious moon.\n")
SETTINGS = [("no draft", None), ("ngram", "ngram"), ("draft model", "MODEL")]


def child(layout: str, cache_mb: float, prompt_json: str, draft: str, k: int, tokens: int) -> None:
    """One generation; prints its figures as JSON. `draft`: "none", "ngram" or a layout path."""
    from mertools.runtime.engine import Engine, draft_footprint

    prompt = json.loads(prompt_json)
    spec = None if draft == "none" else draft
    # the kernels `mertools run` uses (int8), each engine warmed up first as run does (compile time is no decode time)
    with Engine.open(layout, cache_mb=cache_mb, reserve_bytes=draft_footprint(spec), kernels="int8") as eng:
        d = eng.open_drafter(spec) if spec else None
        eng.warmup()
        if hasattr(d, "engine"):
            d.engine.warmup()
        try:
            t0 = time.perf_counter()
            out, after_prompt = [], 0
            for t in eng.generate(prompt, max_tokens=tokens, draft=d, draft_tokens=k):
                if not out:  # the prompt's reads end with the first token (decode reads are counted apart)
                    after_prompt = eng.run_stats().bytes_read
                out.append(t.id)
            wall = time.perf_counter() - t0
            s = eng.stats()
        finally:
            if d is not None:
                d.close()
    n = len(out)
    print(json.dumps({"tokens": n, "decode_tok_s": s["decode_tok_s"], "wall_s": wall,
                      "decode_bytes": s["bytes_read"] - after_prompt,
                      "expert_lookups": s["expert_lookups"], "spec_steps": s["spec_steps"],
                      "acceptance": s["draft_acceptance"], "tokens_per_step": s["tokens_per_step"],
                      "peak_rss_mb": s["peak_rss_mb"], "ids": out}))


def _median(rs: list[dict], key: str) -> float:
    vals = sorted(r[key] for r in rs)
    return vals[len(vals) // 2]


def trained_rows(a: argparse.Namespace, work: Path) -> tuple[list[str], dict]:
    from mertools.convert.pipeline import ConvertOptions, convert
    from mertools.layout import Layout
    from mertools.runtime.tokenizer import load_tokenizer

    lay = {"q4_0": work / "trained-q4_0", "draft": work / "trained-draft-q4_0"}
    for key, src in (("q4_0", "tiny-shakespeare-moe"), ("draft", "tiny-shakespeare-draft")):
        if not (lay[key] / "manifest.json").exists():
            convert(TRAINED / src, lay[key], ConvertOptions(dtype="q4_0", force=True, progress=False))
    m = Layout.open(lay["q4_0"]).manifest
    cache_mb = 8 * max(e.nbytes for e in m.experts) / 2**20 + 0.01
    tok = load_tokenizer(lay["q4_0"], m.tokenizer)
    held_out = (TRAINED / "held-out-julius-caesar.txt").read_text(encoding="utf-8")
    prompts = {"repetitive": tok.encode(VERSE * 3), "held-out prose": tok.encode(held_out)[:96]}
    runs: dict[tuple[str, str], list[dict]] = {(p, s): [] for p in prompts for s, _ in SETTINGS}
    for rnd in range(a.rounds):
        for pname, ids in prompts.items():
            for sname, draft in SETTINGS if rnd % 2 == 0 else SETTINGS[::-1]:
                spec = "none" if draft is None else str(lay["draft"]) if draft == "MODEL" else draft
                r = common.run_child(__file__, ["--child", str(lay["q4_0"]), f"{cache_mb:.3f}", json.dumps(ids), spec,
                                                str(a.draft_tokens), str(a.tokens)])
                runs[(pname, sname)].append(r)
                print(f"trained {pname} / {sname}: {r.get('decode_tok_s', r.get('error'))}", file=sys.stderr, flush=True)
    rows = []
    for pname in prompts:
        base = runs[(pname, "no draft")]
        for sname, _ in SETTINGS:
            rs = [r for r in runs[(pname, sname)] if "error" not in r]
            if not rs:
                rows.append(f"| {pname} | {sname} | error: {runs[(pname, sname)][-1]['error']} | - | - | - | - | - |")
                continue
            same = all(r["ids"] == base[0]["ids"] for r in rs) if base and "error" not in base[0] else False
            tps, lo, hi = _median(rs, "decode_tok_s"), min(r["decode_tok_s"] for r in rs), max(r["decode_tok_s"] for r in rs)
            ratio = tps / _median(base, "decode_tok_s")
            mb = _median(rs, "decode_bytes") / (_median(rs, "tokens") - 1) / 1e6
            acc = "-" if sname == "no draft" else f"{_median(rs, 'acceptance'):.0%}"
            per = "1.00" if sname == "no draft" else f"{_median(rs, 'tokens_per_step'):.2f}"
            rows.append(f"| {pname} | {sname} | {tps:.1f} ({lo:.1f}-{hi:.1f}) | {ratio:.2f}x | {mb:.2f} | {acc} | {per} | "
                        f"{'yes' if same else 'NO'} |")
    return rows, {"cache_mb": cache_mb, "prompt_tokens": {p: len(i) for p, i in prompts.items()}}


def full_size_rows(a: argparse.Namespace, work: Path) -> tuple[list[str], dict]:
    from benchmarks import bench_full_size as fs
    from benchmarks.full_size_checkpoints import SHAPES

    s = SHAPES["mixtral"]
    # what bench_full_size.build reads: the same checkpoint recipe as the full-size benchmarks
    a.shape, a.llama_tokens, a.calib_tokens, a.work, a.seed, a.run_timeout = "mixtral", None, 256, work, 0, 1800
    p = fs.paths(s, s.n_layers, work, 0)
    cap = fs.meminfo("MemTotal") // 4
    ids = common.random_ids(64, 1, s.vocab) * 3
    rows, res = [], {}
    try:
        fs.build(s, s.n_layers, a, p)
        sizes = fs.layout_sizes(p["layout"])
        for sname, draft in SETTINGS[:2]:
            common.wait_quiet(60)
            common.drop_caches()
            cache_mb = (min(cap, fs.meminfo("MemAvailable")) - sizes["dense_layout"] - 1024 * fs.MIB) / fs.MIB
            r = common.run_child(__file__, ["--child", str(p["layout"]), f"{cache_mb:.1f}", json.dumps(ids),
                                            draft or "none", str(a.draft_tokens), str(a.full_tokens)],
                                 cgroup_bytes=cap, timeout=3600)
            res[sname] = r
            print(f"full size / {sname}: {r.get('decode_tok_s', r.get('error'))}", file=sys.stderr, flush=True)
        base = res["no draft"]
        for sname, _ in SETTINGS[:2]:
            r = res[sname]
            if "error" in r:
                rows.append(f"| Mixtral full size, repetitive | {sname} | error: {r['error']} | - | - | - | - | - |")
                continue
            same = "error" not in base and r["ids"] == base["ids"]
            acc = "-" if sname == "no draft" else f"{r['acceptance']:.0%}"
            per = "1.00" if sname == "no draft" else f"{r['tokens_per_step']:.2f}"
            ratio = r["decode_tok_s"] / base["decode_tok_s"] if "error" not in base else float("nan")
            rows.append(f"| Mixtral full size, repetitive (cap {cap / fs.GIB:.1f} GiB) | {sname} | "
                        f"{r['decode_tok_s']:.3f} | {ratio:.2f}x | {r['decode_bytes'] / (r['tokens'] - 1) / 1e6:,.0f} | {acc} | "
                        f"{per} | {'yes' if same else 'NO'} |")
    finally:
        if not a.keep:
            fs.remove(p)
    return rows, {"cap": cap}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64, help="tokens generated per run (trained fixture)")
    ap.add_argument("--full-tokens", type=int, default=16, help="tokens generated per run (full size)")
    ap.add_argument("--draft-tokens", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--full-size", action="store_true", help="also the full-size Mixtral shape (root; ~55 GB of disk)")
    ap.add_argument("--reuse", action="store_true")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--workdir", default=common.WORKDIR)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--child", nargs=6)
    a = ap.parse_args()
    if a.child:
        lay, mb, prompt, draft, k, n = a.child
        return child(lay, float(mb), prompt, draft, int(k), int(n))
    t0 = time.perf_counter()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows, info = trained_rows(a, work)
    full_rows: list[str] = []
    if a.full_size:
        if os.geteuid() != 0:
            sys.exit("bench_speculative --full-size: needs root (drop_caches and the memory cgroup)")
        full_rows, _ = full_size_rows(a, Path(a.workdir))
    header = ("| prompt | drafter | decode tok/s | vs no draft | expert MB read / decoded token | acceptance | tokens per step | "
              "same tokens as no draft |\n|---|---|---:|---:|---:|---:|---:|---|")
    took = f"(took {(time.perf_counter() - t0) / 60:.0f} min)"
    paragraphs = [
        f"Machine: {common.machine_description()}",
        f"Command: `python benchmarks/bench_speculative.py` {took}",
        f"Trained fixture (q4_0, expert cache {info['cache_mb']:.2f} MiB = 8 of its 32 experts, lookahead prefetch, the "
        "int8 kernels `mertools run` uses, every engine warmed up first): greedy, "
        f"{a.tokens} tokens after a repetitive prompt ({info['prompt_tokens']['repetitive']} tokens: a verse three times) "
        f"and after held-out prose ({info['prompt_tokens']['held-out prose']} tokens); up to {a.draft_tokens} drafted "
        f"tokens per step; one process per run, {a.rounds} rounds interleaved, tok/s the median (range). The draft model is "
        "fixtures/trained/tiny-shakespeare-draft as q4_0 (1.0 M parameters against the fixture's 8.1 M), every expert "
        "in memory. Verification computes each row as a decode step would, so the tokens are the same with and without "
        "drafts (last column); what a step saves is reading each expert once for all its rows.",
        header + "\n" + "\n".join(rows),
    ]
    common.publish("speculative", "Speculative decoding with streamed experts", "\n\n".join(paragraphs),
                   write=not a.no_write)
    if a.full_size:
        common.publish("speculative_full", "Speculative decoding at full size", "\n\n".join([
            f"Machine: {common.machine_description()}",
            f"Command: `python benchmarks/bench_speculative.py --full-size` {took}",
            f"The Mixtral-shaped Q4_0 checkpoint of the full-size section, 1/4 of MemTotal as the memory cap, "
            f"{a.full_tokens} greedy tokens after 192 prompt tokens (64 random ids three times), up to "
            f"{a.draft_tokens} drafted tokens per step.", header + "\n" + "\n".join(full_rows)]), write=not a.no_write)


if __name__ == "__main__":
    main()
