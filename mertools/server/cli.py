"""The `serve` command (registered in mertools.cli with `main.add_command(serve)`)."""

from __future__ import annotations

import functools
import ipaddress
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from ..runtime.approx import Approx


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


# `--io` of `mertools run` and `serve`: Engine.open's `io`
io_option = click.option(
    "--io", "io_mode", type=click.Choice(["auto", "direct", "mmap", "buffered"]), default="auto", show_default=True,
    help="Expert reads: O_DIRECT into the cache; mmap: map the expert files (nothing copied, the page cache shared with "
         "the next run); buffered: reads that keep their pages; auto: mmap when the whole layout fits in memory and "
         "--cache-mb (if given) holds every expert, else O_DIRECT.")


# `--kernels` of `mertools run` and `serve`: Engine.open's `kernels`
kernels_option = click.option(
    "--kernels", type=click.Choice(["int8", "exact"]), default="int8", show_default=True,
    help="int8: activations quantized to 8 bits per block of 32 and integer dot products, as llama.cpp computes "
         "(Q4_0, Q8_0, Q4_K, Q5_K, Q6_K weights; other types run exact), mean KL vs exact below 1e-3 on the trained "
         "fixture (`mertools verify --kernels int8` measures a layout's); exact: float kernels, bit-exact with ggml's "
         "weights.")


