"""The textual App of `mertools top`: polls URL/stats every `interval` seconds in a thread (a slow or dead server never
blocks the screen), keeps the readings of the last `window` seconds, and draws one of three views.

Screen, top to bottom (one line each except the view): the title (model, state, uptime, URL), the view (overview,
heat map, requests/latency), the status (polling, paused, or why the last reading failed: retried every interval),
and the keys. Everything is ASCII, so an 80x24 terminal over SSH keeps its alignment.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.widgets import ContentSwitcher, Static

from . import heat as H
from . import views as V
from .poll import History, PollError, Reading, base_url, fetch_stats, figures, recent_heat

VIEWS = ("overview", "heat", "requests")
VIEW_NAMES = {"overview": "overview", "heat": "heat", "requests": "requests"}


class TopApp(App[None]):
    TITLE = "mertools top"
    ENABLE_COMMAND_PALETTE = False
    CSS = """
    #title { height: 1; background: $primary-darken-2; color: $text; text-style: bold; }
    #views { height: 1fr; }
    #views > VerticalScroll { scrollbar-size-vertical: 1; padding: 0 0 0 1; }
    #status { height: auto; max-height: 3; color: $text-muted; }
    #status.error { color: $error; text-style: bold; }
    #status.paused { color: $warning; text-style: bold; }
    #keys { height: 1; background: $primary-darken-3; }
    """
    BINDINGS = [
        Binding("q", "quit", "quit", priority=True),
        Binding("ctrl+c", "quit", "quit", show=False, priority=True),
        Binding("p", "pause", "pause/resume", priority=True),
        Binding("tab", "next_view(1)", "next view", priority=True),
        Binding("shift+tab", "next_view(-1)", "previous view", priority=True),
        Binding("1", "view('overview')", "overview"),
        Binding("2", "view('heat')", "heat map"),
        Binding("3", "view('requests')", "requests"),
        Binding("m", "map_mode", "map: hits/held"),
        Binding("z", "zoom", "map: fit/one row per layer"),
    ]

    def __init__(self, url: str, api_key: str | None = None, interval: float = 1.0, window: float = 5.0) -> None:
        super().__init__()
        self.url, self.api_key, self.interval = base_url(url), api_key, interval
        self.timeout = max(2.0, min(10.0, 5 * interval))
        self.history, self.heat_history = History(max(window, interval)), History(max(window, interval))
        self.gen_history: deque[float] = deque(maxlen=400)
        self.view, self.map_mode, self.zoom = "overview", "both", False
        self.paused = self.inflight = False
        self.generation = 0  # bumped on pause: a reading that lands after it is dropped
        self.error: str | None = None
        self.failures = 0
        self.last_ok: float | None = None  # wall time of the last good reading
        self.polls = 0  # readings taken (good or not), for tests and the status line

    def compose(self) -> ComposeResult:
        yield Static(id="title")
        with ContentSwitcher(initial="overview", id="views"):
            for view in VIEWS:
                with VerticalScroll(id=view):
                    yield Static(id=f"{view}-text")
        yield Static(id="status")
        yield Static(id="keys")

    def on_mount(self) -> None:
        self.draw()
        self.query_one("#overview").focus()
        self.set_interval(self.interval, self.tick)
        self.tick()

    # ------------------------------------------------------------------ polling
    def tick(self) -> None:
        if self.paused or self.inflight:
            return
        self.inflight = True
        args = (self.view == "heat", self.generation)
        threading.Thread(target=self._fetch, args=args, daemon=True, name="mertools-top-poll").start()

    def _fetch(self, heat: bool, generation: int) -> None:
        try:
            result: Reading | PollError = fetch_stats(self.url, self.api_key, heat=heat, timeout=self.timeout)
        except PollError as e:
            result = e
        except Exception as e:  # whatever went wrong, a line on the screen, not a traceback
            result = PollError(f"reading {self.url}/stats failed: {type(e).__name__}: {e}")
        try:
            self.call_from_thread(self.landed, result, generation)
        except Exception:  # the app has ended meanwhile
            pass

    def landed(self, result: Reading | PollError, generation: int) -> None:
        """A reading (or why there is none) arrived in the app's thread."""
        self.inflight = False
        if generation != self.generation or self.paused:
            return  # taken before a pause: the figures stay as they were when it began
        self.polls += 1
        if isinstance(result, PollError):
            self.error, self.failures = str(result), self.failures + 1
            self.draw(views=self.history.latest() is None)
            return
        self.error, self.failures, self.last_ok = None, 0, time.time()
        heat = result.pop("heat", None)
        self.history.add(result)
        if heat is not None:
            self.heat_history.add({"time": result["time"], "heat": heat})
        f = figures(result, self.history.base())
        if f.gen_tps is not None:
            self.gen_history.append(f.gen_tps)
        self.draw()

    # ------------------------------------------------------------------ drawing
    def draw(self, views: bool = True) -> None:
        width = max(20, self.size.width)
        reading = self.history.latest()
        title = Text(no_wrap=True, overflow="crop")
        title.append(" mertools top  ")
        if reading is not None:
            f = figures(reading)
            title.append(f"{f.model}  {f.state}  up {V.uptime(f.uptime_s)}  ")
        title.append(self.url, "")
        title.truncate(width)
        self.query_one("#title", Static).update(title)
        self.draw_status()
        self.draw_keys()
        if views:
            self.draw_view()

    def draw_status(self) -> None:
        status = self.query_one("#status", Static)
        status.set_class(bool(self.error) and not self.paused, "error")
        status.set_class(self.paused, "paused")
        stamp = time.strftime("%H:%M:%S", time.localtime(self.last_ok)) if self.last_ok else None
        if self.paused:
            line = f"PAUSED (p resumes): figures as read at {stamp or '-'}"
        elif self.error:
            line = f"{self.error}; retrying every {self.interval:g} s ({self.failures} failed" + (
                f", last good reading {stamp})" if stamp else ")")
        elif self.history.latest() is None:
            line = f"connecting to {self.url} ..."
        else:
            base = self.history.base()
            span = self.history.latest()["time"] - base["time"] if base else 0.0
            line = (f"read every {self.interval:g} s, last at {stamp}; recent = the last {span:.1f} s" if base else
                    f"read at {stamp}; rates after the next reading")
        status.update(Text(line))

    def draw_keys(self) -> None:
        keys = Text(no_wrap=True, overflow="crop")
        keys.append(" q", "bold")
        keys.append(" quit  ")
        keys.append("p", "bold")
        keys.append(" resume  " if self.paused else " pause  ")
        keys.append("tab/1-3", "bold")
        keys.append(":")
        for view in VIEWS:
            keys.append(" ")
            keys.append(f"[{VIEW_NAMES[view]}]" if view == self.view else VIEW_NAMES[view],
                        "bold reverse" if view == self.view else "")
        if self.view == "heat":
            keys.append("  m", "bold")
            keys.append(f" map: {self.map_mode}  ")
            keys.append("z", "bold")
            keys.append(" zoom" if not self.zoom else " fit")
        keys.truncate(max(20, self.size.width))
        self.query_one("#keys", Static).update(keys)

    def draw_view(self) -> None:
        box = self.query_one(f"#{self.view}", VerticalScroll)
        width = max(20, box.size.width - 2)  # the left padding and the scroll bar
        target = self.query_one(f"#{self.view}-text", Static)
        reading = self.history.latest()
        if reading is None:
            target.update(Text(f"waiting for the first reading of {self.url}/stats\n\n{self.error or ''}",
                               "bold red" if self.error else ""))
            return
        f = figures(reading, self.history.base())
        if self.view == "overview":
            target.update(V.overview(f, self.gen_history, width))
        elif self.view == "requests":
            target.update(V.requests(f, width, box.size.height))
        else:
            target.update(self.heat_text(width, box.size.height))

    def heat_text(self, width: int, height: int) -> Text:
        latest = self.heat_history.latest()
        if latest is None:
            engine = figures(self.history.latest()).has_engine if self.history.latest() else False
            return Text("reading the map..." if engine else "no map yet: the server has no engine up")
        hits, lookups = recent_heat(latest, self.heat_history.base())
        state = latest["heat"]["state"]
        return H.render(state, hits, lookups, width, None if self.zoom else height, self.map_mode).text

    def on_resize(self) -> None:
        self.call_after_refresh(self.draw)

    # ------------------------------------------------------------------ keys
    def action_pause(self) -> None:
        self.paused = not self.paused
        self.generation += 1
        if not self.paused:  # the readings before the pause would average the rates over it
            self.history.clear()
            self.heat_history.clear()
            self.tick()
        self.draw(views=False)

    def action_next_view(self, step: int) -> None:
        self.action_view(VIEWS[(VIEWS.index(self.view) + step) % len(VIEWS)])

    def action_view(self, view: str) -> None:
        if view == self.view:
            return
        if self.view == "heat":  # the map is read only while it shows: its next base must be a fresh one
            self.heat_history.clear()
        self.view = view
        self.query_one(ContentSwitcher).current = view
        self.query_one(f"#{view}").focus()
        self.draw_keys()
        self.call_after_refresh(self.draw_view)
        if view == "heat":
            self.tick()

    def action_map_mode(self) -> None:
        self.map_mode = H.MODES[(H.MODES.index(self.map_mode) + 1) % len(H.MODES)]
        self.draw_keys()
        if self.view == "heat":
            self.draw_view()

    def action_zoom(self) -> None:
        self.zoom = not self.zoom
        self.draw_keys()
        if self.view == "heat":
            self.draw_view()
