"""The one-call decode step (kernels/step.py, runtime/fused.py): its row pieces equal the numpy the general path runs,
and a model's compiled steps give bit for bit the logits, routing, trace and cache bookkeeping of the same steps taken
piece by piece, on the trained fixture and the tiny families it takes; where it does not apply, it is not taken."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from mertools.convert.pipeline import ConvertOptions, convert
from mertools.families import pieces
from mertools.kernels import rowops
from mertools.layout.config import ModelConfig
from mertools.runtime.approx import Approx
from mertools.runtime.engine import Engine
from mertools.runtime.ops import rms_norm

ROOT = Path(__file__).resolve().parent.parent
TRAINED = ROOT / "fixtures" / "trained" / "tiny-shakespeare-moe"
sys.path.insert(0, str(ROOT))


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


# ---------------------------------------------------------------------- the row pieces


def test_pairwise_sum_is_numpys() -> None:
    rng = np.random.default_rng(0)
    for n in [*range(1, 300), 511, 512, 1000, 2048, 2880, 4096, 7168]:
        a = (rng.standard_normal(n) * rng.uniform(0.01, 100)).astype(np.float32) ** 2
        assert rowops.pairwise_sum(a, 0, n) == np.add.reduce(a.reshape(1, -1), axis=-1, dtype=np.float32)[0], n
    a = rng.standard_normal(300).astype(np.float32)
    assert rowops.pairwise_sum(a, 7, 200) == np.float32(a[7:207].sum())  # a window of a longer array


@pytest.mark.parametrize("d", [32, 64, 256, 2048, 2880])
def test_rms_norm_is_the_general_paths(d: int) -> None:
    rng = np.random.default_rng(d)
    x = (rng.standard_normal(d) * 3).astype(np.float32)
    w = rng.standard_normal(d).astype(np.float32)
    out = np.empty(d, np.float32)
    rowops.rms_norm_into(x, w, 1e-6, out)
    assert np.array_equal(_bits(out), _bits(rms_norm(x.reshape(1, -1), w, 1e-6)[0]))
    heads = x.reshape(-1, 32)  # per head (q/k norm of head_dim 32), in place as the step does it
    want = rms_norm(heads, w[:32], 1e-5)
    for h in range(len(heads)):
        rowops.rms_norm_into(heads[h], w[:32], 1e-5, heads[h])
    assert np.array_equal(_bits(heads), _bits(want))


def _cfg(**kw: object) -> ModelConfig:
    base = dict(arch="mixtral", vocab_size=64, d_model=64, d_ff=64, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=32,
                n_experts=16, n_experts_used=4, context_length=128)
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize(("norm", "scaling"), [(True, 1.0), (False, 1.0), (True, 2.5)])
def test_top_k_is_the_general_paths(norm: bool, scaling: float) -> None:
    cfg = _cfg(norm_topk_prob=norm, routed_scaling=scaling)
    rng = np.random.default_rng(1)
    for trial in range(50):
        scores = rowops.softmax_rows(rng.standard_normal((1, 16)).astype(np.float32) * 3)
        if trial % 5 == 0:
            scores[0, 3] = scores[0, 9] = scores[0].max()  # a tie: the lower index first
        want_e, want_w = pieces.top_k(cfg, SimpleNamespace(expert_bias=None), scores)
        got_e, got_w = np.empty(4, np.int64), np.empty(4, np.float32)
        rowops.top_k_into(scores[0], 4, norm, np.float32(scaling), got_e, got_w)
        assert np.array_equal(got_e, want_e[0]) and np.array_equal(_bits(got_w), _bits(want_w[0]))


@pytest.mark.parametrize("rd", [32, 16])
def test_rotary_is_the_general_paths(rd: int) -> None:
    cfg = _cfg(rope_dim=rd if rd != 32 else 0, rope_theta=10000.0)
    rng = np.random.default_rng(rd)
    for pos in (0, 5, 127):
        x = rng.standard_normal((1, 3, 32)).astype(np.float32)
        want = pieces.rotary(cfg, x, np.array([pos]))
        cos, sin = pieces._cos_sin(cfg.rope_theta, cfg.rotary_dim, None, cfg.rope_attn_factor,
                                   np.array([pos], np.int64).tobytes(), np.dtype(np.float32).str)
        got = x.reshape(-1).copy()
        rowops.rotate_into(got, 3, 32, cfg.rotary_dim, cos.reshape(-1), sin.reshape(-1))
        assert np.array_equal(_bits(got), _bits(want.reshape(-1)))


@pytest.mark.parametrize("rd", [6, 24, 64, 128])
@pytest.mark.parametrize("yarn", [None, (8.0, 64, 32.0, 1.0, False)])
def test_rotary_chunks_are_each_positions_own(rd: int, yarn: tuple | None) -> None:
    """The compiled step takes cos/sin from a table of ROPE_CHUNK positions computed at once: each row is what the
    general path computes for that position alone."""
    from mertools.runtime.fused import ROPE_CHUNK

    positions = np.arange(ROPE_CHUNK, 2 * ROPE_CHUNK, dtype=np.int64)
    cos, sin = pieces._cos_sin.__wrapped__(10000.0, rd, yarn, 0.9, positions.tobytes(), "<f4")
    for i in range(0, ROPE_CHUNK, 5):
        c, s = pieces._cos_sin(10000.0, rd, yarn, 0.9, positions[i:i + 1].tobytes(), "<f4")
        assert np.array_equal(_bits(c), _bits(cos[i:i + 1])) and np.array_equal(_bits(s), _bits(sin[i:i + 1]))


def test_router_in_parallel_is_the_serial_one() -> None:
    """The compiled step computes a large router's logits in a parallel region, a small one's on one thread."""
    from mertools.kernels import step as kstep

    rng = np.random.default_rng(3)
    h, router = rng.standard_normal(2048).astype(np.float32), rng.standard_normal((128, 2048)).astype(np.float32)
    a, b = np.empty(128, np.float32), np.empty(128, np.float32)
    kstep._router(h, router, a)
    kstep._router_serial(h, router, b)
    assert router.size > kstep.SERIAL_ROUTER and np.array_equal(_bits(a), _bits(b))
    assert np.array_equal(_bits(a), _bits(rowops.dense_rows(h[None], router)[0]))


def test_router_product_and_softmax() -> None:
    rng = np.random.default_rng(2)
    x, a = rng.standard_normal((3, 2050)).astype(np.float32), rng.standard_normal((128, 2050)).astype(np.float32)
    got = rowops.dense_rows(x, a)  # its own fixed order: close to the float64 product
    np.testing.assert_allclose(got, x.astype(np.float64) @ a.T.astype(np.float64), rtol=1e-4, atol=1e-3)
    assert np.array_equal(_bits(got[1:2]), _bits(rowops.dense_rows(x[1:2], a)))  # each row alone
    p = rowops.softmax_rows(got)
    np.testing.assert_allclose(p, pieces.softmax(got.astype(np.float64)), rtol=1e-5, atol=1e-7)
    assert np.allclose(p.sum(axis=1), 1.0, atol=1e-5)


# ---------------------------------------------------------------------- whole steps


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Layouts the compiled step takes: the trained fixture (q4_0, q4_k), Mixtral, Qwen3-MoE (per-head q/k norm, every
    layer with experts) and OLMoE (q/k norm over the projection, no renormalisation) at q8_0; gpt-oss (biases on
    q/k/v/o, the router and the experts, the clamped GLU, attention sinks, a sliding window of 4 in layers 0 and 2,
    YaRN) with MXFP4 experts and Q8_0 matrices, as llama.cpp's MXFP4_MOE preset."""
    from fixtures.tiny_families import build_hf
    from fixtures.tiny_mixtral import build_all

    root = tmp_path_factory.mktemp("fused")
    out = {}
    for dtype in ("q4_0", "q4_k"):
        out[f"trained-{dtype}"] = convert(TRAINED, root / f"trained-{dtype}", ConvertOptions(dtype=dtype, progress=False)).out
    mixtral = build_all(root / "mixtral-src", seed=3)["hf"]
    out["mixtral"] = convert(mixtral, root / "mixtral", ConvertOptions(dtype="q8_0", progress=False)).out
    for family, kw in (("qwen3_moe", {"mlp_only_layers": []}), ("olmoe", {})):
        src = build_hf(family, root / f"{family}-src", seed=4, **kw)
        out[family] = convert(src, root / family, ConvertOptions(dtype="q8_0", progress=False)).out
    src = build_hf("gpt_oss", root / "gpt_oss-src", seed=4)
    out["gpt_oss"] = convert(src, root / "gpt_oss", ConvertOptions(dtype="mxfp4", dense_dtype="q8_0", progress=False)).out
    return out


