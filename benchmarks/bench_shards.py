"""What expert shards on Ray cost per token: the 4-layer Mixtral shape (Q4_0, real dims, every expert in memory)
decoded in one process and with its experts on 1, 2 and 4 local Ray actors, the same forced tokens, one run.

    python benchmarks/bench_shards.py [--workdir /tmp/mertools-bench] [--tokens 24] [--threads 2] [--no-write]

The per-token overhead of the hops is (sharded - single) time per token; per hop, that over the layers (one round
trip per layer: every shard holding a chosen expert is called at once). On one machine the shards share its cores
with the driver, so the compute is not spread: the figures are the cost of the hops, for docs/DISTRIBUTED.md's model.
Writes the "shards" section of docs/BENCHMARKS.md. Builds the layout like bench_decode.py if absent.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _common as common  # noqa: E402
from benchmarks.bench_decode import ensure_model  # noqa: E402


def decode(layout: Path, ids: list[int], n_prompt: int, threads: int, **kw: object) -> tuple[float, float, list[int]]:
    """(open seconds, decode seconds per token, the argmax of every step) for the forced stream `ids`."""
    import numpy as np

    from mertools.runtime.engine import Engine

    t0 = time.perf_counter()
    with Engine.open(layout, threads=threads, kernels="int8", prefetch="none", **kw) as eng:
        opened = time.perf_counter() - t0
        eng.warmup(ids[:4])
        eng.forward(ids[:n_prompt])
        top, t = [], time.perf_counter()
        for tok in ids[n_prompt:]:
            top.append(int(np.argmax(eng.forward([tok])[-1])))
        return opened, (time.perf_counter() - t) / (len(ids) - n_prompt), top


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/mertools-bench"))
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    import ray

    a.workdir.mkdir(parents=True, exist_ok=True)
    _, layout = ensure_model(a.workdir, 4, "q4_0", sys.executable)
    ids = common.random_ids(8 + a.tokens, seed=3)
    ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
    fused = decode(layout, ids, 8, a.threads)
    single = decode(layout, ids, 8, a.threads, compiled_step=False)  # the path the sharded steps take
    rows = [f"| single process, a decode step in one compiled call | {fused[0]:.1f} | {fused[1] * 1e3:.1f} | - | - | "
            f"{'yes' if fused[2] == single[2] else 'NO'} |",
            f"| single process, step piece by piece (the baseline) | {single[0]:.1f} | {single[1] * 1e3:.1f} | - | - | yes |"]
    for n in a.shards:
        got = decode(layout, ids, 8, a.threads, shards=n)
        extra = got[1] - single[1]
        rows.append(f"| {n} shard{'s' if n > 1 else ''} | {got[0]:.1f} | {got[1] * 1e3:.1f} | {extra * 1e3:+.1f} | "
                    f"{extra / 4 * 1e3:+.2f} | {'yes' if got[2] == single[2] else 'NO'} |")
    ray.shutdown()
    body = (f"`python benchmarks/bench_shards.py --tokens {a.tokens} --threads {a.threads}` — {common.machine_description()}\n\n"
            f"The 4-layer Mixtral shape (Q4_0, {layout.name}), 8 forced prompt tokens then {a.tokens} forced decode "
            "steps, `--kernels int8`, every expert in memory (in the driver, or in its shard), local Ray actors on this "
            "machine (the shards share its cores with the driver: the compute is not spread, so the difference is the "
            "hops' cost; the sharded steps run piece by piece, as the baseline does: the compiled decode step reads its "
            "experts in this process). One round trip per MoE layer and token.\n\n"
            "| experts | open (s) | ms/token | overhead ms/token | per layer hop (ms) | same tokens |\n"
            "|---|---|---|---|---|---|\n"
            + "\n".join(rows))
    common.publish("shards", "Expert shards on Ray: the cost of a hop", body, write=not a.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
