"""The web page `mertools serve` shows at `/` (mertools/server/ui): its routes over HTTP, and the page itself driven in
a real browser — headless Chromium through Selenium — against a live server on the trained fixture in q4_0 with a
1 MiB expert cache (9 of its 32 experts), so experts really stream while the page watches.

The browser tests are skipped, with one line saying why, where Chromium, its driver or Selenium is missing
(`make test-ui` installs them and runs this module). Set MERTOOLS_UI_SCREENSHOT=PATH to keep the screenshot taken
while a reply streams (the README's picture).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_server import Running  # tests/ is on sys.path (pytest's rootdir-relative import)

from mertools.server.app import ServerConfig, create_app
from mertools.server.config import read_settings, with_file
from mertools.server.ui import FILES, STATIC
from mertools.top import poll

ROOT = Path(__file__).resolve().parent.parent
TRAINED = ROOT / "fixtures" / "trained" / "tiny-shakespeare-moe"
KEY = "sk-ui-test"
MODEL = "shakespeare-q4"


def until(check: Callable[[], Any], what: str, timeout: float = 30.0, every: float = 0.05) -> Any:  # noqa: ANN401
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s: {what}")
        time.sleep(every)


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mertools.convert.pipeline import ConvertOptions, convert

    return convert(TRAINED, tmp_path_factory.mktemp("ui") / MODEL, ConvertOptions(dtype="q4_0", progress=False)).out


@pytest.fixture(scope="module")
def srv(layout: Path) -> Iterator[Running]:
    r = Running(create_app(ServerConfig(str(layout), api_key=KEY, cache_mb=1, threads=1)))
    try:
        r.wait_healthy(120)
        # the first request compiles (or loads) numba's kernels: before the page watches anything
        httpx.post(r.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=600,
                   json={"model": MODEL, "prompt": "ROMEO:", "max_tokens": 4, "temperature": 0}).raise_for_status()
        yield r
    finally:
        r.stop()


# ---------------------------------------------------------------------- the routes, no browser
def test_page_and_files_need_no_key_and_stay_on_this_origin(srv: Running) -> None:
    page = httpx.get(srv.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and page.headers["x-content-type-options"] == "nosniff"
    for src in re.findall(r'(?:src|href)="([^"]+)"', page.text):  # every file the page loads is one of ours
        assert src.startswith("/ui/") and src[4:] in FILES, src
    for name, kind in FILES.items():
        r = httpx.get(srv.url + "/ui/" + name)
        assert r.status_code == 200 and r.headers["content-type"] == kind and r.content == (STATIC / name).read_bytes()
        # offline: nothing refers to another origin (the SVG's namespace is a name, not a fetch)
        text = r.text.replace('xmlns="http://www.w3.org/2000/svg"', "")
        assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", text, re.I), name
    # modules import each other by relative path: every import names a shipped file
    for name in (n for n in FILES if n.endswith(".js")):
        for target in re.findall(r'from "\./([^"]+)"', (STATIC / name).read_text()):
            assert target in FILES, f"{name} imports {target}"
    assert sorted(p.name for p in STATIC.iterdir()) == sorted(FILES)  # nothing shipped that is not served
    for path in ("/ui/missing.js", "/ui/..%2Fapp.py", "/ui/..%2F__init__.py"):
        assert httpx.get(srv.url + path).status_code == 404, path
    assert httpx.get(srv.url + "/ui/../__init__.py").status_code == 401  # the client makes it /__init__.py: no page
    # the data stays behind the key
    assert httpx.get(srv.url + "/stats").status_code == 401 and httpx.get(srv.url + "/v1/models").status_code == 401


def test_no_ui_and_the_settings_key(layout: Path, tmp_path: Path) -> None:
    r = Running(create_app(ServerConfig(str(layout), ui=False, cache_mb=1), load=lambda: None))
    try:
        assert httpx.get(r.url + "/").status_code == 404 and httpx.get(r.url + "/ui/app.js").status_code == 404
    finally:
        r.stop()
    f = tmp_path / "s.toml"
    f.write_text("ui = false\n")
    assert read_settings(f) == {"ui": False}
    f.write_text('ui = "no"\n')
    with pytest.raises(ValueError, match=r"s\.toml: ui: must be true or false, not 'no'"):
        read_settings(f)


# ---------------------------------------------------------------------- in a browser
def _browser() -> tuple[str, str] | str:
    """(chromium, chromedriver) paths, or why the browser tests cannot run."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium, or `make test-ui`)"
    chromium = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        return "headless Chromium not found (apt install chromium chromium-driver, or `make test-ui`)"
    return chromium, driver


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    found = _browser()
    if isinstance(found, str):
        pytest.skip(found)
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = found[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,860",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium')}", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(found[1]), options=options)  # the system's driver: nothing downloaded
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def by_id(driver: Any, element_id: str) -> Any:  # noqa: ANN401
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def last_reply(driver: Any) -> Any:  # noqa: ANN401
    from selenium.webdriver.common.by import By

    replies = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")
    return replies[-1] if replies else None


