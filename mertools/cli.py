"""The `mertools` command: one click group, each subcommand thin over the Python API."""

from __future__ import annotations

import json
import signal
import sys
from typing import TYPE_CHECKING, Any

import click

from .errors import MertoolsError
from .server.cli import approx_options, io_option, kernels_option, prefetch_options, shard_options

if TYPE_CHECKING:
    from .runtime.approx import Approx


class _Group(click.Group):
    """Turns a MertoolsError into one line on stderr and exit status 2; Ctrl-C into exit 130."""

    def invoke(self, ctx: click.Context) -> Any:
        signal.signal(signal.SIGTERM, _sigterm)
        try:
            return super().invoke(ctx)
        except MertoolsError as e:  # one line, even when a name in the message holds a newline
            click.echo(f"mertools: error: {' '.join(str(e).splitlines())}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("mertools: interrupted; nothing was left half-written", err=True)
            sys.exit(130)


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@click.group(cls=_Group)
@click.version_option(package_name="mertools")
def main() -> None:
    """Run Mixture-of-Experts models larger than RAM by streaming experts from disk."""


def _convert_choices() -> tuple[list[str], list[str], list[str]]:
    """(--dtype choices, --dense-dtype choices, the presets among the first): from the presets' table, not the
    conversion pipeline, whose source readers every other command would import for nothing."""
    from .convert.presets import DENSE_DTYPE_CHOICES, DTYPE_CHOICES, PRESET_CHOICES

    return list(DTYPE_CHOICES), list(DENSE_DTYPE_CHOICES), list(PRESET_CHOICES)


def _standin_choices() -> tuple[str, ...]:
    from .convert.standins import STANDIN_CHOICES

    return STANDIN_CHOICES


_DTYPES, _DENSE_DTYPES, _PRESETS = _convert_choices()
_STANDINS = list(_standin_choices())


@main.command()
@click.argument("src", type=click.Path(path_type=str))
@click.argument("out", type=click.Path(path_type=str))
@click.option("--dtype", type=click.Choice(_DTYPES, case_sensitive=False), default="auto", show_default=True,
              metavar="DTYPE",
              help="auto keeps each tensor's source type (f32 experts become f16). A llama-quantize preset (any case) "
                   f"({', '.join(_PRESETS)}) gives every tensor the type llama-quantize gives it (no imatrix). "
                   f"A type ({', '.join(d for d in _DTYPES if d != 'auto' and d not in _PRESETS)}) is the experts' "
                   "type and the big dense matrices' where their width fits its blocks (else f16).")
@click.option("--dense-dtype", type=click.Choice(_DENSE_DTYPES), default="auto", show_default=True,
              help="One dtype for every big dense matrix (embeddings, attention, lm_head), overriding --dtype "
                   "and its preset; norms and routers stay f32.")
@click.option("--standins", type=click.Choice(_STANDINS), help="Also write a low-bit stand-in of every expert in this "
              "type, for `run/serve --standin-share` (adds that type's share of the expert bytes to the layout).")
@click.option("--mtp", is_flag=True, help="Keep the checkpoint's multi-token-prediction (nextn) layers (DeepSeek-V3, "
              "GLM-4.5), for `run --draft mtp`.")
@click.option("--force", is_flag=True, help="Replace OUT if it is an existing layout.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the summary as JSON to this file.")
def convert(src: str, out: str, dtype: str, dense_dtype: str, standins: str | None, mtp: bool, force: bool, quiet: bool,
            json_out: str | None) -> None:
    """Convert a HF directory or GGUF file SRC into a layout directory OUT."""
    from .convert.pipeline import ConvertOptions
    from .convert.pipeline import convert as run

    s = run(src, out, ConvertOptions(dtype=dtype, dense_dtype=dense_dtype, force=force, progress=not quiet, mtp=mtp))
    if standins:
        _add_standins(out, standins, quiet)
    d = s.to_dict()
    for n in s.notes:
        click.echo(f"note: {n}", err=True)
    click.echo(
        f"wrote {out}: {s.tensors} tensors ({s.experts} experts, {s.copied} copied byte for byte; "
        f"{', '.join(f'{k}: {v}' for k, v in sorted(s.dtypes.items()))}), "
        f"{s.bytes_in / 1e6:,.1f} MB in, {s.bytes_out / 1e6:,.1f} MB out, {s.seconds:.2f} s "
        f"({d['mb_per_s_in']:,.1f} MB/s in, {d['mb_per_s_out']:,.1f} MB/s out)"
    )
    if json_out:
        with open(json_out, "w") as f:
            json.dump(d, f, indent=1)


@main.command("standins")
@click.argument("layout", type=click.Path(path_type=str))
@click.argument("dtype", type=click.Choice(_STANDINS))
@click.option("--quiet", is_flag=True, help="No progress bar.")
def standins_cmd(layout: str, dtype: str, quiet: bool) -> None:
    """Add low-bit stand-ins of DTYPE to an existing LAYOUT (replacing stand-ins of another type)."""
    _add_standins(layout, dtype, quiet)


def _add_standins(layout: str, dtype: str, quiet: bool) -> None:
    from .convert.standins import add_standins

    s = add_standins(layout, dtype, progress=not quiet)
    click.echo(f"wrote {s.files} {dtype} stand-ins into {layout}: {s.bytes_out / 1e6:,.1f} MB, {s.ratio:.0%} of the "
               f"experts' bytes, {s.requantized} tensors requantized, {s.seconds:.2f} s")


@main.command()
@click.argument("path", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable JSON object.")
def inspect(path: str, as_json: bool) -> None:
    """Describe a HF directory, a GGUF file or a layout."""
    from .inspect import format_report, inspect_path

    info = inspect_path(path)
    click.echo(json.dumps(info, indent=1) if as_json else format_report(info))


@main.command()
@click.argument("layout", type=click.Path(path_type=str))
@click.option("-p", "--prompt", default="Once upon a time", show_default=True, help="Prompt text.")
@click.option("-n", "--max-tokens", default=64, show_default=True, type=click.IntRange(1), help="Tokens to generate.")
@click.option("--cache-mb", type=click.FloatRange(min=0, min_open=True), help="Expert cache budget (MiB); default: what fits.")
@prefetch_options
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(0), help="0 = greedy.")
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(0))
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--seed", type=int, help="Seed for sampling (reproducible).")
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--threads", type=click.IntRange(1), help="Compute threads (default: all cores).")
@click.option("--kv-type", type=click.Choice(["f16", "f32", "q8_0"]), default="f16", show_default=True,
              help="What the KV cache holds (f32: exact, twice the bytes; q8_0: 34/64 of f16's).")
