"""The `serve` command (registered in mertools.cli with `main.add_command(serve)`)."""

from __future__ import annotations

import functools
import ipaddress
import signal
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from ..runtime.prefetch import PREFETCH_DEPTH, PREFETCH_MODES

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
         "--cache-mb (if given) holds every expert (with int8 kernels that pack the experts: buffered until the files "
         "are in the page cache, and always for Q4_0/Q8_0/MXFP4 on CPUs without AVX-512), else O_DIRECT.")


# `--kernels` of `mertools run` and `serve`: Engine.open's `kernels`
kernels_option = click.option(
    "--kernels", type=click.Choice(["int8", "exact"]), default="int8", show_default=True,
    help="int8: activations quantized to 8 bits per block of 32 and integer dot products, as llama.cpp computes "
         "(Q4_0, Q8_0, MXFP4, Q2_K-Q6_K, IQ2_XXS weights; other types run exact), mean KL vs exact below 1e-3 on the trained "
         "fixture (`mertools verify --kernels int8` measures a layout's); exact: float kernels, bit-exact with ggml's "
         "weights.")


def prefetch_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """`--prefetch`, `--prefetch-depth` of `mertools run` and `serve`: Engine.open's `prefetch`, `prefetch_depth`."""
    f = click.option("--prefetch-depth", default=PREFETCH_DEPTH, show_default=True, type=click.IntRange(1),
                     help="Layers ahead the lookahead guesses: beyond the next one, a guess is read only while the "
                          "disk is otherwise idle (1: the next layer only).")(f)
    return click.option("--prefetch", type=click.Choice(PREFETCH_MODES), default="lookahead", show_default=True)(f)


def shard_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """`--shards`, `--shard-plan`, `--ray-address` of `mertools run` and `serve`: the experts on Ray actors
    (runtime/shards.py), each shard's budget --cache-mb (default: every expert of the shard in memory)."""
    options = [
        click.option("--shards", type=click.IntRange(1), help="Split the experts among this many Ray actors (round-robin "
                     "placement); --cache-mb is then each shard's budget."),
        click.option("--shard-plan", type=click.Path(exists=True, dir_okay=False), help="A placement plan (JSON: "
                     "runtime/shards.py's Plan) instead of round-robin."),
        click.option("--ray-address", help="The Ray cluster to start the shards on (default: a Ray instance started "
                     "for this process; 'auto': the one running on this machine)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


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
@click.argument("layout", required=False, type=click.Path(exists=True, file_okay=False, path_type=str))
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=str),
              help="Settings file (TOML; keys named like these options: docs/OPERATIONS.md). Options given here win. "
                   "Re-read on SIGHUP, applied without dropping requests.")
@click.option("--watch-config", default=0.0, show_default=True, type=click.FloatRange(0),
              help="Also reload when the --config file's content changes, looking every this many seconds (0: off; "
                   "for a Kubernetes ConfigMap).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback unless you say otherwise).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--cache-mb", type=click.FloatRange(min=0, min_open=True), help="Expert cache budget (MiB); default: what fits.")
@click.option("--api-key", envvar="MERTOOLS_API_KEY", help="Require 'Authorization: Bearer KEY' (also $MERTOOLS_API_KEY).")
@click.option("--max-concurrency", default=8, show_default=True, type=click.IntRange(1),
              help="Sequences generated together in the running batch.")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(0),
              help="Sequences waiting for a batch slot; beyond this, 429 with Retry-After.")
@prefetch_options
@click.option("--threads", type=click.IntRange(1), help="Compute threads (default: all cores).")
@click.option("--kv-type", type=click.Choice(["f16", "f32", "q8_0"]), default="f16", show_default=True,
              help="What the KV cache holds (f32: exact, twice the bytes; q8_0: 34/64 of f16's).")
@io_option
@kernels_option
@click.option("--model-name", help="Model id clients must send (default: the layout directory's name).")
@click.option("--prefill-chunk", default=64, show_default=True, type=click.IntRange(1),
              help="Prompt tokens per sequence per batch step.")
@click.option("--temperature", type=click.FloatRange(0, 2), help="Default for requests that send none (default 1).")
@click.option("--top-p", type=click.FloatRange(0, 1), help="Default for requests that send none (default 1).")
@click.option("--top-k", type=click.IntRange(0), help="Default for requests that send none (default 0: off).")
@click.option("--max-tokens", type=click.IntRange(1), help="Default for requests that send none (default: chat to "
              "the end of the context, completions 16).")
