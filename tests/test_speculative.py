"""Speculative decoding (runtime/speculative.py, Engine.generate(draft=...), run/serve --draft): the verification
step's rows are bit for bit decode steps, greedy output is the same with either drafter at any cache size and
prefetch mode, the acceptance rule keeps the sampled distribution exactly the target's (a chi-square test that a
wrong rule fails), the KV cache rolls back, and the CLI and server take the flags."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import mertools.runtime.speculative as speculative
from mertools.cli import main
from mertools.convert.pipeline import ConvertOptions, convert
from mertools.layout import Layout
from mertools.runtime.engine import Engine, RuntimeConfigError
from mertools.runtime.sampling import Sampler, SamplingParams
from mertools.runtime.speculative import Draft, NgramDrafter, accept_greedy, accept_sampled

TRAINED = Path(__file__).resolve().parent.parent / "fixtures" / "trained"
SNIPPET = (TRAINED / "held-out-julius-caesar.txt").read_text(encoding="utf-8")
# repetitive text: prompt lookup finds its n-grams again
REPEAT = "ROMEO:\nI will go, I will go, I will go to the house of Capulet.\nJULIET:\nI will go, I will go"


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The trained fixture as q4_0 (the target) and as q2_k (a draft sharing its tokenizer)."""
    root = tmp_path_factory.mktemp("spec")
    src = TRAINED / "tiny-shakespeare-moe"
    return {d: convert(src, root / d, ConvertOptions(dtype=d, progress=False)).out for d in ("q4_0", "q2_k")}


def _slots_mb(layout: Path, slots: int) -> float:
    return slots * max(e.nbytes for e in Layout.open(layout).manifest.experts) / 2**20 + 0.01


# ---------------------------------------------------------------------- pure pieces
def test_ngram_lookup() -> None:
    d = NgramDrafter(max_n=3)
    s = Sampler(SamplingParams())
    # the suffix [7, 8, 9] occurred before, followed by 1, 2, 3
    assert d.propose([7, 8, 9, 1, 2, 3, 4, 7, 8, 9], 3, s).tokens == [1, 2, 3]
    # the most recent earlier occurrence wins
    assert d.propose([5, 6, 5, 7, 5], 4, s).tokens == [7, 5, 7, 5]  # "5 7" repeats with period 2: continued
    assert d.propose([9, 4, 4, 4], 4, s).tokens == [4, 4, 4, 4]  # one token said again and again: a full draft
    assert d.propose([1, 2, 3, 1, 2, 3, 1], 5, s).tokens == [2, 3, 1, 2, 3]
    assert d.propose([1, 2, 3], 4, s).tokens == []  # nothing repeats
    assert d.propose([4], 4, s).tokens == []
    with pytest.raises(ValueError):
        NgramDrafter(max_n=1, min_n=2)


def test_greedy_acceptance() -> None:
    logits = np.zeros((4, 6), np.float32)
    for row, best in enumerate([2, 5, 1, 3]):
        logits[row, best] = 1.0
    assert accept_greedy(logits, [2, 5, 1]) == (3, 3)  # all accepted, then the bonus token
    assert accept_greedy(logits, [2, 4, 1]) == (1, 5)  # the second differs: the target's own token instead
    assert accept_greedy(logits[:1], []) == (0, 2)


