"""Start `mertools serve` in a child process on a free loopback port and wait until /health says ok."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import httpx


def start_server(layout: Path, args: list[str], stderr: IO[str] | int = subprocess.DEVNULL,
                 timeout: float = 120.0) -> tuple[subprocess.Popen, str]:
    """(process, base URL) of `mertools serve LAYOUT --port P *args`, once healthy; killed if it is not."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "mertools.cli", "serve", str(layout), "--port", str(port), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the server did not come up: {' '.join(cmd)}")
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)