def _all_resident(eng: Engine) -> None:
    cfg = eng.config
    eng.cache.prefetch([(la, e) for la in range(cfg.n_layers) for e in range(cfg.n_experts)])
    deadline = time.monotonic() + 60
    while (eng.cache.slot_of < 0).any():
        if time.monotonic() > deadline:
            raise AssertionError("the experts did not all load")
        time.sleep(0.01)


def _run(layout: Path, compiled: bool, kv_dtype: str = "f16", prefetch: str = "lookahead", io: str = "direct"
         ) -> dict[str, object]:
    trace: list[tuple[int, int, list[int], bytes]] = []
    with Engine.open(layout, kernels="int8", compiled_step=compiled, kv_dtype=kv_dtype, prefetch=prefetch, io=io,
                     trace=lambda pos, layer, chosen, w: trace.append((int(pos[0]), layer, chosen.tolist(),
                                                                       _bits(w).tobytes()))) as eng:
        _all_resident(eng)
        assert (eng.model.fused is not None) == compiled
        vocab = eng.config.vocab_size
        logits = [eng.forward([1, 5, 9, 2])]  # a prompt: the general path either way
        logits += [eng.forward([(7 + 31 * i) % vocab]) for i in range(12)]
        c = eng.cache
        # a cache with a slot for every expert keeps no usage estimates, on either path (ExpertCache.learns)
        assert not c.learns and not c.freq.any() and not c.last_chosen.any()
        return dict(logits=np.concatenate(logits), trace=trace, steps=eng.stats()["compiled_steps"],
                    last_x=eng.model.last_x.copy(),
                    counts=(c.stats.lookups, c.stats.hits, c.stats.misses, c.stats.prefetch_used, c.clock,
                            c.current_layer),
                    last_use=c.slot_last.copy())


