"""Charts of the benchmark figures, as PNGs in docs/img/. docs/BENCHMARKS.md is the single source of truth: every
chart reads the tables of its section(s) there (benchmarks/doc_tables.py) and draws exactly the numbers in the
cells; nothing is re-measured, nothing is kept anywhere else.

    python benchmarks/charts.py [--doc docs/BENCHMARKS.md] [--out docs/img] [--section NAME ...]

redraws the charts of the named sections (all by default). The benchmarks that have charts (bench_full_size,
bench_full_size_modes, bench_beyond_ram, bench_modes) redraw theirs right after writing their section
(_common.draw_charts); with --no-doc / --no-write they write neither. A table missing an expected column is a
ValueError naming the section, the table and the column.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on the benchmark machines
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.text import Annotation  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402
from matplotlib.transforms import Bbox  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.doc_tables import Section, Table, cap_label, is_yes, number_texts, numbers, sections  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "BENCHMARKS.md"
IMG = ROOT / "docs" / "img"
DPI = 110
MERTOOLS, LLAMA, MODE, FRONT = "#2b6cb0", "#dd8452", "#55a868", "#c44e52"
LEADER = {"arrowstyle": "-", "color": "#666666", "lw": 0.7, "shrinkA": 1, "shrinkB": 4}  # label to its point


@dataclass(frozen=True)
class Chart:
    file: str  # under the output directory; the section text links it as img/<file>
    sections: tuple[str, ...]  # the doc sections it reads
    draw: Callable[[dict[str, Section]], Figure]


class Skipped(Exception):
    """A chart whose data the doc does not hold at all (a section or a shape not run): noted, not drawn."""


@dataclass(frozen=True)
class Series:
    """One tool's (or setting's) bars: each bar's figure as the doc writes it ("5.30"), None where the cell has none."""

    name: str
    figures: list[str | None]
    colour: str
    missing: str = "n/a"  # the label where a figure is missing

    @property
    def values(self) -> list[float | None]:
        return [None if f is None else float(f.replace(",", "")) for f in self.figures]


# ---------------------------------------------------------------- helpers


def _tick(cell: str) -> str:
    """A cap/budget cell as a two-line tick: "1/4 of RAM (5.9 GiB)" -> "1/4 of RAM\\n(5.9 GiB)"."""
    label = cap_label(cell)
    return label + ("\n" + cell[len(label):].strip() if cell[len(label):].strip() else "")


def _footer(fig: Figure, parts: Sequence[Section], width: int = 190) -> None:
    """The machine line of the section(s) (and a single section's command), in small text at the bottom."""
    names = ", ".join(f'"{s.name}"' for s in parts)
    machines = {s.machine for s in parts}
    where = (f"Machine: {parts[0].machine}" if len(machines) == 1 else  # runs of different hosts: say which is which
             "Machines: " + "; ".join(f'"{s.name}" on {s.machine}' for s in parts))
    lines = [where, f"Figures: docs/BENCHMARKS.md, section{'s' * (len(parts) > 1)} {names}"]
    cmd = parts[0].line("Command:") if len(parts) == 1 else None
    if cmd:
        lines.append(cmd.replace("`", ""))
    text = "\n".join(textwrap.fill(ln, width, subsequent_indent="    ") for ln in lines)
    fig.text(0.01, 0.005, text, fontsize=6.5, color="#555555", ha="left", va="bottom")


def _tight(fig: Figure, footer_in: float = 0.5) -> None:
    """tight_layout above the footer, whose height is in inches whatever the figure's."""
    fig.tight_layout(rect=(0, footer_in / fig.get_figheight(), 1, 1))


def _bars(ax: Axes, groups: Sequence[str], series: Sequence[Series], log: bool = False) -> list[list[float]]:
    """Grouped vertical bars, one group per cap, each bar labelled with the doc's figure; its x positions by group."""
    n, width = len(series), 0.8 / len(series)
    xs = [[g + (k - (n - 1) / 2) * width for k in range(n)] for g in range(len(groups))]
    for k, ser in enumerate(series):
        for g, (v, text) in enumerate(zip(ser.values, ser.figures, strict=True)):
            if v is not None:
                ax.bar(xs[g][k], v, width * 0.95, color=ser.colour, label=ser.name)
            ax.annotate(ser.missing if text is None else text, (xs[g][k], v or 0), xytext=(0, 2),
                        textcoords="offset points", ha="center", va="bottom", fontsize=7, annotation_clip=False)
    ax.set_xticks(range(len(groups)), groups, fontsize=8)
    if log:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 0.1, 1, 10 rather than powers
    present = [v for ser in series for v in ser.values if v is not None]
    if present:
        ax.set_ylim((min(present) / 3, max(present) * 6) if log else (0, max(present) * 1.3))
    ax.grid(axis="y", alpha=0.3)
    if log:
        ax.grid(axis="y", which="minor", alpha=0.1)
    ax.set_axisbelow(True)
    _dedupe_legend(ax)
    return xs


