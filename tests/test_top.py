"""`mertools top`: the pure parts (rates from two readings, recent percentiles from bucket deltas, the heat map's
binning) and the dashboard itself attached to a real server (uvicorn in a thread, the trained fixture in q4_0 with a
cache of 9 of its 32 experts) under streaming openai clients: driven by textual's pilot at 80x24, and as a process in
a detached 80x24 tmux session."""

from __future__ import annotations

import asyncio
import html
import math
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI
from test_server import Running  # tests/ is on sys.path (pytest's rootdir-relative import)

from mertools.server.app import ServerConfig, create_app
from mertools.server.stats import quantile as server_quantile
from mertools.top import heat as H
from mertools.top.app import TopApp
from mertools.top.poll import (
    History,
    PollError,
    base_url,
    bucket_delta,
    buckets,
    delta,
    fetch_stats,
    figures,
    grid_delta,
    quantile,
    rate,
)
from mertools.top.views import crop, overview

ROOT = Path(__file__).resolve().parent.parent
TRAINED = ROOT / "fixtures" / "trained" / "tiny-shakespeare-moe"
KEY = "sk-top-test"
MODEL = "shakespeare-q4"
PROMPTS = ["ROMEO:", "JULIET:", "HAMLET:", "First Citizen:"]


# ---------------------------------------------------------------------- the pure parts
def reading(t: float, generated: float = 0, prompt: float = 0, lookups: int = 0, hits: int = 0,
            bytes_read: int = 0, ttft: list | None = None) -> dict[str, Any]:
    """A /stats reading with only what these tests look at."""
    bounds = [0.01, 0.1, 1.0, "+Inf"]
    return {"time": t, "uptime_s": t, "state": "ready", "model": "m",
            "requests": {"running": 1, "waiting": 0, "max_concurrency": 8, "max_queue": 64, "finished": {}},
            "tokens": {"prompt": prompt, "generated": generated, "steps": generated},
            "ttft_s": {"buckets": [[b, c] for b, c in zip(bounds, ttft or [0, 0, 0, 0], strict=True)]},
            "experts": {"lookups": lookups, "hits": hits, "misses": lookups - hits, "loads": lookups - hits,
                        "evictions": 0, "prefetch_used": 0, "prefetch_wasted": 0, "prefetch_issued": 0, "wait_s": 0.0},
            "disk": {"bytes_read": bytes_read, "reads": 0, "read_s": 0.0}}


def test_rates_from_two_readings_and_a_counter_reset() -> None:
    a = reading(100.0, generated=1000, prompt=50, lookups=4000, hits=3000, bytes_read=10 * 2**20)
    b = reading(102.0, generated=1400, prompt=50, lookups=5000, hits=3900, bytes_read=14 * 2**20)
    f = figures(b, a)
    assert f.dt == 2.0 and f.gen_tps == 200.0 and f.prompt_tps == 0.0
    assert f.hit_rate == pytest.approx(0.9) and f.life_hit_rate == pytest.approx(3900 / 5000)
    assert f.disk_bps == 2 * 2**20 and f.lookups_ps == 500.0 and not f.restarted
    # a reload to a new layout: the engine's counters start again; the server's (tokens) go on
    c = reading(104.0, generated=1800, lookups=600, hits=150, bytes_read=3 * 2**20)
    f = figures(c, b)
    assert f.gen_tps == 200.0 and f.lookups_ps == 300.0 and f.disk_bps == 1.5 * 2**20 and f.restarted
    assert f.hit_rate == pytest.approx(0.25)  # the new engine's lookups only, never a negative difference
    assert min(v for v in vars(f).values() if isinstance(v, float)) >= 0
    assert delta(5, 7) == 5 and delta(7, 5) == 2 and delta(3, None) == 3 and delta(None, 3) == 0
    assert rate(10, 20, 2.0) == 5.0 and rate(10, 4, 0.0) is None
    assert figures(b).gen_tps is None  # no base reading: no rates yet
    # the map's counters, per cell: one that went down restarted; another shape (a new layout) is all new
    assert grid_delta([[5, 1], [0, 9]], [[3, 4], [0, 2]]) == [[2, 1], [0, 7]]
    assert grid_delta([[5, 1, 2]], [[3, 4]]) == [[5, 1, 2]]


