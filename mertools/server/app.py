"""The HTTP layer: OpenAI-compatible routes over the scheduler, /health, /metrics, bearer auth.

The engine loads in the scheduler's thread after the socket is up (/health says 503 until then).
Generation events cross from the scheduler thread to the event loop through `call_soon_threadsafe`
into one asyncio queue per HTTP request; a client that goes away cancels its generations, which
leave the batch at the next token boundary.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import MertoolsError
from ..runtime.harmony import REASONING, HarmonyParser, is_harmony, split_reply
from ..runtime.sampling import SamplingParams
from ..runtime.text import PromptError, check_prompt
from . import protocol as P
from .config import ServerConfig
from .metrics import CONTENT_TYPE, ServerMetrics
from .reload import Live, Reloader
from .scheduler import Event, GenerationRequest, Handle, NotReady, QueueFull, Scheduler
from .stats import server_stats
from .ui import add_ui, is_public

__all__ = ["ServerConfig", "create_app", "open_engine"]

log = logging.getLogger("mertools.server")
MAX_BODY = 16 * 2**20  # bytes; far beyond any context's worth of text, and uvicorn sets no limit
ENDPOINTS = ("/health", "/metrics", "/stats", "/v1/models", "/v1/completions", "/v1/chat/completions")


def open_engine(cfg: ServerConfig) -> Any:  # noqa: ANN401 - an Engine
    """The engine `cfg` asks for, its kernels compiled or loaded (warmed up) before any request."""
    from ..runtime.engine import Engine, draft_footprint

    engine = Engine.open(cfg.layout, cache_mb=cfg.cache_mb, prefetch=cfg.prefetch, prefetch_depth=cfg.prefetch_depth,
                         threads=cfg.threads,
                         kv_dtype=cfg.kv_dtype, approx=cfg.approx, io=cfg.io, kernels=cfg.kernels,
                         reserve_bytes=draft_footprint(cfg.draft), history=cfg.history, shards=cfg.shards,
                         plan=cfg.shard_plan, ray_address=cfg.ray_address, long_lived=True,
                         fill=True)  # between requests it reads the experts not used yet (fill.py)
    engine.warmup()
    return engine


def _engine_and_draft(cfg: ServerConfig) -> tuple[Any, Any]:
    """A reload's new layout: its engine and (with --draft) its drafter, opened beside the engine in service."""
    engine = open_engine(cfg)
    try:
        return engine, (engine.open_drafter(cfg.draft) if cfg.draft is not None else None)
    except Exception:
        engine.close()
        raise


