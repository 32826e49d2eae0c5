"""Approximate routing (mertools/runtime/approx.py): the pure rules on hand-made arrays, then the engine on
the trained fixture (fixtures/trained) and a tiny OLMoE (weights not renormalised), then the CLI flags."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from mertools.cli import main
from mertools.convert.pipeline import ConvertOptions, convert
from mertools.families.pieces import top_k
from mertools.layout import Layout
from mertools.runtime.approx import Approx, adaptive_topk, apply, shares, substitute
from mertools.runtime.engine import Engine, RuntimeConfigError
from mertools.runtime.prefetch import Prefetcher

TRAINED = Path(__file__).resolve().parent.parent / "fixtures" / "trained"
SNIPPET = (TRAINED / "held-out-julius-caesar.txt").read_text(encoding="utf-8")


# ---------------------------------------------------------------------- settings
def test_defaults_are_exact_and_settings_are_validated() -> None:
    assert Approx().exact and Approx().describe() == "exact"
    assert not Approx(topk_tau=0.1).exact and not Approx(resident_delta=0.05).exact
    assert Approx(0.1, 0.05, True).describe() == "topk_tau=0.1 resident_delta=0.05 resident_top1"
    for bad in (dict(topk_tau=-0.1), dict(topk_tau=1.0), dict(topk_tau=float("nan")), dict(resident_delta=-1e-3),
                dict(resident_delta=float("inf")), dict(resident_top1=True), dict(resident_top1=1, resident_delta=0.1),
                dict(topk_tau="0.1")):
        with pytest.raises(ValueError):
            Approx(**bad)


# ---------------------------------------------------------------------- adaptive top-k
def _family(norm: bool, scaling: float = 1.0, k: int = 3):  # noqa: ANN202 - what pieces.top_k reads
    return SimpleNamespace(norm_topk_prob=norm, routed_scaling=scaling, n_experts_used=k, n_groups=1), \
        SimpleNamespace(expert_bias=None)


def _route(scores: np.ndarray, norm: bool, scaling: float = 1.0, k: int = 3):  # noqa: ANN202
    """The family's own choice and weights, and its reweigh (pieces.top_k with a given choice)."""
    cfg, w = _family(norm, scaling, k)
    chosen, weights = top_k(cfg, w, scores)
    return chosen, weights, lambda rows, c: top_k(cfg, w, scores[rows], c)[1]


def test_shares_and_the_kept_choices() -> None:
    w = np.array([[0.6, 0.3, 0.1], [1.5, 1.5, 0.0], [0.0, 0.0, 0.0]])  # a scaled row, a row of underflowed sigmoids
    np.testing.assert_allclose(shares(w), [[0.6, 0.3, 0.1], [0.5, 0.5, 0.0], [1 / 3] * 3])
    assert adaptive_topk(w, 0.2).tolist() == [[True, True, False], [True, True, False], [True, True, True]]
    # never all of them: the largest share stays whatever tau
    assert adaptive_topk(w, 0.99).tolist() == [[True, False, False], [True, False, False], [True, False, False]]


SCORES = np.array([[0.50, 0.30, 0.15, 0.05, 0.0],
                   [0.34, 0.33, 0.32, 0.01, 0.0]], np.float32)  # softmax-like router scores, 5 experts, top-3


@pytest.mark.parametrize("scaling", [1.0, 2.5])
def test_skipped_choices_renormalised_like_the_family(scaling: float) -> None:
    chosen, weights, reweigh = _route(SCORES, norm=True, scaling=scaling)
    r = apply(Approx(topk_tau=0.2), chosen, weights, SCORES, SCORES, np.zeros(5, bool), reweigh)
    assert (r.dropped, r.substituted) == (1, 0)
    # row 0 keeps 0 and 1 renormalised between them (x routed scaling); row 1 keeps its three, untouched,
    # and row 0 is padded with its first kept expert, weight 0, not live
    assert r.chosen.tolist() == [[0, 1, 0], [0, 1, 2]]
    assert r.live.tolist() == [[True, True, False], [True, True, True]]
    np.testing.assert_allclose(r.weights[0], [0.5 / 0.8 * scaling, 0.3 / 0.8 * scaling, 0.0], rtol=1e-6)
    assert np.array_equal(r.weights[1], weights[1])  # a row nothing changed keeps its weights bit for bit
    np.testing.assert_allclose(r.weights.sum(axis=1), scaling, rtol=1e-6)