@pytest.mark.parametrize("name", ["trained-q4_0", "trained-q4_k", "mixtral", "qwen3_moe", "olmoe", "gpt_oss"])
def test_compiled_steps_are_the_steps_piece_by_piece(layouts: dict[str, Path], name: str) -> None:
    got, want = _run(layouts[name], True), _run(layouts[name], False)
    assert got["steps"] == 12 and want["steps"] == 0
    assert np.array_equal(_bits(got["logits"]), _bits(want["logits"]))
    assert np.array_equal(_bits(got["last_x"]), _bits(want["last_x"]))
    assert got["trace"] == want["trace"] and got["counts"] == want["counts"]
    assert np.array_equal(got["last_use"], want["last_use"])


def test_mapped_expert_files(layouts: dict[str, Path]) -> None:
    """With `--io mmap` a slot is the mapping of its expert file: the call reaches it through the store's addresses
    (Q4_K is read as it is, so the 8-bit kernels and the compiled step take mapped slots)."""
    got, want = _run(layouts["trained-q4_k"], True, io="mmap"), _run(layouts["trained-q4_k"], False, io="direct")
    assert got["steps"] == 12 and np.array_equal(_bits(got["logits"]), _bits(want["logits"]))
    assert got["trace"] == want["trace"]
    pieces = _run(layouts["trained-q4_k"], False, io="mmap")  # a layer's mapped experts in one call by address too
    assert np.array_equal(_bits(pieces["logits"]), _bits(want["logits"]))
    with Engine.open(layouts["trained-q4_k"], kernels="int8", io="mmap") as eng:  # a fresh engine: few slots mapped
        eng.warmup()  # the call reads only resident experts' mappings (slots not mapped yet have no address)
        assert eng.stats()["compiled_steps"] == 0 and [t.id for t in eng.generate("ROMEO:", max_tokens=4)]


def test_float32_kv_and_markov_prefetch(layouts: dict[str, Path]) -> None:
    got = _run(layouts["qwen3_moe"], True, kv_dtype="f32", prefetch="markov")
    want = _run(layouts["qwen3_moe"], False, kv_dtype="f32", prefetch="markov")
    assert got["steps"] == 12 and np.array_equal(_bits(got["logits"]), _bits(want["logits"]))
    assert got["counts"] == want["counts"]


