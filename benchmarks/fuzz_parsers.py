"""Long-form fuzzing of every parser of untrusted files (the CI form is tests/test_fuzz_parsers.py).

    python benchmarks/fuzz_parsers.py [--examples 5000] [--atheris-seconds 60] [--workdir DIR]

For each target of fixtures/fuzz.py (GGUF, safetensors, manifest, vocab.gguf, tokenizer.json,
tokenizer_config.json): `--examples` hypothesis cases (seeded, the same strategies as CI), each under a
30 s alarm and an address-space limit; then, if atheris is installed (`pip install atheris`) and
`--atheris-seconds` > 0, coverage-guided libFuzzer mutation of the same file for that long, in a child
process per target. Any case that breaks the contract (an exception that is not a MertoolsError naming
the file, a leftover output, a timeout, MemoryError) stops the run with its traceback. Prints one line
per target: cases, accepted, refused; with --json, writes them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fixtures.fuzz import Target, address_space_limit, all_targets, time_limit  # noqa: E402


def run_hypothesis(t: Target, examples: int) -> None:
    from hypothesis import HealthCheck, given, settings

    @settings(max_examples=examples, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(t.strategy())
    def case(c: tuple) -> None:
        data = t.materialize(c)
        with time_limit(30):
            t.check(data)

    try:
        with address_space_limit(3 << 30):
            case()
    finally:
        t.restore()


ATHERIS_CHILD = r"""
import json, sys
sys.path.insert(0, {root!r})
import atheris
with atheris.instrument_imports(include=["mertools"]):
    import mertools.convert.pipeline, mertools.convert.hf, mertools.convert.gguf_source, mertools.layout.reader
    import mertools.layout.manifest, mertools.runtime.tokenizer, mertools.runtime.tokenizer_gguf, mertools.verify.integrity
from fixtures.fuzz import make_target, time_limit
tiny = {{k: __import__("pathlib").Path(v) for k, v in json.loads({tiny!r}).items()}}
work = __import__("pathlib").Path({work!r})
t = make_target({name!r}, tiny, work / "target")
counts_file = __import__("pathlib").Path({work!r}) / "counts-{slug}.json"
def one(data):
    with time_limit(30):
        t.check(data)
    counts_file.write_text(json.dumps(t.counts))  # libFuzzer ends the process itself: no finally runs
corpus = __import__("pathlib").Path({work!r}) / "corpus-{slug}"
corpus.mkdir(exist_ok=True)
(corpus / "seed").write_bytes(t.seed)
atheris.Setup([sys.argv[0], str(corpus), "-max_total_time={seconds}", "-rss_limit_mb=3072", "-timeout=30",
               "-max_len=" + str(len(t.seed) + 4096), "-print_final_stats=1", "-artifact_prefix=" + str(work) + "/"], one)
atheris.Fuzz()
"""


def run_atheris(name: str, tiny: dict[str, Path], work: Path, seconds: int) -> dict[str, int]:
    work = work / name.replace(":", "-")  # a child of its own: libFuzzer exits without restoring the file
    shutil.rmtree(work, ignore_errors=True)
    code = ATHERIS_CHILD.format(root=str(ROOT), tiny=json.dumps({k: str(v) for k, v in tiny.items()}), work=str(work),
                                name=name, slug=name.replace(":", "-"), seconds=seconds)
    work.mkdir(parents=True, exist_ok=True)
    counts = work / f"counts-{name.replace(':', '-')}.json"
    counts.unlink(missing_ok=True)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=seconds + 300)
    runs = [ln for ln in res.stderr.splitlines() if "stat::number_of_executed_units" in ln]
    if res.returncode != 0 or not counts.exists():
        sys.exit(f"atheris {name}: exit {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}")
    out = json.loads(counts.read_text())
    out["libfuzzer_units"] = int(runs[-1].split()[-1]) if runs else out["cases"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=5000, help="hypothesis cases per target")
    ap.add_argument("--atheris-seconds", type=int, default=60, help="libFuzzer time per target (0: skip)")
    ap.add_argument("--workdir", default="/tmp/mertools-fuzz")
    ap.add_argument("--json", help="write the counts here")
    args = ap.parse_args()
    from fixtures.tiny_mixtral import build_all

    work = Path(args.workdir)
    tiny = build_all(work / "tiny", seed=0)
    results: dict[str, dict] = {}
    for t in all_targets(tiny, work / "hyp"):
        t0 = time.perf_counter()
        run_hypothesis(t, args.examples)
        results[t.name] = {"hypothesis": dict(t.counts), "hypothesis_s": round(time.perf_counter() - t0, 1)}
        print(f"{t.name:40s} hypothesis {t.counts} in {results[t.name]['hypothesis_s']} s", flush=True)
    try:
        import atheris  # noqa: F401
    except ImportError:
        args.atheris_seconds = 0
        print("atheris is not installed: libFuzzer pass skipped (pip install atheris)")
    if args.atheris_seconds:
        for name in results:
            counts = run_atheris(name, tiny, work / "ath", args.atheris_seconds)
            results[name]["atheris"] = counts
            print(f"{name:40s} atheris {counts} in {args.atheris_seconds} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