def test_history_keeps_the_window() -> None:
    h = History(window=1.0)
    for t in (0.0, 0.4, 0.8, 1.2, 1.6, 2.0):
        h.add({"time": t})
    assert h.base()["time"] == 0.8  # the newest reading at least 1 s older than the newest
    assert h.latest()["time"] == 2.0 and [r["time"] for r in h.readings] == [0.8, 1.2, 1.6, 2.0]
    h.add({"time": 0.5})  # a clock that went back: start again
    assert h.base() is None and h.latest()["time"] == 0.5


def test_recent_percentile_from_bucket_deltas() -> None:
    slow = reading(0.0, ttft=[0, 0, 100, 100])  # 100 first tokens in (0.1, 1] s
    later = reading(10.0, ttft=[40, 40, 140, 140])  # then 40 in (0, 0.01]
    f = figures(later, slow)
    assert f.ttft.n == 40 and f.ttft.p50 is not None and f.ttft.p50 <= 0.01 and f.ttft.p95 <= 0.01
    assert f.ttft.life_n == 140 and f.ttft.life_p50 > 0.1  # the lifetime figures stay slow
    assert f.ttft.p50 == pytest.approx(quantile([(0.01, 40), (0.1, 40), (1.0, 40), (math.inf, 40)], 0.5))
    assert figures(slow, slow).ttft.p50 is None  # nothing new in the window: no recent percentile
    # the histogram restarted (a new server): the newer buckets whole, never negative counts
    assert bucket_delta(buckets(slow["ttft_s"]), buckets(later["ttft_s"])) == buckets(slow["ttft_s"])
    # the same interpolation as the server's own p50/p95
    rng = random.Random(0)
    for _ in range(200):
        cum, n = [], 0
        for b in (0.001, 0.01, 0.1, 1.0, math.inf):
            n += rng.choice([0, 0, 1, 5, 30])
            cum.append((b, n))
        for q in (0.5, 0.95, 0.99):
            assert quantile(cum, q) == server_quantile(cum, q)


