"""Modes that cut bytes per token (runtime/approx.py): per mode and setting, the fidelity it costs on the
trained fixture and the decode speed it buys at a 1/4 expert-cache budget on the full-size shape; a
Pareto table.

    python benchmarks/bench_modes.py [--tokens 24] [--fidelity-tokens 128] [--rounds 2] [--workdir /tmp/mertools-bench]

(a) Fidelity: fixtures/trained/tiny-shakespeare-moe converted to q4_0 (the full-size shape's type) with q2_k
stand-ins (iq2_xxs for the settings named so, on a hard-linked copy), read through an expert cache of 1/4 of its
experts (8 of 32; lookahead prefetch), fed verify's two texts (the built-in paragraph and
fixtures/trained/held-out-julius-caesar.txt) one token at a time (teacher-forced decode, so the cache behaves as in
decoding); each setting's logits against the exact engine's: mean KL(exact ||
mode), top-1 agreement and perplexity ratio (verify's compare_logits), and the expert bytes it read.
(b) Speed: the synthetic Mixtral-shaped Q4_0 checkpoint of bench_beyond_ram.py (4 layers, routers
recalibrated so that routing is diverse; built under --workdir if absent, shared with that benchmark; q2_k
stand-ins added if it has none),
1/4 of its expert bytes as the cache budget, lookahead prefetch, one process per setting, page cache
dropped before each (as root): an 8-token prompt, then --tokens forced random ids decoded one by one.
Writes the "modes" section of docs/BENCHMARKS.md and its chart (benchmarks/charts.py; --no-write: print only).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _common as common  # noqa: E402

TRAINED = common.ROOT / "fixtures" / "trained"
CHECKPOINT = TRAINED / "tiny-shakespeare-moe"
N_PROMPT = 8  # prompt tokens before the timed decode steps (as bench_beyond_ram.py)
BUDGET = 0.25  # of the expert bytes

HEADER = ("| setting | Pareto | tok/s | vs exact | GB read/token | hit rate | skipped / replaced / stand-ins per token | "
          "mean KL (built-in / held-out) | top-1 | perplexity ratio | trained: MB read/token | "
          "trained: skipped / replaced / stand-ins |\n" + "|---" * 12 + "|")
STANDINS = "q2_k"  # the stand-in type of every stand-in setting, for both checkpoints
SMALLER = "iq2_xxs"  # a smaller one, for the settings of SMALLER_SETTINGS (a hard-linked copy of each layout carries it)

# (label, Approx keyword arguments): exact first
SETTINGS: list[tuple[str, dict]] = [
    ("exact", {}),
    *((f"top-k τ={t:g}", {"topk_tau": t}) for t in (0.05, 0.1, 0.2, 0.3)),
    *((f"resident δ={d:g}", {"resident_delta": d}) for d in (0.02, 0.05, 0.1, 0.2)),
    ("resident δ=0.2, top-1 too", {"resident_delta": 0.2, "resident_top1": True}),
    ("τ=0.1 + δ=0.05", {"topk_tau": 0.1, "resident_delta": 0.05}),
    ("τ=0.2 + δ=0.1", {"topk_tau": 0.2, "resident_delta": 0.1}),
    *((f"stand-ins σ={v:g}", {"standin_share": v}) for v in (0.3, 0.5, 1.0)),
    ("stand-ins σ=0.5, cache 0.25", {"standin_share": 0.5, "standin_cache": 0.25}),
    ("stand-ins σ=0.5 + fill", {"standin_share": 0.5, "standin_fill": True}),
    ("stand-ins σ=1 + fill", {"standin_share": 1.0, "standin_fill": True}),
    *((f"stand-ins σ={v:g}, {SMALLER}", {"standin_share": v}) for v in (0.5, 1.0)),
]
SMALLER_SETTINGS = frozenset(label for label, _ in SETTINGS if label.endswith(f", {SMALLER}"))


def standins_of(layout: Path, label: str) -> Path:
    """The layout a setting runs on: `layout` (STANDINS stand-ins), or for SMALLER_SETTINGS its copy with SMALLER
    ones, made once: the expert files hard-linked (no copy), the stand-ins written in place of the q2_k ones."""
    import os
    import shutil

    from mertools.convert.standins import add_standins
    from mertools.layout import Layout

    if label not in SMALLER_SETTINGS:
        return layout
    copy = layout.parent / f"{layout.name}-{SMALLER}"
    if not (copy / "manifest.json").exists():
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(layout, copy, copy_function=os.link)  # the manifest is replaced by rename, never written into
    if {t.dtype for st in Layout.open(copy).manifest.standins for t in st.tensors.values()} & {STANDINS}:
        print(f"writing {SMALLER} stand-ins into {copy} (minutes)", file=sys.stderr, flush=True)
        add_standins(copy, SMALLER)
    return copy


# ---------------------------------------------------------------- (b) speed, one engine per process


def child_speed(layout: str, cache_mb: float, ids_path: str, approx_json: str) -> None:
    from mertools.runtime.approx import Approx
    from mertools.runtime.engine import Engine

    ids = json.loads(Path(ids_path).read_text())
    eng = Engine.open(layout, cache_mb=cache_mb, approx=Approx(**json.loads(approx_json)))

    def step(tokens: list[int]) -> None:
        eng.forward(tokens, all_logits=False)

    def counters() -> list[float]:
        r, a = eng.run_stats(), eng.model.moe.approx_stats  # both tiers' reads and lookups
        return [r.bytes_read, r.expert_lookups, r.expert_hits, r.expert_misses, a.dropped, a.substituted, a.standins]

    before: list[float] = []
    _, decode_s = common.forced_decode(step, ids, N_PROMPT, after_prefill=lambda: before.extend(counters()))
    d = [b - a for a, b in zip(before, counters(), strict=True)]
    n = len(ids) - N_PROMPT
    s = eng.stats()
    eng.close()
    print(json.dumps({"decode_tok_s": n / decode_s, "gb_per_token": d[0] / n / 1e9, "hit_rate": d[2] / d[1] if d[1] else 0,
                      "misses_per_token": d[3] / n, "dropped_per_token": d[4] / n, "substituted_per_token": d[5] / n,
                      "standins_per_token": d[6] / n,
                      "cache_mb": s["cache_mb"], "slot_bytes": eng.store.slot_bytes}))


# ---------------------------------------------------------------- (a) fidelity, in this process


def fidelity(layout: Path, texts: dict[str, list[int]], settings: list[tuple[str, dict]]) -> dict[str, dict]:
    """Per setting and text: compare_logits against the exact engine, plus expert bytes per token."""
    from mertools.layout import Layout
    from mertools.runtime.approx import Approx
    from mertools.runtime.engine import Engine
    from mertools.verify.numerics import compare_logits

    m = Layout.open(layout).manifest
    cache_mb = BUDGET * sum(e.nbytes for e in m.experts) / 2**20 + 0.01
    out: dict[str, dict] = {}
    exact: dict[str, np.ndarray] = {}
    for label, kw in settings:
        out[label] = {}
        for name, ids in texts.items():
            with Engine.open(standins_of(layout, label), cache_mb=cache_mb, approx=Approx(**kw)) as eng:
                logits = np.concatenate([eng.forward([i]) for i in ids])
                s = eng.stats()
            if not kw:
                exact[name] = logits
            fig = compare_logits(ids, logits, exact[name])
            fig.pop("per_position")
            fig.update(mb_per_token=s["bytes_read"] / len(ids) / 1e6, hit_rate=s["hit_rate"],
                       dropped=s["approx_dropped_per_token"], substituted=s["approx_substituted_per_token"],
                       standins=s["approx_standins_per_token"],
                       slots=s["cache_slots"])
            out[label][name] = fig
        print(f"fidelity {label}: " + ", ".join(f"{n} KL {f['kl_mean']:.4f} top-1 {f['top1_agreement']:.1%}"
                                                  for n, f in out[label].items()), file=sys.stderr, flush=True)
    return out


def _mean(runs: list[dict]) -> dict:
    """The rounds' mean of every figure, and tok/s's range; {"error": ...} if no round succeeded."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[-1]["error"] if runs else "not run"}
    out = {k: float(np.mean([r[k] for r in ok])) for k in ok[0]}
    out["tok_s_range"] = (min(r["decode_tok_s"] for r in ok), max(r["decode_tok_s"] for r in ok))
    return out