@io_option
@kernels_option
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the run's figures as JSON.")
@click.option("--trace-out", type=click.Path(dir_okay=False), help="Write the routing trace (zstd JSON lines).")
@click.option("--draft", help="Speculative decoding: 'ngram' (prompt lookup), 'mtp' (the layout's own multi-token-"
              "prediction block: convert --mtp) or a small LAYOUT sharing the tokenizer (kept in memory). Greedy "
              "output is the same; sampled output has the same distribution.")
@click.option("--draft-tokens", default=4, show_default=True, type=click.IntRange(1, 64),
              help="Tokens drafted per verification step.")
@click.option("--history", "history", type=click.Path(dir_okay=False), help="Learning cache: a routing history file "
              "(created if absent; e.g. LAYOUT.history.json beside the layout). The experts it saw used most are "
              "loaded at start and ranked by the cache from the first token; this run's routing is added at exit.")
@click.option("--packed-copies/--no-packed-copies", default=None,
              help="Keep the experts and dense weights the 8-bit kernels pack as files in LAYOUT/packed/, and map "
                   "them in later runs instead of reading and packing again (when reads keep their pages: --io "
                   "buffered, or auto's choice of it). Default: on, unless MERTOOLS_PACKED_COPIES=0.")
@click.option("--fill/--no-fill", default=False, show_default=True,
              help="When the cache holds every expert, read the ones not used yet on a lowest-priority thread "
                   "(it reads when the compute leaves a core idle; `serve` does by default, filling between requests).")