def test_skipped_choices_without_renormalisation_keep_the_router_weights() -> None:
    chosen, weights, reweigh = _route(SCORES, norm=False)
    # shares are of the token's mixture (0.15 / 0.95 < 0.2), the same whether the family renormalises or not
    r = apply(Approx(topk_tau=0.2), chosen, weights, SCORES, SCORES, np.zeros(5, bool), reweigh)
    assert r.chosen[0, :2].tolist() == [0, 1] and r.live[0].tolist() == [True, True, False]
    np.testing.assert_array_equal(r.weights[0], [weights[0, 0], weights[0, 1], 0.0])  # the skipped term is left out


def test_every_row_changed_narrows_the_choice() -> None:
    scores = SCORES[:1]
    chosen, weights, reweigh = _route(scores, norm=True)
    r = apply(Approx(topk_tau=0.4), chosen, weights, scores, scores, np.zeros(5, bool), reweigh)
    assert r.chosen.tolist() == [[0]] and r.live.all() and r.dropped == 2
    np.testing.assert_allclose(r.weights, [[1.0]])


# ---------------------------------------------------------------------- substitution
def _resident(*experts: int, n: int = 5) -> np.ndarray:
    out = np.zeros(n, bool)
    out[list(experts)] = True
    return out


def test_substitution_within_delta_of_the_routed_mass() -> None:
    scores = np.array([[0.40, 0.30, 0.25, 0.05]])
    chosen, live = np.array([[0, 1]]), np.ones((1, 2), bool)
    # expert 1 (0.30) is not resident, 2 (0.25) is: 0.05 apart, the token's routed mass is 0.70
    new, rep = substitute(chosen, live, scores, scores, _resident(2, n=4), delta=0.08)  # 0.05 <= 0.056
    assert new.tolist() == [[0, 2]] and rep.tolist() == [[False, True]]
    new, rep = substitute(chosen, live, scores, scores, _resident(2, n=4), delta=0.07)  # 0.05 > 0.049
    assert new.tolist() == [[0, 1]] and not rep.any()
    # resident choices stay, whatever delta
    new, rep = substitute(chosen, live, scores, scores, _resident(1, 2, n=4), delta=10.0)
    assert new.tolist() == [[0, 1]] and not rep.any()


def test_the_top1_choice_is_replaced_only_when_asked() -> None:
    scores = np.array([[0.30, 0.29, 0.28, 0.13]])
    chosen, live = np.array([[0, 1]]), np.ones((1, 2), bool)
    new, rep = substitute(chosen, live, scores, scores, _resident(2, 3, n=4), delta=1.0)
    assert new.tolist() == [[0, 2]]  # the nearest resident expert, for the second choice only
    new, rep = substitute(chosen, live, scores, scores, _resident(2, 3, n=4), delta=1.0, top1=True)
    assert new.tolist() == [[2, 3]] and rep.all()  # each resident expert once per token
    # the top-1 is the highest choice score, wherever it sits in the row (a replayed routing's order)
    new, _ = substitute(chosen[:, ::-1], live, scores, scores, _resident(2, 3, n=4), delta=1.0)
    assert new.tolist() == [[2, 0]]


def test_substitution_ranks_and_measures_by_the_choice_scores() -> None:
    scores = np.array([[0.40, 0.30, 0.25, 0.20]])
    choice = scores + np.array([0.0, 0.0, -0.2, 0.0])  # a correction bias that only chooses
    chosen, live = np.array([[0, 1]]), np.ones((1, 2), bool)
    new, _ = substitute(chosen, live, scores, choice, _resident(2, 3, n=4), delta=0.2)  # 3 beats 2 by choice
    assert new.tolist() == [[0, 3]]
    new, _ = substitute(chosen, live, scores, choice, _resident(2, n=4), delta=0.2)  # 0.25 apart by choice > 0.14
    assert new.tolist() == [[0, 1]]


