"""Modes that cut bytes per token, at full size: the full-depth Mixtral-shaped Q4_0 checkpoint of
bench_full_size.py (~26 GB), decoded under a memory cap by llama.cpp (mmap), by mertools exact, and by mertools
with each mode (runtime/approx.py), all in the same run, one command:

    python benchmarks/bench_full_size_modes.py --workdir /tmp/mertools-full --llama-python /tmp/venv-bench/bin/python

Steps: build the checkpoint (bench_full_size.build: GGUF written, routers recalibrated for diverse routing,
converted), run llama.cpp and mertools exact at each cap (bench_full_size.run_caps: fresh process, memory cgroup,
page cache dropped), delete the GGUF (unless --keep: the stand-ins need its room), add --standins stand-ins to
the layout (`mertools standins`; q2_k takes ~40 min for 45 G weights on 2 cores: ggml's reference quantizer),
then run mertools with each mode at each cap, the same way. Speed only: the fidelity each setting costs is
measured on the trained fixture by benchmarks/bench_modes.py (docs/BENCHMARKS.md, "modes").
Writes the "full_size_modes" section of docs/BENCHMARKS.md and its charts (benchmarks/charts.py; --no-doc: print
only). Needs root.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _common as common  # noqa: E402
from benchmarks import bench_full_size as fs  # noqa: E402
from benchmarks.full_size_checkpoints import SHAPES, sizes  # noqa: E402

SECTION = ("full_size_modes", "Full size: modes that cut bytes per token")
# (label, Approx keyword arguments); each is also a row of bench_modes.py, where its fidelity is measured
MODES: list[tuple[str, dict]] = [
    ("stand-ins σ=1", {"standin_share": 1.0}),
    ("stand-ins σ=0.5", {"standin_share": 0.5}),
    ("resident δ=0.1", {"resident_delta": 0.1}),
    ("resident δ=0.2", {"resident_delta": 0.2}),
    ("top-k τ=0.3", {"topk_tau": 0.3}),
]


# the rough quantizer of each stand-in type (--rough-standins) and what it does, for the report
ROUGH = {"q2_k": ("rough_q2_k", "a min-max Q2_K quantizer, no search"),
         "iq2_xxs": ("rough_iq2_xxs", "ggml's IQ2_XXS signs and weights, three scale trials, nearest grid point by table")}


def rough_encoder(a: argparse.Namespace, dtype: str):  # noqa: ANN201 - add_standins' Encoder, or None
    if not a.rough_standins:
        return None
    if dtype not in ROUGH:
        raise SystemExit(f"bench_full_size_modes: --rough-standins writes {' or '.join(ROUGH)}, not {dtype}")
    import importlib

    module = ROUGH[dtype][0]
    return getattr(importlib.import_module(f"benchmarks.{module}"), module)


def chosen(names: str | None) -> list[tuple[str, dict]]:
    """The MODES rows named (comma-separated labels, e.g. "stand-ins σ=1"), or all of them."""
    if not names:
        return MODES
    want = [n.strip() for n in names.split(",")]
    known = {label: kw for label, kw in MODES}
    if unknown := [n for n in want if n not in known]:
        raise SystemExit(f"bench_full_size_modes: unknown mode(s) {unknown}; known: {', '.join(known)}")
    return [(n, known[n]) for n in want]


def run_modes(built: dict, caps: list[tuple[str, int]], a: argparse.Namespace, ids_path: Path,
              settings: list[tuple[str, dict]]) -> dict[str, list[dict]]:
    """mertools with each setting at each cap: {cap label: [result per setting]}."""
    out: dict[str, list[dict]] = {}
    dense = built["sizes"]["dense_layout"]
    for label, cap in caps:
        out[label] = []
        for name, kw in settings:
            quiet = common.wait_quiet(a.wait_quiet)
            common.drop_caches()
            cache_mb = (min(cap, fs.meminfo("MemAvailable")) - dense - a.margin_mb * fs.MIB) / fs.MIB
            fs.cgroup_reset()
            t0 = time.perf_counter()
            args = [str(built["layout"]), f"{cache_mb:.1f}", str(ids_path), str(a.threads), str(a.prompt_tokens), a.kernels]
            r = common.run_child(fs.__file__, ["--child-mertools", *args, json.dumps(kw)], cgroup_bytes=cap,
                                 timeout=a.run_timeout)
            r.update(wall_s=time.perf_counter() - t0, cgroup_peak=fs.cgroup_peak(), quiet=quiet, mode=name)
            print(f"[modes] cap {label}, {name}: {fs._brief(r)}", file=sys.stderr, flush=True)
            out[label].append(r)
    return out


def with_standins(layout: Path, dtype: str, a: argparse.Namespace) -> dict:
    """Give the layout `dtype` stand-ins (replacing another type's; kept when it has them): what they are."""
    from mertools.convert.standins import add_standins
    from mertools.layout import Layout

    m = Layout.open(layout).manifest
    if m.standins and all(t.dtype == dtype for st in m.standins for role, t in st.tensors.items() if "bias" not in role):
        return {"dtype": dtype, "bytes": sum(e.nbytes for e in m.standins),
                "ratio": sum(e.nbytes for e in m.standins) / sum(e.nbytes for e in m.experts), "seconds": 0.0}
    print(f"[modes] writing {dtype} stand-ins (long) ...", file=sys.stderr, flush=True)
    st = add_standins(layout, dtype, encode=rough_encoder(a, dtype))
    return {"dtype": dtype, "bytes": st.bytes_out, "ratio": st.ratio, "seconds": st.seconds}


def report(runs: list[dict], modes: dict[str, list[dict]], standins: list[dict], a: argparse.Namespace, command: str,
           total_s: float, n_layers: int) -> tuple[str, bool]:
    s = SHAPES["mixtral"]
    z = sizes(s, n_layers)
    lines = [f"Machine: {common.machine_description()}", "", f"Command: `{command}` (took {total_s / 60:.0f} min)", "",
             f"The {s.title}-shaped Q4_0 checkpoint of the full-size section ({n_layers} layers, {z['total'] / 1e9:.1f} GB, "
             "routers recalibrated for diverse routing), each run a fresh process in a memory cgroup limited to the cap, "
             f"page cache dropped first, the same forced stream ({a.prompt_tokens}-token prompt, then {a.tokens} tokens "
             f"one by one, {a.threads} threads). mertools' `--cache-mb` = min(cap, MemAvailable) - dense bytes - "
             f"{a.margin_mb} MiB, lookahead prefetch, {common.KERNELS[a.kernels]}, the stand-ins' cache taken from "
             "that budget. Stand-ins (a setting's type named when there are several): "
             + "; ".join(f"{d['dtype']}, {d['bytes'] / 1e9:.1f} GB ({d['ratio']:.0%} of the experts' bytes), "
                         + (f"made by benchmarks/{ROUGH[d['dtype']][0]}.py ({ROUGH[d['dtype']][1]}) in "
                            if a.rough_standins else "written by `mertools standins` in ") + f"{d['seconds'] / 60:.0f} min"
                         for d in standins)
             + (" (rough quantizers: close enough to the experts that the routing stays theirs; fidelity is measured "
                "with ggml's)" if a.rough_standins else "")
             + ". Fidelity of each setting on the trained fixture: the \"modes\" section (its top-1 and KL columns).", "",
             "| cap | setting | tok/s | vs mertools exact | vs llama.cpp | GB read/token | no demand read | "
             "peak RSS GiB (within cap) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    ok = True
    for run in runs:
        label, cap, ex, ll = run["cap_label"], run["cap"], run["mertools"], run["llama"]
        rows = [("llama.cpp (mmap)", ll), ("mertools exact", ex), *((r["mode"], r) for r in modes.get(label, []))]
        for name, r in rows:
            cells = [f"{label} ({cap / fs.GIB:.1f} GiB)", name]
            if "error" in r:
                ok &= name.startswith("llama")
                lines.append("| " + " | ".join(cells + [f"error: {r['error']}", *["-"] * 5]) + " |")
                continue
            is_ll = name.startswith("llama")
            within = r["peak_rss_mb"] * fs.MIB <= cap
            ok &= within or is_ll
            hit = "-" if is_ll else f"{r['decode_hits'] / max(1, r['decode_lookups']):.0%}"
            vs_ex = f"{r['decode_tok_s'] / ex['decode_tok_s']:.2f}x" if "error" not in ex else "-"
            vs_ll = f"{r['decode_tok_s'] / ll['decode_tok_s']:.1f}x" if "error" not in ll else "-"
            lines.append("| " + " | ".join(cells + [f"{r['decode_tok_s']:.3f}", vs_ex, vs_ll,
                                                    f"{fs._read_per_token(r) / 1e9:.2f}", hit,
                                                    f"{r['peak_rss_mb'] / 1024:.2f}" + ("" if is_ll else
                                                    f" ({'yes' if within else 'NO'})")]) + " |")
    busy = sum(1 for run in runs for t in ("mertools", "llama") if not run[t].get("quiet", True))
    busy += sum(1 for rs in modes.values() for r in rs if not r.get("quiet", True))
    lines += ["", *fs.ceilings(runs)]  # exact mode's bound, which only the modes' fewer bytes can pass
    lines += ["", "![tok/s per setting at each memory cap, llama.cpp and mertools exact included]"
              "(img/bench-full-size-modes.png)"]  # drawn by benchmarks/charts.py from this table
    lines += ["", "GB read/token: decode steps only (mertools: both tiers' reads, stand-ins included; llama.cpp: "
              "/proc/self/io read_bytes). No demand read: expert lookups found resident or already on their way in "
              "(a prefetch), either cache."
              + (f" {busy} run(s) started while other processes kept the CPUs busy: their figures may be low." if busy else "")]
    return "\n".join(lines), ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, help="layers to write (default: 32); for smoke tests")
    ap.add_argument("--tokens", type=int, default=12)
    ap.add_argument("--prompt-tokens", type=int, default=8)
    ap.add_argument("--calib-tokens", type=int, default=256)
    ap.add_argument("--caps", default="1/4", help="fractions of MemTotal, or sizes such as 1.5GiB")
    ap.add_argument("--margin-mb", type=int, help="left under the cap beside the caches (default: the engine's margin)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rough-standins", action="store_true",
                    help="stand-ins by benchmarks/rough_<type>.py (minutes) instead of ggml's quantizer (~40 min for q2_k)")
    ap.add_argument("--modes", help="comma-separated settings to run (default: every one of MODES)")
    common.add_kernels_option(ap)
    ap.add_argument("--standins", default="q2_k", help="the stand-ins' type, or several (comma-separated): the stand-in "
                    "settings run with each in turn, the others once")
    ap.add_argument("--workdir", default="/tmp/mertools-full")
    ap.add_argument("--llama-python", default="/tmp/venv-bench/bin/python")
    ap.add_argument("--keep", action="store_true", help="keep the GGUF and the layout (more disk)")
    ap.add_argument("--reuse", action="store_true", help="reuse a checkpoint whose files (and sidecar) match")
    ap.add_argument("--run-timeout", type=float, default=1800)
    ap.add_argument("--wait-quiet", type=float, default=60)
    ap.add_argument("--no-doc", action="store_true")
    a = ap.parse_args()
    a.shape, a.llama_tokens = "mixtral", None  # what bench_full_size's helpers read
    a.margin_mb = fs.engine_margin_mb() if a.margin_mb is None else a.margin_mb
    if os.geteuid() != 0 or not Path("/sys/fs/cgroup/memory").is_dir():
        sys.exit("bench_full_size_modes: needs root and a cgroup v1 memory controller")
    command = "python benchmarks/bench_full_size_modes.py " + " ".join(
        x for x in sys.argv[1:] if x not in ("--no-doc", "--reuse", "--keep"))
    a.work = work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    s = SHAPES["mixtral"]
    n = a.layers or s.n_layers
    p = fs.paths(s, n, work, a.seed)
    z = sizes(s, n)
    from mertools.dtypes import DTYPES

    types = [t.strip() for t in a.standins.split(",")]
    if unknown := [t for t in types if t not in DTYPES]:
        sys.exit(f"bench_full_size_modes: unknown stand-in type(s) {unknown}")
    standin_bytes = int(z["experts"] * max(DTYPES[t].bits_per_weight for t in types) / DTYPES[s.qtype].bits_per_weight)
    need = max(fs.disk_need(s, n), z["total"] + standin_bytes + (z["total"] if a.keep else 0)) + fs.GIB
    have = shutil.disk_usage(work).free
    print(f"disk: need {need / 1e9:.1f} GB, have {have / 1e9:.1f} GB", file=sys.stderr, flush=True)
    if need > have and not a.reuse:
        sys.exit(f"bench_full_size_modes: not enough free disk in {work}: need {need / 1e9:.1f} GB, have {have / 1e9:.1f} GB")
    t_start = time.perf_counter()
    caps = fs.parse_caps(a.caps, fs.meminfo("MemTotal"))
    try:
        fs.build(s, n, a, p)
        built = {"gguf": p["gguf"], "layout": p["layout"], "sizes": fs.layout_sizes(p["layout"])}
        ids_path = work / "mixtral-modes-decode-ids.json"
        ids_path.write_text(json.dumps(common.random_ids(a.prompt_tokens + a.tokens, a.seed + 1, s.vocab)))
        runs = fs.run_caps(s, built, caps, a, ids_path)
        if not a.keep:
            p["gguf"].unlink(missing_ok=True)
        standins, modes = [], {}
        for i, dtype in enumerate(types):  # the stand-in settings with each type; the others with the first
            standins.append(with_standins(p["layout"], dtype, a))
            print(f"[modes] stand-ins: {standins[-1]}", file=sys.stderr, flush=True)
            settings = [(name + (f", {dtype}" if len(types) > 1 and "standin_share" in kw else ""), kw)
                        for name, kw in chosen(a.modes) if i == 0 or "standin_share" in kw]
            for label, rs in run_modes(built, caps, a, ids_path, settings).items():
                modes.setdefault(label, []).extend(rs)
        (work / f"results-modes-{n}L.json").write_text(json.dumps({"runs": runs, "modes": modes, "standins": standins},
                                                                  indent=1, default=str))
    finally:
        if not a.keep:
            fs.remove(p)
    body, ok = report(runs, modes, standins, a, command, time.perf_counter() - t_start, n)
    common.publish(*SECTION, body, write=not a.no_doc)
    if not a.no_doc:
        common.draw_charts(SECTION[0])
    if not ok:
        sys.exit("bench_full_size_modes: a mertools run failed or went over its cap (see the table)")


if __name__ == "__main__":
    main()