@shard_options
@approx_options
def run(layout: str, prompt: str, max_tokens: int, cache_mb: float | None, prefetch: str, prefetch_depth: int,
        temperature: float,
        top_k: int, top_p: float, seed: int | None, stop: tuple[str, ...], threads: int | None, kv_type: str,
        io_mode: str, kernels: str, json_out: str | None, trace_out: str | None, draft: str | None, draft_tokens: int,
        history: str | None, packed_copies: bool | None, fill: bool, shards: int | None, shard_plan: str | None,
        ray_address: str | None, approx: Approx | None = None) -> None:
    """Generate text from LAYOUT, streaming experts from disk, and print the run's figures."""
    from .runtime.compile_clock import announce_compiling
    from .runtime.engine import Engine, draft_footprint
    from .runtime.report import format_stats

    tracer = None
    if trace_out:
        from .runtime.trace import TraceWriter  # zstandard: imported only by a run that traces

        tracer = TraceWriter(trace_out)
    drafter = None
    echoed = []  # the prompt, once printed: the notice then starts a line of its own
    # a first run is otherwise silent for minutes before its first token
    announce_compiling(lambda: click.echo(("\n" if echoed else "") + "(numba is compiling this machine's kernels: once, "
                                          "minutes on a small machine; later runs load them, and `mertools warmup "
                                          "LAYOUT` compiles them ahead)", err=True))
    try:
        with Engine.open(layout, cache_mb=cache_mb, prefetch=prefetch, threads=threads, trace=tracer, approx=approx,
                         kv_dtype=kv_type, io=io_mode, reserve_bytes=draft_footprint(draft), history=history,
                         kernels=kernels, shards=shards, plan=shard_plan, ray_address=ray_address,
                         packed_copies=packed_copies, fill=fill, prefetch_depth=prefetch_depth) as engine:
            if tracer is not None and engine.shards is None:  # a sharded driver's cache holds nothing: no "held"
                tracer.follow(engine.cache, engine.store)
            drafter = engine.open_drafter(draft) if draft else None
            # no warm-up pass: generation leaves numba's compiling out of its figures (runtime/compile_clock.py), and
            # on a machine whose kernels are cached a pass over the prompt would be work done for nothing
            click.echo(prompt, nl=False)
            echoed.append(True)
            finish = None
            for tok in engine.generate(prompt, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                                       top_p=top_p, seed=seed, stop=stop, draft=drafter, draft_tokens=draft_tokens):
                click.echo(tok.text, nl=False)
                sys.stdout.flush()
                finish = tok.finish_reason
            click.echo()
            stats = engine.stats()
            if tracer is not None:  # its reads record beside these figures, before the engine's closing drains prefetches
                tracer.close()
    finally:
        announce_compiling(None)
        if drafter is not None:
            drafter.close()
        if tracer is not None:
            tracer.close()
    stats["finish_reason"] = finish
    click.echo(format_stats(stats), err=True)
    if json_out:
        with open(json_out, "w") as f:
            json.dump(stats, f, indent=1)


@main.command()
@click.argument("layout", type=click.Path(path_type=str))
@click.option("--reference", "reference", type=click.Path(path_type=str),
              help="Source checkpoint (HF dir or GGUF) to compare logits with.")