def fill(driver: Any, element_id: str, value: str) -> None:
    el = by_id(driver, element_id)
    el.clear()
    el.send_keys(value)


def connected(driver: Any, srv: Running) -> None:
    """The page open on `srv` with the key (a test run alone, e.g. with -k, starts here)."""
    if not driver.current_url.startswith(srv.url) or by_id(driver, "model").text != MODEL:
        driver.get(srv.url + "/")
        driver.execute_script("localStorage.setItem('mertools.apiKey', arguments[0])", KEY)
        driver.refresh()
    until(lambda: by_id(driver, "model").text == MODEL, "the page connected")
    until(lambda: by_id(driver, "requests").text == "0 / 0", "the live panel's first reading")


def js_errors(driver: Any) -> list[str]:
    """The console's errors that are not a refused request (those the page answers in words)."""
    return [e["message"] for e in driver.get_log("browser")
            if e["level"] == "SEVERE" and "Failed to load resource" not in e["message"]]


def test_the_page_asks_for_the_key_once_and_explains_refusals(srv: Running, browser: Any) -> None:
    d = browser
    d.get(srv.url + "/")
    until(lambda: by_id(d, "key-dialog").get_attribute("open") is not None, "the key dialog to open")
    assert "needs an API key" in by_id(d, "key-message").text and "needs an API key" in by_id(d, "banner").text
    assert by_id(d, "status").text == "ready"  # /health answers without a key
    # a key that cannot be an HTTP header: said so in the dialog, nothing sent
    fill(d, "key-input", "sk bad key")
    by_id(d, "key-save").click()
    assert until(lambda: by_id(d, "key-error").text, "the malformed key's message") == \
        "an API key is printable ASCII without spaces or line breaks"
    assert by_id(d, "key-dialog").get_attribute("open") is not None
    # a well-formed wrong key: the server's refusal, in words, and the dialog again
    fill(d, "key-input", "sk-wrong")
    by_id(d, "key-save").click()
    until(lambda: "refused this API key" in by_id(d, "key-message").text, "the refusal in the dialog")
    assert by_id(d, "key-dialog").get_attribute("open") is not None and by_id(d, "model").text == "…"
    fill(d, "key-input", KEY)
    by_id(d, "key-save").click()
    until(lambda: by_id(d, "model").text == MODEL, "the model's name")
    until(lambda: by_id(d, "requests").text == "0 / 0", "the live panel's first reading")
    assert by_id(d, "key-dialog").get_attribute("open") is None and not by_id(d, "banner").is_displayed()
    assert d.execute_script("return localStorage.getItem('mertools.apiKey')") == KEY
    # a reload remembers the key: asked once
    d.refresh()
    until(lambda: by_id(d, "model").text == MODEL, "the model's name after a reload")
    assert by_id(d, "key-dialog").get_attribute("open") is None
    # offline: everything the page loaded came from this server
    loaded = d.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert loaded and all(u.startswith(srv.url + "/") for u in loaded), loaded
    assert js_errors(d) == []


