"""`mertools top [URL]`: the click command (textual is imported only when it runs)."""

from __future__ import annotations

import click

from . import DEFAULT_URL


@click.command("top")
@click.argument("url", default=DEFAULT_URL, required=False)
@click.option("--interval", type=click.FloatRange(min=0.05), default=1.0, show_default=True,
              help="Seconds between readings of URL/stats.")
@click.option("--window", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="Seconds of readings the recent figures (rates, percentiles, hit rate, map hits) are taken over.")
@click.option("--api-key", envvar="MERTOOLS_API_KEY", default=None,
              help="The server's API key, sent as 'Authorization: Bearer KEY' (also $MERTOOLS_API_KEY).")
def top(url: str, interval: float, window: float, api_key: str | None) -> None:
    """A live dashboard of a running `mertools serve` at URL (default: http://127.0.0.1:8000): tokens/s, requests,
    latencies, expert hit rate, disk reads, cache and memory, and a per-layer x expert map of what the cache holds
    and what is being hit. Keys: p pause/resume, tab or 1/2/3 switch views, m/z the map's mode and zoom, q quit."""
    from .app import TopApp

    TopApp(url, api_key=api_key or None, interval=interval, window=window).run()