def test_heat_binning_61_layers_by_256_experts() -> None:
    rng = random.Random(1)
    layers, experts, width, height = 61, 256, 76, 21
    state = [[rng.choice([0, 0, 0, 1, 2]) for _ in range(experts)] for _ in range(layers)]
    hits = [[rng.randint(0, 3) for _ in range(experts)] for _ in range(layers)]
    hot_layer, hot_expert = 37, 201
    hits[hot_layer][hot_expert] = 10_000
    m = H.render(state, hits, hits, width, height)
    lpr, epc = m.layers_per_row, m.experts_per_col
    assert lpr > 1 and epc > 1 and m.rows <= height - H.HEADER_LINES
    # every expert in exactly one bin
    ones = [[1] * experts for _ in range(layers)]
    sums = H.bin_sums(ones, lpr, epc)
    assert sum(map(sum, sums)) == layers * experts and len(sums) == m.rows
    assert len(sums[0]) == math.ceil(experts / epc) and sums[0][0] == lpr * epc
    assert sum(map(sum, H.bin_sums(hits, lpr, epc))) == sum(map(sum, hits))
    lines = m.text.plain.split("\n")
    assert len(lines) <= height and max(map(len, lines)) <= width
    assert f"{lpr} layers/row" in lines[0] and f"{epc} experts/col" in lines[0]
    rows = [line for line in lines if re.match(r"L\d", line)]
    assert len(rows) == m.rows
    cells = [line[m.label_w::m.cell_w][:len(sums[0])] for line in rows]
    nines = [(r, c) for r, row in enumerate(cells) for c, ch in enumerate(row) if ch == "9"]
    assert nines == [(hot_layer // lpr, hot_expert // epc)]  # the hot expert, and only it, in the hottest digit
    assert all(ch in "12345678" for row in cells for ch in row if (ch != "9"))  # every other bin has some hits
    assert "L37 E201 10,000" in lines[-1]
    # residency only: what is held, per bin
    held = H.render(state, None, None, width, height, mode="held")
    held_cells = [line[held.label_w::held.cell_w][:len(sums[0])] for line in held.text.plain.split("\n")
                  if re.match(r"L\d", line)]
    assert {ch for row in held_cells for ch in row} <= set(".:o~")
    # a small map is drawn one cell per expert, with room to spare
    small = H.render([[1, 0, 2, 0]] * 2, [[0, 5, 0, 1]] * 2, [[1, 5, 0, 2]] * 2, 78, 20)
    assert small.layers_per_row == small.experts_per_col == 1
    assert [line[small.label_w::small.cell_w][:4] for line in small.text.plain.split("\n")[3:5]] == ["o9~2"] * 2


def test_overview_fits_80_columns() -> None:
    a = reading(100.0, generated=10**9, prompt=10**8, lookups=10**9, hits=10**8, bytes_read=10**13)
    b = reading(101.0, generated=2 * 10**9, prompt=2 * 10**8, lookups=2 * 10**9, hits=2 * 10**8, bytes_read=2 * 10**13)
    text = overview(figures(b, a), [1e6] * 500, 78)
    assert max(map(len, text.plain.split("\n"))) <= 78
    assert crop(text, 20).plain.split("\n")[0] == text.plain.split("\n")[0][:20]


def test_base_url() -> None:
    assert base_url("127.0.0.1:8000") == "http://127.0.0.1:8000"
    assert base_url("https://h/v1/") == "https://h"


# ---------------------------------------------------------------------- a real server under load
def until(cond: Callable[[], Any], what: str, timeout: float = 60, check: Callable[[], bool] = lambda: True) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        assert time.monotonic() < deadline and check(), what
        time.sleep(0.05)
    return value


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    from mertools.convert.pipeline import ConvertOptions, convert

    layout = convert(TRAINED, tmp_path_factory.mktemp("top") / MODEL, ConvertOptions(dtype="q4_0", progress=False)).out
    r = Running(create_app(ServerConfig(str(layout), api_key=KEY, cache_mb=1, threads=1)))
    try:
        until(lambda: fetch_stats(r.url, KEY, heat=False).get("state") == "ready", "the engine did not load")
        # the first request compiles (or loads) numba's kernels: before any test watches the figures
        OpenAI(base_url=r.url + "/v1", api_key=KEY, max_retries=0, timeout=600).completions.create(
            model=MODEL, prompt="ROMEO:", max_tokens=4, temperature=0)
        yield r
    finally:
        r.stop()


@pytest.fixture
def load(srv: Running) -> Iterator[list[int]]:
    """Three clients streaming chat completions one after another until the test ends; yields their token counts."""
    stop, counts, errors = threading.Event(), [0, 0, 0], []

    def client(i: int) -> None:
        c = OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        try:
            while not stop.is_set():
                stream = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPTS[i]}],
                                                   max_tokens=150, temperature=0, stream=True)
                with stream:
                    for _ in stream:
                        counts[i] += 1
                        if stop.is_set():
                            break
        except Exception as e:  # noqa: BLE001 - reported by the fixture
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(3)]
    for t in threads:
        t.start()
    until(lambda: sum(counts) > 20, "the clients did not stream", check=lambda: not errors)
    yield counts
    stop.set()
    for t in threads:
        t.join(60)
    assert not errors, errors


def screen(app: TopApp) -> list[str]:
    """The screen's text, one string per row, from the app's SVG screenshot (each run of text sits at its column)."""
    svg = app.export_screenshot()
    rows = [[" "] * app.size.width for _ in range(app.size.height)]
    for m in re.finditer(r'<text [^>]*x="([\d.]+)"[^>]*textLength="([\d.]+)"[^>]*line-(\d+)\)">([^<]*)</text>', svg):
        x, length, row, text = float(m[1]), float(m[2]), int(m[3]), html.unescape(m[4]).replace("\xa0", " ")
        col = round(x / (length / len(text))) if text else 0
        rows[row][col:col + len(text)] = text
    return ["".join(r).rstrip() for r in rows]


def figure(lines: list[str], pattern: str) -> float:
    """The number a regex's group finds on the screen (1,234 / 12.3k / 4.5M)."""
    m = re.search(pattern, "\n".join(lines))
    assert m, f"{pattern!r} not on the screen:\n" + "\n".join(lines)
    s = m[1].replace(",", "")
    return float(s[:-1]) * {"k": 1e3, "M": 1e6}[s[-1]] if s[-1] in "kM" else float(s)


