#!/usr/bin/env python3
"""The image's HEALTHCHECK: exit 0 when GET /health of the local `mertools serve` answers 200, else 1.

/health answers 200 once the model is loaded and 503 while it loads; it never needs the API key. The URL is
$MERTOOLS_HEALTH_URL when set; else it is built from the --host/--port of the running `mertools serve` (read
from /proc, so `podman run IMAGE /layout --port 9000` is checked on 9000), a wildcard host meaning loopback;
else http://127.0.0.1:8000/health, the image's CMD. Standard library only (no curl in a slim image).
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def serve_argv() -> list[str]:
    """The command line of the `mertools serve` process in this container ([] if none is found)."""
    for pid in sorted((p for p in os.listdir("/proc") if p.isdigit()), key=int):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "serve" in argv and any(os.path.basename(a) == "mertools" for a in argv[:3]):
            return argv
    return []


def option(argv: list[str], name: str) -> str | None:
    value = None
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def health_url() -> str:
    url = os.environ.get("MERTOOLS_HEALTH_URL")
    if url:
        return url
    argv = serve_argv()
    host = option(argv, "--host") or "127.0.0.1"
    port = option(argv, "--port") or "8000"
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/health"


def main() -> int:
    url = health_url()
    try:
        with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 - a loopback URL of our own
            status = r.status
    except urllib.error.HTTPError as e:
        status = e.code
    except OSError as e:
        print(f"{url}: {e}", file=sys.stderr)
        return 1
    print(f"{url}: {status}")
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