@click.option("--no-ui", "ui", is_flag=True, default=True, flag_value=False,
              help="Leave out the web page at / (chat and live experts); the API is the same.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True)
@click.option("--draft", help="Speculative decoding: 'ngram' (prompt lookup in each request's own text), 'mtp' (the "
              "layout's own multi-token-prediction block: convert --mtp) or a small LAYOUT sharing the tokenizer "
              "(kept in memory; a KV cache per sequence). Greedy output is the same, sampled output has the same "
              "distribution.")
@click.option("--draft-tokens", default=4, show_default=True, type=click.IntRange(1, 64),
              help="Tokens drafted per sequence per verification step.")
@click.option("--history", "history", type=click.Path(dir_okay=False), help="Learning cache: a routing history file "
              "(created if absent). Its most used experts are loaded at start; the served routing is added to it "
              "when the server stops.")
@shard_options
@approx_options
@click.pass_context
def serve(ctx: click.Context, layout: str | None, config_file: str | None, watch_config: float, io_mode: str,
          kv_type: str, approx: Approx | None = None, **options: Any) -> None:
    """Serve LAYOUT over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models,
    /health, /metrics, /stats), batching concurrent requests into shared forward steps. LAYOUT may come from
    --config instead."""
    import uvicorn

    from .config import OPTION_OF, ServerConfig, read_settings, with_file

    given = {name for name in ctx.params if ctx.get_parameter_source(name) in (
        click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)}
    pinned = {field for field in ("layout", "model_name", "api_key", "max_concurrency", "max_queue", "cache_mb", "prefetch",
                                  "prefetch_depth", "threads", "prefill_chunk", "kv_dtype", "io", "kernels", "draft",
                                  "draft_tokens", "history", "temperature", "top_p", "top_k", "max_tokens", "log_level",
                                  "host", "port", "ui")
              if OPTION_OF.get(field, field) in given}
    base = ServerConfig(layout=layout or "", api_key=options.pop("api_key") or None, kv_dtype=kv_type, io=io_mode,
                        approx=approx, config_file=config_file, watch_config=watch_config, pinned=frozenset(pinned),
                        **options)
    cfg = base
    if config_file is not None:
        try:
            cfg = with_file(base, read_settings(config_file))
        except ValueError as e:
            raise click.UsageError(str(e)) from None
    elif watch_config:
        raise click.UsageError("--watch-config needs --config")
    if not cfg.layout:
        raise click.UsageError("no layout: give LAYOUT or `layout = ...` in the --config file")
    _check_start(cfg)
    if not _is_loopback(cfg.host):
        click.echo(f"note: listening on {cfg.host}, not loopback: anyone who can reach it can use the model"
                   + ("" if cfg.keys else " (no --api-key set)"), err=True)
    failed: list[str] = []
    server: uvicorn.Server | None = None

    def on_load_error(message: str) -> None:  # called from the scheduler thread
        failed.append(message)
        if server is not None:
            server.should_exit = True

    app = _app(cfg, base, on_load_error)
    server = uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level,
                                           timeout_graceful_shutdown=5))
    if config_file is not None:  # SIGHUP: re-read the file (the handler only wakes the reloader's thread)
        signal.signal(signal.SIGHUP, lambda *_: app.state.reloader.request())
    else:  # nothing to reload: a SIGHUP (a closed terminal, a habit) must not end the server
        signal.signal(signal.SIGHUP, lambda *_: click.echo("mertools: SIGHUP ignored: no --config file to reload",
                                                           err=True))
    page = f"; the web page at http://{cfg.host}:{cfg.port}/" if cfg.ui else ""
    click.echo(f"serving {cfg.name} from {cfg.layout} on http://{cfg.host}:{cfg.port}/v1{page} (loading the model...)",
               err=True)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C/SIGTERM it has already shut down for
        pass
    if failed:
        click.echo(f"mertools: error: {failed[0]}", err=True)
        sys.exit(2)


def _check_start(cfg: Any) -> None:  # noqa: ANN401 - a ServerConfig
    """What can be refused before the socket opens (exit status 2): a path that is not a layout, a bad, foreign or
    unwritable routing history, a draft the layout cannot take."""
    from ..errors import RuntimeConfigError
    from ..layout.reader import Layout

    lay = Layout.open(cfg.layout)
    if cfg.history:
        from ..runtime.history import RoutingHistory

        RoutingHistory.open(cfg.history, lay)
    if cfg.draft == "mtp" and not lay.manifest.config.nextn_layers:
        raise RuntimeConfigError(f"{cfg.layout}: has no multi-token-prediction layers for --draft mtp; convert with --mtp "
                                 "from a checkpoint that has them (DeepSeek-V3, GLM-4.5)")
    if cfg.draft not in (None, "ngram", "mtp"):
        Layout.open(cfg.draft)


def _app(cfg: Any, base: Any, on_load_error: Callable[[str], None]) -> Any:  # noqa: ANN401
    """The app, with the mertools loggers printing as uvicorn's do, at cfg's level."""
    import logging

    from uvicorn.logging import DefaultFormatter

    from .app import create_app
    from .reload import set_log_level

    logger = logging.getLogger("mertools")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(DefaultFormatter("%(levelprefix)s %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    set_log_level(cfg.log_level)
    return create_app(cfg, on_load_error=on_load_error, base=base)