@click.option("--prompt", help="Text to score (default: a built-in paragraph).")
@click.option("--text-file", type=click.Path(exists=True, dir_okay=False), help="Score this file's text instead.")
@click.option("--max-tokens", default=128, show_default=True, type=click.IntRange(2))
@click.option("--reference-engine", type=click.Choice(["numpy", "transformers"]), default="numpy", show_default=True)
@click.option("--max-kl", type=click.FloatRange(0), help="Override the dtype's mean-KL limit.")
@click.option("--min-top1", type=click.FloatRange(0, 1), help="Override the dtype's top-1 agreement limit.")
@click.option("--max-ppl-ratio", type=click.FloatRange(1), help="Override the dtype's perplexity-ratio limit.")
@click.option("--kernels", type=click.Choice(["exact", "int8"]), default="exact", show_default=True,
              help="int8: also run the text through the 8-bit kernels (run/serve's default) and report their KL "
                   "against the exact kernels (fails above a mean of 0.002).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the full report as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def verify(layout: str, reference: str | None, prompt: str | None, text_file: str | None, max_tokens: int,
           reference_engine: str, max_kl: float | None, min_top1: float | None, max_ppl_ratio: float | None,
           kernels: str, json_out: str | None, quiet: bool) -> None:
    """Prove LAYOUT intact (exit 0) or not (exit 1); with --reference, compare its logits with the source's."""
    from dataclasses import replace

    from .verify.integrity import check_integrity
    from .verify.numerics import DEFAULT_THRESHOLDS, check_kernels, check_numerics, expert_dtype

    if prompt and text_file:
        raise click.UsageError("give --prompt or --text-file, not both")
    report = check_integrity(layout, progress=not quiet)
    for problem in report.problems:
        click.echo(f"problem: {problem}")
    click.echo(report.verdict())
    result: dict[str, Any] = {"integrity": report.to_dict()}
    ok = report.ok
    if ok and reference:
        from .layout.reader import Layout

        limits = DEFAULT_THRESHOLDS[expert_dtype(Layout.open(layout).manifest)]
        overrides = {k: v for k, v in (("kl_mean", max_kl), ("top1", min_top1), ("ppl_ratio", max_ppl_ratio)) if v is not None}
        text = open(text_file, encoding="utf-8").read() if text_file else prompt
        num = check_numerics(layout, reference, text=text, max_tokens=max_tokens, engine=reference_engine,
                             thresholds=replace(limits, **overrides))
        click.echo(num.format())
        result["numerics"] = num.to_dict()
        ok = num.ok
    if report.ok and kernels != "exact":
        text = open(text_file, encoding="utf-8").read() if text_file else prompt
        kr = check_kernels(layout, kernels, text=text, max_tokens=max_tokens)
        click.echo(kr.format())
        result["kernels"] = kr.to_dict()
        ok = ok and kr.ok
    if json_out:
        with open(json_out, "w") as f:
            json.dump(result, f, indent=1)
    if not ok:
        sys.exit(1)


@main.command()
@click.argument("layout", type=click.Path(path_type=str))
@click.option("--kernels", type=click.Choice(["both", "int8", "exact"]), default="both", show_default=True,
              help="The kernel paths to compile: run/serve's default (int8), the exact ones, or both.")
def warmup(layout: str, kernels: str) -> None:
    """Compile numba's kernels ahead of a first run (a new machine, a container image's build): every path a run of
    LAYOUT takes (a prompt's, a few rows', decode's, the compiled step) into numba's cache, for any later process.
    The kernels do not depend on a model's shapes or weight types, so any layout serves every other."""
    from .runtime.engine import Engine

    for mode in ("int8", "exact") if kernels == "both" else (kernels,):
        with Engine.open(layout, kernels=mode, io="auto") as eng:
            took = eng.warmup()
        click.echo(f"{mode} kernels: compiled or loaded in {took:.1f} s")


@main.command("shard-plan")
@click.argument("layout", type=click.Path(exists=True, file_okay=False, path_type=str))
@click.argument("shards", type=click.IntRange(1))
@click.argument("out", type=click.Path(dir_okay=False, path_type=str))
@click.option("--history", type=click.Path(exists=True, dir_okay=False), help="Place by measured use: a routing "
              "history of this layout (`run/serve --history`); default: round-robin.")
def shard_plan(layout: str, shards: int, out: str, history: str | None) -> None:
    """Write a placement of LAYOUT's experts on SHARDS Ray actors (`run/serve --shard-plan OUT`): round-robin, or
    with --history each layer's experts, most used first, dealt to the least loaded shard."""
    from .layout.reader import Layout
    from .runtime.shards import Plan

    lay = Layout.open(layout)
    cfg = lay.manifest.config
    if history is None:
        plan = Plan.round_robin(cfg.n_layers + cfg.nextn_layers, cfg.n_experts, shards)
    else:
        from .runtime.history import RoutingHistory

        plan = Plan.by_frequency(RoutingHistory.open(history, lay).counts, shards)
    plan.save(out)
    click.echo(f"{out}: {shards} shards, {', '.join(str(len(plan.keys(s))) for s in range(shards))} experts each")


from .server.cli import serve  # noqa: E402 - only click at import time; FastAPI loads when serving

main.add_command(serve)

from .top.cli import top  # noqa: E402 - only click at import time; textual loads when it runs

main.add_command(top)

from .plot.cli import plot  # noqa: E402 - only click at import time; matplotlib loads when it draws

main.add_command(plot)

if __name__ == "__main__":
    main()
