"""The learning cache (`--history`): a routing history written beside the layout, read by the next process to
load and rank the experts its workload used; never a change in results; bad files refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mertools.convert.pipeline import ConvertOptions, convert
from mertools.errors import RuntimeConfigError
from mertools.layout import Layout
from mertools.runtime import history as history_mod
from mertools.runtime.engine import Engine
from mertools.runtime.history import RoutingHistory, layout_id

TRAINED = Path(__file__).resolve().parent.parent / "fixtures" / "trained"
TEXT = (TRAINED / "held-out-julius-caesar.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained fixture (real, skewed routing) as q4_0."""
    return convert(TRAINED / "tiny-shakespeare-moe", tmp_path_factory.mktemp("history") / "q4_0",
                   ConvertOptions(dtype="q4_0", progress=False)).out


@pytest.fixture(scope="module")
def ids(layout: Path) -> list[int]:
    with Engine.open(layout) as eng:
        return eng.tokenizer.encode(TEXT[:4000])


def _slots_mb(layout: Path, slots: int) -> float:
    return slots * max(e.nbytes for e in Layout.open(layout).manifest.experts) / 2**20 + 0.01


def _feed(eng: Engine, ids: list[int], prompt: int = 16) -> np.ndarray:
    """A prompt in one step, then the rest one token at a time (the cache sees decoding's access pattern)."""
    out = [eng.forward(ids[:prompt])]
    out += [eng.forward([t]) for t in ids[prompt:]]
    return np.concatenate(out)


def test_a_run_writes_its_routing(layout: Path, ids: list[int], tmp_path: Path) -> None:
    path = tmp_path / "h.json"
    seen = np.zeros((4, 8))

    def trace(pos: np.ndarray, layer: int, chosen: np.ndarray, weights: np.ndarray) -> None:
        np.add.at(seen[layer], chosen.ravel(), 1)

    with Engine.open(layout, history=path, trace=trace) as eng:
        assert eng.stats()["history_preloaded"] == 0  # nothing learned yet
        _feed(eng, ids[:100])
    doc = json.loads(path.read_text())
    assert doc["format"] == history_mod.FORMAT and doc["layout"] == layout_id(Layout.open(layout).manifest)
    assert doc["tokens"] == 100
    np.testing.assert_array_equal(np.array(doc["counts"]), seen)  # every choice of every layer, once
    assert [p.name for p in tmp_path.iterdir()] == ["h.json"]  # written by rename: no temporary left


