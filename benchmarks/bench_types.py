"""The trained fixture in every conversion target: size and `verify` figures per tensor type (and per
llama.cpp preset), from which each type's default verify limits are calibrated.

Run: python benchmarks/bench_types.py [--no-write]
Converts fixtures/trained/tiny-shakespeare-moe with `--dtype T` for every target, runs verify's
numerics (numpy float64 reference of the HF checkpoint, the streaming runtime) on two texts: the
built-in paragraph (what `mertools verify` uses by default; modern prose, out of domain) and the
held-out Julius Caesar snippet (fixtures/trained/held-out-julius-caesar.txt). Writes the
"trained_verify" section of docs/BENCHMARKS.md, and prints the limits the calibration rule gives.

Calibration rule (docs/BENCHMARKS.md), per tensor type, from the layout `--dtype T` writes (the
uniform type, or llama.cpp's preset of that name, which is what a downloaded GGUF of that name holds):
over both texts, mean KL limit = 10x the worst measured, rounded up to one significant digit (at
least 1e-6); top-1 limit = the worst measured minus 10 points; perplexity ratio limit = 1 + 10x the
worst |ratio - 1|, rounded up to 3 decimals (at least 1.001). The factor 10 is headroom for real
models, which lose more to quantization than this 4-layer model (see docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import machine_description, publish  # noqa: E402
from mertools.convert.pipeline import ConvertOptions, convert  # noqa: E402
from mertools.convert.presets import DTYPE_CHOICES  # noqa: E402
from mertools.dtypes import DTYPES, Thresholds  # noqa: E402
from mertools.verify.numerics import check_numerics  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT = ROOT / "fixtures" / "trained" / "tiny-shakespeare-moe"
HELD_OUT = (ROOT / "fixtures" / "trained" / "held-out-julius-caesar.txt").read_text(encoding="utf-8")


def _round_up(x: float, digits: int = 2) -> float:
    if x <= 0:
        return 0.0
    e = math.floor(math.log10(x)) - digits + 1
    return math.ceil(x / 10**e) * 10**e


def calibrate(reports: list) -> Thresholds:  # noqa: ANN001 - NumericsReport
    kl = max(1e-6, _round_up(10 * max(r.kl_mean for r in reports), digits=1))
    top1 = max(0.0, math.floor(100 * min(r.top1_agreement for r in reports)) / 100 - 0.10)
    dev = 10 * max(abs(r.ppl_ratio - 1) for r in reports)
    return Thresholds(kl_mean=float(f"{kl:.1g}"), top1=round(top1, 2), ppl_ratio=max(1.001, math.ceil((1 + dev) * 1000) / 1000))


def targets() -> list[str]:
    """Every `--dtype` but auto: the types with a quantizer, smallest first, then the presets."""
    return [d for d in DTYPE_CHOICES if d != "auto"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-write", action="store_true", help="print only, leave docs/BENCHMARKS.md alone")
    ap.add_argument("--only", nargs="*", help="these targets only")
    args = ap.parse_args()
    rows, limits = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for target in args.only or targets():
            t0 = time.perf_counter()
            lay = convert(CHECKPOINT, Path(tmp) / target, ConvertOptions(dtype=target, progress=False))
            seconds = time.perf_counter() - t0
            reps = [check_numerics(lay.out, CHECKPOINT),
                    check_numerics(lay.out, CHECKPOINT, text=HELD_OUT, max_tokens=256)]
            size = sum(f.stat().st_size for f in lay.out.rglob("*") if f.is_file())
            mix = ", ".join(f"{k} {v}" for k, v in sorted(lay.dtypes.items(), key=lambda kv: -kv[1]))
            cal = calibrate(reps)
            ok = " / ".join("pass" if r.ok else "FAIL" for r in reps)
            rows.append(
                f"| {target} | {size / 1e6:.1f} MB | {mix} | {reps[0].dtype} | "
                + " | ".join(f"{a} / {b}" for a, b in (
                    (f"{reps[0].kl_mean:.3g}", f"{reps[1].kl_mean:.3g}"),
                    (f"{reps[0].kl_p99:.3g}", f"{reps[1].kl_p99:.3g}"),
                    (f"{reps[0].top1_agreement:.1%}", f"{reps[1].top1_agreement:.1%}"),
                    (f"{reps[0].ppl_ratio:.4f}", f"{reps[1].ppl_ratio:.4f}"),
                ))
                + f" | {ok} | {seconds:.1f} s |"
            )
            if target in DTYPES and DTYPES[target].verify is not None:  # a type's limits come from its own row
                cur = DTYPES[target].verify
                limits.append(f"| {target} | {cal.kl_mean:g} / {cal.top1:.0%} / x{cal.ppl_ratio:g} | "
                              f"{cur.kl_mean:g} / {cur.top1:.0%} / x{cur.ppl_ratio:g} |")
            print(rows[-1], flush=True)
    body = f"""Machine: {machine_description()}

Command: `python benchmarks/bench_types.py`: `convert fixtures/trained/tiny-shakespeare-moe L --dtype T` for
every target, then verify's numerics (streaming runtime against the float64 numpy reference of the HF
checkpoint) on the built-in paragraph (103 tokens, what `mertools verify` uses by default; out of domain)
and on the held-out Julius Caesar snippet (fixtures/trained/held-out-julius-caesar.txt). Size: every
file of the layout. "tensors": how many tensors of each type (dense and expert; norms and routers stay
f32). "limits": the verdict under the default limits of the layout's most common expert type.

| target | size | tensors | expert type | mean KL (built-in / held-out) | p99 KL | top-1 | perplexity ratio | limits | convert |
|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Default verify limits per type (mean KL / top-1 / perplexity ratio), each type's `verify` in its
module, calibrated from the row of the same name by the rule in the script's docstring: 10x the worst
mean KL of the two texts, the worst top-1 minus 10 points, 1 + 10x the worst perplexity deviation. A
layout of a preset is judged by the limits of its most common expert type (q4_k_m by q4_k's).

| type | calibrated by the rule from this run | in the type module |
|---|---|---|
{chr(10).join(limits)}

Why 10x: this is a 4-layer model trained on ~1 MB of text, and real models lose more to the same
types; a limit must not fail a correct layout of one. For scale, llama.cpp's own published figures for
LLaMA-3-8B (measured there, not here): perplexity ratio 1.0004 (q8_0), 1.0035 (q6_K), 1.028 (q4_K_M),
1.565 (q2_K) (ggml-org/llama.cpp#6936); IQ4_XS mean KL 0.0425 with the same top token 89.9% of the time
(ggml-org/llama.cpp#12557). The perplexity ratio of the 103-token built-in paragraph is the noisiest
figure (mxfp4's 0.93 there is lower perplexity, not better weights); mean KL is the one to read.
"""
    publish("trained_verify", "Verify figures of the trained fixture, every target", body, write=not args.no_write)


if __name__ == "__main__":
    main()