def test_a_batch_substitutes_only_what_saves_a_read() -> None:
    scores = np.array([[0.40, 0.00, 0.00, 0.20, 0.00, 0.30],
                       [0.00, 0.00, 0.40, 0.00, 0.00, 0.30],
                       [0.00, 0.45, 0.00, 0.00, 0.35, 0.00],
                       [0.00, 0.00, 0.00, 0.00, 0.50, 0.40]])
    chosen = np.array([[0, 5], [2, 5], [1, 4], [4, 5]])
    live = np.ones((4, 2), bool)
    # rows 0 and 1 could each swap 5 for resident 3 (within delta only for row 0); row 1 keeps 5, so row 0's
    # swap would save nothing and is undone. Row 2's 4 is read anyway for row 3's top-1: not replaced.
    new, rep = substitute(chosen, live, scores, scores, _resident(0, 2, 3, n=6), delta=0.2)
    assert new.tolist() == chosen.tolist() and not rep.any()
    # without rows 1 and 3 (which read 5 anyway), row 0's swap stands
    new, rep = substitute(chosen[[0, 2]], live[:2], scores[[0, 2]], scores[[0, 2]], _resident(0, 2, 3, n=6), 0.2)
    assert new.tolist() == [[0, 3], [1, 4]] and rep.tolist() == [[False, True], [False, False]]


def test_substitute_weights_come_from_its_own_score() -> None:
    scores = np.array([[0.40, 0.30, 0.25, 0.05]], np.float32)
    chosen, weights, reweigh = _route(scores, norm=True, k=2)
    r = apply(Approx(resident_delta=0.1), chosen, weights, scores, scores, _resident(0, 2, n=4), reweigh)
    assert r.chosen.tolist() == [[0, 2]] and (r.dropped, r.substituted) == (0, 1)
    np.testing.assert_allclose(r.weights, [[0.40 / 0.65, 0.25 / 0.65]], rtol=1e-6)
    # combined: tau first on the router's weights (expert 4's 0.15 / 0.93 skipped), then substitution among
    # the kept (1 by resident 2, 0.24 <= 0.3 x 0.93; not by the nearer 4, one of the token's own choices)
    scores = np.array([[0.50, 0.28, 0.04, 0.03, 0.15]], np.float32)
    chosen, weights, reweigh = _route(scores, norm=True, k=3)
    assert chosen.tolist() == [[0, 1, 4]]
    r = apply(Approx(0.2, 0.3), chosen, weights, scores, scores, _resident(0, 2, 4), reweigh)
    assert r.chosen.tolist() == [[0, 2]] and (r.dropped, r.substituted) == (1, 1)
    np.testing.assert_allclose(r.weights, [[0.50 / 0.54, 0.04 / 0.54]], rtol=1e-6)


def test_top1_is_never_replaced_on_random_routing() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        logits = rng.standard_normal((3, 8))
        scores = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        chosen = np.argsort(-scores, axis=1, kind="stable")[:, :3]
        resident = rng.random(8) < 0.5
        new, rep = substitute(chosen, np.ones((3, 3), bool), scores, scores, resident, delta=rng.random())
        assert (new[:, 0] == chosen[:, 0]).all() and not rep[:, 0].any()
        assert all(len(set(row)) == 3 for row in new.tolist())  # each expert once per token
        free = resident.copy()
        free[chosen[:, 0]] = True  # the top-1 choices are read anyway
        assert free[new[rep]].all()


# ---------------------------------------------------------------------- the engine, on the trained fixture
@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert(TRAINED / "tiny-shakespeare-moe", tmp_path_factory.mktemp("approx") / "f16",
                   ConvertOptions(progress=False)).out


def _slots_mb(layout: Path, slots: int) -> float:
    return slots * max(e.nbytes for e in Layout.open(layout).manifest.experts) / 2**20 + 0.01


def _ids(layout: Path, n: int = 48) -> list[int]:
    with Engine.open(layout, cache_mb=_slots_mb(layout, 32)) as eng:
        return eng.tokenizer.encode(SNIPPET)[:n]


def _decode(layout: Path, ids: list[int], slots: int, prefill: int = 4, **kw) -> tuple[np.ndarray, dict]:
    """A prefill of `prefill` ids, then the rest one by one (teacher-forced decode): (logits, stats)."""
    with Engine.open(layout, cache_mb=_slots_mb(layout, slots), **kw) as eng:
        out = [eng.forward(ids[:prefill])] + [eng.forward([i]) for i in ids[prefill:]]
        return np.concatenate(out), eng.stats()


