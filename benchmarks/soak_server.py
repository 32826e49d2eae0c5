"""Soak `mertools serve`: many concurrent clients mixing valid, malformed, unauthorised and disconnecting
requests against the real server process on loopback, for a fixed time.

    python benchmarks/soak_server.py [--clients 16] [--minutes 3] [--workdir /tmp/mertools-soak] [--json FILE]

The server is `mertools serve` (a subprocess, an API key, an expert cache of 2.5 experts so reads
really happen) on the tiny fixture converted to q4_0. Before the soak, every valid request is made
once alone: its greedy answer is the reference. During it, each client (seeded) picks per request:
a greedy completion or chat, streamed or not (its text must equal the solo answer), malformed JSON,
wrong field types, an unknown model, no API key, a wrong API key, or a stream / request it abandons
mid-way. A thread samples the server's VmRSS; VmHWM (peak RSS) is read at the end. Passes when there
are no 5xx, no unexpected status, no wrong answer, the server is alive and healthy at the end, and
its peak RSS is within cache budget + dense weights + 512 MiB (the README's documented overhead).
tests/test_soak.py runs the short form (16 clients, 20 s).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import start_server  # noqa: E402

KEY = "sk-soak"
MODEL = "tiny-q4"  # the served layout directory's name; soak() sets it
OVERHEAD = 512 << 20  # README "Memory": Python, numpy, numba, tokenizer, KV caches, activations
PROMPTS = ["Once upon a time", "The old lighthouse keeper", "In a hole in the ground", "Call me Ishmael"]
MAX_TOKENS = 12


def _status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out


def build_layout(work: Path) -> Path:
    from fixtures.tiny_mixtral import build_all
    from mertools.convert.pipeline import ConvertOptions, convert

    out = work / MODEL
    if not (out / "manifest.json").exists():
        tiny = build_all(work / "fixture", seed=0)
        convert(tiny["hf"], out, ConvertOptions(dtype="q4_0", progress=False, force=True))
    return out


def valid_body(kind: str, i: int, stream: bool) -> tuple[str, dict[str, Any]]:
    if kind == "chat":
        return "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": PROMPTS[i]}],
                                        "max_tokens": MAX_TOKENS, "temperature": 0, "stream": stream}
    return "/v1/completions", {"model": MODEL, "prompt": PROMPTS[i], "max_tokens": MAX_TOKENS, "temperature": 0,
                               "stream": stream}


def answer(c: httpx.Client, kind: str, i: int, stream: bool) -> tuple[int, str]:
    path, body = valid_body(kind, i, stream)
    if not stream:
        r = c.post(path, json=body)
        if r.status_code != 200:
            return r.status_code, r.text
        ch = r.json()["choices"][0]
        return 200, ch["message"]["content"] if kind == "chat" else ch["text"]
    text = []
    with c.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            return r.status_code, r.read().decode()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if "error" in ev:
                return 500, json.dumps(ev)
            ch = ev["choices"][0] if ev.get("choices") else {}
            text.append((ch.get("delta") or {}).get("content") or "" if kind == "chat" else ch.get("text") or "")
    return 200, "".join(text)


# (what, expected status) for the requests that must be refused
BAD = {
    "malformed_json": 400, "wrong_types": 400, "unknown_model": 404, "no_key": 401, "wrong_key": 401,
}


def bad_request(url: str, c: httpx.Client, what: str) -> int:
    if what == "malformed_json":
        return c.post("/v1/completions", content=b'{"model": "m", "prompt": ',
                      headers={"Content-Type": "application/json"}).status_code
    if what == "wrong_types":
        return c.post("/v1/chat/completions", json={"model": MODEL, "messages": "hi", "max_tokens": "5"}).status_code
    if what == "unknown_model":
        return c.post("/v1/completions", json={"model": "gpt-4", "prompt": "x"}).status_code
    headers = {} if what == "no_key" else {"Authorization": "Bearer nope"}
    return httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "x"}, headers=headers, timeout=30).status_code


def disconnect(url: str, rng: random.Random) -> None:
    """A client that goes away: a stream closed after its first event, or a request given up on."""
    path, body = valid_body(rng.choice(["chat", "completion"]), rng.randrange(len(PROMPTS)), True)
    body["max_tokens"] = 200
    headers = {"Authorization": f"Bearer {KEY}"}
    if rng.random() < 0.5:
        with httpx.Client(base_url=url, headers=headers, timeout=30) as c, c.stream("POST", path, json=body) as r:
            next(r.iter_lines())
    else:
        try:
            httpx.post(url + path, json={**body, "stream": False}, headers=headers, timeout=0.05)
        except httpx.TimeoutException:
            pass


def soak(layout: Path, clients: int = 16, seconds: float = 20.0, seed: int = 0, log: Path | None = None) -> dict[str, Any]:
    from mertools.layout import Layout

    global MODEL
    MODEL = layout.name  # the model id the server serves
    m = Layout.open(layout).manifest
    slot = max(e.nbytes for e in m.experts)
    cache_mb = 2.5 * slot / 2**20
    dense = sum(t.nbytes for t in m.dense.values())
    log = log or layout.parent / "soak-server.log"
    proc, url = start_server(layout, ["--cache-mb", f"{cache_mb}", "--api-key", KEY, "--max-concurrency", "8",
                                      "--max-queue", "64"], stderr=open(log, "w"))  # noqa: SIM115 - the child owns it
    counts: Counter[str] = Counter()
    problems: list[str] = []
    lock = threading.Lock()
    rss_peak = 0
    try:
        auth = {"Authorization": f"Bearer {KEY}"}
        with httpx.Client(base_url=url, headers=auth, timeout=120) as c:
            solo = {(k, i): answer(c, k, i, False)[1] for k in ("chat", "completion") for i in range(len(PROMPTS))}
        end = time.monotonic() + seconds
        stop = threading.Event()

        def sample() -> None:
            nonlocal rss_peak
            while not stop.wait(0.2):
                try:
                    rss_peak = max(rss_peak, _status(proc.pid)["VmRSS"])
                except (OSError, KeyError):
                    return

        def client(n: int) -> None:
            rng = random.Random(seed * 1000 + n)
            first = True  # each client's first request is set by its number, so that every kind runs however slow
            with httpx.Client(base_url=url, headers=auth, timeout=120) as c:
                while first or time.monotonic() < end:
                    r = (0.0, 0.6, 0.9)[n % 3] if first else rng.random()  # valid, bad, disconnect
                    try:
                        if r < 0.55:
                            kind, i, stream = rng.choice(["chat", "completion"]), rng.randrange(len(PROMPTS)), rng.random() < 0.5
                            if first:  # clients 0, 6, 12: a streamed chat; 3, 9, 15: a plain completion
                                kind, stream = ("chat", True) if n // 3 % 2 == 0 else ("completion", False)
                            code, text = answer(c, kind, i, stream)
                            what = f"valid_{kind}_{'stream' if stream else 'plain'}"
                            ok = code == 200 and text == solo[(kind, i)]
                            detail = f"{what} {PROMPTS[i]!r}: {code} {text[:200]!r} != solo {solo[(kind, i)]!r}"
                        elif r < 0.85:
                            what = sorted(BAD)[n // 3 % len(BAD)] if first else rng.choice(sorted(BAD))
                            code = bad_request(url, c, what)
                            ok, detail = code == BAD[what], f"{what}: status {code}, expected {BAD[what]}"
                        else:
                            what, code, ok, detail = "disconnect", 0, True, ""
                            disconnect(url, rng)
                    except Exception as e:  # a transport error on a request we did not abandon is a failure
                        what, code, ok, detail = "transport_error", 0, False, f"{type(e).__name__}: {e}"
                    first = False
                    with lock:
                        counts[what] += 1
                        counts["requests"] += 1
                        if code >= 500:
                            counts["5xx"] += 1
                        if not ok:
                            problems.append(detail)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(seconds + 300)
        stop.set()
        alive = proc.poll() is None
        healthy = alive and httpx.get(url + "/health").status_code == 200
        metrics = httpx.get(url + "/metrics", headers=auth).text if healthy else ""
        hwm = _status(proc.pid)["VmHWM"] if alive else 0
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    budget = int(cache_mb * 2**20) + dense + OVERHEAD
    # /health answers 503 while the engine loads, as documented: not an error
    server_5xx = sum(float(x.split()[-1]) for x in metrics.splitlines()
                     if x.startswith("mertools_requests_total{") and 'status="5' in x and "/health" not in x)
    return {
        "clients": clients, "seconds": seconds, "requests": counts["requests"], "by_kind": dict(sorted(counts.items())),
        "problems": len(problems), "first_problems": problems[:5], "5xx_seen": counts["5xx"],
        "5xx_server_metric": server_5xx,
        "status_metric": {x.split("{")[1].split("}")[0]: float(x.split()[-1]) for x in metrics.splitlines()
                          if x.startswith("mertools_requests_total{")}, "server_alive": alive, "server_healthy": healthy,
        "peak_rss_mb": round(max(hwm, rss_peak) / 2**20, 1), "cache_mb": round(cache_mb, 3),
        "dense_mb": round(dense / 2**20, 2), "budget_mb": round(budget / 2**20, 1),
        "ok": not problems and counts["5xx"] == 0 and server_5xx == 0 and healthy and max(hwm, rss_peak) <= budget,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--workdir", default="/tmp/mertools-soak")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the result here")
    args = ap.parse_args()
    res = soak(build_layout(Path(args.workdir)), args.clients, args.minutes * 60, args.seed)
    print(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    sys.exit(0 if res["ok"] else 1)


if __name__ == "__main__":
    main()
