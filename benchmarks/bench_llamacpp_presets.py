"""llama.cpp's own preset files (fixtures/llamacpp): what `convert --dtype auto` keeps, and the layout's
logits beside llama.cpp's logits on the very same GGUF and beside the float64 forward of that GGUF.

Run: python benchmarks/bench_llamacpp_presets.py [--no-write]
No llama.cpp is needed: its logits were recorded when fixtures/llamacpp_presets.py made the files
(llama-cpp-python 0.3.36, 2 threads, one batch of 128 positions). Writes the "llamacpp_presets"
section of docs/BENCHMARKS.md. tests/test_llamacpp_presets.py asserts the same figures' bounds.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import machine_description, publish  # noqa: E402
from fixtures.llamacpp_presets import PRESETS, gguf_path, logits_path, manifest, token_ids  # noqa: E402
from mertools.convert.pipeline import ConvertOptions, convert  # noqa: E402
from mertools.layout import Layout  # noqa: E402
from mertools.reference.forward import ReferenceModel  # noqa: E402
from mertools.runtime.engine import Engine  # noqa: E402
from mertools.verify.numerics import compare_logits  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-write", action="store_true", help="print only, leave docs/BENCHMARKS.md alone")
    args = ap.parse_args()
    ids = token_ids()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in PRESETS:
            s = convert(gguf_path(preset), Path(tmp) / preset, ConvertOptions(progress=False))
            lay = Layout.open(s.out)
            kinds = Counter(t.dtype for e in lay.manifest.experts for t in e.tensors.values())
            with Engine.open(s.out) as eng:
                got = eng.forward(ids)
            llama = compare_logits(ids, got, np.load(logits_path(preset)))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                exact = compare_logits(ids, got, ReferenceModel.from_source(gguf_path(preset)).forward(ids))
            mix = ", ".join(f"{k} {v}" for k, v in kinds.most_common())
            rows.append(f"| {preset} | {gguf_path(preset).stat().st_size / 1e6:.2f} MB | {mix} | {s.copied}/{s.tensors} | "
                        f"{llama['kl_mean']:.2e} | {llama['kl_max']:.3f} | {llama['top1_agreement']:.1%} | "
                        f"{llama['max_abs_diff']:.3f} | {exact['kl_mean']:.1e} | {exact['top1_agreement']:.0%} |")
            print(rows[-1], flush=True)
    info = manifest()
    body = f"""Machine: {machine_description()}

Command: `python benchmarks/bench_llamacpp_presets.py`. Files: {info["made_by"]}; a tiny 8-expert Mixtral
(2 layers, d 256, expert ffn 256, vocab 512, random weights). Each converted with `--dtype auto`, then
one forward of the same {len(ids)} token ids through the engine (every position's logits). KL is
KL(llama.cpp || mertools) per position, in nats; "float64" compares with the numpy float64 forward of
the same GGUF (gguf-py's dequantizers). The issue's bar: mean KL <= 0.005 and top-1 >= 90%.

| preset | file | expert tensors | copied | mean KL vs llama.cpp | max KL | top-1 | max abs diff | KL vs float64 | top-1 |
|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Every tensor is copied byte for byte; against the float64 forward of the same file the engine differs by
float32 rounding only, so what remains against llama.cpp is llama.cpp's arithmetic: its dot products
quantize activations to 8 bits (Q8_0 / Q8_K blocks; BF16 for BF16 weights). Top-1 flips only where the
two best logits of a random model lie close together.
"""
    publish("llamacpp_presets", "llama.cpp's preset files: byte-for-byte conversion and logits beside llama.cpp", body,
            write=not args.no_write)


if __name__ == "__main__":
    main()