def test_sampled_acceptance_edges() -> None:
    rng = np.random.default_rng(0)
    p = np.array([[0.0, 1.0, 0.0], [0.2, 0.3, 0.5]])
    assert accept_sampled(p, Draft([1]), rng)[0] == 1  # p(d) = 1: always accepted
    p = np.array([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    assert accept_sampled(p, Draft([1]), rng) == (0, 0)  # p(d) = 0: rejected, the residual is all on token 0
    q = np.array([[0.0, 0.0, 1.0]])
    p = np.array([[0.5, 0.0, 0.5], [1.0, 0.0, 0.0]])
    for _ in range(20):  # rejected half the time: then from max(0, p - q) = token 0 only
        j, t = accept_sampled(p, Draft([2], q), rng)
        assert (j, t) in ((1, 0), (0, 0))


def test_settle_uses_the_drafts_own_distribution() -> None:
    """The step both the engine and the server settle with: a sampled draft is judged by its own q (here q = p,
    always accepted; judged as a point mass it would be rejected half the time), the cache rolls back past the
    rejected rows, the counts add up."""
    from types import SimpleNamespace

    from mertools.runtime.speculative import AdaptiveK, SpecStats, settle

    sampler = Sampler(SamplingParams(temperature=1.0, seed=0))
    logits = np.log(np.array([[0.5, 0.5], [0.5, 0.5]], np.float32))
    q = np.array([[0.5, 0.5]])
    stats, adapt = SpecStats(), AdaptiveK(4)
    for _ in range(50):
        kv = SimpleNamespace(length=12)  # a target cache that holds the current token and the one drafted row
        j, _ = settle(logits, Draft([1], q), sampler, kv, adapt, stats)
        assert j == 1 and kv.length == 12
    assert (stats.steps, stats.drafted, stats.accepted, stats.tokens_per_step) == (50, 50, 50, 2.0)
    greedy = Sampler(SamplingParams())
    kv = SimpleNamespace(length=13)
    assert settle(np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]), Draft([0, 1]), greedy, kv, adapt, stats) == (0, 1)
    assert kv.length == 11  # both drafted rows forgotten


# ---------------------------------------------------------------------- the verification step
def test_verification_rows_are_decode_steps(layouts: dict[str, Path]) -> None:
    for kv in ("f32", "f16", "q8_0"):
        with Engine.open(layouts["q4_0"], cache_mb=_slots_mb(layouts["q4_0"], 3), kv_dtype=kv) as eng:
            ids = eng.tokenizer.encode(SNIPPET)[:30]
            eng.forward(ids[:20])
            one = np.concatenate([eng.forward([i]) for i in ids[20:]])
            eng.reset()
            eng.forward(ids[:20])
            many = eng.model.forward(np.array(ids[20:]), rows_apart=True)
            assert np.array_equal(one, many), kv
            # and the batched path (engine.step with verify) alongside another sequence's prompt
            kv_a, kv_b = eng.new_sequence(), eng.new_sequence()
            eng.step([(kv_a, ids[:20])])
            out = eng.step([(kv_a, ids[20:]), (kv_b, ids[:7])], verify=[True, False])
            assert np.array_equal(out[0], one) and out[1].shape == (eng.config.vocab_size,)


@pytest.mark.parametrize("drafter", ["ngram", "model"])
def test_greedy_output_is_the_same(layouts: dict[str, Path], drafter: str) -> None:
    target, draft_layout = layouts["q4_0"], layouts["q2_k"]
    for prompt in (REPEAT, SNIPPET[:300]):
        base = None
        for slots, prefetch in ((2, "lookahead"), (32, "none")) if prompt == REPEAT else ((5, "markov"),):
            with Engine.open(target, cache_mb=_slots_mb(target, slots), prefetch=prefetch) as eng:
                if base is None:
                    base = [t.id for t in eng.generate(prompt, max_tokens=40)]
                d = eng.open_drafter("ngram" if drafter == "ngram" else str(draft_layout))
                try:
                    for k in (1, 5):
                        got = [t.id for t in eng.generate(prompt, max_tokens=40, draft=d, draft_tokens=k)]
                        assert got == base, (prompt[:20], slots, prefetch, k)
                finally:
                    d.close()
                s = eng.stats()
                assert s["spec_steps"] > 0 and s["draft_proposed"] >= s["draft_accepted"]
                if drafter == "model":  # a q2_k copy of the same model agrees most of the time
                    assert s["draft_acceptance"] > 0.5 and s["tokens_per_step"] > 1.5