def pareto(points: dict[str, tuple[float, float]]) -> set[str]:
    """The labels no other point beats on both speed (higher) and cost (lower)."""
    front = set()
    for a, (sa, ca) in points.items():
        if not any(sb >= sa and cb <= ca and (sb > sa or cb < ca) for b, (sb, cb) in points.items() if b != a):
            front.add(a)
    return front


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=24, help="decode tokens timed per setting on the full-size shape")
    ap.add_argument("--fidelity-tokens", type=int, default=128, help="tokens of each verify text")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=common.WORKDIR)
    ap.add_argument("--rounds", type=int, default=2, help="timed runs of each setting (interleaved)")
    ap.add_argument("--wait-quiet", type=float, default=20.0, help="seconds to wait for an idle machine before a run")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--fidelity-only", action="store_true",
                    help="part (a) alone: print each setting's fidelity on the trained fixture (minutes), write nothing")
    ap.add_argument("--child-speed", nargs=4)
    a = ap.parse_args()
    if a.child_speed:
        layout, mb, ids_path, approx_json = a.child_speed
        return child_speed(layout, float(mb), ids_path, approx_json)

    from benchmarks.router_calibration import diverse_checkpoint
    from mertools.convert.pipeline import ConvertOptions, convert
    from mertools.convert.standins import add_standins
    from mertools.layout import Layout
    from mertools.reference.forward import ReferenceModel
    from mertools.runtime.tokenizer import load_tokenizer
    from mertools.verify.numerics import DEFAULT_TEXT, compare_logits

    t_start = time.perf_counter()
    work = Path(a.workdir)
    # (a) the trained fixture, q4_0 with stand-ins
    trained = work / f"trained-q4_0-{STANDINS}"
    if not (trained / "manifest.json").exists():
        convert(CHECKPOINT, trained, ConvertOptions(dtype="q4_0", force=True, progress=False))
    if not Layout.open(trained).manifest.standins:
        add_standins(trained, STANDINS)
    tm = Layout.open(trained).manifest
    tok = load_tokenizer(trained, tm.tokenizer)
    held_out = (TRAINED / "held-out-julius-caesar.txt").read_text(encoding="utf-8")
    texts = {"built-in": tok.encode(DEFAULT_TEXT)[:a.fidelity_tokens], "held-out": tok.encode(held_out)[:a.fidelity_tokens]}
    fid = fidelity(trained, texts, SETTINGS)
    if a.fidelity_only:
        print("| setting | mean KL (built-in / held-out) | top-1 (built-in / held-out) | perplexity ratio | MB read/token |")
        print("|---|---|---|---|---|")
        for label, _ in SETTINGS:
            fb, fh = fid[label]["built-in"], fid[label]["held-out"]
            print(f"| {label} | {fb['kl_mean']:.4f} / {fh['kl_mean']:.4f} | {fb['top1_agreement']:.1%} / "
                  f"{fh['top1_agreement']:.1%} | {fb['ppl_ratio']:.3f} / {fh['ppl_ratio']:.3f} | "
                  f"{fb['mb_per_token']:.2f} / {fh['mb_per_token']:.2f} |")
        return
    # for scale: the exact engine against verify's float64 reference of the checkpoint
    ref = ReferenceModel.from_source(CHECKPOINT)
    from mertools.runtime.engine import Engine

    base_kl = {}
    with Engine.open(trained) as eng:
        for name, ids in texts.items():
            eng.reset()
            base_kl[name] = compare_logits(ids, eng.forward(ids), ref.forward(ids))["kl_mean"]

    # (b) the full-size shape (bench_beyond_ram.py's checkpoint)
    base = common.synth_gguf(work, a.layers)
    gguf, lay_dir = work / f"mixtral-{a.layers}L-q4_0-diverse.gguf", work / f"layout-{a.layers}L-diverse"
    if not gguf.exists() or not (lay_dir / "manifest.json").exists():
        diverse_checkpoint(base, gguf, lay_dir, common.random_ids(256, a.seed, common.MIXTRAL.vocab), a.seed)
    if not Layout.open(lay_dir).manifest.standins:
        print(f"writing {STANDINS} stand-ins into {lay_dir} (minutes)", file=sys.stderr, flush=True)
        add_standins(lay_dir, STANDINS)
    m = Layout.open(lay_dir).manifest
    cfg = m.config
    expert_bytes = sum(e.nbytes for e in m.experts)
    ids_path = work / "modes-decode-ids.json"
    ids_path.write_text(json.dumps(common.random_ids(N_PROMPT + a.tokens, a.seed + 1, common.MIXTRAL.vocab)))
    child = ["--child-speed", str(lay_dir), str(expert_bytes * BUDGET / 2**20 + 1), str(ids_path)]
    for label in SMALLER_SETTINGS:
        standins_of(lay_dir, label)  # before the timed runs
    common.drop_caches()
    common.run_child(__file__, [*child, "{}"])  # untimed: numba's cache, the host's cache of the disk, warmed alike
    runs: dict[str, list[dict]] = {label: [] for label, _ in SETTINGS}
    noisy, n_runs, cold = 0, 0, True
    for rnd in range(a.rounds):  # interleaved, every other round in reverse, so drift hits every setting alike
        for label, kw in SETTINGS if rnd % 2 == 0 else SETTINGS[::-1]:
            if common.cpu_busy(1.0) > 0.1:
                noisy += not common.wait_quiet(a.wait_quiet)
            n_runs += 1
            cold &= common.drop_caches()
            r = common.run_child(__file__, [child[0], str(standins_of(lay_dir, label)), *child[2:], json.dumps(kw)])
            runs[label].append(r)
            print(f"speed {label}: " + (f"{r['decode_tok_s']:.2f} tok/s, {r['gb_per_token']:.3f} GB/token"
                                        if "error" not in r else r["error"]), file=sys.stderr, flush=True)
    speed = {label: _mean(rs) for label, rs in runs.items()}

    # the table
    ex = speed["exact"].get("decode_tok_s")
    points = {lab: (speed[lab]["decode_tok_s"], fid[lab]["held-out"]["kl_mean"]) for lab, _ in SETTINGS
              if "error" not in speed[lab]}
    front = pareto(points)
    rows = []
    for label, _ in SETTINGS:
        f, s = fid[label], speed[label]
        fb, fh = f["built-in"], f["held-out"]
        if "error" in s:
            sp = f"error: {s['error']} | - | - | - | - |"
        else:
            lo, hi = s["tok_s_range"]
            sp = (f"{s['decode_tok_s']:.2f} ({lo:.2f}-{hi:.2f}) | {s['decode_tok_s'] / ex:.2f}x | "
                  f"{s['gb_per_token']:.3f} | {s['hit_rate']:.1%} | "
                  f"{s['dropped_per_token']:.2f} / {s['substituted_per_token']:.2f} / {s['standins_per_token']:.2f} |")
        rows.append(f"| {label} | {'**yes**' if label in front else ''} | {sp} "
                    f"{fb['kl_mean']:.4f} / {fh['kl_mean']:.4f} | {fb['top1_agreement']:.1%} / {fh['top1_agreement']:.1%} | "
                    f"{fb['ppl_ratio']:.4f} / {fh['ppl_ratio']:.4f} | {fh['mb_per_token']:.2f} | "
                    f"{fh['dropped']:.2f} / {fh['substituted']:.2f} / {fh['standins']:.2f} |")
    slot = m.experts[0].nbytes
    busy = (f"other processes kept over 10% of the CPUs busy before {noisy} of the {n_runs} runs, so those speeds are "
            "noisier" if noisy else "the machine was idle before each run")
    paragraphs = [
        f"Machine: {common.machine_description()}",
        f"Command: `python benchmarks/bench_modes.py --tokens {a.tokens} --fidelity-tokens {a.fidelity_tokens} "
        f"--rounds {a.rounds}` (took {(time.perf_counter() - t_start) / 60:.0f} min)",
        "Modes (`Engine.open(..., approx=Approx(...))`, `mertools run/serve --approx-topk-tau T "
        "--approx-resident-delta D [--approx-resident-top1]`; off by default, and then exact bit for bit): **top-k τ** "
        "skips a chosen expert whose share of the token's routed mixture (its weight over the sum of the token's "
        "weights) is below τ, the top one always kept; **resident δ** replaces a chosen expert that is neither resident "
        "nor on its way in by a resident one the router nearly chose: choice score within δ x the token's routed mass "
        "(the sum of its chosen experts' scores), its weight from its own score, never the token's top-1 unless asked; "
        f"**stand-ins σ** (`--standin-share S [--standin-cache C] [--standin-fill]`, the layout carrying {STANDINS} "
        f"copies of its experts from `convert --standins`, or {SMALLER} ones where the setting says so) computes a "
        "chosen expert that is not in memory with its stand-in when its share is below σ (σ=1: every miss), prefetches "
        "the next layer's guesses the same way (by "
        "their predicted share), keeps stand-ins in a cache of their own (C of the budget, 0.5 by default, all but one "
        "layer's experts when σ=1 without fill), and with fill also loads the full expert for later tokens "
        "(definitions: mertools/runtime/approx.py).",
        f"Speed: the synthetic Mixtral-shaped checkpoint of the beyond-RAM section (d_model {cfg.d_model}, d_ff "
        f"{cfg.d_ff}, {cfg.n_experts} experts top-{cfg.n_experts_used}, {cfg.n_layers} layers, Q4_0, {slot / 1e6:.1f} MB "
        f"an expert, routers recalibrated for diverse routing), expert cache {BUDGET:g}x of the expert bytes "
        f"({speed['exact'].get('cache_mb', 0):.0f} MiB), lookahead prefetch; an {N_PROMPT}-token prompt then "
        f"{a.tokens} forced random ids decoded one by one, page cache dropped before each run "
        f"({'yes' if cold else 'NO - not root'}). After one untimed run, {a.rounds} timed runs of each setting, "
        "interleaved (every other round in reverse order): tok/s is their mean (range in brackets), the other figures "
        f"their means; {busy}. The disk is a virtio device whose host caches recently read data, which favours "
        "re-reads. GB read/token counts every expert read (prefetches and stand-ins included); skipped / "
        f"replaced / stand-ins: expert choices per token, of {cfg.n_experts_used * cfg.n_layers} "
        f"({cfg.n_experts_used} x {cfg.n_layers} layers).",
        f"Fidelity: the trained fixture (fixtures/trained) converted to q4_0 with {STANDINS} stand-ins ({SMALLER} where "
        "the setting says so; ggml's quantizers, bit for bit, the importance matrix of the smaller one all ones) (the same "
        f"{cfg.n_layers} x {cfg.n_experts} top-{cfg.n_experts_used} grid) through an expert cache of {BUDGET:g}x "
        f"({fid['exact']['held-out']['slots']} of its 32 experts), lookahead prefetch, the built-in verify paragraph "
        f"({len(texts['built-in'])} tokens) and the held-out Julius Caesar snippet ({len(texts['held-out'])} tokens) "
        "fed one token at a time; each setting's logits against the exact engine's on the same layout (verify's "
        "figures: mean KL(exact || mode) in nats, top-1 agreement, "
        "perplexity ratio mode / exact). For scale, the exact q4_0 engine against verify's float64 reference of the "
        f"f16 checkpoint: mean KL {base_kl['built-in']:.2g} / {base_kl['held-out']:.2g}. Substitution depends on what the "
        "cache holds, which depends on when loads complete: its figures vary a little between runs.",
        "Pareto: **yes** where no other setting is both faster (full-size tok/s) and closer (held-out mean KL). Speed "
        "differences inside the bracketed ranges are noise, and so are the Pareto marks they decide. The two routers "
        "differ: at the same τ or δ the trained fixture skips or replaces far more choices per token (last column) "
        "than the recalibrated synthetic router, whose second choice seldom has under a fifth of the mixture; a "
        "setting's speed-up follows the choices it skips or replaces, so on another model read it through that "
        "model's counts (`mertools run` prints them).",
        HEADER + "\n" + "\n".join(rows),
        "![tok/s against held-out mean KL per setting, the Pareto front joined](img/bench-modes.png)",  # charts.py
    ]
    common.publish("modes", "Modes that cut bytes per token (speed against fidelity)", "\n\n".join(paragraphs),
                   write=not a.no_write)
    if not a.no_write:
        common.draw_charts("modes")


if __name__ == "__main__":
    main()
