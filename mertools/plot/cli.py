"""`mertools plot TRACE OUT_DIR`: the click command (matplotlib is imported only when it draws)."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import MertoolsError

FIGURES = ("routing", "frequency", "cache", "reads")  # the files' stems, in the order they are written


@click.command("plot")
@click.argument("trace", type=click.Path(path_type=str))
@click.argument("out_dir", type=click.Path(path_type=str))
@click.option("--format", "fmt", type=click.Choice(["png", "svg", "both"]), default="png", show_default=True,
              help="Picture format: PNG, SVG, or both side by side.")
@click.option("--layout", type=click.Path(path_type=str), help="The layout the trace was run on: its manifest gives "
              "the layers and experts (else: the largest the trace names), and the trace is checked against it.")
def plot(trace: str, out_dir: str, fmt: str, layout: str | None) -> None:
    """Draw the routing trace TRACE (`mertools run --trace-out`) into OUT_DIR (created): routing.png (the experts
    each layer chose over the tokens), frequency.png (layer x expert: how often each was chosen), cache.png (the
    expert cache's hits and misses per token and over time; traces of `mertools run` that record them) and
    reads.png (the expert reads' latency distribution, with p50 and p95). Prints the paths written."""
    try:
        import matplotlib  # noqa: F401 - only to say what is missing before anything else
    except ImportError:
        raise MertoolsError("mertools plot needs matplotlib: pip install 'mertools[plot]'") from None
    from .figures import cache_figure, frequency_figure, reads_figure, routing_figure, save
    from .read import load_trace

    n_layers = n_experts = None
    if layout is not None:
        from ..layout.reader import Layout

        cfg = Layout.open_unchecked(layout).manifest.config  # the manifest only: the expert files are not needed
        n_layers, n_experts = cfg.n_layers + cfg.nextn_layers, cfg.n_experts  # MTP layers route like any other
    tr = load_trace(trace, n_layers, n_experts)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise MertoolsError(f"{out}: exists and is not a directory") from None
    except OSError as e:
        raise MertoolsError(f"{out}: cannot create the output directory ({e.strerror})") from None
    draw = {"routing": routing_figure, "frequency": frequency_figure}
    if tr.held is None:
        click.echo(f"note: {trace}: records no cache hits (\"held\": an older trace, or not from `mertools run`); "
                   "cache figure skipped", err=True)
    else:
        draw["cache"] = cache_figure
    if tr.reads is None:
        click.echo(f"note: {trace}: has no reads record (an older trace, or not from `mertools run`); reads figure "
                   "skipped", err=True)
    elif tr.reads.count == 0:
        click.echo(f"note: {trace}: no expert was read from disk; reads figure skipped", err=True)
    else:
        draw["reads"] = reads_figure
    formats = ("png", "svg") if fmt == "both" else (fmt,)
    for name in FIGURES:
        if name in draw:
            try:
                written = save(draw[name](tr), out / name, formats)
            except OSError as e:
                raise MertoolsError(f"{out / name}: could not write the picture ({e.strerror or e})") from None
            for p in written:
                click.echo(str(p))
