"""What the 8-bit-activation kernels change in a model's output: their logits against the exact kernels' on the same
layout (`mertools verify --kernels int8`'s figures), for the trained fixture converted to each type the kernels take
and for every family's tiny model (q8_0 GGUF, as tests/test_families.py builds it).

    python benchmarks/bench_int8_fidelity.py [--tokens 256] [--no-write]

The trained fixture scores its held-out text (fixtures/trained/held-out-julius-caesar.txt); the tiny families,
random weights, verify's default paragraph. Writes the "int8_fidelity" section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _common as common  # noqa: E402

TRAINED = common.ROOT / "fixtures" / "trained"
# (experts, dense matrices): each type alone, and MXFP4 experts as llama.cpp's MXFP4_MOE preset leaves them (Q8_0 dense)
TYPES = (("q4_0", "q4_0"), ("q8_0", "q8_0"), ("q4_k", "q4_k"), ("q5_k", "q5_k"), ("q6_k", "q6_k"), ("mxfp4", "q8_0"))
FAMILIES = ("qwen3_moe", "olmoe", "qwen2_moe", "glm4_moe", "gpt_oss", "deepseek_v2", "deepseek_v3")
GGUF_TYPES = {"gpt_oss": ("q8_0", "mxfp4")}  # the tiny families' GGUFs (gpt-oss ships MXFP4 experts); q8_0 otherwise


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=256, help="tokens scored per model (at most)")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    from fixtures.tiny_families import build_gguf, build_hf
    from mertools.convert.pipeline import ConvertOptions, convert
    from mertools.verify.numerics import KERNELS_KL_LIMIT, check_kernels

    t0 = time.perf_counter()
    text = (TRAINED / "held-out-julius-caesar.txt").read_text(encoding="utf-8")
    rows = ["| model | layout | tokens | mean KL | p99 KL | max KL | top-1 agreement | perplexity ratio |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]

    def row(name: str, what: str, rep) -> None:  # noqa: ANN001 - a KernelsReport
        rows.append(f"| {name} | {what} | {rep.tokens} | {rep.kl_mean:.2e} | {rep.kl_p99:.2e} | {rep.kl_max:.2e} | "
                    f"{rep.top1_agreement:.1%} | {rep.ppl_ratio:.4f} |")
        print(rows[-1], file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for experts, dense in TYPES:
            lay = convert(TRAINED / "tiny-shakespeare-moe", tmp / f"trained-{experts}",
                          ConvertOptions(dtype=experts, dense_dtype=dense, progress=False)).out
            what = f"{experts} (dense and experts)" if dense == experts else f"{experts} experts, {dense} dense"
            row("trained fixture", what, check_kernels(lay, "int8", text=text, max_tokens=a.tokens))
        for fam in FAMILIES:
            hf = build_hf(fam, tmp / fam, seed=0)
            for q in GGUF_TYPES.get(fam, ("q8_0",)):
                gguf = build_gguf(hf, tmp / f"{fam}-{q}.gguf", q)
                lay = convert(gguf, tmp / f"{fam}-{q}-layout", ConvertOptions(progress=False)).out
                row(f"tiny {fam} (random weights)", f"{q} GGUF", check_kernels(lay, "int8", max_tokens=a.tokens))
    body = (f"Machine: {common.machine_description()}\n\nCommand: `python benchmarks/bench_int8_fidelity.py --tokens "
            f"{a.tokens}` (took {(time.perf_counter() - t0) / 60:.1f} min)\n\n"
            "Each layout's logits with `kernels=\"int8\"` (activations quantized to 8 bits as ggml quantizes them: "
            "q8_0, a scale per 32, for the 32-weight types; q8_K, a scale per 256, for the K types; integer dot "
            "products; run/serve's default) against its own logits with the exact float kernels, "
            "every expert resident, an f32 KV cache: KL(exact || int8) in nats per position. `mertools verify LAYOUT "
            f"--kernels int8` reports the same figures and fails above a mean of {KERNELS_KL_LIMIT:g}. Types the 8-bit "
            "kernels do not take (a tiny model's odd shapes, q2_k, q3_k, the 32-weight types with mins, IQ4, "
            "floats) run exact in both, so they add nothing here.\n\n" + "\n".join(rows))
    common.publish("int8_fidelity", "The 8-bit kernels against the exact ones: logits", body, write=not a.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
