"""`mertools plot` and the routing trace it draws: "t", "held" and the reads record that `mertools run --trace-out`
writes (runtime/trace.py), checked against the expert cache's and the store's own counters, then every figure drawn
from a real run of the trained fixture with experts streaming from disk (a 1 MiB cache holds 9 of its 32 experts)."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import zstandard
from click.testing import CliRunner, Result

from mertools.cli import main
from mertools.convert.pipeline import ConvertOptions, convert
from mertools.layout.reader import Layout
from mertools.plot.read import TraceError, load_trace
from mertools.runtime.engine import Engine
from mertools.runtime.stats import BOUNDS
from mertools.runtime.trace import TraceCutShort, TraceWriter, read_trace, routing_records, routing_summary

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT = ROOT / "fixtures" / "trained" / "tiny-shakespeare-moe"
OLD_TRACE = ROOT / "fixtures" / "trained" / "validation-trace.jsonl.zst"  # committed before "t", "held", reads
FIGURES = ("routing", "frequency", "cache", "reads")
N_LAYERS, N_EXPERTS, K = 4, 8, 2  # the trained fixture's


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert(CHECKPOINT, tmp_path_factory.mktemp("plot") / "shakespeare-q4_0",
                   ConvertOptions(dtype="q4_0", progress=False)).out


@pytest.fixture(scope="module")
def run(layout: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """(the trace, the run's --json figures) of `mertools run` with a 1 MiB cache."""
    d = tmp_path_factory.mktemp("run")
    trace, js = d / "trace.zst", d / "run.json"
    res = CliRunner().invoke(main, ["run", str(layout), "-p", "ROMEO:", "-n", "48", "--cache-mb", "1",
                                    "--trace-out", str(trace), "--json", str(js)])
    assert res.exit_code == 0, res.output
    return trace, json.loads(js.read_text())


def plot(*args: str | Path) -> Result:
    return CliRunner().invoke(main, ["plot", *map(str, args)])


def one_error_line(res: Result, *words: str) -> None:
    """Exit 2 and one line on stderr naming what is wrong, no traceback."""
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mertools: error: "), res.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


def write_trace(path: Path, lines: list[str]) -> Path:
    path.write_bytes(zstandard.ZstdCompressor().compress("".join(f"{x}\n" for x in lines).encode()))
    return path


# ---------------------------------------------------------------------- the trace


def test_run_trace_has_times_held_and_reads(run: tuple[Path, dict], layout: Path) -> None:
    trace, stats = run
    records = list(read_trace(trace))
    routing = list(routing_records(trace))
    assert records[-1]["kind"] == "reads" and len(routing) == len(records) - 1  # the reads record comes last, once
    assert len(routing) == (stats["prompt_tokens"] + stats["generated_tokens"] - 1) * N_LAYERS
    t = [r["t"] for r in routing]
    assert t == sorted(t) and 0 < t[0] and t[-1] <= records[-1]["t"]
    assert all(len(r["held"]) == K and set(r["held"]) <= {0, 1} for r in routing)
    tr = load_trace(trace)
    assert (tr.n_layers, tr.n_experts, tr.experts.shape[1]) == (N_LAYERS, N_EXPERTS, K)
    r = tr.reads
    # the store's histogram, as the run reported it: the same bytes, the same percentile estimates
    assert r is not None and r.count == r.counts.sum() > 0 and tuple(r.bounds) == BOUNDS
    # the record is written right after the run's figures are taken: a prefetch still in flight may land in between
    assert r.bytes_read >= stats["bytes_read"] > 0 and 0 < r.min <= r.max
    assert r.bytes_read - stats["bytes_read"] <= 4 * max(e.nbytes for e in Layout.open(layout).manifest.experts)
    if r.bytes_read == stats["bytes_read"]:
        for p in (50, 95, 99):
            assert r.percentile(p) * 1e3 == pytest.approx(stats["read_latency_ms"][str(p)], rel=1e-12)
    # a streaming run misses, and hits what is resident or prefetched
    hits, misses = tr.lookups()
    assert hits.sum() > 0 and misses.sum() > 0
    summary = routing_summary(records, N_LAYERS, N_EXPERTS)  # the reads record is skipped
    assert all(s["distinct"] >= 2 for s in summary)


@pytest.mark.parametrize("cache_mb, prefetch, kernels", [(1, "lookahead", "exact"), (1, "none", "int8"),
                                                         (8, "lookahead", "int8")])
def test_held_is_what_the_cache_counts_as_hits(layout: Path, tmp_path: Path, cache_mb: float, prefetch: str,
                                               kernels: str) -> None:
    """Decoding one position a step, each step's distinct chosen experts with held=1 are the cache's hits of that
    step and the others its misses, expert by expert: a 1 MiB cache that streams (with prefetches in flight, which
    count as hits, and without), and an 8 MiB one that ends up holding every expert, whose decode steps run in one
    compiled call (runtime/fused.py) and touch the cache without looking experts up one by one."""
    trace = tmp_path / "t.zst"
    tw = TraceWriter(trace)
    with Engine.open(layout, cache_mb=cache_mb, prefetch=prefetch, kernels=kernels, trace=tw) as eng:
        tw.follow(eng.cache, eng.store)
        ids = eng.tokenizer.encode("ROMEO:")
        logits = eng.forward(ids, all_logits=False)
        c = eng.cache
        hits0, lookups0 = c.hits_by.copy(), c.lookups_by.copy()
        for _ in range(40):
            logits = eng.forward([int(np.argmax(logits[-1]))], all_logits=False)
        hits, lookups = c.hits_by - hits0, c.lookups_by - lookups0
        fused = eng.model.fused.steps if eng.model.fused is not None else 0
    tw.close()
    tr = load_trace(trace)
    decode = tr.token >= len(ids)
    assert decode.sum() == 40 * N_LAYERS
    want_hits = np.zeros_like(hits)
    want_lookups = np.zeros_like(lookups)
    for layer, experts, held in zip(tr.layer[decode], tr.experts[decode], tr.held[decode], strict=True):
        for e, h in dict(zip(experts.tolist(), held.tolist(), strict=True)).items():
            want_lookups[layer, e] += 1
            want_hits[layer, e] += h
    assert (want_lookups == lookups).all() and (want_hits == hits).all()
    assert 0 < hits.sum() < lookups.sum() or cache_mb == 8
    assert fused > 0 if cache_mb == 8 else fused == 0  # the compiled step's trace was checked too


def test_writer_without_follow_writes_no_held_and_no_reads(tmp_path: Path) -> None:
    tw = TraceWriter(tmp_path / "t.zst")
    tw(np.array([0, 1]), 0, np.array([[1, 2], [3, 1]]), np.array([[0.6, 0.4], [0.5, 0.5]], np.float32))
    tw.close()
    tw.close()  # a second close does nothing
    a, b = read_trace(tw.path)
    assert set(a) == set(b) == {"token", "layer", "experts", "weights", "t"} and a["t"] == b["t"] >= 0
    tr = load_trace(tw.path)
    assert tr.held is None and tr.reads is None and tr.t is not None


# ---------------------------------------------------------------------- the pictures


def check_png(path: Path) -> None:
    from matplotlib.image import imread

    assert 5_000 < path.stat().st_size < 2_000_000, (path, path.stat().st_size)
    px = imread(path)
    assert px.ndim == 3 and px.shape[0] > 200 and px.shape[1] > 400, px.shape
    rgb = np.round(px[:, :, :3] * 255).astype(np.uint8).reshape(-1, 3)
    colours = np.unique(rgb, axis=0)
    assert len(colours) >= 16, (path, len(colours))
    inked = (rgb != 255).any(axis=1).mean()  # not the white background
    assert inked > 0.05, (path, inked)


def check_svg(path: Path) -> None:
    root = ET.parse(path).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    tags = [el.tag.rsplit("}", 1)[-1] for el in root.iter()]
    assert tags.count("path") + tags.count("use") > 20 and tags.count("g") > 5, path


def test_plot_writes_every_figure(run: tuple[Path, dict], tmp_path: Path) -> None:
    trace, _ = run
    out = tmp_path / "new" / "dir"  # created, parents too
    res = plot(trace, out, "--format", "both")
    assert res.exit_code == 0, res.output
    want = [out / f"{name}.{fmt}" for name in FIGURES for fmt in ("png", "svg")]
    assert res.stdout.split() == [str(p) for p in want] and res.stderr == ""
    for p in want:
        check_png(p) if p.suffix == ".png" else check_svg(p)
    assert sorted(out.iterdir()) == sorted(want)  # no temporary file left behind
    # the same trace, the same pictures: SVGs carry no date and fixed ids
    svg1, svg2 = tmp_path / "svg1", tmp_path / "svg2"
    assert plot(trace, svg1, "--format", "svg").exit_code == 0 == plot(trace, svg2, "--format", "svg").exit_code
    for name in FIGURES:
        assert (svg1 / f"{name}.svg").read_bytes() == (svg2 / f"{name}.svg").read_bytes(), name


@pytest.mark.parametrize("fmt", ["png", "svg"])
def test_plot_format_and_layout(run: tuple[Path, dict], layout: Path, tmp_path: Path, fmt: str) -> None:
    trace, _ = run
    args = [trace, tmp_path, "--layout", layout] + (["--format", fmt] if fmt != "png" else [])  # png: the default
    res = plot(*args)
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{n}.{fmt}" for n in FIGURES)
    # the trace routes within the layout's experts; a trace naming an expert beyond them is another model's
    bad = write_trace(tmp_path / "bad.zst", [json.dumps({"token": 0, "layer": 1, "experts": [3, 9], "weights": [.5, .5]})])
    one_error_line(plot(bad, tmp_path / "x", "--layout", layout), str(bad), "expert 9", "8 experts")
    one_error_line(plot(trace, tmp_path / "x", "--layout", tmp_path / "nolayout"), "nolayout")
    assert not (tmp_path / "x").exists()


def test_old_traces_plot_what_they_have(tmp_path: Path) -> None:
    """A trace from before "t", "held" and the reads record: its routing figures, and a note for each skipped one."""
    old = write_trace(tmp_path / "old.zst", [json.dumps({"token": p, "layer": layer, "experts": [(p + layer) % 8, 7 - p % 8],
                                                         "weights": [0.7, 0.3]})
                                             for p in range(40) for layer in range(4)])
    for trace in (old, OLD_TRACE):
        out = tmp_path / f"out-{trace.name}"
        res = plot(trace, out)
        assert res.exit_code == 0, res.output
        assert res.stdout.split() == [str(out / "routing.png"), str(out / "frequency.png")]
        notes = res.stderr.strip().splitlines()
        assert len(notes) == 2 and "cache figure skipped" in notes[0] and "reads figure skipped" in notes[1], notes
        for p in out.iterdir():
            check_png(p)
    assert load_trace(OLD_TRACE).n_layers == N_LAYERS


def test_plot_many_layers_experts_and_tokens(tmp_path: Path) -> None:
    """A real model's size (here 20 layers x 96 experts, top-4, 900 positions): the routing figure draws 8 of the
    layers and sums positions and experts into columns and rows a panel can show, in a sane size."""
    rng = np.random.default_rng(0)
    tw = TraceWriter(tmp_path / "big.zst")
    for start, n in [(0, 300)] + [(p, 1) for p in range(300, 900)]:
        for layer in range(20):
            chosen = np.argsort(rng.random((n, 96)), axis=1)[:, :4]
            tw(np.arange(start, start + n), layer, chosen, rng.dirichlet(np.ones(4), n).astype(np.float32))
    tw.close()
    res = plot(tw.path, tmp_path / "out")
    assert res.exit_code == 0, res.output
    assert "cache figure skipped" in res.stderr  # a writer that followed no cache
    for name in ("routing", "frequency"):
        check_png(tmp_path / "out" / f"{name}.png")


def test_plot_errors_are_one_line(run: tuple[Path, dict], tmp_path: Path) -> None:
    out = tmp_path / "out"
    one_error_line(plot(tmp_path / "missing.zst", out), "missing.zst", "no such file")
    one_error_line(plot(tmp_path, out), str(tmp_path), "directory")
    (junk := tmp_path / "junk.zst").write_bytes(b"not zstd at all" * 10)
    one_error_line(plot(junk, out), "junk.zst", "zstd")
    (empty := tmp_path / "empty.zst").write_bytes(b"")
    one_error_line(plot(empty, out), "empty.zst", "is empty")
    nothing = write_trace(tmp_path / "nothing.zst", [])
    one_error_line(plot(nothing, out), "nothing.zst", "no routing records")
    only_reads = write_trace(tmp_path / "reads.zst", [json.dumps({"kind": "reads"})])
    one_error_line(plot(only_reads, out), "reads.zst", "record 1", "reads record needs")
    text = write_trace(tmp_path / "text.zst", ["{\"token\": 0, \"layer\": 0, \"experts\": [1], \"weights\": [1]}", "oops"])
    one_error_line(plot(text, out), "text.zst", "record 2", "not a JSON line")
    typed = write_trace(tmp_path / "typed.zst", [json.dumps({"token": 0, "layer": 0, "experts": ["a"], "weights": [1]})])
    one_error_line(plot(typed, out), "typed.zst", "record 1", "'experts' must be a list of non-negative integers")
    short = write_trace(tmp_path / "short.zst", [json.dumps({"token": 0, "layer": 0, "experts": [1, 2], "weights": [1]})])
    one_error_line(plot(short, out), "short.zst", "'weights' must be 2 numbers")
    mixed = write_trace(tmp_path / "mixed.zst", [json.dumps({"token": p, "layer": 0, "experts": [1], "weights": [1],
                                                             **({"held": [1]} if p else {})}) for p in range(3)])
    one_error_line(plot(mixed, out), "mixed.zst", "2 of its 3 routing records have 'held'")
    cut = tmp_path / "cut.zst"
    cut.write_bytes(run[0].read_bytes()[:-40])  # a run killed while writing
    one_error_line(plot(cut, out), "cut.zst", "cut short")
    with pytest.raises(TraceCutShort):  # not a quietly shorter list of records
        list(read_trace(cut))
    assert not out.exists()  # nothing written, not even the directory
    (afile := tmp_path / "afile").write_text("x")
    one_error_line(plot(run[0], afile), "afile", "not a directory")
    with pytest.raises(TraceError):  # also a ValueError for Python callers
        load_trace(empty)


def test_plot_without_matplotlib_says_what_to_install(run: tuple[Path, dict], tmp_path: Path) -> None:
    """A Python without matplotlib (an import of it fails, as in an install without the `plot` extra)."""
    code = ("import sys; sys.modules['matplotlib'] = None; from mertools.cli import main; "
            f"main(['plot', {str(run[0])!r}, {str(tmp_path / 'out')!r}])")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.strip().splitlines() == ["mertools: error: mertools plot needs matplotlib: "
                                               "pip install 'mertools[plot]'"], res.stderr
    assert not (tmp_path / "out").exists()


def test_reads_record_with_no_reads_is_noted(tmp_path: Path) -> None:
    """A run whose experts were all served without a read (e.g. mapped): the reads figure is skipped, with a note."""
    lines = [json.dumps({"token": 0, "layer": 0, "experts": [1, 2], "weights": [.5, .5], "t": 0.1, "held": [1, 0]}),
             json.dumps({"kind": "reads", "t": 0.2, "bounds": list(BOUNDS), "counts": [0] * (len(BOUNDS) + 1),
                         "count": 0, "sum": 0.0, "min": None, "max": 0.0, "bytes_read": 0})]
    res = plot(write_trace(tmp_path / "t.zst", lines), tmp_path / "out")
    assert res.exit_code == 0, res.output
    assert "no expert was read" in res.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["cache.png", "frequency.png", "routing.png"]