async def polls(pilot: Any, app: TopApp, n: int, timeout: float = 60) -> None:
    """Waits (up to `timeout`: no timing assertion) for `n` more readings than the app has taken so far."""
    target, deadline = app.polls + n, time.monotonic() + timeout
    while app.polls < target:
        assert time.monotonic() < deadline, f"no reading: {screen(app)}"
        await pilot.pause(0.05)


def test_dashboard_figures_move_and_pause(srv: Running, load: list[int]) -> None:
    asyncio.run(_dashboard_figures_move_and_pause(srv, load))


async def _dashboard_figures_move_and_pause(srv: Running, load: list[int]) -> None:
    app = TopApp(srv.url, api_key=KEY, interval=0.2, window=1.0)
    async with app.run_test(size=(80, 24)) as pilot:
        await polls(pilot, app, 3)
        first = screen(app)
        assert MODEL in first[0] and "q quit" in first[-1] and "p pause" in first[-1] and "[overview]" in first[-1]
        assert figure(first, r"generated (\S+) tok/s") > 0 and max(map(len, first)) <= 80
        await pilot.press("3")
        await polls(pilot, app, 2)
        before = figure(screen(app), r"generated ([\d,.kM]+) \(")
        await polls(pilot, app, 3)
        moving = screen(app)
        assert figure(moving, r"generated ([\d,.kM]+) \(") > before and "[requests]" in moving[-1]
        # p: the figures stop changing (the clients still stream), and go on again
        await pilot.press("p")
        paused = screen(app)
        taken = app.polls
        assert "PAUSED" in "\n".join(paused) and "p resume" in paused[-1]
        await pilot.pause(1.0)  # five intervals
        assert screen(app) == paused and app.polls == taken
        await pilot.press("p")
        await polls(pilot, app, 3)
        resumed = screen(app)
        assert resumed != paused and "PAUSED" not in "\n".join(resumed)
        assert figure(resumed, r"generated ([\d,.kM]+) \(") > figure(paused, r"generated ([\d,.kM]+) \(")
        await pilot.press("q")
        await pilot.pause()
        assert not app.is_running and app.return_code == 0


def test_dashboard_heat_map_and_views(srv: Running, load: list[int]) -> None:
    asyncio.run(_dashboard_heat_map_and_views(srv, load))


async def _dashboard_heat_map_and_views(srv: Running, load: list[int]) -> None:
    slots = fetch_stats(srv.url, KEY, heat=False)["cache"]["slots"]
    assert slots == 9
    app = TopApp(srv.url, api_key=KEY, interval=0.2, window=1.0)
    async with app.run_test(size=(80, 24)) as pilot:
        await polls(pilot, app, 1)
        await pilot.press("tab")
        assert app.view == "heat"

        def cells(lines: list[str]) -> list[str]:
            return [line.split()[1:9] for line in lines if re.match(r" L\d ", line)]  # " L0" then 8 cells

        def hot(lines: list[str]) -> bool:
            return any(c in "123456789" for row in cells(lines) for c in row)

        def held(lines: list[str]) -> list[int]:  # what the cache holds, per layer (resident, not being read)
            return [int(m[1]) for line in lines if (m := re.match(r" L\d .* (\d+)/8 ", line))]

        # two readings of the map make recent hits; a reading may catch all nine slots being read (three streams
        # thrash 9 of 32 experts): wait for one with hits and a resident expert
        for _ in range(100):
            await polls(pilot, app, 1)
            lines = screen(app)
            if hot(lines) and sum(held(lines)) > 0:
                break
        assert hot(lines), "\n".join(lines)
        assert "4 layers x 8 experts" in lines[1] and "[heat]" in lines[-1] and "m map: both" in lines[-1]
        assert len(cells(lines)) == 4 and all(len(row) == 8 and len("".join(row)) == 8 for row in cells(lines))
        assert len(held(lines)) == 4 and 0 < sum(held(lines)) <= slots
        assert "hottest experts" in "\n".join(lines) and max(map(len, lines)) <= 80
        # m: hits only, then what is held only
        await pilot.press("m")
        await polls(pilot, app, 1)
        assert "m map: hits" in screen(app)[-1]
        await pilot.press("m")
        await polls(pilot, app, 1)
        for _ in range(100):  # as above: a reading with a resident expert
            lines = screen(app)
            states = [c for row in cells(lines) for c in row]
            assert "m map: held" in lines[-1] and set(states) <= {"o", ".", "~"} and states.count("o") <= slots
            if "o" in states:
                break
            await polls(pilot, app, 1)
        assert "o" in states, "\n".join(lines)
        await pilot.press("3")
        assert "Time to first token" in "\n".join(screen(app)) and "[requests]" in screen(app)[-1]
        await pilot.press("tab")
        assert app.view == "overview" and "Experts" in "\n".join(screen(app))
        await pilot.press("q")
        await pilot.pause()
        assert not app.is_running


