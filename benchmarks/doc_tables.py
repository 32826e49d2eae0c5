"""The markdown tables of docs/BENCHMARKS.md, parsed: the doc is the single source of truth for measured figures,
so the charts (benchmarks/charts.py) read them from there rather than from a benchmark's own results.

A section is the text between `<!-- NAME:start -->` and `<!-- NAME:end -->` (benchmarks/_common.py writes
them); each table in it is a header row, a separator row and body rows, under the nearest heading above it.
Cells are strings; numbers() / number() read the figures out of the formats the benchmarks write: "0.449",
"4.0x", "54.6%", "2,048", "2.1e-08", "5.00 (yes)", "3.14 (3.13-3.15)", "0.0011 / 0.0005", "1/4 of RAM (5.9 GiB)".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# a number (thousands commas, exponent) not glued to a word ("q4_0"); a minus only where it cannot be a range's dash
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:,\d{3})*(?:\.\d+)?(?:[eE][-+]?\d+)?")
_HEADING = re.compile(r"^(#{1,6})\s+(.*\S)\s*$")
_CAP_GIB = re.compile(r"\(\s*(\d+(?:\.\d+)?)\s*GiB\s*\)")
_MISSING = ("", "-", "n/a")


def number_texts(cell: str) -> tuple[str, ...]:
    """Every number in a cell as written, in order; () for an empty cell, "-" or an error message (whose digits are
    no figure). "3.14 (3.13-3.15)" -> ("3.14", "3.13", "3.15"); "0.0011 / 0.0005" -> ("0.0011", "0.0005")."""
    text = cell.replace("**", "").strip()
    if text.lower() in _MISSING or text.lower().startswith(("error", "not run")):
        return ()
    return tuple(_NUMBER.findall(text))


def numbers(cell: str) -> tuple[float, ...]:
    """Every number in a cell, in order: "4.0x" -> (4.0,), "2,048" -> (2048.0,), "1/4 of RAM (5.9 GiB)" -> (1, 4, 5.9)."""
    return tuple(float(t.replace(",", "")) for t in number_texts(cell))


def number_text(cell: str) -> str | None:
    """The cell's first number as written ("5.30 (yes)" -> "5.30"): a chart labels a bar with the doc's own digits."""
    found = number_texts(cell)
    return found[0] if found else None


def number(cell: str) -> float | None:
    """The cell's first number ("5.00 (yes)" -> 5.0, "54.6%" -> 54.6), None when it has none."""
    found = numbers(cell)
    return found[0] if found else None


def is_yes(cell: str) -> bool:
    """A yes mark ("**yes**", "yes"): the Pareto column of the modes table."""
    return cell.replace("**", "").strip().lower() == "yes"


def cap_label(cell: str) -> str:
    """The words of a cap or budget cell, its size in brackets left off: "1/4 of RAM (5.9 GiB)" -> "1/4 of RAM"."""
    return cell.split(" (", 1)[0].strip()


def cap_gib(cell: str) -> float | None:
    """The GiB in brackets of a cap cell: "1/4 of RAM (5.9 GiB)" -> 5.9 (not the 1 and 4 of its fraction)."""
    m = _CAP_GIB.search(cell)
    return float(m.group(1)) if m else None


@dataclass(frozen=True)
class Table:
    section: str  # the section's marker name, for error messages
    heading: str  # the nearest heading above the table, without its #s
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]

    def column(self, name: str, after: str | None = None) -> int:
        """Index of the column headed `name` (or `name (...)`: a header's bracketed note may change), the first one
        right of column `after` when given: the full-size tables have two "GB read/token", one per tool."""
        start = self.column(after) + 1 if after is not None else 0
        for exact in (True, False):
            for i in range(start, len(self.header)):
                h = self.header[i]
                if h == name if exact else h.startswith(name + " ("):
                    return i
        where = f" right of {after!r}" if after is not None else ""
        raise ValueError(f"section {self.section!r}, table {self.heading!r}: no column {name!r}{where}; "
                         f"its columns: {list(self.header)}")

    def cells(self, name: str, after: str | None = None) -> list[str]:
        i = self.column(name, after)
        return [r[i] for r in self.rows]

    def numbers(self, name: str, after: str | None = None) -> list[float | None]:
        """The first number of each row's cell in that column (None where it has none: "-", an error)."""
        return [number(c) for c in self.cells(name, after)]

    def figures(self, name: str, after: str | None = None) -> list[str | None]:
        """The first number of each row's cell in that column as written ("5.30"), None where it has none."""
        return [number_text(c) for c in self.cells(name, after)]


