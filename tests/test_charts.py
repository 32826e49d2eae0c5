"""benchmarks/charts.py and benchmarks/doc_tables.py: the tables of docs/BENCHMARKS.md parsed (the doc is the charts'
only source), every chart drawn from the real doc, and the errors a table missing a column raises.

The known cells below are the doc's current figures: a benchmark re-run that changes them changes these too."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from benchmarks import charts  # noqa: E402
from benchmarks.doc_tables import (  # noqa: E402
    cap_gib,
    cap_label,
    is_yes,
    number,
    number_text,
    numbers,
    parse_section,
    read_section,
    sections,
)

DOC = charts.DOC


@pytest.mark.parametrize(("cell", "expected"), [
    ("0.449", (0.449,)),
    ("4.0x", (4.0,)),
    ("54.6%", (54.6,)),
    ("2,048", (2048.0,)),
    ("5.00 (yes)", (5.0,)),
    ("1/4 of RAM (5.9 GiB)", (1.0, 4.0, 5.9)),
    ("3.14 (3.13-3.15)", (3.14, 3.13, 3.15)),  # a range's dash is no minus sign
    ("0.0011 / 0.0005", (0.0011, 0.0005)),
    ("2.1e-08 / 1.1e-06", (2.1e-08, 1.1e-06)),
    ("4.0 GiB (43 of 256)", (4.0, 43.0, 256.0)),
    ("top-k τ=0.05", (0.05,)),
    ("q4_0 at -0.5", (-0.5,)),  # digits glued to a word are no figure; a lone minus is
    ("**yes**", ()),
    ("", ()),
    ("-", ()),
    ("error: exit 137", ()),  # an error message's digits are no figure
])
def test_numbers_in_cells(cell: str, expected: tuple[float, ...]) -> None:
    assert numbers(cell) == pytest.approx(expected)
    assert number(cell) == (pytest.approx(expected[0]) if expected else None)


def test_cell_helpers() -> None:
    assert number_text("5.30 (yes)") == "5.30" and number_text("0.0011 / 0.0005") == "0.0011"
    assert number_text("-") is None and number_text("error: 12") is None
    assert is_yes("**yes**") and is_yes("yes") and not is_yes("") and not is_yes("NO")
    assert cap_label("1/4 of RAM (5.9 GiB)") == "1/4 of RAM" and cap_gib("1/4 of RAM (5.9 GiB)") == 5.9
    assert cap_label("0.25x (756 MiB)") == "0.25x" and cap_gib("0.25x (756 MiB)") is None


def test_real_doc_known_cells() -> None:
    fs = read_section(DOC, "full_size")
    assert fs.title == "Full size, beyond RAM" and fs.machine.startswith("Intel(R) Xeon(R) Processor, 2 cores")
    mix, qwen = fs.table("Mixtral"), fs.table("Qwen3-30B-A3B")
    assert mix.numbers("mertools tok/s") == [0.234, 0.433, 0.965]
    assert mix.numbers("GB read/token") == [4.84, 3.04, 0.79]  # mertools' column: the first of the two
    assert mix.numbers("GB read/token", after="llama.cpp tok/s") == [12.36, 5.98, 0.45]
    assert mix.numbers("mertools / llama.cpp") == [3.1, 2.9, 1.1]
    assert mix.figures("peak RSS GiB (within cap)") == ["5.56", "11.38", "20.97"]
    assert [cap_gib(c) for c in mix.cells("cap")] == [5.9, 11.8, 23.5]
    assert qwen.numbers("llama.cpp tok/s") == [0.057, 3.216, 5.469]

    modes = read_section(DOC, "modes").table()
    row = modes.cells("setting").index("stand-ins σ=1")
    assert numbers(modes.cells("tok/s")[row]) == (6.36, 5.51, 7.21)
    assert numbers(modes.cells("mean KL (built-in / held-out)")[row]) == (0.0072, 0.0125)
    assert sum(is_yes(c) for c in modes.cells("Pareto")) == 6 and len(modes.rows) == 20

    decode = read_section(DOC, "beyond_ram").table("2. Decode with cache budgets")
    assert decode.numbers("llama.cpp tok/s") == [0.96, 1.99, 11.07]  # header "llama.cpp tok/s (cgroup = ...)"
    assert numbers(decode.cells("GB read/token")[0]) == (0.69, 0.62)  # header "GB read/token (needed)"

    fm = read_section(DOC, "full_size_modes").table()
    assert len(fm.rows) == 9 and fm.cells("setting")[2] == "stand-ins σ=1, q2_k" and fm.numbers("tok/s")[2] == 1.040
    assert fm.cells("setting")[7] == "stand-ins σ=1, iq2_xxs" and fm.numbers("tok/s")[7] == 1.152


def test_every_charted_section_links_its_chart() -> None:
    """A re-run keeps the link: the benchmark writes it into its section, as the doc has it now."""
    found = sections(DOC.read_text(encoding="utf-8"))
    for chart in charts.CHARTS:
        if len(chart.sections) == 1:  # headline.png is the README's
            assert f"](img/{chart.file})" in found[chart.sections[0]].text, chart.file
    for bench, file in [("bench_full_size.py", "bench-full-size.png"), ("bench_full_size_modes.py",
                        "bench-full-size-modes.png"), ("bench_beyond_ram.py", "bench-beyond-ram.png"),
                        ("bench_modes.py", "bench-modes.png")]:
        source = (charts.ROOT / "benchmarks" / bench).read_text(encoding="utf-8")
        assert f"(img/{file})" in source and "draw_charts(" in source, bench


@pytest.fixture(scope="module")
def drawn(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return charts.draw(DOC, tmp_path_factory.mktemp("charts"))


def test_every_chart_drawn_from_the_real_doc(drawn: list[Path]) -> None:
    import matplotlib.image

    assert [p.name for p in drawn] == [c.file for c in charts.CHARTS]
    for path in drawn:
        assert 20_000 < path.stat().st_size < 250_000, (path.name, path.stat().st_size)
        img = matplotlib.image.imread(path)
        h, w = img.shape[:2]
        assert 400 <= h <= 1400 and 700 <= w <= 1400, (path.name, img.shape)
        colours = np.unique((img[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
        assert len(colours) >= 8, (path.name, len(colours))  # bars, text, grid: not a blank page
        assert (img[..., :3] < 0.9).mean() > 0.02, path.name
    assert matplotlib.image.imread(drawn[1]).shape[1] <= 850  # the headline fits the README's width


def _doc_with(tmp_path: Path, old: str, new: str) -> Path:
    text = DOC.read_text(encoding="utf-8")
    assert old in text
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text(text.replace(old, new, 1), encoding="utf-8")
    return doc


def test_missing_column_names_section_table_and_column(tmp_path: Path) -> None:
    doc = _doc_with(tmp_path, "| cap | mertools cache | mertools tok/s |", "| cap | mertools cache | tok/s mertools |")
    with pytest.raises(ValueError, match=r"section 'full_size', table 'Mixtral 8x7B-shaped \(llama, Q4_0\)': "
                                         r"no column 'mertools tok/s'"):
        charts.draw(doc, tmp_path / "img", ["full_size"])
    doc = _doc_with(tmp_path, "per token | mean KL (built-in / held-out) |", "per token | mean KL |")
    with pytest.raises(ValueError, match=r"section 'modes', table 'Modes that cut.*no column 'mean KL \(built-in / "
                                         r"held-out\)'.*its columns: \["):
        charts.draw(doc, tmp_path / "img", ["modes"])


def test_missing_section(tmp_path: Path) -> None:
    doc = _doc_with(tmp_path, "<!-- full_size_modes:start -->", "<!-- renamed:start -->")
    with pytest.raises(ValueError, match=r"no section \['full_size_modes'\]"):
        charts.draw(doc, tmp_path / "img", ["full_size_modes"])
    # asked for full_size only: its own chart is drawn, the headline (which also needs full_size_modes) skipped
    assert [p.name for p in charts.draw(doc, tmp_path / "img", ["full_size"])] == ["bench-full-size.png"]
    with pytest.raises(ValueError, match="no charts for section"):
        charts.draw(DOC, tmp_path / "img", ["quantizers"])


def test_parser_errors_name_the_section() -> None:
    with pytest.raises(ValueError, match=r"section 'x', table 'T': a row of 3 cells under a header of 2"):
        parse_section("x", "### T\n\n| a | b |\n|---|---|\n| 1 | 2 | 3 |\n")
    s = parse_section("x", "## X\n\n### A\n\n| a |\n|---|\n| 1 |\n\n### B\n\n| b |\n|:--:|\n| 2 |\n")
    assert s.title == "X" and [t.heading for t in s.tables] == ["A", "B"] and s.table("B").numbers("b") == [2.0]
    with pytest.raises(ValueError, match=r"section 'x': expected one table, found 2; its tables: \['A', 'B'\]"):
        s.table()
    with pytest.raises(ValueError, match=r"no column 'a' right of 'a'"):
        s.table("A").column("a", after="a")