def _dedupe_legend(ax: Axes, **kw: object) -> None:
    handles, labels = ax.get_legend_handles_labels()
    seen = dict(zip(labels, handles, strict=True))
    ax.legend(seen.values(), seen.keys(), fontsize=8, frameon=False, **kw)


def _ratio(ax: Axes, x: float, y: float | None, text: str, colour: str = "black") -> None:
    """A ratio label ("4.0x") above a bar whose figure label it clears."""
    if y is not None and text.strip() not in ("", "-"):
        ax.annotate(text, (x, y), xytext=(0, 12), textcoords="offset points", ha="center", va="bottom", fontsize=8.5,
                    fontweight="bold", color=colour)


def _place_labels(ax: Axes, points: Sequence[tuple[float, float, str, bool]]) -> None:
    """Label scattered points without overlaps: each label takes the first nearby spot (growing rings around its
    point) that collides with no point and no label placed before it, with a leader line when it sits far off."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    taken: list[Bbox] = []
    for x, y, _, _ in points:
        px, py = ax.transData.transform((x, y))
        taken.append(Bbox.from_extents(px - 5, py - 5, px + 5, py + 5))
    rings = [(r * dx, r * dy) for r in (5, 12, 22, 34, 48) for dx, dy in
             ((1, 0.4), (-1, 0.4), (1, -1), (-1, -1), (0.2, 1.3), (0.2, -1.6), (1, 1.3), (-1, 1.3))]

    def put(x: float, y: float, text: str, bold: bool, dx: float, dy: float) -> Annotation:
        far = abs(dx) > 6 or abs(dy) > 6  # off the first ring: a leader line says whose label it is
        return ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=7.5,
                           ha="left" if dx >= 0 else "right", va="bottom" if dy >= 0 else "top",
                           fontweight="bold" if bold else "normal",
                           arrowprops=LEADER if far else None)

    for x, y, text, bold in points:
        for dx, dy in rings:
            label = put(x, y, text, bold, dx, dy)
            box = label.get_window_extent(renderer).padded(1.5)
            if inside.contains(box.x0, box.y0) and inside.contains(box.x1, box.y1) and \
                    not any(box.overlaps(o) for o in taken):
                break
            label.remove()
        else:  # nowhere free: the nearest spot, overlapping (a label is never dropped)
            label = put(x, y, text, bold, *rings[0])
            box = label.get_window_extent(renderer).padded(1.5)
        taken.append(box)


# ---------------------------------------------------------------- the charts


def full_size(doc: dict[str, Section]) -> Figure:
    """Per shape: tok/s against the memory cap for both tools (ratio above each pair), and GB read per token."""
    s = doc["full_size"]
    if not s.tables:
        raise ValueError("section 'full_size': expected a table per shape, found none")
    fig, axes = plt.subplots(len(s.tables), 2, figsize=(11, 0.9 + 3.5 * len(s.tables)), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 2]})
    for (speed, reads), t in zip(axes, s.tables, strict=True):
        caps = [_tick(c) for c in t.cells("cap")]
        ours, theirs = Series("mertools", t.figures("mertools tok/s"), MERTOOLS), \
            Series("llama.cpp (mmap)", t.figures("llama.cpp tok/s"), LLAMA)
        xs = _bars(speed, caps, [ours, theirs], log=True)
        for g, text in enumerate(t.cells("mertools / llama.cpp")):
            top = max((v for v in (ours.values[g], theirs.values[g]) if v is not None), default=None)
            _ratio(speed, sum(xs[g]) / 2, top, text)
        speed.set_title(f"{t.heading}\ndecode tok/s under a memory cap (bold: mertools / llama.cpp)", fontsize=9.5)
        speed.set_ylabel("tokens/s (log scale)")
        speed.set_xlabel("memory cap (cgroup)", fontsize=8)
        _bars(reads, caps, [Series("mertools", t.figures("GB read/token"), MERTOOLS),
                            Series("llama.cpp (mmap)", t.figures("GB read/token", after="llama.cpp tok/s"), LLAMA)])
        reads.set_title("GB read from disk per decoded token", fontsize=9.5)
        reads.set_ylabel("GB per token")
        reads.set_xlabel("memory cap (cgroup)", fontsize=8)
    fig.suptitle("Full size, beyond RAM: mertools beside llama.cpp", fontsize=12, fontweight="bold")
    _footer(fig, [s])
    _tight(fig)
    return fig


def _fastest_modes(t: Table) -> dict[str, tuple[str, str, str]]:
    """Per cap cell: the fastest byte-cutting setting (not llama.cpp, not exact): (name, tok/s, its vs-llama.cpp cell)."""
    best: dict[str, tuple[str, str, str]] = {}
    for cap, name, tok_s, vs in zip(t.cells("cap"), t.cells("setting"), t.figures("tok/s"), t.cells("vs llama.cpp"),
                                    strict=True):
        if tok_s is None or name.startswith("llama.cpp") or name == "mertools exact":
            continue
        if cap not in best or float(tok_s) > float(best[cap][1]):
            best[cap] = (name, tok_s, vs)
    return best


def headline(doc: dict[str, Section]) -> Figure:
    """The README's chart: the Mixtral-shaped checkpoint's tok/s against the memory cap, llama.cpp, mertools exact
    and the fastest byte-cutting mode of the full_size_modes run at that cap, each labelled with its ratio."""
    if not doc["full_size"].tables_under("Mixtral"):
        raise Skipped("section 'full_size' has no Mixtral-shaped table (run with --shape mixtral or all)")
    t = doc["full_size"].table("Mixtral")
    best = _fastest_modes(doc["full_size_modes"].table())
    caps = t.cells("cap")
    modes = [best.get(c) for c in caps]
    names = sorted({m[0] for m in modes if m})
    one_name = len(names) == 1  # the same mode wins at every cap: named in the legend, else on each bar
    fig, ax = plt.subplots(figsize=(7.3, 4.3))
    series = [Series("llama.cpp (mmap)", t.figures("llama.cpp tok/s"), LLAMA),
              Series("mertools exact", t.figures("mertools tok/s"), MERTOOLS)]
    if names:
        series.append(Series(f"mertools, {names[0]}" if one_name else "mertools, fastest mode (named)",
                             [m[1] if m else None for m in modes], MODE, missing=""))
    xs = _bars(ax, [_tick(c) for c in caps], series)
    for g, text in enumerate(t.cells("mertools / llama.cpp")):
        _ratio(ax, xs[g][1], series[1].values[g], text, MERTOOLS)
        if modes[g]:
            _ratio(ax, xs[g][2], series[2].values[g], modes[g][2], MODE)
            if not one_name:
                ax.annotate(modes[g][0], (xs[g][2], 0), xytext=(0, 4), textcoords="offset points", rotation=90,
                            ha="center", va="bottom", fontsize=7, color="white")
    top = max(v for s in series for v in s.values if v is not None)
    ax.set_ylim(0, top * 1.75)  # the legend and the ratios above the tallest bar, not over it
    ax.set_title(f"{t.heading}, larger than RAM: decode tokens/s\n(bold: times llama.cpp's speed)", fontsize=10)
    ax.set_ylabel("tokens/s")
    ax.set_xlabel("memory cap (cgroup)", fontsize=8.5)
    _dedupe_legend(ax, loc="upper left")
    parts = [doc["full_size"], doc["full_size_modes"]]
    lift = 0.03 * (len({p.machine for p in parts}) > 1)  # room for a footer that names two machines
    fig.text(0.01, 0.075 + lift, "The mode's bars come from its own run (section full_size_modes; no bar: not run at that "
             "cap), its ratio against\nthat run's llama.cpp; its fidelity cost is in section modes.", fontsize=6.5,
             color="#555555")
    _footer(fig, parts, width=150)
    _tight(fig, 0.62 + 5 * lift)
    return fig


def beyond_ram(doc: dict[str, Section]) -> Figure:
    """The decode table of the beyond-RAM section: tok/s against the cache budget (and the roofline), GB read/token."""
    s = doc["beyond_ram"]
    t = s.table("2. Decode with cache budgets")
    budgets = [_tick(c) for c in t.cells("budget")]
    fig, (speed, reads) = plt.subplots(1, 2, figsize=(11, 4.6), gridspec_kw={"width_ratios": [3, 2]})
    ours = Series("mertools", t.figures("mertools tok/s"), MERTOOLS)
    xs = _bars(speed, budgets, [ours, Series("llama.cpp (mmap, cgroup = mertools' peak RSS)", t.figures("llama.cpp tok/s"),
                                             LLAMA)])
    roof = t.numbers("roofline tok/s")
    speed.scatter([g[0] for g, r in zip(xs, roof, strict=True) if r is not None], [r for r in roof if r is not None],
                  marker="_", s=500, linewidths=2, color="black", zorder=3, label="mertools' roofline")
    for g, text in enumerate(t.cells("mertools / llama.cpp")):
        _ratio(speed, xs[g][0], max(v for v in (ours.values[g], roof[g], 0.0) if v is not None), text)
    speed.set_ylim(0, max(v for v in [*ours.values, *roof, 1e-9] if v is not None) * 1.35)  # room for legend and ratios
    speed.set_title("decode tok/s (bold: mertools / llama.cpp)", fontsize=9.5)
    speed.set_ylabel("tokens/s")
    speed.set_xlabel("mertools' cache budget (of the expert bytes)", fontsize=8)
    _dedupe_legend(speed, loc="upper left")
    read = [number_texts(c) for c in t.cells("GB read/token")]  # "0.69 (0.62)": read (needed)
    _bars(reads, budgets, [Series("read (prefetches included)", [r[0] if r else None for r in read], MERTOOLS),
                           Series("needed (bytes missed)", [r[1] if len(r) > 1 else None for r in read], "#90b4d8")])
    reads.set_title("mertools: GB read from disk per token", fontsize=9.5)
    reads.set_ylabel("GB per token")
    reads.set_xlabel("cache budget", fontsize=8)
    fig.suptitle(f"Beyond RAM: {t.heading.split('(')[0].strip().removeprefix('2. ')}", fontsize=11.5, fontweight="bold")
    _footer(fig, [s])
    _tight(fig)
    return fig


def modes(doc: dict[str, Section]) -> Figure:
    """The speed/fidelity front: held-out mean KL against tok/s per setting, the Pareto settings joined."""
    s = doc["modes"]
    t = s.table()
    kl = [numbers(c) for c in t.cells("mean KL (built-in / held-out)")]
    speed = [numbers(c) for c in t.cells("tok/s")]
    front = [is_yes(c) for c in t.cells("Pareto")]
    points = [(k[1], v[0], name, f, v[1:3]) for name, k, v, f in zip(t.cells("setting"), kl, speed, front, strict=True)
              if len(k) > 1 and v]
    fig, ax = plt.subplots(figsize=(10, 6.2))
    for x, y, _, f, rng in points:
        err = [[y - rng[0]], [rng[1] - y]] if len(rng) == 2 else None
        ax.errorbar(x, y, yerr=err, fmt="o", ms=7 if f else 5, color=FRONT if f else "#7f7f7f", ecolor="#bbbbbb",
                    elinewidth=1, capsize=2, zorder=3 if f else 2)
    line = sorted((x, y) for x, y, _, f, _ in points if f)
    ax.plot([p[0] for p in line], [p[1] for p in line], color=FRONT, lw=1.2, alpha=0.7, zorder=1,
            label="Pareto front (the table's marks: no setting both faster and closer)")
    ax.plot([], [], "o", color="#7f7f7f", label="other settings (bar: range over the timed runs)")
    ax.set_xscale("symlog", linthresh=1e-3, linscale=0.8)  # exact sits at KL 0, the rest spans decades
    ax.set_xlim(-1e-4, max((p[0] for p in points), default=1e-2) * 1.6)
    ax.set_xticks([0, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2])
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.grid(alpha=0.3, which="both")
    ax.set_xlabel("held-out mean KL(exact || setting), nats (symlog: linear below 0.001)")
    ax.set_ylabel("decode tokens/s (synthetic Mixtral-shaped checkpoint)")
    ax.set_title("Modes that cut bytes per token: speed against fidelity (up and left is better)", fontsize=11)
    ax.legend(fontsize=8, frameon=False, loc="upper left")
    _tight(fig)
    fig.canvas.draw()  # the labels are placed in display space: the final layout first
    _place_labels(ax, [(x, y, name, f) for x, y, name, f, _ in sorted(points, key=lambda p: -p[3])])
    _footer(fig, [s])
    return fig


def full_size_modes(doc: dict[str, Section]) -> Figure:
    """Horizontal bars of tok/s per setting, one panel per cap, llama.cpp and mertools exact included."""
    s = doc["full_size_modes"]
    t = s.table()
    caps = list(dict.fromkeys(t.cells("cap")))
    rows = list(zip(t.cells("cap"), t.cells("setting"), t.figures("tok/s"), t.cells("vs mertools exact"),
                    t.cells("vs llama.cpp"), strict=True))
    n_rows = max(sum(r[0] == c for r in rows) for c in caps) if caps else 1
    fig, axes = plt.subplots(len(caps) or 1, 1, figsize=(9, 1.2 + len(caps) * (0.6 + 0.32 * n_rows)), sharex=True,
                             squeeze=False)
    top = max((float(r[2]) for r in rows if r[2] is not None), default=1.0)
    for ax, cap in zip(axes[:, 0], caps, strict=False):
        mine = [r for r in rows if r[0] == cap]
        for y, (_, name, tok_s, vs_exact, vs_llama) in enumerate(mine):
            colour = LLAMA if name.startswith("llama.cpp") else MERTOOLS if name == "mertools exact" else MODE
            if tok_s is None:
                ax.annotate("error (see the table)", (0, y), xytext=(3, 0), textcoords="offset points", va="center",
                            fontsize=7.5)
                continue
            ax.barh(y, float(tok_s), 0.7, color=colour)
            note = "" if name.startswith("llama.cpp") else f"   {vs_exact} exact, {vs_llama} llama.cpp"
            ax.annotate(f"{tok_s}{note}", (float(tok_s), y), xytext=(3, 0), textcoords="offset points", va="center",
                        fontsize=7.5)
        ax.set_yticks(range(len(mine)), [r[1] for r in mine], fontsize=8.5)
        ax.invert_yaxis()
        ax.set_title(f"memory cap {cap}", fontsize=9.5, loc="left")
        ax.grid(axis="x", alpha=0.3)
        ax.set_axisbelow(True)
        ax.set_xlim(0, top * 1.65)
    axes[-1, 0].set_xlabel("decode tokens/s (Mixtral 8x7B-shaped, Q4_0)")
    fig.suptitle("Full size: modes that cut bytes per token", fontsize=11.5, fontweight="bold")
    _footer(fig, [s], width=150)
    _tight(fig)
    return fig


CHARTS = (
    Chart("bench-full-size.png", ("full_size",), full_size),
    Chart("headline.png", ("full_size", "full_size_modes"), headline),
    Chart("bench-beyond-ram.png", ("beyond_ram",), beyond_ram),
    Chart("bench-modes.png", ("modes",), modes),
    Chart("bench-full-size-modes.png", ("full_size_modes",), full_size_modes),
)
CHARTED = tuple(dict.fromkeys(s for c in CHARTS for s in c.sections))


def draw(doc: Path = DOC, out: Path = IMG, only: Sequence[str] | None = None) -> list[Path]:
    """Draw the charts that read any of the sections `only` (all with None) from `doc` into `out`; the written
    paths. A chart needing a section the doc lacks is skipped with a note, unless that section was asked for."""
    unknown = sorted(set(only or ()) - set(CHARTED))
    if unknown:
        raise ValueError(f"no charts for section(s) {unknown}; charted sections: {list(CHARTED)}")
    found = sections(Path(doc).read_text(encoding="utf-8"))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for chart in CHARTS:
        if only and not set(only) & set(chart.sections):
            continue
        missing = [name for name in chart.sections if name not in found]
        if missing and set(missing) & set(only or ()):
            raise ValueError(f"{doc}: no section {missing} (between <!-- NAME:start --> and <!-- NAME:end -->)")
        try:
            if missing:
                raise Skipped(f"{doc} has no section {missing}")
            fig = chart.draw(found)
        except Skipped as e:
            print(f"{chart.file}: not drawn, {e}", file=sys.stderr)
            continue
        try:
            fig.savefig(out / chart.file, dpi=DPI, metadata={"Software": None})  # no version: reruns diff less
        finally:
            plt.close(fig)
        written.append(out / chart.file)
    return written


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--doc", type=Path, default=DOC)
    ap.add_argument("--out", type=Path, default=IMG)
    ap.add_argument("--section", nargs="+", choices=CHARTED, help="only the charts of these sections")
    a = ap.parse_args(argv)
    for path in draw(a.doc, a.out, a.section):
        print(f"{path} ({path.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
