"""The KV cache in f16 (the default) against the exact f32: fidelity on the trained fixture's held-out text, and
decode speed with a long context, both in one run.

    python benchmarks/bench_kv.py            # writes the "KV cache" section of docs/BENCHMARKS.md

Fidelity: the trained fixture (q8_0 layout, every expert cached) scores the first 256 tokens of
fixtures/trained/held-out-julius-caesar.txt, 128 as a prefill and 128 one at a time, with each KV type;
verify's comparison (mean/max KL, top-1, perplexity ratio) of f16 against f32. Speed: a synthetic
Mixtral-shaped model small enough to stay resident (4 layers, d_model 1024, 8 heads of 128, 8 kv heads)
decodes 32 tokens after a prompt of `--context` tokens, per KV type, best of 3.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import _common as common  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def fidelity(work: Path) -> tuple[dict[str, dict], dict[str, float]]:
    from mertools.convert.pipeline import ConvertOptions, convert
    from mertools.layout import Layout
    from mertools.runtime.engine import Engine
    from mertools.runtime.tokenizer import load_tokenizer
    from mertools.verify.numerics import compare_logits

    q8 = convert(ROOT / "fixtures/trained/tiny-shakespeare-moe", work / "q8", ConvertOptions(dtype="q8_0", progress=False)).out
    lay = Layout.open(q8)
    text = (ROOT / "fixtures/trained/held-out-julius-caesar.txt").read_text(encoding="utf-8")
    ids = load_tokenizer(lay.root, lay.manifest.tokenizer).encode(text)[:256]
    out, per = {}, {}
    for kv in ("f16", "q8_0", "f32"):
        with Engine.open(q8, kv_dtype=kv) as eng:
            out[kv] = np.concatenate([eng.forward(ids[:128])] + [eng.forward([t]) for t in ids[128:]])
            per[kv] = eng.model.kv.bytes_per_token
    return {kv: compare_logits(ids, out[kv], out["f32"]) for kv in ("f16", "q8_0")}, per


def speed(work: Path, context: int) -> dict[str, float]:
    from fixtures.synth import synth_mixtral_gguf
    from mertools.convert.pipeline import ConvertOptions, convert
    from mertools.runtime.engine import Engine

    gguf = synth_mixtral_gguf(work / "long.gguf", 4, seed=2, d_model=1024, d_ff=1024, n_head=8, n_kv=8, vocab=1024,
                              n_ctx=context + 64)
    layout = convert(gguf, work / "long", ConvertOptions(progress=False)).out
    ids = common.random_ids(context + 32, seed=1, vocab=1024)
    res = {}
    for kv in ("f16", "q8_0", "f32"):
        with Engine.open(layout, kv_dtype=kv, context=context + 32) as eng:
            best = float("inf")
            for _ in range(3):
                eng.reset()
                for i in range(0, context, 512):
                    eng.forward(ids[i:min(i + 512, context)], all_logits=False)
                t0 = time.perf_counter()
                for t in ids[context:]:
                    eng.forward([t], all_logits=False)
                best = min(best, time.perf_counter() - t0)
            res[kv] = 32 / best
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--no-doc", action="store_true")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        c, per = fidelity(Path(tmp))
        tok_s = speed(Path(tmp), args.context)
    row = lambda label, fn: f"| {label} | {fn('f16')} | {fn('q8_0')} | exact |\n"  # noqa: E731
    body = (f"{common.machine_description()}\n\nCommand: `python benchmarks/bench_kv.py --context {args.context}`.\n\n"
            "| | f16 (default) | q8_0 | f32 |\n|---|---|---|---|\n"
            f"| trained fixture: KV bytes per token of context | {per['f16']:,} | {per['q8_0']:,} | {per['f32']:,} |\n"
            + row("trained fixture, 256 held-out tokens (128 prefill, 128 decode) vs f32: mean KL / max KL",
                  lambda k: f"{c[k]['kl_mean']:.1e} / {c[k]['kl_max']:.1e}")
            + row("... top-1 agreement, perplexity ratio", lambda k: f"{c[k]['top1_agreement']:.1%}, {c[k]['ppl_ratio']:.6f}")
            + f"| decode tok/s after {args.context} tokens (4 layers, 8 kv heads of 128, resident) | {tok_s['f16']:.1f} | "
            f"{tok_s['q8_0']:.1f} | {tok_s['f32']:.1f} |\n\n"
            "verify's limits for weights of the type (f16: mean KL 1e-6, top-1 90%, perplexity ratio 1.001; q8_0: "
            "its own, docs/BENCHMARKS.md \"Verify figures\"): the caches stay inside them here, and f16 for every "
            "family's tiny model in the tests (tests/family_checks.py `assert_f16_kv_within_f16_limits`).")
    common.publish("kv_cache", "KV cache: f16 against f32", body, write=not args.no_doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
