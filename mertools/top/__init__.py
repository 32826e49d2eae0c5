"""`mertools top [URL]`: a live terminal dashboard of a running `mertools serve`, drawn from its `GET /stats`.

- `poll` fetching /stats and the figures of two readings (rates, recent percentiles, recent hit rate): pure
- `heat` the per-layer x expert map binned into a rich Text that fits a width and a height: pure
- `views` the overview's and the requests view's text from the figures: pure
- `app` the textual App (polling, pause, views, keys); `cli` the click command

Nothing here imports textual until `top` runs, so the CLI starts without it.
"""

DEFAULT_URL = "http://127.0.0.1:8000"  # `mertools serve`'s own default; here so the CLI can name it without `poll`'s HTTP imports