def test_runs_add_up_with_older_ones_fading(layout: Path, ids: list[int], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "h.json"
    monkeypatch.setattr(history_mod, "HALF_LIFE", 50)  # 50 new tokens halve what the file held
    with Engine.open(layout, history=path) as eng:
        _feed(eng, ids[:60])
    first = np.array(json.loads(path.read_text())["counts"])
    with Engine.open(layout, history=path) as eng:
        assert eng.stats()["history_tokens"] == 60
        _feed(eng, ids[60:110])
    doc = json.loads(path.read_text())
    assert doc["tokens"] == pytest.approx(60 * 0.5 + 50)
    assert np.array(doc["counts"]).sum() == pytest.approx(first.sum() * 0.5 + 50 * 2 * 4)  # top-2, 4 layers


@pytest.mark.parametrize("slots", [8, 32])  # 1/4 of the experts, and all
def test_history_never_changes_results(layout: Path, ids: list[int], tmp_path: Path, slots: int) -> None:
    path = tmp_path / "h.json"
    with Engine.open(layout, history=path) as eng:
        _feed(eng, ids[:200])  # learn
    mb = _slots_mb(layout, slots)
    with Engine.open(layout, cache_mb=mb, kv_dtype="f32") as eng:
        cold = _feed(eng, ids[200:330])
    with Engine.open(layout, cache_mb=mb, kv_dtype="f32", history=path) as eng:
        np.testing.assert_array_equal(_feed(eng, ids[200:330]), cold)


def _write(path: Path, layout: Path, counts: np.ndarray, tokens: float) -> None:
    path.write_text(json.dumps({"format": history_mod.FORMAT, "version": history_mod.VERSION,
                                "layout": layout_id(Layout.open(layout).manifest), "tokens": tokens,
                                "counts": counts.tolist()}))


def test_hot_experts_are_loaded_at_open(layout: Path, ids: list[int], tmp_path: Path) -> None:
    """Experts chosen at least HOT times as often as uniform routing would are loaded before the first token,
    the most used first, as many as the cache holds; on balanced routing nothing is (the prompt's own reads
    would only wait behind them)."""
    path = tmp_path / "h.json"
    counts = np.full((4, 8), 100 * 2 / 8)  # 100 tokens of top-2 routing, uniform...
    hot = [(0, 3, 80.0), (2, 5, 70.0), (3, 1, 60.0)]  # ...but for three experts chosen far more often
    for layer, expert, c in hot:
        counts[layer, expert] = c
    _write(path, layout, counts, 100)
    with Engine.open(layout, cache_mb=_slots_mb(layout, 2), history=path) as eng:
        assert eng.stats()["history_preloaded"] == 2
        assert set(eng.cache.entries) == {(0, 3), (2, 5)}  # the two hottest: the cache holds two
    with Engine.open(layout, cache_mb=_slots_mb(layout, 8), kv_dtype="f32", history=path) as eng:
        assert set(eng.cache.entries) == {(0, 3), (2, 5), (3, 1)}
        warm = _feed(eng, ids[:40])
    with Engine.open(layout, cache_mb=_slots_mb(layout, 8), kv_dtype="f32") as eng:
        np.testing.assert_array_equal(_feed(eng, ids[:40]), warm)
    _write(path, layout, np.full((4, 8), 100 * 2 / 8), 100)
    with Engine.open(layout, cache_mb=_slots_mb(layout, 8), history=path) as eng:
        assert eng.stats()["history_preloaded"] == 0 and not eng.cache.entries


def test_the_cache_policy_starts_from_the_history(layout: Path, ids: list[int], tmp_path: Path) -> None:
    path = tmp_path / "h.json"
    with Engine.open(layout, history=path) as eng:
        _feed(eng, ids[:200])
    h = RoutingHistory.open(path, Layout.open(layout))
    with Engine.open(layout, cache_mb=_slots_mb(layout, 8), history=path) as eng:
        np.testing.assert_allclose(np.array(eng.cache.freq), h.counts / h.tokens * history_mod.SEED_VISITS)
        np.testing.assert_array_equal(eng.cache.k_seen, [2.0] * 4)


def test_another_layouts_history_is_refused(layout: Path, ids: list[int], tmp_path: Path) -> None:
    path = tmp_path / "h.json"
    with Engine.open(layout, history=path) as eng:
        _feed(eng, ids[:20])
    other = convert(TRAINED / "tiny-shakespeare-moe", tmp_path / "q8_0", ConvertOptions(dtype="q8_0", progress=False)).out
    before = path.read_bytes()
    with pytest.raises(RuntimeConfigError, match=r"h\.json: routing history of another layout.*q8_0"):
        Engine.open(other, history=path)
    assert path.read_bytes() == before


@pytest.mark.parametrize(("doc", "field"), [
    ("not json", "not a routing history"),
    ('{"format": "x"}', "field 'format'"),
    ('{"format": "mertools-routing-history", "version": 9}', "field 'version'"),
    ('LAYOUT_OK, "tokens": -1, "counts": []}', "field 'tokens'"),
    ('LAYOUT_OK, "tokens": 5, "counts": [[1, 2]]}', r"field 'counts': expected shape \(4, 8\)"),
    ('LAYOUT_OK, "tokens": 5, "counts": "x"}', "field 'counts'"),
    ('LAYOUT_OK, "tokens": 5, "counts": NEG}', "field 'counts': expected finite numbers >= 0"),
])
def test_a_bad_history_is_refused_naming_file_and_field(layout: Path, tmp_path: Path, doc: str, field: str) -> None:
    ident = layout_id(Layout.open(layout).manifest)
    doc = doc.replace("LAYOUT_OK", f'{{"format": "mertools-routing-history", "version": 1, "layout": "{ident}"')
    doc = doc.replace("NEG", json.dumps([[-1.0] * 8] * 4))
    path = tmp_path / "bad.json"
    path.write_text(doc)
    with pytest.raises(RuntimeConfigError, match=rf"bad\.json: .*{field}"):
        Engine.open(layout, history=path)
    assert path.read_text() == doc  # left as it was


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_an_unwritable_place_is_refused_before_the_run(layout: Path, tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(RuntimeConfigError, match="cannot write a routing history"):
            Engine.open(layout, history=ro / "h.json")
    finally:
        ro.chmod(0o700)


def test_an_unwritable_place_is_refused_even_for_root(layout: Path, tmp_path: Path) -> None:
    with pytest.raises(RuntimeConfigError, match="not a writable directory"):
        Engine.open(layout, history=tmp_path / "missing-dir" / "h.json")


def test_cli_run_learns_and_reports(layout: Path, tmp_path: Path) -> None:
    path = tmp_path / "h.json"
    cmd = [sys.executable, "-m", "mertools.cli", "run", str(layout), "-p", "ROMEO:", "-n", "12",
           "--history", str(path)]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert path.exists() and "from the routing history" not in first.stderr  # nothing learned before it
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert first.stdout == second.stdout  # same text
    assert "experts loaded at open from the routing history" in second.stderr and "history" in second.stderr
    path.write_text("{}")
    bad = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "h.json: routing history field 'format'" in bad.stderr
    assert bad.stdout == ""


def test_the_server_writes_its_history_as_it_goes(layout: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server runs for days: its routing history is written every HISTORY_EVERY seconds (here at once), not only
    at shutdown, and a history it cannot write is logged without failing requests."""
    import time

    from fastapi.testclient import TestClient

    from mertools.server import scheduler as scheduler_mod
    from mertools.server.app import ServerConfig, create_app

    monkeypatch.setattr(scheduler_mod, "HISTORY_EVERY", 0.0)
    path = tmp_path / "h.json"
    with TestClient(create_app(ServerConfig(str(layout), model_name="t", history=str(path)))) as client:
        deadline = time.monotonic() + 60
        while client.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        r = client.post("/v1/completions", json={"model": "t", "prompt": "ROMEO:", "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200
        deadline = time.monotonic() + 30
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert json.loads(path.read_text())["tokens"] > 0  # written while the server runs
        for _ in range(200):  # the scheduler may still be writing it after the reply: retry until the directory stays
            path.unlink(missing_ok=True)
            try:
                path.mkdir()  # now it cannot be written (a directory where the file goes): requests still succeed
                break
            except FileExistsError:
                time.sleep(0.05)
        assert path.is_dir()
        r = client.post("/v1/completions", json={"model": "t", "prompt": "JULIET:", "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