def approx_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The approximate-routing flags of `mertools run` and `serve` (runtime/approx.py), handed to the command
    as one `approx` argument (an Approx; exact unless a flag is given). Invalid settings: a usage error."""

    @functools.wraps(f)
    def wrapper(*args: Any, approx_topk_tau: float, approx_resident_delta: float, approx_resident_top1: bool,
                standin_share: float, standin_fill: bool, standin_cache: float, **kw: Any) -> Any:
        from ..runtime.approx import Approx

        try:
            approx = Approx(approx_topk_tau, approx_resident_delta, approx_resident_top1, standin_share, standin_fill,
                            standin_cache)
        except ValueError as e:
            raise click.UsageError(str(e)) from None
        return f(*args, approx=approx, **kw)

    options = [
        click.option("--approx-topk-tau", default=0.0, show_default=True, type=click.FloatRange(0, 1, max_open=True),
                     help="Adaptive top-k: skip a chosen expert whose share of the token's routed mixture is below "
                          "this (0: off). Fewer bytes per token, less fidelity (docs/BENCHMARKS.md)."),
        click.option("--approx-resident-delta", default=0.0, show_default=True, type=click.FloatRange(0),
                     help="Cache-aware routing: replace a chosen expert not in memory by a resident one whose router "
                          "score is within this share of the token's routed mass (0: off)."),
        click.option("--approx-resident-top1", is_flag=True,
                     help="Let --approx-resident-delta replace the token's top-1 expert too."),
        click.option("--standin-share", default=0.0, show_default=True, type=click.FloatRange(0, 1),
                     help="Compute a chosen expert that is not in memory with its low-bit stand-in (`convert --standins`) "
                          "when its share of the token's mixture is below this (1: every miss; 0: off)."),
        click.option("--standin-fill", is_flag=True,
                     help="With --standin-share: also load the full expert in the background, for later tokens."),
        click.option("--standin-cache", default=0.5, show_default=True, type=click.FloatRange(0, 1, min_open=True,
                                                                                               max_open=True),
                     help="With --standin-share: the share of the expert cache's budget that holds stand-ins."),
    ]
    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


@click.command()
@click.argument("layout", type=click.Path(exists=True, file_okay=False, path_type=str))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback unless you say otherwise).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--cache-mb", type=click.FloatRange(min=0, min_open=True), help="Expert cache budget (MiB); default: what fits.")
@click.option("--api-key", envvar="MERTOOLS_API_KEY", help="Require 'Authorization: Bearer KEY' (also $MERTOOLS_API_KEY).")
@click.option("--max-concurrency", default=8, show_default=True, type=click.IntRange(1),
              help="Sequences generated together in the running batch.")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(0),
              help="Sequences waiting for a batch slot; beyond this, 429 with Retry-After.")
@click.option("--prefetch", type=click.Choice(["lookahead", "markov", "none"]), default="lookahead", show_default=True)
@click.option("--threads", type=click.IntRange(1), help="Compute threads (default: all cores).")
@click.option("--kv-type", type=click.Choice(["f16", "f32", "q8_0"]), default="f16", show_default=True,
              help="What the KV cache holds (f32: exact, twice the bytes; q8_0: 34/64 of f16's).")
@io_option
@kernels_option
@click.option("--model-name", help="Model id clients must send (default: the layout directory's name).")
@click.option("--prefill-chunk", default=64, show_default=True, type=click.IntRange(1),
              help="Prompt tokens per sequence per batch step.")
@click.option("--draft", help="Speculative decoding: 'ngram' (prompt lookup in each request's own text), 'mtp' (the "
              "layout's own multi-token-prediction block: convert --mtp) or a small LAYOUT sharing the tokenizer "
              "(kept in memory; a KV cache per sequence). Greedy output is the same, sampled output has the same "
              "distribution.")
@click.option("--draft-tokens", default=4, show_default=True, type=click.IntRange(1, 64),
              help="Tokens drafted per sequence per verification step.")
@click.option("--history", "history", type=click.Path(dir_okay=False), help="Learning cache: a routing history file "
              "(created if absent). Its most used experts are loaded at start; the served routing is added to it "
              "when the server stops.")
@approx_options
def serve(layout: str, host: str, port: int, cache_mb: float | None, api_key: str | None, max_concurrency: int,
          max_queue: int, prefetch: str, threads: int | None, kv_type: str, io_mode: str, kernels: str, model_name: str | None,
          prefill_chunk: int, draft: str | None, draft_tokens: int, history: str | None,
          approx: Approx | None = None) -> None:
    """Serve LAYOUT over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models,
    /health, /metrics), batching concurrent requests into shared forward steps."""
    import uvicorn

    from ..errors import RuntimeConfigError
    from ..layout.reader import Layout
    from .app import ServerConfig, create_app

    lay = Layout.open(layout)  # a bad layout fails here (exit status 2), before the socket is up
    if history:
        from ..runtime.history import RoutingHistory

        RoutingHistory.open(history, lay)  # and so does a bad, foreign or unwritable routing history
    if draft == "mtp" and not lay.manifest.config.nextn_layers:
        raise RuntimeConfigError(f"{layout}: has no multi-token-prediction layers for --draft mtp; convert with --mtp "
                                 "from a checkpoint that has them (DeepSeek-V3, GLM-4.5)")
    if draft not in (None, "ngram", "mtp"):
        Layout.open(draft)  # and so does a bad draft layout
    if not _is_loopback(host):
        click.echo(f"note: listening on {host}, not loopback: anyone who can reach it can use the model"
                   + ("" if api_key else " (no --api-key set)"), err=True)
    failed: list[str] = []
    server: uvicorn.Server | None = None

    def on_load_error(message: str) -> None:  # called from the scheduler thread
        failed.append(message)
        if server is not None:
            server.should_exit = True

    cfg = ServerConfig(layout=layout, model_name=model_name, api_key=api_key or None, max_concurrency=max_concurrency,
                       max_queue=max_queue, cache_mb=cache_mb, prefetch=prefetch, threads=threads,
                       prefill_chunk=prefill_chunk, kv_dtype=kv_type, io=io_mode, kernels=kernels, approx=approx, draft=draft,
                       draft_tokens=draft_tokens, history=history)
    app = create_app(cfg, on_load_error=on_load_error)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5))
    click.echo(f"serving {cfg.name} from {layout} on http://{host}:{port}/v1 (loading the model...)", err=True)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C/SIGTERM it has already shut down for
        pass
    if failed:
        click.echo(f"mertools: error: {failed[0]}", err=True)
        sys.exit(2)