def test_unreachable_and_wrong_key_are_status_lines(srv: Running) -> None:
    asyncio.run(_unreachable_and_wrong_key_are_status_lines(srv))


async def _unreachable_and_wrong_key_are_status_lines(srv: Running) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(PollError, match="cannot reach"):
        fetch_stats(dead)
    with pytest.raises(PollError, match="needs an API key"):
        fetch_stats(srv.url)
    with pytest.raises(PollError, match="API key was refused"):
        fetch_stats(srv.url, "wrong")
    for url, key, say in ((dead, None, "cannot reach"), (srv.url, None, "needs an API key"),
                          (srv.url, "wrong", "API key was refused")):
        app = TopApp(url, api_key=key, interval=0.2)
        async with app.run_test(size=(80, 24)) as pilot:
            await polls(pilot, app, 3)  # it keeps trying
            text = "\n".join(screen(app))
            assert say in text and "retrying every 0.2 s" in text and "Traceback" not in text
            assert app.failures >= 3 and app.is_running
            await pilot.press("q")


# ---------------------------------------------------------------------- the command in a terminal
def test_tmux_80x24(srv: Running, load: list[int]) -> None:
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    tmux = ["tmux", "-L", f"mertools-top-test-{os.getpid()}"]  # a server of its own: nobody else's sessions
    name = "top"
    cmd = (f"cd {ROOT} && MERTOOLS_API_KEY={KEY} exec {sys.executable} -m mertools.cli top {srv.url} --interval 0.3")
    try:
        subprocess.run([*tmux, "new-session", "-d", "-s", name, "-x", "80", "-y", "24", cmd], check=True)
        subprocess.run([*tmux, "set-option", "-t", name, "remain-on-exit", "on"], check=True)

        def pane() -> list[str]:
            return subprocess.run([*tmux, "capture-pane", "-p", "-t", name], capture_output=True, text=True,
                                  check=True).stdout.split("\n")

        def ready() -> list[str] | None:
            lines = pane()
            text = "\n".join(lines)
            m, n = re.search(r"generated (\S+) tok/s", text), re.search(r"last (\d+) readings", text)
            return lines if m and m[1] not in ("-", "0.0") and n and int(n[1]) >= 5 else None

        lines = until(ready, "no tokens/s on the dashboard")
        print("\n".join(lines))  # what an 80x24 terminal shows (docs/OPERATIONS.md has a copy)
        text = "\n".join(lines)
        assert MODEL in lines[0] and "q quit" in text and "tab/1-3: [overview] heat requests" in text and "Disk" in text
        assert max(map(len, lines)) <= 80 and len([line for line in lines if line.strip()]) <= 24
        subprocess.run([*tmux, "send-keys", "-t", name, "q"], check=True)

        def dead() -> str | None:
            out = subprocess.run([*tmux, "display-message", "-p", "-t", name,
                                  "#{pane_dead} status=#{pane_dead_status} signal=#{pane_dead_signal}"],
                                 capture_output=True, text=True).stdout.split()
            return " ".join(out[1:]) if out and out[0] == "1" else None

        # ended by itself, not by a signal (tmux does not always have the exit status of a pane that ended: then empty)
        assert until(dead, "q did not end the dashboard", timeout=30) in ("status=0 signal=", "status= signal=")
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)