def create_app(cfg: ServerConfig, *, load: Callable[[], Any] | None = None,
               on_load_error: Callable[[str], None] | None = None, base: ServerConfig | None = None) -> FastAPI:
    """The ASGI app. `load` (default: `open_engine(cfg)`) runs in the scheduler thread. With `cfg.config_file`, a
    Reloader applies the file again on request (`app.state.reloader.request()`: SIGHUP, `--watch-config`) over `base`,
    the settings without the file (the command line and the defaults; default: cfg)."""
    if load is None:
        def load() -> Any:
            return open_engine(cfg)

    metrics = ServerMetrics(running=lambda: scheduler.n_running, waiting=lambda: scheduler.n_waiting,
                            engine=lambda: scheduler.engine)
    scheduler = Scheduler(load, max_running=cfg.max_concurrency, max_waiting=cfg.max_queue,
                          prefill_chunk=cfg.prefill_chunk, metrics=metrics, on_load_error=on_load_error,
                          draft=cfg.draft, draft_tokens=cfg.draft_tokens)
    created = P.now()
    tok_lock = threading.Lock()  # tokenizers are used from threadpool threads: one at a time
    live = Live(cfg)  # the settings in force: `live.cfg` is read afresh by every request
    reloader = Reloader(base or cfg, live, scheduler, _engine_and_draft) if cfg.config_file else None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        if reloader is not None:
            reloader.start()
        try:
            yield
        finally:
            if reloader is not None:
                await run_in_threadpool(reloader.close)
            await run_in_threadpool(scheduler.close)

    app = FastAPI(title="mertools", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler, app.state.metrics, app.state.live, app.state.reloader = scheduler, metrics, live, reloader

    # ------------------------------------------------------------------ errors in OpenAI's shape
    def error(e: P.RequestError) -> JSONResponse:
        return JSONResponse(P.error_body(e.message, e.type, e.code, e.param), e.status, headers=e.headers)

    @app.exception_handler(P.RequestError)
    async def _request_error(request: Request, e: P.RequestError) -> JSONResponse:
        return error(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(P.error_body(str(e.detail), kind, None), e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return JSONResponse(P.error_body(f"internal error: {type(e).__name__}", "server_error"), 500)

    # ------------------------------------------------------------------ plain routes
    def engine_or_503() -> Any:
        if scheduler.state == "ready":
            return scheduler.admission_engine
        msg = scheduler.load_error or f"the model is {scheduler.state}; retry shortly"
        raise P.RequestError(msg, 503, "service_unavailable", "model_not_ready", headers={"Retry-After": "1"})

    @app.get("/health")
    async def health() -> Response:
        state = scheduler.state
        extra = {"config": live.to_dict()} if reloader is not None else {}  # what the reloads did
        if state == "ready":
            return JSONResponse({"status": "ok", **extra})
        body: dict[str, Any] = {"status": "loading" if state == "loading" else "error", **extra}
        if scheduler.load_error:
            body["message"] = scheduler.load_error
        return JSONResponse(body, 503, headers={"Retry-After": "1"})

    @app.get("/metrics")
    async def metrics_text() -> Response:
        return PlainTextResponse(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/stats")
    async def stats(heat: bool = True) -> Response:  # what `mertools top` draws: counters and the cache's map
        return JSONResponse(await run_in_threadpool(server_stats, scheduler, metrics, live, heat))

    def card() -> dict[str, Any]:
        eng = scheduler.admission_engine
        return P.model_card(live.cfg.name, created, eng.config.context_length if eng is not None else None)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict[str, Any]:
        check_model(model)
        return card()

    def check_model(name: str) -> None:
        if name != live.cfg.name:
            raise P.RequestError(f"The model `{name}` does not exist; this server serves `{live.cfg.name}`", 404,
                                 "invalid_request_error", "model_not_found", "model")

    # ------------------------------------------------------------------ generation
    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate(request, "chat")

    def prompts_of(req: P.ChatRequest | P.CompletionRequest, tokenizer: Any) -> list[list[int]]:
        from ..runtime.chat import encode_chat

        with tok_lock:
            if isinstance(req, P.ChatRequest):
                messages = [{"role": m.role, "content": m.content, **({"name": m.name} if m.name else {})}
                            for m in req.messages]
                return [encode_chat(tokenizer, messages)]
            return [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in req.prompt]

    async def generate(request: Request, kind: Literal["chat", "completion"]) -> Response:
        req = P.parse_request(await read_body(request), kind)
        cfg = live.cfg  # one set of settings for the whole request, whatever a reload does meanwhile
        check_model(req.model)
        engine = engine_or_503()
        ctx, vocab = engine.config.context_length, engine.config.vocab_size
        try:
            prompts = await run_in_threadpool(prompts_of, req, engine.tokenizer)
        except MertoolsError as e:  # e.g. the chat template refuses the messages (raise_exception)
            raise P.RequestError(str(e), param="messages") from None
        param = "messages" if kind == "chat" else "prompt"
        for ids in prompts:
            try:  # the scheduler checks again (runtime.text): here for OpenAI's error codes
                check_prompt(ids, vocab, ctx, 1)
            except PromptError as e:
                raise P.RequestError(str(e), code="context_length_exceeded" if e.rule == "context" else None,
                                     param=param) from None
        if req.max_new is not None and req.max_new > ctx:
            raise P.RequestError(f"max_tokens {req.max_new} exceeds the model's context length of {ctx}",
                                 param="max_tokens")
        # no max_tokens: the server's default, else chat generates until EOS or the context ends (OpenAI), completions
        # 16 tokens; temperature, top_p and top_k left out: the server's defaults, else OpenAI's
        default_max = cfg.max_tokens or (ctx if kind == "chat" else cfg.completion_default_max_tokens)
        top_k = req.top_k if req.top_k is not None else (cfg.top_k or 0)
        top_k = top_k if top_k > 0 else 0
        temperature = req.temperature if req.temperature is not None else (
            1.0 if cfg.temperature is None else cfg.temperature)
        top_p = req.top_p if req.top_p is not None else (1.0 if cfg.top_p is None else cfg.top_p)
        n = req.n or 1
        # a harmony (gpt-oss) chat: its control tokens are decoded, then split into content and reasoning;
        # skip_special_tokens=false asks for the raw text instead
        harmony = (kind == "chat" and req.skip_special_tokens is not False
                   and is_harmony(getattr(engine.tokenizer, "chat_template", None)))
        gens = []
        for ids in prompts:
            for j in range(n):
                # choices of one request sample differently but reproducibly from one seed
                seed = None if req.seed is None else (req.seed + j) % 2**64
                gens.append(GenerationRequest(
                    tuple(ids), req.max_new or default_max,
                    SamplingParams(temperature, top_k, top_p, seed),
                    req.stop, not harmony and req.skip_special_tokens is not False))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, Event | None]] = asyncio.Queue()

        def sink(i: int) -> Callable[[Event], None]:
            return lambda ev: loop.call_soon_threadsafe(queue.put_nowait, (i, ev))

        try:
            handles = scheduler.submit(gens, [sink(i) for i in range(len(gens))], engine)
        except QueueFull as e:
            raise P.RequestError(f"the server is busy: {e}; retry shortly", 429, "rate_limit_error",
                                 "rate_limit_exceeded", headers={"Retry-After": "1"}) from None
        except NotReady as e:
            raise P.RequestError(str(e), 503, "service_unavailable", "model_not_ready",
                                 headers={"Retry-After": "1"}) from None
        except ValueError as e:
            raise P.RequestError(str(e)) from None
        rid, model_name, t = P.new_id(kind), cfg.name, P.now()
        prompt_tokens = sum(len(p) for p in prompts)
        if req.stream:
            def cancel_all() -> None:  # also when the client left before the stream's first piece
                for h in handles:
                    h.cancel()

            return StreamingResponse(
                stream(kind, rid, model_name, t, handles, queue, req.include_usage, prompt_tokens, harmony),
                media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                background=BackgroundTask(cancel_all))
        return await collect(request, kind, rid, model_name, t, handles, queue, prompt_tokens, harmony)

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length", "")
        size, parts = int(declared) if declared.isdigit() else 0, []
        if size <= MAX_BODY:
            size = 0
            async for part in request.stream():
                size += len(part)
                if size > MAX_BODY:
                    break
                parts.append(part)
        if size > MAX_BODY:
            raise P.RequestError(f"the request body is larger than {MAX_BODY // 2**20} MiB", 413, code="body_too_large")
        return b"".join(parts)

    async def collect(request: Request, kind: str, rid: str, model_name: str, t: int, handles: list[Handle],
                      queue: asyncio.Queue[tuple[int, Event | None]], prompt_tokens: int,
                      harmony: bool = False) -> Response:
        texts: list[list[str]] = [[] for _ in handles]
        finish: list[str | None] = [None] * len(handles)
        completion = 0

        async def watch() -> None:  # the body is read: the next message can only be the disconnect
            while (await request.receive())["type"] != "http.disconnect":
                pass
            queue.put_nowait((-1, None))

        watcher = asyncio.create_task(watch())
        try:
            while any(f is None for f in finish):
                i, ev = await queue.get()
                if ev is None:
                    return Response(status_code=499)  # nobody reads it; the handles are cancelled below
                if ev.error:
                    raise P.RequestError(ev.error, 500, "server_error", "generation_failed")
                texts[i].append(ev.text)
                if ev.finish_reason:
                    finish[i], completion = ev.finish_reason, completion + ev.completion_tokens
        finally:
            watcher.cancel()
            for h in handles:
                h.cancel()  # a no-op for finished ones
        choices = [("".join(x), f or "stop") for x, f in zip(texts, finish, strict=True)]
        reasoning = None
        if harmony:
            parts = [split_reply(text) for text, _ in choices]
            choices = [(content, f) for (content, _), (_, f) in zip(parts, choices, strict=True)]
            reasoning = [r for _, r in parts]
        return JSONResponse(P.response(kind, rid, model_name, t, choices, P.usage(prompt_tokens, completion),
                                       reasoning))

    async def stream(kind: str, rid: str, model_name: str, t: int, handles: list[Handle],
                     queue: asyncio.Queue[tuple[int, Event | None]], include_usage: bool,
                     prompt_tokens: int, harmony: bool = False) -> AsyncIterator[str]:
        # if the client disconnects, Starlette cancels this generator: `finally` cancels the generations
        left, completion = set(range(len(handles))), 0
        parsers = [HarmonyParser() for _ in handles] if harmony else None

        def pieces(i: int, events: list[tuple[str, str]]) -> Iterator[str]:
            for channel, text in events:
                thinking = channel == REASONING
                yield P.sse(P.chunk(kind, rid, model_name, t, i, None if thinking else text, None, include_usage,
                                    reasoning=text if thinking else None))

        try:
            if kind == "chat":
                for i in range(len(handles)):
                    yield P.sse(P.chunk(kind, rid, model_name, t, i, None, None, include_usage, role=True))
            while left:
                i, ev = await queue.get()
                assert ev is not None  # only collect's watcher sends None
                if ev.error:
                    yield P.sse(P.error_body(ev.error, "server_error", "generation_failed"))
                    break
                if ev.text and parsers is not None:
                    for piece in pieces(i, parsers[i].feed(ev.text)):
                        yield piece
                elif ev.text:
                    yield P.sse(P.chunk(kind, rid, model_name, t, i, ev.text, None, include_usage))
                if ev.finish_reason:
                    if parsers is not None:
                        for piece in pieces(i, parsers[i].flush()):
                            yield piece
                    left.discard(i)
                    completion += ev.completion_tokens
                    yield P.sse(P.chunk(kind, rid, model_name, t, i, None, ev.finish_reason, include_usage))
            else:  # every choice finished (no error)
                if include_usage:
                    yield P.sse(P.usage_chunk(kind, rid, model_name, t, P.usage(prompt_tokens, completion)))
            yield P.sse("[DONE]")
        finally:
            for h in handles:
                h.cancel()

    if cfg.ui:
        add_ui(app)
    app.add_middleware(_Gate, keys=lambda: live.cfg.keys, metrics=metrics)
    return app


class _Gate:
    """Pure ASGI wrapper (keeps streaming and disconnects intact, unlike BaseHTTPMiddleware): bearer
    auth on everything but /health and the web page's files, and the request counter by endpoint and status."""

    def __init__(self, app: Any, keys: Callable[[], tuple[str, ...]], metrics: ServerMetrics) -> None:
        self.app, self.keys, self.metrics = app, keys, metrics  # the keys read per request: a reload may change them

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = (path if path in ENDPOINTS else "/v1/models/{model}" if path.startswith("/v1/models/")
                    else "/ui" if is_public(path) else "other")
        status = 500

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            keys = self.keys()
            if keys and path != "/health" and not is_public(path) and not self._authorized(scope, keys):
                body = json.dumps(P.error_body("Invalid or missing API key (send 'Authorization: Bearer KEY')",
                                               "authentication_error", "invalid_api_key")).encode()
                await send_status({"type": "http.response.start", "status": 401, "headers": [
                    (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b"Bearer")]})
                await send({"type": "http.response.body", "body": body})
                return
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()

    @staticmethod
    def _authorized(scope: dict[str, Any], keys: tuple[str, ...]) -> bool:
        scheme, _, token = dict(scope.get("headers") or []).get(b"authorization", b"").partition(b" ")
        token = token.strip()
        # every key compared (no early exit), each in constant time
        return scheme.lower() == b"bearer" and sum(hmac.compare_digest(token, k.encode()) for k in keys) > 0
