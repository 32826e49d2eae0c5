"""Generation, sampling and `mertools run` on the tiny fixture's layouts."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mertools.cli import main
from mertools.layout import Layout
from mertools.runtime.engine import Engine
from mertools.runtime.prefetch import Prefetcher
from mertools.runtime.sampling import Sampler, SamplingParams
from mertools.runtime.trace import read_trace, routing_summary

PROMPT = "The old lighthouse keeper"


@pytest.fixture(scope="module")
def layout(tiny_q4_0: Path) -> Path:
    return tiny_q4_0


@pytest.fixture(scope="module")
def gguf_layout(tiny_layout: Callable[..., Path]) -> Path:
    return tiny_layout("f16", "q4_0")  # the f16 GGUF through the same Q4_0 preset as the HF layout


def slot_mb(layout: Path) -> float:
    return max(e.nbytes for e in Layout.open(layout).manifest.experts) / 2**20


def generate(layout: Path, cache_slots: int | None = None, **kw) -> list[tuple[int, str, str | None]]:
    cache_mb = cache_slots * slot_mb(layout) if cache_slots else None
    with Engine.open(layout, cache_mb=cache_mb) as eng:
        return [(t.id, t.text, t.finish_reason) for t in eng.generate(PROMPT, **kw)]


def test_greedy_is_identical_across_runs_cache_sizes_and_sources(layout: Path, gguf_layout: Path) -> None:
    want = generate(layout, max_tokens=24)
    assert len(want) == 24 and want[-1][2] == "length"
    assert generate(layout, max_tokens=24) == want
    for slots in (2, 3, 6):
        assert generate(layout, cache_slots=slots, max_tokens=24) == want, slots
    # the same model converted from its GGUF (a different tokenizer path) generates the same
    assert [t[0] for t in generate(gguf_layout, max_tokens=24)] == [t[0] for t in want]


def test_seeded_sampling_is_reproducible(layout: Path) -> None:
    a = generate(layout, max_tokens=16, temperature=1.0, top_p=0.95, seed=7)
    assert generate(layout, cache_slots=2, max_tokens=16, temperature=1.0, top_p=0.95, seed=7) == a
    b = generate(layout, max_tokens=16, temperature=1.0, top_p=0.95, seed=8)
    assert [t[0] for t in a] != [t[0] for t in b]


def test_text_pieces_join_to_the_decoded_ids(layout: Path) -> None:
    with Engine.open(layout) as eng:
        toks = list(eng.generate(PROMPT, max_tokens=20, temperature=0.8, seed=3))
        assert "".join(t.text for t in toks) == eng.tokenizer.decode([t.id for t in toks])


def test_stop_string_ends_generation_before_it(layout: Path) -> None:
    full = "".join(t[1] for t in generate(layout, max_tokens=30))
    stop = next(full[i:i + 3] for i in range(4, len(full) - 3) if full[i:i + 3].strip())
    out = generate(layout, max_tokens=30, stop=[stop])
    text = "".join(t[1] for t in out)
    assert out[-1][2] == "stop" and stop not in text and full.startswith(text) and text == full[:full.find(stop)]


def test_engine_open_takes_the_hooks_and_a_prefetcher_factory(layout: Path) -> None:
    class Counting(Prefetcher):
        mode = "counting"

        def __init__(self) -> None:
            self.guesses = 0

        def guess(self, layer: int, chosen: np.ndarray, hidden: np.ndarray, k: int) -> list[int]:
            self.guesses += 1
            return []

    made: list[Counting] = []
    routes: list[tuple[int, list[list[int]]]] = []

    def factory(router: object) -> Counting:
        made.append(Counting())
        return made[-1]

    def trace(pos: np.ndarray, layer: int, chosen: np.ndarray, weights: np.ndarray) -> None:
        routes.append((layer, chosen.tolist()))

    def override(layer: int, pos: np.ndarray) -> np.ndarray:
        return np.tile([3, 1], (len(pos), 1))

    with Engine.open(layout, prefetch=factory, trace=trace, routing_override=override) as eng:
        assert len(list(eng.generate(PROMPT, max_tokens=3))) == 3
        assert eng.model.prefetcher is made[0] and made[0].guesses > 0
        assert eng.stats()["prefetch"] == "counting"
    assert {layer for layer, _ in routes} == {0, 1}
    assert all(row == [3, 1] for _, rows in routes for row in rows)  # the trace sees the override's choice


def test_sampler_rules() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=50).astype(np.float32)
    greedy = int(np.argmax(logits))
    assert Sampler(SamplingParams())(logits) == greedy
    assert all(Sampler(SamplingParams(1.0, top_k=1, seed=s))(logits) == greedy for s in range(5))
    assert all(Sampler(SamplingParams(1.0, top_p=1e-6, seed=s))(logits) == greedy for s in range(5))
    top3 = set(np.argsort(-logits)[:3].tolist())
    s = Sampler(SamplingParams(1.0, top_k=3, seed=1))
    assert {s(logits) for _ in range(200)} == top3
    # at temperature 1 the empirical frequencies follow the softmax
    small = np.array([0.0, 1.0, 2.0], np.float32)
    s = Sampler(SamplingParams(1.0, seed=2))
    freq = np.bincount([s(small) for _ in range(6000)], minlength=3) / 6000
    p = np.exp(small) / np.exp(small).sum()
    assert np.abs(freq - p).max() < 0.03
    for bad in (dict(temperature=-1), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_run_cli_streams_text_and_reports(layout: Path, tmp_path: Path) -> None:
    js, trace = tmp_path / "run.json", tmp_path / "trace.zst"
    res = CliRunner().invoke(main, ["run", str(layout), "-p", PROMPT, "-n", "12", "--cache-mb", str(3 * slot_mb(layout)),
                                    "--io", "direct", "--json", str(js), "--trace-out", str(trace)])
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith(PROMPT)
    for word in ("prefill", "decode", "hit rate", "latency p50/p95/p99", "O_DIRECT yes", "prefetch", "peak RSS"):
        assert word in res.stderr, word
    stats = json.loads(js.read_text())
    # no pass ahead of the prompt: the line reports numba compiling during the run, when it did (a cold cache)
    assert stats["warmup_s"] >= 0 and ("warm-up" in res.stderr) == (stats["warmup_s"] > 0)
    assert stats["warmup_s"] == 0 or "numba is compiling this machine's kernels" in res.stderr  # said as it began
    assert list(stats) == [  # the --json schema
        "prompt_tokens", "prefill_tok_s", "warmup_s", "generated_tokens", "decode_tok_s", "ttft_s", "expert_lookups",
        "expert_hits",
        "expert_misses", "hit_rate", "bytes_read", "read_mb_s", "read_latency_ms", "read_wait_share", "prefetch_issued",
        "prefetch_used", "prefetch_wasted", "prefetch_cancelled", "read_retries", "cache_slots", "cache_mb", "prefetch",
        "o_direct", "peak_rss_mb", "keep_pages", "mapped", "packed_copies_mapped", "packed_copies_written", "prefetch_ahead",
        "prefetch_depth", "kv_dtype",
        "kernels", "compiled_steps", "experts_filled", "kv_bytes_per_token",
        "kv_mb", "approx",
        "expert_choices_per_token", "approx_dropped", "approx_substituted", "approx_dropped_per_token",
        "approx_substituted_per_token", "approx_standins", "approx_standins_per_token", "standin_bytes_read",
        "history_preloaded", "history_tokens", "spec_steps", "draft_proposed",
        "draft_accepted", "draft_acceptance", "tokens_per_step", "finish_reason"]
    assert list(stats["read_latency_ms"]) == ["50", "95", "99"] and stats["read_mb_s"] > 0
    assert 0 < stats["read_latency_ms"]["50"] <= stats["read_latency_ms"]["95"] <= stats["read_latency_ms"]["99"]
    assert stats["generated_tokens"] == 12 and stats["cache_slots"] == 3 and stats["bytes_read"] > 0
    assert stats["expert_hits"] + stats["expert_misses"] == stats["expert_lookups"] > 0
    records = [r for r in read_trace(trace) if "experts" in r]  # the routing records; the last is the reads record
    assert len(records) == (stats["prompt_tokens"] + 11) * 2  # every position of every layer, once
    assert all(len(r["experts"]) == 2 and abs(sum(r["weights"]) - 1) < 1e-4 for r in records)
    summary = routing_summary(records, 2, 4)
    assert all(s["distinct"] >= 2 and s["entropy_bits"] > 0.5 for s in summary)


def test_run_cli_bad_input(layout: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(main, ["run", str(layout), "--cache-mb", str(slot_mb(layout))])
    assert res.exit_code == 2 and "smaller than one layer's active experts" in res.output
    res = runner.invoke(main, ["run", str(tmp_path / "missing")])
    assert res.exit_code == 2 and "missing" in res.output and len(res.output.strip().splitlines()) == 1
    res = runner.invoke(main, ["run", str(layout), "-p", "word " * 600, "-n", "4"])
    assert res.exit_code == 2 and "context" in res.output
