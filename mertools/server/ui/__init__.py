"""The page `mertools serve` shows at `/`: a chat over the server's own /v1/chat/completions and a live panel over
/stats (tokens/s, time to first token, requests, cache hit rate, disk MB/s, the layer x expert map).

Static files only, shipped in the package (static/): no build step, no CDN, nothing fetched from elsewhere, so it
works offline; the Content-Security-Policy below holds the page to its own origin. The page and its files need no API
key (they carry no data); every call they make sends the key the page asks for once. `--no-ui` leaves these routes
out.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, Response

STATIC = Path(__file__).parent / "static"
TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
         ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml"}
NAMES = ("index.html", "style.css", "api.js", "app.js", "chat.js", "live.js", "heat.js", "rates.js", "favicon.svg")
FILES = {name: TYPES[Path(name).suffix] for name in NAMES}  # the only files served, with their content types
PREFIX = "/ui/"
# the page talks only to this origin: a script or style from anywhere else is refused by the browser
HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; "
                                      "base-uri 'none'; frame-ancestors 'none'; form-action 'self'",
           "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache", "Referrer-Policy": "no-referrer"}


def is_public(path: str) -> bool:
    """Paths served without an API key: the page and its static files."""
    return path == "/" or path.startswith(PREFIX)


def add_ui(app: FastAPI) -> None:
    """`/` (the page) and `/ui/NAME` (its files): a fixed list, so no path from a request ever reaches the disk."""
    for name in FILES:
        if not (STATIC / name).is_file():
            raise FileNotFoundError(f"{STATIC / name}: the web page's file is missing from the installed package")

    def serve(name: str) -> Response:
        return FileResponse(STATIC / name, media_type=FILES[name], headers=HEADERS)

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return serve("index.html")

    @app.get(PREFIX + "{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        if name not in FILES:
            return Response(status_code=404, headers=HEADERS)
        return serve(name)
