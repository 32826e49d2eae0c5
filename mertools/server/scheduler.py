"""Continuous batching over `Engine.step`, in one thread, free of HTTP.

Requests wait in a bounded queue and join the running batch (at most `max_running` sequences) at a
token boundary; each iteration makes ONE `engine.step` over every running sequence: one token for
each decoding sequence, and a prompt chunk (`prefill_chunk` tokens) for each sequence still reading
its prompt, so a long prompt never stalls the others for more than one chunk's worth of compute.
A sequence leaves the batch as soon as it ends (EOS, a stop string, max_tokens, the context, or its
consumer cancelled it), freeing its slot for the next waiting request.

Chunk boundaries depend only on the prompt (every chunk but the last is `prefill_chunk` long,
whatever else is running), so a request's arithmetic never depends on its neighbours' prompts
beyond what the batched kernels themselves do.

The engine is loaded by this thread too: it is not thread-safe, so every call into it is made here.
Results go out through per-request callbacks (`on_event`), called from this thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from ..runtime.sampling import Sampler
from ..runtime.speculative import AdaptiveK, Draft, Drafter, settle
from ..runtime.text import GenerationText, check_prompt
from .metrics import ServerMetrics
from .requests import Event, GenerationRequest, Handle, NotReady, QueueFull

__all__ = ["Event", "GenerationRequest", "Handle", "NotReady", "QueueFull", "Scheduler"]

log = logging.getLogger("mertools.server")


@dataclass
class _Seq:
    handle: Handle
    kv: Any
    sampler: Sampler
    text: GenerationText
    fed: int = 0  # prompt tokens already in the KV cache
    last_id: int = -1
    last_time: float = 0.0
    tokens: list[int] = field(default_factory=list)  # generated so far (the n-gram drafter looks them up)
    adapt: AdaptiveK | None = None  # how many tokens to draft next (with a drafter)
    drafter: Drafter | None = None  # the scheduler's drafter for this sequence (a draft model's KV cache of its own)

    @property
    def prompt(self) -> tuple[int, ...]:
        return self.handle.request.prompt_ids

    @property
    def generated(self) -> int:
        return self.text.generated


HISTORY_EVERY = 300.0  # seconds between writes of the routing history (--history), besides the one at shutdown


class Scheduler:
    def __init__(self, load: Callable[[], Any], *, max_running: int = 8, max_waiting: int = 64,
                 prefill_chunk: int = 64, step_token_budget: int = 512, metrics: ServerMetrics | None = None,
                 on_load_error: Callable[[str], None] | None = None, draft: str | None = None,
                 draft_tokens: int = 4) -> None:
        if max_running < 1 or max_waiting < 0 or prefill_chunk < 1 or draft_tokens < 1:
            raise ValueError("max_running, prefill_chunk and draft_tokens must be >= 1, max_waiting >= 0")
        self._load = load
        # speculative decoding: "ngram", "mtp" or a draft layout, opened with the engine (engine.open_drafter) in this
        # scheduler's thread; each sequence drafts through its own `for_sequence()` view, told its rows' states
        self.draft_spec, self.draft_tokens = draft, draft_tokens
        self.draft: Drafter | None = None
        self.max_running, self.max_waiting = max_running, max_waiting
        self.prefill_chunk, self.step_token_budget = prefill_chunk, max(step_token_budget, prefill_chunk)
        self.metrics = metrics
        self._on_load_error = on_load_error
        self.engine: Any = None
        self.load_error: str | None = None
        self._state = "loading"
        self._ready = threading.Event()
        self._cond = threading.Condition()
        self._waiting: deque[Handle] = deque()
        self._running: list[_Seq] = []
        self._closing = False
        self._tasks: deque[tuple[Callable[[Any], Any], Future[Any]]] = deque()  # run in this thread between steps
        # a reloaded layout's engine and drafter, waiting for the old engine's requests to end (`switch`)
        self._next: tuple[Any, Drafter | None, Future[None]] | None = None
        self._thread = threading.Thread(target=self._main, name="mertools-scheduler", daemon=True)

    # ------------------------------------------------------------------ any thread
    def start(self) -> Scheduler:
        self._thread.start()
        return self

    @property
    def state(self) -> str:
        """loading, ready, failed or stopped."""
        return self._state

    def wait_ready(self, timeout: float | None = None) -> bool:
        self._ready.wait(timeout)
        return self._state == "ready"

    @property
    def admission_engine(self) -> Any:  # noqa: ANN401 - an Engine
        """The engine a request read now will run on: the reloaded one once a switch is pending."""
        nxt = self._next
        return nxt[0] if nxt is not None else self.engine

    def configure(self, max_running: int, max_waiting: int, prefill_chunk: int) -> None:
        """New limits (a reload), in force from the next token boundary; sequences beyond a smaller batch finish
        where they are, none is dropped."""
        if max_running < 1 or max_waiting < 0 or prefill_chunk < 1:
            raise ValueError("max_running and prefill_chunk must be >= 1, max_waiting >= 0")
        with self._cond:
            self.max_running, self.max_waiting = max_running, max_waiting
            self.prefill_chunk, self.step_token_budget = prefill_chunk, max(self.step_token_budget, prefill_chunk)
            self._cond.notify()

    def call(self, fn: Callable[[Any], Any]) -> Future[Any]:
        """Run fn(engine) in the scheduler's thread at the next token boundary (the engine is not thread-safe):
        a cache resize, a new prefetcher. The future holds its result or exception."""
        fut: Future[Any] = Future()
        with self._cond:
            if self._closing or self._state != "ready":
                fut.set_exception(NotReady(f"the model is {self._state}"))
                return fut
            self._tasks.append((fn, fut))
            self._cond.notify()
        return fut

    def switch(self, engine: Any, draft: Drafter | None) -> Future[None]:  # noqa: ANN401 - an Engine
        """Serve `engine` (a reloaded layout, opened and warmed up by the caller) once the requests already given to
        the current one have ended; requests read from now on wait for it. The old engine is closed then. A switch
        still pending is superseded (its engine closed, its future failed)."""
        fut: Future[None] = Future()
        with self._cond:
            if self._closing or self._state != "ready":
                fut.set_exception(NotReady(f"the model is {self._state}"))
                return fut
            old, self._next = self._next, (engine, draft, fut)
            self._cond.notify()
        if old is not None:
            self._close_engine(old[0], old[1])
            old[2].set_exception(RuntimeError("superseded by a later reload"))
        return fut

    @property
    def n_running(self) -> int:
        return len(self._running)

    @property
    def n_waiting(self) -> int:
        return len(self._waiting)

    def submit(self, requests: Sequence[GenerationRequest], on_event: Sequence[Callable[[Event], None]],
               engine: Any = None) -> list[Handle]:  # noqa: ANN401 - an Engine
        """Queue generations (all or none) for `engine`, the one whose tokenizer read the prompts (default: the
        admission engine). Raises NotReady (also when a reload replaced that engine meanwhile), QueueFull, or
        PromptError (a ValueError) for a request the engine cannot run: the checks of runtime.text, which the app
        runs first to answer with OpenAI's error codes."""
        if self._state != "ready":
            raise NotReady(self.load_error or f"the model is {self._state}")
        engine = self.admission_engine if engine is None else engine
        cfg = engine.config
        handles = [Handle(r, cb, check_prompt(r.prompt_ids, cfg.vocab_size, cfg.context_length, r.max_tokens)[1], engine)
                   for r, cb in zip(requests, on_event, strict=True)]
        with self._cond:
            if self._closing:
                raise NotReady("the server is shutting down")
            # once a switch is pending only the new engine takes requests, so the old one's all wait ahead of them
            if engine is not (self._next[0] if self._next is not None else self.engine):
                raise NotReady("the model was reloaded while the request was read; retry")
            # slots free now are filled from the queue at the next token boundary
            room = self.max_waiting + max(0, self.max_running - len(self._running)) - len(self._waiting)
            if len(handles) > room:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (at most {self.max_waiting})")
            self._waiting.extend(handles)
            self._cond.notify()
        return handles

    def close(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ------------------------------------------------------------------ the scheduler thread
    def _main(self) -> None:
        try:
            engine = self._load()
            engine.tokenizer  # noqa: B018 - loaded here, before any request can use it
            if self.draft_spec is not None:
                self.draft = engine.open_drafter(self.draft_spec)
        except Exception as e:  # any failure to load is reported, never a dead thread nobody notices
            self.load_error = f"cannot load the model: {e}"
            self._state = "failed"
            log.error("%s", self.load_error)
            try:
                if self._on_load_error is not None:
                    self._on_load_error(self.load_error)
            finally:
                self._ready.set()
            return
        self.engine = engine
        self._state = "ready"
        self._ready.set()
        saved = time.monotonic()
        try:
            while True:
                try:
                    self._run_tasks()
                    self._maybe_switch()
                    if not self._next_batch():
                        break
                    if self._running:
                        self._step()
                    if time.monotonic() - saved > HISTORY_EVERY:  # a server runs for days: not only at exit
                        self._save_history(self.engine)
                        saved = time.monotonic()
                except Exception as e:  # a bug: fail the running batch, keep serving
                    log.exception("scheduler iteration failed")
                    for s in list(self._running):
                        self._finish(s, Event(finish_reason="error", error=f"generation failed: {e}"), "error")
        finally:
            self._state = "stopped"
            with self._cond:
                left = list(self._waiting)
                self._waiting.clear()
            for s in list(self._running):
                self._finish(s, Event(finish_reason="error", error="the server is shutting down"), "error")
            for h in left:
                h.emit(Event(finish_reason="error", error="the server is shutting down"))
            with self._cond:
                pending, self._next, tasks = self._next, None, list(self._tasks)
                self._tasks.clear()
            for _, fut in tasks:
                fut.set_exception(NotReady("the server is shutting down"))
            if pending is not None:
                self._close_engine(pending[0], pending[1])
                pending[2].set_exception(NotReady("the server is shutting down"))
            self._close_engine(self.engine, self.draft)

    @staticmethod
    def _close_engine(engine: Any, draft: Drafter | None) -> None:  # noqa: ANN401 - an Engine
        if draft is not None:
            draft.close()
        try:
            engine.close()  # files closed first; then the routing history written, which may fail (logged)
        except Exception as e:
            log.warning("closing the engine: %s", e)

    def _run_tasks(self) -> None:
        """Run what `call` queued, each with the engine in service."""
        while True:
            with self._cond:
                if not self._tasks:
                    return
                fn, fut = self._tasks.popleft()
            try:
                fut.set_result(fn(self.engine))
            except Exception as e:
                fut.set_exception(e)

    def _maybe_switch(self) -> None:
        """Serve the reloaded engine once none of the old one's requests is running or waiting."""
        with self._cond:
            if self._next is None or self._running or any(h.engine is self.engine for h in self._waiting):
                return
            (engine, draft, fut), self._next = self._next, None
            old, old_draft = self.engine, self.draft
            self.engine, self.draft = engine, draft
        self._close_engine(old, old_draft)
        fut.set_result(None)

    def _save_history(self, engine: Any) -> None:  # noqa: ANN401 - an Engine
        """Write the routing history (--history) now; a failed write is logged and serving goes on."""
        history = getattr(engine, "history", None)  # None without --history (and on test doubles)
        if history is None:
            return
        try:
            history.save()
        except Exception as e:  # a full or read-only disk must not fail requests
            log.warning("routing history not written: %s", e)

    def _next_batch(self) -> bool:
        """Drop cancelled sequences, admit waiting ones; block while there is nothing to do."""
        for s in [s for s in self._running if s.handle.cancelled]:
            self._finish(s, None, "cancelled")
        with self._cond:
            while not self._closing and not self._waiting and not self._running and not self._tasks and not self._next:
                self._cond.wait()
            if self._closing:
                return False
            admitted = []
            # a request read for a reloaded engine waits until the switch (FIFO: the old engine's come first)
            while self._waiting and len(self._running) + len(admitted) < self.max_running \
                    and self._waiting[0].engine in (None, self.engine):
                admitted.append(self._waiting.popleft())
        for h in admitted:
            if h.cancelled:
                self._count_finish("cancelled")
                continue
            try:
                self._running.append(self._new_seq(h))
            except Exception as e:
                log.exception("cannot start a generation")
                h.emit(Event(finish_reason="error", error=f"cannot start the generation: {e}"))
                self._count_finish("error")
        return True

    def _new_seq(self, h: Handle) -> _Seq:
        r, eng = h.request, self.engine
        tok = eng.tokenizer
        if self.metrics:
            self.metrics.prompt_tokens.inc(len(r.prompt_ids))
        text = GenerationText(tok.stream(skip_special=r.skip_special), r.stop, tok.eos_ids, h.max_tokens)
        # the KV cache sized once for the context the request can reach
        return _Seq(h, eng.new_sequence(len(r.prompt_ids) + h.max_tokens), Sampler(r.sampling), text)

    def _step(self) -> None:
        chunk = self.prefill_chunk
        decoding = sum(1 for s in self._running if s.fed == len(s.prompt))
        budget, any_prefill = self.step_token_budget - decoding, False
        items, fed, verify = [], [], []
        for s in self._running:
            drafted = Draft([])
            if self.draft is not None and s.drafter is None:  # from the first step: the MTP drafter reads the prompt's
                s.adapt, s.drafter = AdaptiveK(self.draft_tokens), self.draft.for_sequence()
            if s.fed < len(s.prompt):
                ids = s.prompt[s.fed:s.fed + chunk]
                if any_prefill and len(ids) > budget:
                    continue  # over this step's budget: its next chunk waits one step
                budget, any_prefill = budget - len(ids), True
            else:
                if self.draft is not None:
                    drafted = self._propose(s)
                ids = (s.last_id, *drafted.tokens)
            items.append((s.kv, ids))
            fed.append((s, ids, drafted, s.kv.length if self.draft is not None else 0))
            verify.append(self.draft is not None and s.fed == len(s.prompt))
        try:
            logits = self.engine.step(items, verify=verify) if any(verify) else self.engine.step(items)
        except Exception as e:  # e.g. an expert that cannot be read: those sequences end, the rest go on
            log.exception("engine step failed")
            for s, _, _, _ in fed:
                self._finish(s, Event(finish_reason="error", error=f"generation failed: {e}"), "error")
            return
        now = time.perf_counter()
        if self.metrics:
            self.metrics.steps.inc()
            self.metrics.step_tokens.inc(sum(len(ids) for _, ids, _, _ in fed))
        # every item's final hidden states, in order: what the drafters are told (the MTP drafter feeds them)
        states, row = (self.engine.model.last_x if self.draft is not None else None), 0
        for (s, ids, drafted, start), lg, checked in zip(fed, logits, verify, strict=True):
            rows = states[row:row + len(ids)] if states is not None else None
            row += len(ids)
            if s.fed < len(s.prompt):
                s.fed += len(ids)
                if s.drafter is not None:
                    s.drafter.observe(start, ids, rows)
                if s.fed < len(s.prompt):
                    continue  # more prompt to read; these logits predict nothing we need
            if s.handle.cancelled:
                self._finish(s, None, "cancelled")
                continue
            try:
                if checked:
                    self._accept(s, lg, drafted, now, start, rows)
                else:
                    self._on_token(s, s.sampler(lg), now)
            except Exception as e:  # e.g. NaN logits under sampling: this sequence ends, the batch goes on
                log.exception("sampling failed")
                if s in self._running:
                    self._finish(s, Event(finish_reason="error", error=f"generation failed: {e}"), "error")

    def _propose(self, s: _Seq) -> Draft:
        """Draft tokens for a decoding sequence, no more than its max_tokens and its KV cache's context allow."""
        room = min(s.adapt.next(), s.handle.max_tokens - s.generated - 1,
                   self.engine.config.context_length - len(s.prompt) - len(s.tokens) - 1)
        return s.drafter.propose([*s.prompt, *s.tokens], room, s.sampler) if room > 0 else Draft([])

    def _accept(self, s: _Seq, logits: Any, drafted: Draft, now: float, start: int,  # noqa: ANN401 - (n, vocab)
                rows: Any) -> None:  # noqa: ANN401 - (n, d_model)
        """A verification step's outcome (speculative.settle: the draft's own q under sampling), the accepted
        drafted tokens and the target's next one emitted in order until the sequence ends; the drafter is told the
        states of the rows kept."""
        j, nxt = settle(logits, drafted, s.sampler, s.kv, s.adapt, self.engine.spec)
        s.drafter.observe(start, [s.last_id, *drafted.tokens[:j]], rows[:j + 1])
        for tid in [*drafted.tokens[:j], nxt]:
            if s not in self._running:
                return
            self._on_token(s, tid, now)

    def _on_token(self, s: _Seq, tid: int, now: float) -> None:
        text, reason = s.text.push(tid)
        s.last_id = tid
        s.tokens.append(tid)
        m = self.metrics
        if m:
            m.generated_tokens.inc()
            if s.generated == 1:
                m.ttft.observe(now - s.handle.submitted)
            else:
                m.itl.observe(now - s.last_time)
        s.last_time = now
        if reason is None:
            if text:
                s.handle.emit(Event(text))
            return
        self._finish(s, Event(text, reason, prompt_tokens=len(s.prompt), completion_tokens=s.generated), reason)

    def _finish(self, s: _Seq, event: Event | None, reason: str) -> None:
        self._running.remove(s)
        if event is not None:
            event = Event(event.text, event.finish_reason, event.error, len(s.prompt), s.generated)
            s.handle.emit(event)
        self._count_finish(reason)
        if self.metrics and s.generated:
            self.metrics.e2e.observe(time.perf_counter() - s.handle.submitted)

    def _count_finish(self, reason: str) -> None:
        if self.metrics:
            self.metrics.finished.labels(reason=reason).inc()