def test_fewer_steps_and_expert_reads_per_token(layouts: dict[str, Path]) -> None:
    """The target as its own draft (every draft accepted): a step verifies k + 1 tokens and reads each expert once
    for all of them, so fewer expert bytes per generated token than one step per token; n-gram drafts on
    repetitive text take fewer steps than tokens."""
    target = layouts["q4_0"]
    mb = _slots_mb(target, 8)  # a quarter of the experts
    runs = {}
    for name in ("plain", "self", "ngram"):
        with Engine.open(target, cache_mb=mb, prefetch="none") as eng:
            d = None if name == "plain" else eng.open_drafter("ngram" if name == "ngram" else str(target))
            try:
                eng.forward(eng.tokenizer.encode(REPEAT))  # prompt reads counted apart
                before = eng.stats()["bytes_read"]
                eng.reset()
                ids = [t.id for t in eng.generate(REPEAT, max_tokens=48, draft=d, draft_tokens=5)]
                s = eng.stats()
                runs[name] = (ids, s, s["bytes_read"] - before)
            finally:
                if d is not None:
                    d.close()
    assert runs["self"][0] == runs["plain"][0] == runs["ngram"][0]
    assert runs["self"][1]["draft_acceptance"] == 1.0 and runs["self"][1]["tokens_per_step"] > 5
    assert runs["self"][2] < runs["plain"][2]
    assert runs["ngram"][1]["spec_steps"] < 47  # some drafts pass: fewer steps than tokens


def test_the_kv_cache_rolls_back(layouts: dict[str, Path]) -> None:
    with Engine.open(layouts["q4_0"]) as eng:
        ids = eng.tokenizer.encode(REPEAT)
        toks = [t.id for t in eng.generate(ids, max_tokens=20, draft=NgramDrafter(), draft_tokens=5)]
        # every generated token but the last is in the cache, nothing rejected is left
        assert eng.model.kv.length == len(ids) + len(toks) - 1
        cached_logits = eng.forward([toks[-1]])
        eng.reset()
        fresh = eng.forward([*ids, *toks])[-1:]
        assert np.array_equal(np.argmax(cached_logits, 1), np.argmax(fresh, 1))


def test_a_draft_must_share_the_tokenizer(layouts: dict[str, Path], tiny_q4_0: Path) -> None:
    with Engine.open(layouts["q4_0"]) as eng, pytest.raises(RuntimeConfigError, match="share the target's tokenizer"):
        eng.open_drafter(str(tiny_q4_0))
    with Engine.open(layouts["q4_0"]) as eng, pytest.raises(RuntimeConfigError, match="draft_tokens"):
        list(eng.generate("Hi", max_tokens=2, draft=NgramDrafter(), draft_tokens=0))


# ---------------------------------------------------------------------- the sampled distribution
def _exact_distribution(eng: Engine, ids: list[int], params: SamplingParams, n: int) -> dict[tuple[int, ...], float]:
    """The target sampler's probability of every sequence of its next n tokens, by enumeration."""
    s = Sampler(params)
    out: dict[tuple[int, ...], float] = {}

    def walk(prefix: tuple[int, ...], prob: float) -> None:
        if len(prefix) == n:
            out[prefix] = prob
            return
        eng.reset()
        p = s.distribution(eng.forward([*ids, *prefix])[-1])
        for t in np.nonzero(p)[0]:
            walk((*prefix, int(t)), prob * p[t])

    walk((), 1.0)
    return out


def _chi_square(samples: list[tuple[int, ...]], exact: dict[tuple[int, ...], float]) -> tuple[float, int]:
    """Pearson's statistic of the samples against the exact distribution (cells expecting fewer than 5 merged,
    a sample outside the support in a cell of its own: expected ~0, so a huge statistic) and its degrees of freedom."""
    n = len(samples)
    counts: dict[tuple[int, ...], int] = {}
    for x in samples:
        counts[x] = counts.get(x, 0) + 1
    big = {k for k, p in exact.items() if p * n >= 5}
    stat, cells = 0.0, 0
    for k in big:
        stat += (counts.get(k, 0) - exact[k] * n) ** 2 / (exact[k] * n)
        cells += 1
    rest_p = sum(p for k, p in exact.items() if k not in big)
    rest_n = sum(c for k, c in counts.items() if k not in big and k in exact)
    if rest_p * n >= 1:
        stat += (rest_n - rest_p * n) ** 2 / (rest_p * n)
        cells += 1
    outside = sum(c for k, c in counts.items() if k not in exact)
    stat += outside * 1e6
    return stat, cells - 1