@pytest.mark.parametrize("name", ["trained-q4_0", "qwen3_moe", "gpt_oss"])
def test_a_step_with_an_expert_to_read_waits_for_it_and_goes_on_compiled(layouts: dict[str, Path], name: str) -> None:
    """A fresh engine (every expert fits, none read yet): the compiled call stops at the first layer that chose an
    expert not yet resident, Python looks that layer's experts up and waits for their reads, and a compiled call goes
    on from that layer's experts; the logits, the trace and the cache's counts are those of every step taken piece by
    piece."""
    out, counts, traces = {}, {}, {}
    for compiled in (True, False):
        trace: list[tuple[int, int, list[int], bytes]] = []
        with Engine.open(layouts[name], kernels="int8", compiled_step=compiled, prefetch="none",
                         trace=lambda pos, layer, chosen, w, t=trace: t.append((int(pos[0]), layer, chosen.tolist(),
                                                                                 _bits(w).tobytes()))) as eng:
            vocab = eng.config.vocab_size
            out[compiled] = np.concatenate([eng.forward([1, 2, 3])] + [eng.forward([(5 + 17 * i) % vocab])
                                                                       for i in range(40)])
            c = eng.cache
            counts[compiled] = (c.stats.lookups, c.stats.hits, c.stats.misses, c.clock, c.current_layer)
            traces[compiled] = trace
            if compiled:
                fused = eng.model.fused
                assert fused.steps == 40 and fused.partial == 0  # every token finished compiled
                assert fused.fetched > 0 and fused.resumed >= fused.fetched  # after layers whose experts were read
    assert np.array_equal(_bits(out[True]), _bits(out[False]))
    assert counts[True] == counts[False]  # without prefetch guesses, the same reads
    assert traces[True] == traces[False]


def test_a_layer_with_an_expert_to_read_prefetches_the_next_layers_guesses(layouts: dict[str, Path]) -> None:
    """With lookahead guesses, a stopped call's fetched layer starts the next layer's reads as the general path's does:
    the same logits as every step piece by piece, prefetches issued and used."""
    out, stats = {}, {}
    for compiled in (True, False):
        with Engine.open(layouts["qwen3_moe"], kernels="int8", compiled_step=compiled, prefetch="lookahead") as eng:
            vocab = eng.config.vocab_size
            out[compiled] = np.concatenate([eng.forward([1, 2, 3])] + [eng.forward([(5 + 17 * i) % vocab])
                                                                       for i in range(24)])
            stats[compiled] = eng.stats()
            if compiled:
                assert eng.model.fused.fetched > 0 and eng.model.fused.steps == 24
    assert np.array_equal(_bits(out[True]), _bits(out[False]))
    assert stats[True]["prefetch_issued"] > 0 and stats[True]["prefetch_used"] > 0


@pytest.mark.parametrize("prefetch", ["none", "lookahead"])
def test_a_cache_smaller_than_the_experts_steps_compiled(layouts: dict[str, Path], prefetch: str) -> None:
    """Streaming (half the experts' slots) a type the 8-bit kernels read as it is (Q4_K; a packed type's streamed
    slots are not packed, so its experts stay on the exact kernels and the general path): the call stops at each
    miss, Python reads and evicts between calls (only this thread evicts), and the logits and trace are those of
    every step piece by piece at the same budget; without prefetch guesses, the same reads and evictions too."""
    name = "trained-q4_k"
    with Engine.open(layouts[name], kernels="int8") as eng:
        half = eng.config.n_layers * eng.config.n_experts // 2 * eng.store.slot_bytes / 2**20
    out, counts, traces = {}, {}, {}
    for compiled in (True, False):
        trace: list[tuple[int, int, list[int], bytes]] = []
        def record(pos, layer, chosen, w, t=trace) -> None:  # noqa: ANN001
            t.append((int(pos[0]), layer, chosen.tolist(), _bits(w).tobytes()))

        with Engine.open(layouts[name], kernels="int8", compiled_step=compiled, prefetch=prefetch, cache_mb=half,
                         step_reads=float("inf"), trace=record) as eng:
            assert eng.cache.learns  # a victim is chosen at every miss once the slots are full
            vocab = eng.config.vocab_size
            out[compiled] = np.concatenate([eng.forward([1, 2, 3])] + [eng.forward([(5 + 17 * i) % vocab])
                                                                       for i in range(30)])
            c = eng.cache
            counts[compiled] = (c.stats.lookups, c.stats.hits, c.stats.misses, c.stats.evictions, c.clock)
            traces[compiled] = trace
            if compiled:
                fused = eng.model.fused
                assert fused.steps == 30 and fused.partial == 0 and fused.fetched > 0
                assert c.stats.evictions > 0
    assert np.array_equal(_bits(out[True]), _bits(out[False]))
    assert traces[True] == traces[False]
    if prefetch == "none":
        assert counts[True] == counts[False]