def test_exact_settings_give_identical_logits(trained: Path) -> None:
    ids = _ids(trained, 24)
    base, s0 = _decode(trained, ids, slots=8)
    same, s1 = _decode(trained, ids, slots=8, approx=Approx())
    assert np.array_equal(base, same)
    assert s0["approx"] == s1["approx"] == "exact" and s1["approx_dropped"] == s1["approx_substituted"] == 0
    assert s1["expert_choices_per_token"] == 2 * 4
    with pytest.raises(RuntimeConfigError, match="Approx"):
        Engine.open(trained, approx={"topk_tau": 0.1})


def test_tau_reads_fewer_expert_bytes(trained: Path) -> None:
    ids = _ids(trained)
    base, s0 = _decode(trained, ids, slots=8, prefetch="none")
    got, s = _decode(trained, ids, slots=8, prefetch="none", approx=Approx(topk_tau=0.3))
    assert s["approx"] == "topk_tau=0.3" and s["approx_substituted"] == 0
    assert 0.5 < s["approx_dropped_per_token"] < 4  # of 8 choices a token, never its top-1 (4 layers x 1)
    assert s["expert_lookups"] < s0["expert_lookups"] and s["bytes_read"] < s0["bytes_read"]
    assert (got.argmax(1) == base.argmax(1)).mean() > 0.6  # an approximation, not a different model


def test_delta_raises_the_hit_rate_of_a_small_cache(trained: Path) -> None:
    ids = _ids(trained)
    _, s0 = _decode(trained, ids, slots=6, prefill=1, prefetch="none")
    got, s = _decode(trained, ids, slots=6, prefill=1, prefetch="none", approx=Approx(resident_delta=0.2))
    assert s["approx_substituted"] > 0 and s["approx_dropped"] == 0
    assert s["expert_misses"] < s0["expert_misses"] and s["hit_rate"] > s0["hit_rate"]
    assert s["expert_lookups"] == s0["expert_lookups"]  # as many experts a step, others


class _Top1Check(Prefetcher):
    """Guesses nothing; at every MoE layer (but the last: the model asks for no guess there) it recomputes
    the router's own top-1 from the layer's input, and counts the steps whose final choice lacks it."""

    def __init__(self, router) -> None:  # noqa: ANN001 - the model's lookahead router
        self.router, self.steps, self.missing = router, 0, 0

    def guess(self, layer: int, chosen: np.ndarray, hidden: np.ndarray, k: int) -> list[int]:
        top1 = self.router(layer, hidden).argmax(axis=1)  # (n,) this layer's scores of its own input
        self.steps += len(top1)
        self.missing += int(sum(t not in row for t, row in zip(top1.tolist(), chosen.tolist(), strict=True)))
        return []


def test_top1_substituted_only_when_asked(trained: Path) -> None:
    ids = _ids(trained, 32)
    seen = {}
    for top1 in (False, True):
        checks: list[_Top1Check] = []

        def factory(router, checks=checks):  # noqa: ANN001, ANN202
            checks.append(_Top1Check(router))
            return checks[0]

        _, s = _decode(trained, ids, slots=12, prefetch=factory, approx=Approx(resident_delta=10.0, resident_top1=top1))
        seen[top1] = (checks[0].steps, checks[0].missing, s["approx_substituted"])
    assert seen[False][0] > 50 and seen[False][1] == 0 and seen[False][2] > 0
    assert seen[True][1] > 0  # asked for: some top-1 choices went to resident experts


def test_batched_and_prefill_steps_with_approximation(trained: Path) -> None:
    """Several sequences in one step, and a long prefill: padded rows, each sequence still sane."""
    ids = _ids(trained, 40)
    with Engine.open(trained, cache_mb=_slots_mb(trained, 8), approx=Approx(0.3, 0.1)) as eng:
        a, b = eng.new_sequence(), eng.new_sequence()
        out = eng.step([(a, ids[:20]), (b, ids[5:9])])
        out += eng.step([(a, [ids[20]]), (b, [ids[9]])])
        assert all(np.isfinite(o).all() for o in out)
        assert eng.stats()["approx_dropped"] > 0


