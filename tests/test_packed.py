"""runtime/packed.py: packed copies of a layout's experts and dense weights, written by a run that packs them and
mapped by the next one. The copies' own checks (format, source, size, xxh3), their all-or-nothing writes, and on the
tiny q4_0 layout: a second engine maps every copy, reads no expert and no dense byte, and computes the first one's
logits bit for bit; a stale or corrupt copy is refused, packed again and replaced."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mertools.dtypes import DTYPES
from mertools.runtime.engine import Engine
from mertools.runtime.packed import DENSE_COPY, DIR, HEADER, Header, PackedCopies, format_of, pack_format

IDS = [[1, 2, 3, 4, 5], [6], [7]]


def _copies(root: Path, **kw) -> tuple[PackedCopies, list[str]]:
    said: list[str] = []
    return PackedCopies(root, "fmt", notice=said.append, **kw), said


def test_header_round_trip_and_garbage() -> None:
    h = Header("int8-abc", "0123", "4567", 99, "plan")
    raw = h.encode()
    assert len(raw) == HEADER and Header.decode(raw) == h
    assert Header.decode(raw[:100]) is None  # short
    assert Header.decode(b"x" + raw[1:]) is None  # not ours
    assert Header.decode(raw.replace(b'"nbytes": 99', b'"nbytes": "x"')) is None  # malformed


def test_write_then_open(tmp_path: Path) -> None:
    copies, said = _copies(tmp_path / "c")
    data = np.random.default_rng(0).integers(0, 256, 3 * 4096 + 17, dtype=np.uint8)
    copies.write("experts/a.bin", "src1", data)
    assert copies.written == 1 and not said
    assert [p.name for p in (tmp_path / "c" / "experts").iterdir()] == ["a.bin"]  # no temporary left
    got = copies.open("experts/a.bin", "src1", data.size, verify=True)
    assert got is not None and np.array_equal(got.data, data) and got.data.ctypes.data % 4096 == 0
    # another source's, another size, another format, a file that is not there: refused or absent, never mapped
    assert copies.open("experts/a.bin", "src2", data.size, verify=True) is None
    assert copies.open("experts/a.bin", "src1", data.size - 1, verify=True) is None
    assert PackedCopies(tmp_path / "c", "fmt2").open("experts/a.bin", "src1", data.size, verify=True) is None
    assert copies.open("experts/b.bin", "src1", data.size, verify=True) is None
    assert (copies.mapped, copies.refused) == (1, 2)


def test_keep_writes_on_its_own_thread_and_checks_the_bytes_again(tmp_path: Path) -> None:
    copies, said = _copies(tmp_path)
    data = np.arange(10000, dtype=np.uint16).view(np.uint8)
    copies.keep("k", "s", data)
    copies.close()  # waits for the write
    assert (copies.queued, copies.written) == (1, 1) and copies.open("k", "s", data.size, verify=True) is not None
    copies.write("w", "s", data, expect="0" * 16)  # the bytes changed after their xxh3 was taken: not kept
    assert not (tmp_path / "w").exists() and not list(tmp_path.glob("w.tmp*")) and copies.written == 1 and not said


def test_corrupt_and_truncated_copies_are_refused(tmp_path: Path) -> None:
    copies, _ = _copies(tmp_path)
    data = np.arange(8192, dtype=np.uint8)
    copies.write("x", "s", data)
    path = tmp_path / "x"
    raw = bytearray(path.read_bytes())
    raw[HEADER + 5] ^= 1
    path.write_bytes(raw)
    assert copies.open("x", "s", data.size, verify=True) is None
    assert copies.open("x", "s", data.size, verify=False) is not None  # unverified: the header's word is taken
    path.write_bytes(raw[:HEADER + 100])  # cut short: mapping it would fault past its end
    assert copies.open("x", "s", data.size, verify=False) is None


def test_a_directory_that_cannot_be_written_turns_copies_off_once(tmp_path: Path) -> None:
    (tmp_path / "blocked").write_text("a file where the directory would go")
    copies, said = _copies(tmp_path / "blocked" / "fmt")
    copies.write("experts/a.bin", "s", np.zeros(10, np.uint8))
    copies.write("experts/b.bin", "s", np.zeros(10, np.uint8))
    assert not copies.writable and copies.written == 0 and len(said) == 1 and "blocked" in said[0]


def test_older_formats_and_dead_writers_leftovers_are_removed(tmp_path: Path) -> None:
    packed = tmp_path / DIR
    old = packed / "int8-0123456789abcdef" / "experts"
    old.mkdir(parents=True)
    (old / "a.bin").write_bytes(b"x")
    mine = packed / "int8-new" / "experts"
    mine.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (mine / f"b.bin.tmp{int(dead.stdout)}.1").write_bytes(b"torn")  # a writer killed mid-write
    (mine / f"c.bin.tmp{os.getpid()}.1").write_bytes(b"busy")  # a live process's write in progress
    copies = PackedCopies(packed / "int8-new", "int8-new")
    copies.write("experts/d.bin", "s", np.zeros(10, np.uint8))
    assert not (packed / "int8-0123456789abcdef").exists()
    assert sorted(p.name for p in mine.iterdir()) == [f"c.bin.tmp{os.getpid()}.1", "d.bin"]


def test_copies_leave_the_reserve_free(tmp_path: Path) -> None:
    copies, said = _copies(tmp_path, reserve=shutil.disk_usage(tmp_path).free + (1 << 30))
    copies.write("a", "s", np.zeros(10, np.uint8))
    assert not (tmp_path / "a").exists() and not copies.writable and "free" in said[0]


def test_pack_format_follows_the_packing_sources(tmp_path: Path) -> None:
    from mertools.dtypes import _k8packed
    from mertools.kernels import int8, simd8x

    sources = [Path(m.__file__) for m in (int8, _k8packed, simd8x)]
    specs = repr(sorted((n, d.int8_pack) for n, d in DTYPES.items() if d.int8_pack is not None))
    assert pack_format() == format_of(sources, specs) and pack_format().startswith("int8-")
    edited = tmp_path / "int8.py"  # one byte more in one source, or another spec: another format, no old copy mapped
    edited.write_bytes(sources[0].read_bytes() + b"\n")
    assert format_of([edited, *sources[1:]], specs) != pack_format()
    assert format_of(sources, specs + " ") != pack_format()


def _run(layout: Path, **kw) -> tuple[np.ndarray, Engine]:
    eng = Engine.open(layout, kernels="int8", context=32, io="buffered", **kw)
    logits = np.concatenate([eng.forward(ids) for ids in IDS])
    eng.close()
    return logits, eng


@pytest.fixture()
def layout(tiny_q4_0: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_q4_0, tmp_path / "lay", ignore=shutil.ignore_patterns(DIR)))


def test_a_second_engine_maps_the_first_ones_copies(layout: Path) -> None:
    first, e1 = _run(layout, packed_copies=True)
    root = layout / DIR / pack_format()
    n = len(e1.store.entries)
    assert e1.store.copies.written == n + 1 and (root / DENSE_COPY).exists()  # every expert (all routed) + dense
    assert not e1.model.dense_arena.filled
    second, e2 = _run(layout, packed_copies=True)
    assert e2.store.copies.mapped == n + 1 and e2.store.copies.written == 0 and e2.model.dense_arena.filled
    assert e2.store.bytes_read == 0
    np.testing.assert_array_equal(first, second)
    # without copies: the same bits again, and nothing written
    third, e3 = _run(layout, packed_copies=False)
    assert e3.store.copies is None
    np.testing.assert_array_equal(first, third)


def test_corrupt_copies_are_packed_again(layout: Path) -> None:
    first, e1 = _run(layout, packed_copies=True)
    root = layout / DIR / pack_format()
    victims = [root / DENSE_COPY, root / e1.store.entries[(0, 0)].file]
    for path in victims:
        with open(path, "r+b") as f:
            f.seek(HEADER + 1000)
            b = f.read(1)
            f.seek(HEADER + 1000)
            f.write(bytes([b[0] ^ 0xFF]))
    second, e2 = _run(layout, packed_copies=True)
    np.testing.assert_array_equal(first, second)
    assert e2.store.copies.refused == 2 and e2.store.copies.written == 2 and not e2.model.dense_arena.filled
    third, e3 = _run(layout, packed_copies=True)  # the replacements are good
    assert e3.store.copies.refused == 0 and e3.store.copies.written == 0
    np.testing.assert_array_equal(first, third)


def test_copies_only_where_pages_are_kept(layout: Path) -> None:
    eng = Engine.open(layout, kernels="int8", context=32, io="direct")
    eng.forward([1, 2, 3])
    eng.close()
    assert eng.store.copies is None and not (layout / DIR).exists()
    eng = Engine.open(layout, kernels="exact", context=32, io="buffered")
    eng.forward([1, 2, 3])
    eng.close()
    assert eng.store.copies is None and not (layout / DIR).exists()


def test_environment_turns_copies_off(layout: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MERTOOLS_PACKED_COPIES", "0")
    _, eng = _run(layout)
    assert eng.store.copies is None and not (layout / DIR).exists()
    monkeypatch.setenv("MERTOOLS_PACKED_COPIES", "1")
    _, eng = _run(layout)
    assert eng.store.copies.written > 0 and os.path.isdir(layout / DIR)


def test_mertools_run_keeps_copies_for_the_next_run(layout: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from mertools.cli import main

    monkeypatch.delenv("MERTOOLS_PACKED_COPIES")  # the CLI's default: on
    runs = []
    for i, extra in enumerate(([], [], ["--no-packed-copies"])):
        out = tmp_path / f"run{i}.json"
        r = CliRunner().invoke(main, ["run", str(layout), "-p", "Hello", "-n", "4", "--seed", "1", "--io", "buffered",
                                      "--json", str(out), *extra])
        assert r.exit_code == 0, r.output
        runs.append((*r.output.split("\n--\n"), json.loads(out.read_text())))
    (text1, figures1, s1), (text2, figures2, s2), (text3, figures3, s3) = runs
    assert text1 == text2 == text3
    assert s1["packed_copies_written"] > 0 and s1["packed_copies_mapped"] == 0
    assert s2["packed_copies_mapped"] == s1["packed_copies_written"] and s2["packed_copies_written"] == 0
    assert s2["bytes_read"] == 0 and f"packed copies {s2['packed_copies_mapped']} mapped, 0 written" in figures2
    assert s3["packed_copies_mapped"] == s3["packed_copies_written"] == 0 and s3["bytes_read"] > 0
    assert "packed copies" not in figures3
