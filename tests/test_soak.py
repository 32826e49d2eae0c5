"""The server under load (short form): 16 concurrent clients for 20 s against the real `mertools serve`
process on loopback, mixing valid greedy requests (streamed or not, chat or completion), malformed
JSON, wrong field types, unknown models, missing and wrong API keys, and clients that disconnect
mid-stream: no 5xx, no unexpected status, every valid answer equal to its solo answer, the server
alive and healthy, peak RSS within the cache budget + dense weights + 512 MiB. The long form is
`python benchmarks/soak_server.py --clients 16 --minutes 3` (figures in docs/RELIABILITY.md)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from benchmarks.soak_server import soak
from mertools.convert.pipeline import ConvertOptions, convert
from mertools.layout import Layout

SECONDS = float(os.environ.get("MERTOOLS_SOAK_SECONDS", "20"))


@pytest.fixture(scope="module")
def layout(tiny_q4_0: Path) -> Path:
    return tiny_q4_0


def test_soak_short_form(layout: Path) -> None:
    res = soak(layout, clients=16, seconds=SECONDS, seed=1)
    print(f"\nsoak: {res}")
    assert res["problems"] == 0, res["first_problems"]
    assert res["5xx_seen"] == 0 and res["5xx_server_metric"] == 0
    assert res["server_alive"] and res["server_healthy"]
    assert res["peak_rss_mb"] <= res["budget_mb"], res
    kinds = res["by_kind"]
    for what in ("valid_chat_stream", "valid_completion_plain", "malformed_json", "no_key", "wrong_key", "disconnect"):
        assert kinds.get(what, 0) > 0, (what, kinds)  # every kind of client really ran
    assert res["ok"]


def test_serve_rss_stays_within_budget_on_a_layout_much_larger_than_its_cache(tmp_path: Path) -> None:
    """16 concurrent clients on 226 MB of experts through a 9 MB cache: peak RSS of the server process
    (VmHWM) within cache + dense + 512 MiB, as for `mertools run` in tests/test_memory.py."""
    from fixtures.tiny_mixtral import synth_mixtral_gguf

    gguf = synth_mixtral_gguf(tmp_path / "mid.gguf", 8, seed=3, d_model=1024, d_ff=2048, n_expert=8, n_head=8, n_kv=2,
                              vocab=1024, n_ctx=512)
    lay = convert(gguf, tmp_path / "mid-q4", ConvertOptions(progress=False)).out
    gguf.unlink()
    res = soak(lay, clients=16, seconds=min(SECONDS, 10), seed=2)
    print(f"\nsoak (mid): {res}")
    experts = sum(e.nbytes for e in Layout.open(lay).manifest.experts)
    assert experts > 20 * res["cache_mb"] * 2**20  # the cache really streams
    assert res["ok"] and res["problems"] == 0 and res["peak_rss_mb"] <= res["budget_mb"], res