@dataclass(frozen=True)
class Section:
    name: str
    title: str  # its "## " heading
    text: str  # the markdown between the markers
    tables: tuple[Table, ...]

    def line(self, prefix: str) -> str | None:
        """The first line starting with `prefix` ("Machine:", "Command:"), None if there is none."""
        return next((ln.strip() for ln in self.text.splitlines() if ln.startswith(prefix)), None)

    @property
    def machine(self) -> str:
        """The machine description of its "Machine: ..." line; "" if it has none (a few sections give it bare)."""
        found = self.line("Machine:")
        return found.removeprefix("Machine:").strip() if found else ""

    def table(self, heading: str | None = None) -> Table:
        """The table under a heading that starts with `heading`; with None, the section's only table."""
        found = [t for t in self.tables if heading is None or t.heading.startswith(heading)]
        if len(found) != 1:
            want = "one table" if heading is None else f"one table under a heading starting {heading!r}"
            raise ValueError(f"section {self.name!r}: expected {want}, found {len(found)}; "
                             f"its tables: {[t.heading for t in self.tables]}")
        return found[0]

    def tables_under(self, heading: str) -> list[Table]:
        return [t for t in self.tables if t.heading.startswith(heading)]


def _split_row(line: str) -> tuple[str, ...]:
    inner = line.strip()
    inner = inner[1:] if inner.startswith("|") else inner
    inner = inner[:-1] if inner.endswith("|") else inner
    return tuple(c.strip() for c in inner.split("|"))


def _is_separator(line: str) -> bool:
    cells = _split_row(line)
    return bool(cells) and all(re.fullmatch(r":?-+:?", c) for c in cells)


def parse_section(name: str, text: str) -> Section:
    """The tables of one section's markdown, each under the nearest heading above it."""
    lines = text.splitlines()
    title, heading, tables = "", "", []
    i = 0
    while i < len(lines):
        line = lines[i]
        m = _HEADING.match(line)
        if m:
            heading = m.group(2)
            title = title or (heading if len(m.group(1)) == 2 else "")
        elif line.lstrip().startswith("|") and i + 1 < len(lines) and _is_separator(lines[i + 1]):
            header, rows = _split_row(line), []
            i += 2
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                row = _split_row(lines[i])
                if len(row) != len(header):
                    raise ValueError(f"section {name!r}, table {heading!r}: a row of {len(row)} cells under a header "
                                     f"of {len(header)}: {lines[i].strip()[:120]}")
                rows.append(row)
                i += 1
            tables.append(Table(name, heading, header, tuple(rows)))
            continue
        i += 1
    return Section(name, title, text, tuple(tables))


def sections(text: str) -> dict[str, Section]:
    """Every marked section of the doc's text, by name."""
    found = re.finditer(r"<!-- (\S+):start -->\n(.*?)\n<!-- \1:end -->", text, re.S)
    return {m.group(1): parse_section(m.group(1), m.group(2)) for m in found}


def read_section(doc: Path, name: str) -> Section:
    found = sections(Path(doc).read_text(encoding="utf-8"))
    if name not in found:
        raise ValueError(f"{doc}: no section {name!r} (between <!-- {name}:start --> and <!-- {name}:end -->); "
                         f"its sections: {sorted(found)}")
    return found[name]