def _wrong_residual(p: np.ndarray, draft: Draft, rng: np.random.Generator) -> tuple[int, int]:
    """A subtly broken rule: on rejection it draws from p itself rather than the residual, so drafted tokens come
    out too often."""
    for i, d in enumerate(draft.tokens):
        q = 1.0 if draft.q is None else float(draft.q[i][d])
        if rng.random() < min(1.0, float(p[i, d]) / q):
            continue
        return i, int(rng.choice(p.shape[1], p=p[i]))
    return len(draft.tokens), int(rng.choice(p.shape[1], p=p[len(draft.tokens)]))


def _accept_all(p: np.ndarray, draft: Draft, rng: np.random.Generator) -> tuple[int, int]:
    """A grossly broken rule: every draft accepted."""
    return len(draft.tokens), int(rng.choice(p.shape[1], p=p[len(draft.tokens)]))


def _first_token_chi_square(rule, p: np.ndarray, q: np.ndarray | None, n: int, seed: int) -> float:  # noqa: ANN001
    """Pearson's statistic of the first emitted token over n trials of a one-token draft (drawn from q, or the
    point mass on token 0) against p's first row (every cell expects >= 5 here)."""
    rng = np.random.default_rng(seed)
    counts = np.zeros(p.shape[1])
    for _ in range(n):
        d = 0 if q is None else int(rng.choice(p.shape[1], p=q))
        j, t = rule(p, Draft([d], None if q is None else q[None]), rng)
        counts[d if j == 1 else t] += 1
    want = p[0] * n
    return float(((counts - want) ** 2 / want).sum())


def test_the_acceptance_rule_reproduces_the_target() -> None:
    """The rule alone, many trials: whatever the draft distribution (a point mass, or a q unlike p), the first
    emitted token is distributed as p; a rule drawing rejections from p instead of the residual is caught."""
    p = np.array([[0.35, 0.25, 0.2, 0.12, 0.08], [0.2] * 5])
    q = np.array([0.1, 0.5, 0.1, 0.1, 0.2])
    bound = 4 + 5 * np.sqrt(8)  # chi-square with 4 degrees of freedom, 5 sigma
    for draft_q in (None, q):
        assert _first_token_chi_square(accept_sampled, p, draft_q, 20000, 1) < bound
        assert _first_token_chi_square(_wrong_residual, p, draft_q, 20000, 2) > bound