def test_a_streaming_cache_steps_compiled_while_it_reads_few_experts(layouts: dict[str, Path]) -> None:
    """The rule (`step_reads`): a cache with one slot short of the experts reads next to nothing once warm, so its
    decode steps go compiled; one of a few slots reads at every layer or more, so they stay on the
    general path (its prefetch guesses); never with `step_reads` 0. The logits are the same bits whichever path."""
    lay = layouts["trained-q4_k"]
    with Engine.open(lay, kernels="int8") as eng:
        cfg, slot = eng.config, eng.store.slot_bytes / 2**20
    ids = [(5 + 17 * i) % cfg.vocab_size for i in range(30)]
    out = {}
    for name, mb, reads in (("most", (cfg.n_layers * cfg.n_experts - 1) * slot, 0.25), ("few", 1, 0.25),
                            ("never", (cfg.n_layers * cfg.n_experts - 1) * slot, 0)):
        with Engine.open(lay, kernels="int8", cache_mb=mb, step_reads=reads) as eng:
            assert eng.cache.learns
            out[name] = np.concatenate([eng.forward([1, 2, 3])] + [eng.forward([i]) for i in ids])
            fused = eng.model.fused
            assert fused.steps + fused.left == 30 and fused.partial == 0
            if name == "most":
                assert fused.steps > 10 and fused.reads <= 0.25
            else:  # a read per layer or more (misses and prefetches): the decayed mean stays above the rule
                assert fused.steps == 0 and fused.left == 30
                assert name == "never" or fused.reads > 0.5
    assert np.array_equal(_bits(out["most"]), _bits(out["few"]))
    assert np.array_equal(_bits(out["most"]), _bits(out["never"]))


def test_reads_ahead_do_not_count_toward_the_rule(layouts: dict[str, Path]) -> None:
    """Reads of guesses beyond the next layer go while the disk is idle (prefetch depth): the rule counts the reads a
    step needed, so such reads between two steps leave it compiled, and the same number of other reads does not."""
    lay = layouts["trained-q4_k"]
    with Engine.open(lay, kernels="int8", cache_mb=1, step_reads=0.25) as eng:
        fused, st = eng.model.fused, eng.cache.stats
        assert not fused._reads_few(1, True)  # nothing measured yet
        st.loads += 40
        st.prefetch_ahead += 40  # forty reads ahead since the last step began
        assert fused._reads_few(1, True) and fused.reads == 0
        st.loads += 40  # forty reads the step made
        assert not fused._reads_few(1, True) and fused.reads > 0.25


def _batched(layout: Path, compiled: bool, preload: bool) -> dict[str, object]:
    """Three sequences decoding together (the server's steps), after prompts of their own."""
    trace: list[tuple[list[int], int, list[int], bytes]] = []
    with Engine.open(layout, kernels="int8", compiled_step=compiled, prefetch="none",
                     trace=lambda pos, layer, chosen, w: trace.append((pos.tolist(), layer, chosen.tolist(),
                                                                       _bits(w).tobytes()))) as eng:
        if preload:
            _all_resident(eng)
        seqs = [eng.new_sequence() for _ in range(3)]
        eng.step([(s, [1 + i, 7, 9 + i]) for i, s in enumerate(seqs)])
        vocab, out = eng.config.vocab_size, []
        for t in range(10):
            live = seqs if t % 4 else seqs[:2]  # steps of two and of three sequences
            out += eng.step([(s, [(5 + 13 * t + 7 * i) % vocab]) for i, s in enumerate(live)])
        c, fused = eng.cache, eng.model.fused
        return dict(logits=np.stack(out), trace=trace, last_x=eng.model.last_x.copy(),
                    counts=(c.stats.lookups, c.stats.hits, c.stats.misses, c.clock),
                    steps=(fused.steps, fused.partial) if fused else (0, 0))


