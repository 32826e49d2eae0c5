"""Reloading `mertools serve --config FILE` while it serves: on SIGHUP (or, with `--watch-config`, when the file's
content changes) the file is read again and what changed is applied without dropping a request or a stream.

In a thread of its own: a new layout is opened and warmed up here while the old one serves, then handed to the
scheduler, which switches once the old engine's requests have ended; a cache budget or prefetcher change runs in the
scheduler's thread at a token boundary (the engine is not thread-safe); limits, API keys, the model name and request
defaults replace the live settings at once (the next request sees them). A file that does not parse or check, or
a layout or budget the engine refuses, changes nothing: the running settings stay and one line says why.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

from .config import RELOADABLE, ServerConfig, read_settings, with_file

log = logging.getLogger("mertools.server")
RESIZE_TIMEOUT = 120.0  # seconds to wait for a token boundary (a long prompt chunk on a big model)


@dataclass(frozen=True)
class ReloadOutcome:
    at: float  # time.time()
    ok: bool
    changed: tuple[str, ...]  # ServerConfig fields now in force with new values
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"at": self.at, "ok": self.ok, "changed": list(self.changed), "message": self.message}


class Live:
    """The settings in force (replaced whole, so a request reads one consistent set) and what the reloads did."""

    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        self.reloads = 0  # reloads applied
        self.failed = 0  # reloads refused (the settings stayed)
        self.last: ReloadOutcome | None = None
        self.pending: str | None = None  # a layout opened or waiting for the old one's requests to end

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.cfg.config_file, "reloads": self.reloads, "failed": self.failed,
                "last": self.last.to_dict() if self.last else None, "pending": self.pending}


def kernels_thread_safe() -> bool:
    """Whether numba's threading layer (known once a parallel kernel has run) takes parallel regions from two
    threads at once."""
    import numba

    try:
        return numba.threading_layer() in ("omp", "tbb")
    except ValueError:  # no parallel kernel has run yet
        return False


def set_log_level(level: str) -> None:
    for name in ("mertools", "uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).setLevel(level.upper())


class Reloader:
    """`request()` (from a signal handler too: it only sets an event) asks for a reload; the thread does it."""

    def __init__(self, base: ServerConfig, live: Live, scheduler: Any,  # noqa: ANN401 - the app's Scheduler
                 open_engine: Callable[[ServerConfig], tuple[Any, Any]]) -> None:
        if base.config_file is None:
            raise ValueError("a Reloader needs a config file")
        self.base, self.live, self.scheduler, self.open_engine = base, live, scheduler, open_engine
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._seen = self._digest()
        self._thread = threading.Thread(target=self._main, name="mertools-reload", daemon=True)

    def start(self) -> Reloader:
        self._thread.start()
        return self

    def request(self) -> None:
        self._wake.set()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)

    def _digest(self) -> bytes | None:
        try:
            with open(self.base.config_file, "rb") as f:  # type: ignore[arg-type]
                return hashlib.sha256(f.read()).digest()
        except OSError:
            return None

    def _main(self) -> None:
        poll = self.base.watch_config or None
        while not self._stop.is_set():
            woke = self._wake.wait(poll)
            if self._stop.is_set():
                return
            self._wake.clear()
            digest = self._digest()
            if woke or (digest is not None and digest != self._seen):
                self._seen = digest
                try:
                    self.reload()
                except Exception:  # a bug here must not end reloading
                    log.exception("reload failed")

    # ------------------------------------------------------------------ one reload
    def reload(self) -> ReloadOutcome:
        """Read the file and apply it; the outcome is also kept in `live.last` and logged."""
        path, cur = self.base.config_file, self.live.cfg
        try:
            new = with_file(self.base, read_settings(path))  # type: ignore[arg-type]
        except ValueError as e:
            return self._refused(str(e))
        changed = [f.name for f in fields(ServerConfig) if getattr(new, f.name) != getattr(cur, f.name)]
        later = [f for f in changed if f not in RELOADABLE]
        if later:  # kept as they are: the process was built with them
            log.warning("%s: %s changed; applied at the next start", path, ", ".join(later))
            new = replace(new, **{f: getattr(cur, f) for f in later})
            changed = [f for f in changed if f in RELOADABLE]
        if "layout" in changed:
            self.live.pending = new.layout
            try:
                engine, draft = self._open(new)
            except Exception as e:
                self.live.pending = None
                return self._refused(f"{path}: layout: cannot load {new.layout}: {e}")
            done = self.scheduler.switch(engine, draft)
            self.live.cfg = new  # requests read from now on are the new layout's: they wait for the switch
            return self._applied(new, changed, f"loading {new.layout}, switching when running requests end",
                                 switch=done)
        try:
            if "cache_mb" in changed:
                slots = self.scheduler.call(lambda e: e.resize_cache(new.cache_mb)).result(RESIZE_TIMEOUT)
                log.info("expert cache: %d slots", slots)
            if "prefetch" in changed:
                self.scheduler.call(lambda e: e.model.set_prefetch(new.prefetch)).result(RESIZE_TIMEOUT)
        except Exception as e:  # refused by the engine (a budget below one layer's experts...): nothing else changes
            return self._refused(f"{path}: {'cache_mb' if 'cache_mb' in changed else 'prefetch'}: {e}")
        return self._applied(new, changed, "applied")

    def _open(self, new: ServerConfig) -> tuple[Any, Any]:
        """The new layout's engine: opened here, beside the serving one, where numba's threading layer lets two
        threads run parallel kernels at once (OpenMP, TBB); else in the scheduler's thread, between steps (its
        workqueue layer aborts the process on concurrent parallel regions): serving then pauses while it loads."""
        if kernels_thread_safe():
            return self.open_engine(new)
        return self.scheduler.call(lambda _: self.open_engine(new)).result()

    def _applied(self, new: ServerConfig, changed: list[str], message: str, switch: Any = None) -> ReloadOutcome:  # noqa: ANN401
        self.scheduler.configure(new.max_concurrency, new.max_queue, new.prefill_chunk)
        set_log_level(new.log_level)
        self.live.cfg = new
        self.live.reloads += 1
        out = ReloadOutcome(time.time(), True, tuple(changed), message)
        self.live.last = out
        log.info("%s: reloaded (%s): %s", new.config_file, ", ".join(changed) or "nothing changed", message)
        if switch is not None:
            def switched(fut: Any) -> None:  # noqa: ANN401 - a Future; called in the scheduler's thread
                self.live.pending = None
                if fut.exception() is None:
                    log.info("%s: now serving %s", new.config_file, new.layout)
                    if new.cache_mb is None:  # opened beside the old engine: grow into the memory it gave back
                        self.scheduler.call(lambda e: e.resize_cache(None))
            switch.add_done_callback(switched)
        return out

    def _refused(self, message: str) -> ReloadOutcome:
        self.live.failed += 1
        out = ReloadOutcome(time.time(), False, (), message)
        self.live.last = out
        log.error("reload refused, running settings kept: %s", message)
        return out