# ---------------------------------------------------------------------- a family that does not renormalise
def _first_record(layout: Path, ids: list[int], **kw) -> tuple[list[int], list[float]]:
    got: list = []

    def trace(pos: np.ndarray, layer: int, chosen: np.ndarray, weights: np.ndarray) -> None:
        if not got:  # position 0, layer 0: both runs route the same hidden state there
            got.extend([chosen[0].tolist(), weights[0].tolist()])

    with Engine.open(layout, trace=trace, **kw) as eng:
        eng.forward(ids[:1])
    return got[0], got[1]


@pytest.mark.parametrize("family", ["olmoe", "trained"])
def test_kept_weights_follow_the_family_rule(family: str, trained: Path, tmp_path: Path) -> None:
    if family == "olmoe":
        pytest.importorskip("torch", reason="torch is not installed (the `reference` extra)")
        from fixtures.tiny_families import build_hf

        layout = convert(build_hf("olmoe", tmp_path / "hf"), tmp_path / "lay", ConvertOptions(progress=False)).out
    else:
        layout = trained
    norm = Layout.open(layout).manifest.config.norm_topk_prob
    ids = [1, 45]
    chosen, weights = _first_record(layout, ids)
    s = np.asarray(weights) / np.sum(weights)
    tau = float(np.sort(s)[-2:].mean())  # between the two largest shares: only the top one stays
    kept, w = _first_record(layout, ids, approx=Approx(topk_tau=tau))
    top = int(np.argmax(s))
    assert kept == [chosen[top]]
    want = 1.0 if norm else weights[top]  # renormalised over the one kept, or the router's weight as it was
    np.testing.assert_allclose(w, [want], rtol=1e-6)
    assert norm is (family == "trained")


# ---------------------------------------------------------------------- the CLI
def test_run_flags(trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    r = CliRunner().invoke(main, ["run", str(trained), "-p", "ROMEO:", "-n", "6", "--cache-mb", str(_slots_mb(trained, 8)),
                                  "--approx-topk-tau", "0.3", "--approx-resident-delta", "0.1", "--json", str(out)])
    assert r.exit_code == 0, r.output
    s = json.loads(out.read_text())
    assert s["approx"] == "topk_tau=0.3 resident_delta=0.1" and s["approx_dropped"] > 0
    assert "approx      topk_tau=0.3 resident_delta=0.1: of 8 expert choices per token" in r.output
    r = CliRunner().invoke(main, ["run", str(trained), "-n", "2", "--json", str(out)])
    assert r.exit_code == 0 and json.loads(out.read_text())["approx"] == "exact" and "approx " not in r.output
    r = CliRunner().invoke(main, ["run", str(trained), "-n", "2", "--approx-resident-top1"])
    assert r.exit_code == 2 and "resident_delta" in r.output
    r = CliRunner().invoke(main, ["run", str(trained), "-n", "2", "--approx-topk-tau", "1"])
    assert r.exit_code == 2


def test_serve_flags_reach_the_engine(trained: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    import mertools.server.app as app_mod

    configs, loads = [], []
    real_create_app, real_scheduler = app_mod.create_app, app_mod.Scheduler

    def create_app(cfg, **kw):  # noqa: ANN001, ANN202
        configs.append(cfg)
        return real_create_app(cfg, **kw)

    def scheduler(load, **kw):  # noqa: ANN001, ANN202 - keeps the engine loader, starts nothing
        loads.append(load)
        return real_scheduler(load, **kw)

    class Server:  # noqa: D101 - in place of uvicorn's: returns at once
        def __init__(self, config) -> None:  # noqa: ANN001
            self.should_exit = False

        def run(self) -> None:
            pass

    monkeypatch.setattr(app_mod, "create_app", create_app)
    monkeypatch.setattr(app_mod, "Scheduler", scheduler)
    monkeypatch.setattr(uvicorn, "Server", Server)
    r = CliRunner().invoke(main, ["serve", str(trained), "--approx-resident-delta", "0.05", "--approx-resident-top1"])
    assert r.exit_code == 0, r.output
    assert configs[0].approx == Approx(resident_delta=0.05, resident_top1=True)
    with loads[0]() as eng:  # the server's own loader: Engine.open with the config's options
        assert eng.stats()["approx"] == "resident_delta=0.05 resident_top1"
    r = CliRunner().invoke(main, ["serve", str(trained), "--approx-topk-tau", "-0.1"])
    assert r.exit_code == 2