@pytest.mark.parametrize("preload", [True, False])
def test_steps_of_several_sequences(layouts: dict[str, Path], preload: bool) -> None:
    """Each sequence of a decode step runs its own compiled call; a step one of whose sequences meets an expert to
    read is taken again by the general path. The logits are those of the steps piece by piece (and with every
    expert resident, the trace and the cache's counts too)."""
    got, want = _batched(layouts["qwen3_moe"], True, preload), _batched(layouts["qwen3_moe"], False, preload)
    assert np.array_equal(_bits(got["logits"]), _bits(want["logits"]))
    assert np.array_equal(_bits(got["last_x"]), _bits(want["last_x"]))
    if preload:
        assert got["steps"] == (27, 0) and got["trace"] == want["trace"] and got["counts"] == want["counts"]
    else:
        assert got["steps"][1] > 0  # some steps met experts to read and went the general way


def test_greedy_generation_unchanged(layouts: dict[str, Path]) -> None:
    out = {}
    for compiled in (True, False):
        with Engine.open(layouts["trained-q4_0"], kernels="int8", compiled_step=compiled) as eng:
            out[compiled] = [t.id for t in eng.generate("ROMEO:", max_tokens=48)]
            steps = eng.stats()["compiled_steps"]
        assert (steps > 0) == compiled  # the fixture's 32 experts are all read within its first tokens
    assert out[True] == out[False]


def test_not_taken_where_it_does_not_apply(layouts: dict[str, Path]) -> None:
    lay = layouts["trained-q4_0"]
    with Engine.open(lay, kernels="exact") as eng:
        assert eng.model.fused is None
    with Engine.open(lay, kernels="int8", io="mmap") as eng:  # mapped q4_0 experts stay on the exact kernels
        assert eng.model.fused is None
    with Engine.open(lay, kernels="int8", approx=Approx(topk_tau=0.3)) as eng:
        assert eng.model.fused is None
    with Engine.open(lay, kernels="int8", kv_dtype="q8_0") as eng:  # a KV type it does not write
        _all_resident(eng)
        eng.forward([1, 2, 3])
        eng.forward([4])
        assert eng.stats()["compiled_steps"] == 0
    q4k = layouts["trained-q4_k"]  # read as it is: the 8-bit kernels whether the cache streams or not
    # streaming, compiled whatever the reads (`step_reads` inf): the calls stop at every miss
    with Engine.open(q4k, kernels="int8", cache_mb=1, step_reads=float("inf")) as eng:
        assert eng.model.fused is not None
        small = np.concatenate([eng.forward([i]) for i in range(1, 10)])
        steps = eng.model.fused.steps
        assert steps > 0
        a, b = eng.new_sequence(), eng.new_sequence()  # several sequences, streaming: the general path
        eng.step([(a, [5]), (b, [6])])
        assert eng.model.fused.steps == steps and eng.model.fused.partial == 0
    with Engine.open(q4k, kernels="int8") as eng:
        _all_resident(eng)
        whole = np.concatenate([eng.forward([i]) for i in range(1, 10)])
        assert eng.stats()["compiled_steps"] == 9
        a, b = eng.new_sequence(), eng.new_sequence()  # a prompt beside a decode token: the general path
        eng.step([(a, [5, 6, 7]), (b, [6])])
        assert eng.stats()["compiled_steps"] == 9
    assert np.array_equal(_bits(small), _bits(whole))


def test_warmup_command(layouts: dict[str, Path]) -> None:
    from click.testing import CliRunner

    from mertools.cli import main

    r = CliRunner().invoke(main, ["warmup", str(layouts["trained-q4_k"]), "--kernels", "int8"])
    assert r.exit_code == 0, r.output
    assert "int8 kernels: compiled or loaded in" in r.output and "exact" not in r.output
    r = CliRunner().invoke(main, ["warmup", str(layouts["trained-q4_k"].parent / "nothing-here")])
    assert r.exit_code == 2 and "nothing-here" in r.output