@pytest.mark.parametrize("drafter", ["ngram", "model"])
def test_sampling_keeps_the_target_distribution(layouts: dict[str, Path], drafter: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Seeded samples of the next three tokens with drafts, against the target sampler's exact distribution (by
    enumeration). The n-gram drafts here are mostly rejected (the residual path), the q2_k draft's mostly accepted;
    a rule that accepts every draft fails the same test."""
    params = SamplingParams(temperature=1.0, top_k=3)
    n_tokens, n_samples = 3, 500  # the first token comes from the prompt: drafts check the second and third
    with Engine.open(layouts["q4_0"]) as eng:
        ids = eng.tokenizer.encode("JULIET:\nGood night, good night, good night")
        exact = _exact_distribution(eng, ids, params, n_tokens)
        d = eng.open_drafter("ngram" if drafter == "ngram" else str(layouts["q2_k"]))

        def sample(seed: int) -> tuple[int, ...]:
            return tuple(t.id for t in eng.generate(ids, max_tokens=n_tokens, temperature=1.0, top_k=3, seed=seed,
                                                    draft=d, draft_tokens=3))

        try:
            good = [sample(i) for i in range(n_samples)]
            s = eng.stats()
            assert s["draft_proposed"] > n_samples / 2 and (drafter == "ngram" or s["draft_acceptance"] > 0.5)
            stat, df = _chi_square(good, exact)
            assert stat < df + 5 * np.sqrt(2 * df), (stat, df)  # 5 sigma: chi-square(df) has mean df, variance 2 df
            if drafter == "ngram":  # its drafts are often tokens the sampler never gives: accepting them shows
                monkeypatch.setattr(speculative, "accept_sampled", _accept_all)
                bad = [sample(i) for i in range(n_samples)]
                stat_bad, df_bad = _chi_square(bad, exact)
                assert stat_bad > df_bad + 5 * np.sqrt(2 * df_bad), (stat_bad, df_bad)
        finally:
            d.close()


# ---------------------------------------------------------------------- CLI and server
def test_run_flags(layouts: dict[str, Path], tmp_path: Path) -> None:
    args = ["run", str(layouts["q4_0"]), "-p", REPEAT, "-n", "24", "--cache-mb", "2"]
    plain = CliRunner().invoke(main, [*args, "--json", str(tmp_path / "a.json")])
    spec = CliRunner().invoke(main, [*args, "--draft", "ngram", "--draft-tokens", "5", "--json", str(tmp_path / "b.json")])
    model = CliRunner().invoke(main, [*args, "--draft", str(layouts["q2_k"]), "--json", str(tmp_path / "c.json")])
    for r in (plain, spec, model):
        assert r.exit_code == 0, r.output
    assert plain.stdout == spec.stdout == model.stdout
    s = json.loads((tmp_path / "b.json").read_text())
    assert s["spec_steps"] > 0 and "speculate" in spec.stderr
    per_token = s["bytes_read"] / s["generated_tokens"] / 2**20
    assert f"{per_token:.1f} MiB of experts read per generated token" in spec.stderr
    bad = CliRunner().invoke(main, [*args, "--draft", str(tmp_path / "nowhere")])
    assert bad.exit_code == 2 and "nowhere" in bad.output


@pytest.mark.parametrize("drafter", ["ngram", "model"])
def test_serve_with_drafts_batches_and_matches(layouts: dict[str, Path], drafter: str) -> None:
    """Concurrent greedy completions through the server with --draft ngram or a draft layout (a KV cache per
    sequence): each the text the engine gives alone, and the drafted and accepted counts on /metrics."""
    from family_checks import serve_concurrently

    prompts = [REPEAT, SNIPPET[:200], REPEAT[:60], "JULIET:\nI will go, I will go"]
    with Engine.open(layouts["q4_0"]) as eng:
        want = ["".join(t.text for t in eng.generate(p, max_tokens=20)) for p in prompts]
    draft = "ngram" if drafter == "ngram" else str(layouts["q2_k"])
    got, text = serve_concurrently(layouts["q4_0"], prompts, 20, max_concurrency=4, draft=draft, draft_tokens=4)
    assert got == want
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line.startswith("mertools_draft")}
    assert values["mertools_draft_accepted_tokens_total"] > 0
    assert values["mertools_draft_tokens_total"] >= values["mertools_draft_accepted_tokens_total"]


def test_adaptive_draft_length() -> None:
    from mertools.runtime.speculative import AdaptiveK

    a = AdaptiveK(4, probe=3)
    assert a.next() == 4
    a.update(4, 0)
    assert a.next() == 2  # none accepted: half as many
    a.update(2, 1)
    assert a.next() == 2  # some accepted: unchanged
    a.update(2, 0)
    a.update(1, 0)
    assert [a.next() for _ in range(6)] == [0, 0, 1, 0, 0, 1]  # at zero: a one-token probe every third step
    a.update(1, 1)
    assert a.next() == 2  # a probe that passed: grows back, one more each time all pass
    for _ in range(5):
        a.update(a.next(), a.next())
    assert a.next() == 4  # never past the most asked for