def test_a_reply_streams_while_the_experts_and_counters_move(srv: Running, browser: Any, tmp_path: Path) -> None:
    d = browser
    connected(d, srv)
    generated_before = int(by_id(d, "totals").text.split(" / ")[0])
    fill(d, "temperature", "0")
    fill(d, "max-tokens", "220")
    fill(d, "prompt", "Tell me of the king.")
    by_id(d, "send").click()
    reply = until(lambda: last_reply(d), "the reply's bubble")
    lengths, heat, running, counters, shot = set(), set(), set(), set(), None
    saw_used, disk_moved, spark = False, False, 0.0
    while reply.get_attribute("data-state") == "streaming":
        text = reply.find_element("css selector", ".text").get_property("textContent")
        lengths.add(len(text))
        canvas = by_id(d, "heatmap")
        heat.add(canvas.get_attribute("data-hit") + "/" + canvas.get_attribute("data-missed") + "/"
                 + canvas.get_attribute("data-resident") + "/" + canvas.get_attribute("data-loading"))
        saw_used |= int(canvas.get_attribute("data-hit") or 0) + int(canvas.get_attribute("data-missed") or 0) > 0
        running.add(by_id(d, "requests").text)
        counters.add(by_id(d, "totals").text)
        disk_moved |= by_id(d, "disk").text not in ("–", "0.0")
        spark = max(spark, float(by_id(d, "sparkline").get_attribute("data-last") or 0))
        if shot is None and len(text) > 150:  # mid-reply: the picture shows tokens and the map moving together
            shot = tmp_path / "ui.png"
            d.save_screenshot(str(shot))
        time.sleep(0.05)
    assert reply.get_attribute("data-state") == "done", reply.text
    assert reply.get_attribute("data-finish") in ("length", "stop")
    assert len({n for n in lengths if n > 0}) >= 3, f"the text did not stream in: lengths seen {sorted(lengths)}"
    assert len(heat) >= 2 and saw_used, f"the heat map did not change: {heat}"
    assert "1 / 0" in running, running  # the request was seen running
    assert len(counters) >= 2 and disk_moved, (counters, disk_moved)
    # the streamed reply is the server's own greedy answer to the same conversation, token for token
    content = reply.find_element("css selector", ".text").get_property("textContent")
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me of the king."}], "temperature": 0,
            "top_p": 1, "max_tokens": 220}
    answer = httpx.post(srv.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                        timeout=120).json()
    assert content == answer["choices"][0]["message"]["content"] and content
    meta = reply.find_element("css selector", ".meta").text
    assert re.match(rf"{answer['usage']['completion_tokens']} tokens in \d+\.\d\d s · first after", meta), meta
    until(lambda: int(by_id(d, "totals").text.split(" / ")[0]) >= generated_before + 2 * answer["usage"]["completion_tokens"],
          "the generated-token counter to count both replies")
    until(lambda: by_id(d, "tok-s").text not in ("–", "0.0"), "tokens/s")
    assert by_id(d, "hit-rate").text.endswith("%") and by_id(d, "ttft").text != "–"
    assert spark > 0  # the sparkline's last second drew tokens while the reply streamed
    # the screenshot: a real picture, not a blank page
    assert shot is not None and shot.stat().st_size > 20_000
    from matplotlib.image import imread

    pixels = imread(shot)
    colours = {tuple(p) for p in pixels[::7, ::7].reshape(-1, pixels.shape[2])}
    assert pixels.shape[0] >= 600 and pixels.shape[1] >= 1200 and len(colours) > 50
    if os.environ.get("MERTOOLS_UI_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["MERTOOLS_UI_SCREENSHOT"])
    assert js_errors(d) == []


def test_stop_and_errors_in_words(srv: Running, browser: Any) -> None:
    d = browser
    connected(d, srv)
    by_id(d, "clear").click()
    # a value the form refuses before anything is sent
    fill(d, "temperature", "3")
    fill(d, "prompt", "ROMEO:")
    by_id(d, "send").click()
    reply = until(lambda: last_reply(d), "the error bubble")
    assert reply.get_attribute("data-state") == "error" and "temperature must be a number from 0 to 2" in reply.text
    # a request the server refuses: its own message
    fill(d, "temperature", "0.8")
    fill(d, "max-tokens", "100000")
    by_id(d, "send").click()
    until(lambda: "exceeds the model's context length" in (last_reply(d).text or ""), "the server's refusal")
    assert last_reply(d).get_attribute("data-state") == "error" and "HTTP 400" in last_reply(d).text
    assert by_id(d, "prompt").get_property("value") == ""  # the question was sent; it stays in the transcript
    # Stop: the generation ends on the server too
    fill(d, "max-tokens", "400")
    fill(d, "prompt", "JULIET:")
    by_id(d, "send").click()
    until(lambda: int(last_reply(d).get_attribute("data-pieces") or 0) >= 5, "the first pieces")
    by_id(d, "stop").click()
    until(lambda: last_reply(d).get_attribute("data-state") == "stopped", "the reply to stop")
    assert "stopped by you" in last_reply(d).text
    until(lambda: poll.fetch_stats(srv.url, KEY, heat=False)["requests"]["running"] == 0, "the server to end it")
    assert js_errors(d) == []


def test_the_page_and_poll_py_compute_the_same_figures(srv: Running, browser: Any) -> None:
    """rates.js mirrors mertools/top/poll.py: the same inputs, the same answers."""
    d = browser
    connected(d, srv)
    cum = [[0.01, 3], [0.1, 10], [1.0, 12], ["+Inf", 12]]
    older = [[0.01, 1], [0.1, 4], [1.0, 4], ["+Inf", 4]]
    got = d.execute_async_script("""
        const done = arguments[arguments.length - 1];
        import('/ui/rates.js').then((R) => {
          const cum = arguments[0], older = arguments[1];
          const q = [0.5, 0.95].map((p) => R.quantile(R.bucketDelta(R.buckets({buckets: cum}), R.buckets({buckets: older})), p));
          done({q, deltas: [R.delta(5, 7), R.delta(7, 5), R.delta(3, null), R.delta(null, 3)],
                grid: R.gridDelta([[5, 1], [0, 9]], [[3, 4], [0, 2]]),
                spark: R.perSecond([{time: 0, tokens: {generated: 0}}, {time: 2, tokens: {generated: 10}},
                                    {time: 3, tokens: {generated: 4}}], 3)});
        }).catch((e) => done({error: String(e)}));
    """, cum, older)
    assert "error" not in got, got
    py_cum = [(math.inf if b == "+Inf" else b, c) for b, c in cum]
    py_old = [(math.inf if b == "+Inf" else b, c) for b, c in older]
    want = [poll.quantile(poll.bucket_delta(py_cum, py_old), p) for p in (0.5, 0.95)]
    assert got["q"] == pytest.approx(want)
    assert got["deltas"] == [poll.delta(5, 7), poll.delta(7, 5), poll.delta(3, None), poll.delta(None, 3)]
    assert got["grid"] == poll.grid_delta([[5, 1], [0, 9]], [[3, 4], [0, 2]])
    assert got["spark"] == pytest.approx([5, 5, 4])  # 10 tokens over 2 s, then a restart counting 4 in the last


def test_loading_then_a_server_that_went_away_are_said_so(layout: Path, browser: Any) -> None:
    import threading

    from mertools.server.app import open_engine

    d = browser
    go = threading.Event()
    cfg = ServerConfig(str(layout), cache_mb=1, threads=1)  # no key this time

    def load() -> Any:  # noqa: ANN401 - the engine, once the test has seen the page wait for it
        go.wait(60)
        return open_engine(cfg)

    r = Running(create_app(cfg, load=load))
    try:
        d.get(r.url + "/")
        until(lambda: by_id(d, "status").text == "loading the model…", "the loading state")
        assert by_id(d, "model").text == "…"
        go.set()
        until(lambda: by_id(d, "model").text == MODEL, "the model's name once loaded", timeout=120)
        assert by_id(d, "status").text == "ready" and by_id(d, "key-dialog").get_attribute("open") is None
    finally:
        go.set()
        r.stop()
    fill(d, "prompt", "ROMEO:")
    by_id(d, "send").click()
    until(lambda: "cannot reach the server" in (last_reply(d).text or ""), "the unreachable server in words")
    until(lambda: "cannot reach the server" in by_id(d, "live-note").text, "the live panel's note")


def test_a_model_renamed_by_a_reload_is_picked_up(layout: Path, browser: Any, tmp_path: Path) -> None:
    """A reload (issue 20) renames the model: the next message is refused by its old name, in words, and the page
    takes the new name, so sending again works."""
    d = browser
    settings = tmp_path / "settings.toml"
    settings.write_text('model_name = "first"\n')
    base = ServerConfig(str(layout), cache_mb=1, threads=1, config_file=str(settings))
    r = Running(create_app(with_file(base, read_settings(settings)), base=base))
    try:
        r.wait_healthy(120)
        d.get(r.url + "/")
        until(lambda: by_id(d, "model").text == "first", "the first name")
        settings.write_text('model_name = "second"\n')
        r.app.state.reloader.request()
        until(lambda: httpx.get(r.url + "/v1/models").json()["data"][0]["id"] == "second", "the reload")
        fill(d, "max-tokens", "8")
        fill(d, "prompt", "ROMEO:")
        by_id(d, "send").click()
        until(lambda: last_reply(d).get_attribute("data-state") == "error", "the refusal")
        assert "`first` does not exist" in last_reply(d).text and 'now serves "second": send again' in last_reply(d).text
        assert by_id(d, "model").text == "second"
        fill(d, "prompt", "ROMEO:")
        by_id(d, "send").click()
        until(lambda: last_reply(d).get_attribute("data-state") == "done", "the reply under the new name")
    finally:
        r.stop()
