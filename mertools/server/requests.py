"""What the scheduler takes and gives: a generation's request, its events, its handle, and the refusals.

Free of the engine and of HTTP: the app builds GenerationRequests and reads Events; the scheduler runs them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..runtime.sampling import SamplingParams

log = logging.getLogger("mertools.server")


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: tuple[int, ...]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    skip_special: bool = True  # special tokens (<s>, </s>...) add no text, as OpenAI-style servers do


@dataclass(frozen=True)
class Event:
    """New text of one generation; the last event has `finish_reason` and the token counts."""

    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "error"
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class QueueFull(Exception):
    """More waiting requests than the queue takes: the client should retry later (HTTP 429)."""


class NotReady(Exception):
    """The engine is still loading, failed to load, or the scheduler is shutting down (HTTP 503)."""


class Handle:
    """One submitted generation. `cancel()` (any thread) makes the scheduler drop it at the next
    token boundary; no more events are sent after that."""

    def __init__(self, request: GenerationRequest, on_event: Callable[[Event], None], max_tokens: int,
                 engine: Any = None) -> None:  # noqa: ANN401 - an Engine
        self.request = request
        self.engine = engine  # the engine whose tokenizer read the prompt (a reload may bring another); None: any
        self.max_tokens = max_tokens  # the request's, clamped to the room its prompt leaves in the context
        self._on_event = on_event
        self._cancelled = threading.Event()
        self.submitted = time.perf_counter()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def emit(self, event: Event) -> None:
        try:
            self._on_event(event)
        except Exception:  # the consumer is gone (closed event loop...): stop generating for it
            log.debug("event consumer failed; cancelling", exc_info=True)
            self.cancel()
