"""GLM-4.5 (glm4_moe) beyond test_families.py's shared checks: what each of its pieces does, its MTP
layer, group-limited routing, the prefetcher across its leading dense layer, llama.cpp's converter,
and the CLI and server paths.

Tiny models (fixtures/tiny_families.py): "main" is GLM-4.5-like (sigmoid routing with a random non-zero
correction bias, routed scaling 2.5, shared expert, 1 leading dense layer, q/k/v biases, per-head q/k
norm, partial rotary 0.5, an MTP layer in the checkpoint); "grouped" is -Air-like (no q/k norm) with
DeepSeek-V3's group-limited choice (8 experts in 4 groups, the best 2 kept).

Measured (24-token prompts; float32 transformers vs the runtime, experts through a cache of 2 slots, f16
layouts from HF and from GGUF alike): max |logit diff| 3.0e-6 (main) / 4.6e-6 (grouped) for prefill and
3.9e-6 / 3.8e-6 for token-by-token decode, with |logits| <= 4.4; top-1 identical everywhere; the float64
numpy reference within 3.3e-6. The bound is 1e-5 of the largest logit (the acceptance asks 1e-3); each
spoiled piece moves the logits by 8% (q/k norm) to 81% (correction bias) of the largest.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch", reason="torch is not installed (the `reference` extra)")
transformers = pytest.importorskip("transformers", reason="transformers is not installed (the `reference` extra)")

from family_checks import LLAMA_CPP, assert_close, assert_engine_matches, cache_mb, chat_once, llama_convert, prompts, spoil  # noqa: E402

from fixtures.tiny_families import build_gguf, build_hf  # noqa: E402
from mertools.cli import main  # noqa: E402
from mertools.convert.pipeline import ConvertOptions, convert  # noqa: E402
from mertools.convert.source import open_source  # noqa: E402
from mertools.errors import LayoutError  # noqa: E402
from mertools.families import get_family  # noqa: E402
from mertools.families.pieces import top_k  # noqa: E402
from mertools.families.weights import LayerWeights  # noqa: E402
from mertools.layout import Layout  # noqa: E402
from mertools.layout.config import ModelConfig  # noqa: E402
from mertools.reference import ReferenceModel  # noqa: E402
from mertools.reference.forward import NumpyOps  # noqa: E402
from mertools.runtime.engine import Engine  # noqa: E402
from mertools.runtime.ops import RuntimeOps  # noqa: E402
from mertools.runtime.prefetch import LookaheadPrefetcher  # noqa: E402

REL_BOUND = 1e-5
VARIANTS = {"main": {}, "grouped": dict(n_group=4, topk_group=2, use_qk_norm=False)}


@pytest.fixture(scope="module")
def glm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    out = tmp_path_factory.mktemp("glm")
    res = {}
    for v, overrides in VARIANTS.items():
        hf = build_hf("glm4_moe", out / v, seed=0, **overrides)
        d = {"hf": hf, "gguf": build_gguf(hf, out / f"{v}-f16.gguf", "f16")}
        opts = ConvertOptions(dtype="f16", progress=False)
        d["layout_hf"] = convert(hf, out / f"{v}-layout-hf", opts).out
        d["layout_gguf"] = convert(d["gguf"], out / f"{v}-layout-gguf", opts).out
        res[v] = d
    return res


@pytest.fixture(scope="module")
def hf_logits(glm: dict):  # noqa: ANN201 - (variant, ids) -> logits
    models: dict[str, object] = {}

    def run(v: str, ids: list[int]) -> np.ndarray:
        if v not in models:
            models[v] = transformers.Glm4MoeForCausalLM.from_pretrained(glm[v]["hf"], dtype=torch.float32).eval()
        with torch.no_grad():
            return models[v](torch.tensor([ids])).logits[0].float().numpy()

    return run


# ---------------------------------------------------------------- config, MTP layer
def test_config_from_hf_and_gguf(glm: dict) -> None:
    for v, want_groups, want_qk in (("main", (1, 1), "head"), ("grouped", (4, 2), "none")):
        hf, gg = open_source(glm[v]["hf"]).config, open_source(glm[v]["gguf"]).config
        assert hf == gg
        assert (hf.n_groups, hf.n_groups_used, hf.qk_norm) == (*want_groups, want_qk)
        assert (hf.gating_func, hf.expert_bias, hf.routed_scaling, hf.rope_dim, hf.rotary_dim) == ("sigmoid", True, 2.5, 16, 16)
        assert (hf.n_layers, hf.dense_layers, hf.d_ff_dense, hf.d_ff_shared, hf.attn_bias) == (3, (0,), 192, 64, True)
    r = gguf.GGUFReader(glm["main"]["gguf"])
    assert r.fields["glm4moe.block_count"].contents() == 4 and r.fields["glm4moe.nextn_predict_layers"].contents() == 1


def test_mtp_layer_is_read_past_and_left_out(glm: dict) -> None:
    """The checkpoint's model.layers.3.* / the GGUF's blk.3.* (MTP) convert to nothing; inspect counts them apart."""
    hf = open_source(glm["main"]["hf"])
    assert "model.layers.3.eh_proj.weight" in hf.tensors and "model.layers.3.mlp.experts.0.up_proj.weight" in hf.tensors
    assert "blk.3.nextn.eh_proj.weight" in open_source(glm["main"]["gguf"]).tensors
    for which in ("layout_hf", "layout_gguf"):
        m = Layout.open(glm["main"][which]).manifest
        assert not [n for n in m.dense if n.startswith("blk.3.")] and {e.layer for e in m.experts} == {1, 2}
    assert hf.summary()["unused_tensors"] == 44 and open_source(glm["main"]["gguf"]).summary()["unused_tensors"] == 23


# the published config.json files (transformers 4.54's format: flat rope_theta and partial_rotary_factor)
_AIR = dict(architectures=["Glm4MoeForCausalLM"], model_type="glm4_moe", attention_bias=True, head_dim=128,
            hidden_size=4096, partial_rotary_factor=0.5, intermediate_size=10944, max_position_embeddings=131072,
            moe_intermediate_size=1408, norm_topk_prob=True, num_attention_heads=96, n_group=1, topk_group=1,
            n_routed_experts=128, n_shared_experts=1, routed_scaling_factor=1.0, num_experts_per_tok=8,
            first_k_dense_replace=1, num_hidden_layers=46, num_key_value_heads=8, rms_norm_eps=1e-05, rope_scaling=None,
            rope_theta=1000000, num_nextn_predict_layers=1, tie_word_embeddings=False, use_qk_norm=False,
            vocab_size=151552, eos_token_id=[151329, 151336, 151338])
_FULL = dict(_AIR, hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536, n_routed_experts=160,
             routed_scaling_factor=2.5, first_k_dense_replace=3, num_hidden_layers=92, use_qk_norm=True)


@pytest.mark.parametrize("hp", [_AIR, _FULL], ids=["GLM-4.5-Air", "GLM-4.5"])
def test_published_configs(tmp_path: Path, hp: dict) -> None:
    from fixtures.safetensors_io import write_safetensors

    (tmp_path / "config.json").write_text(json.dumps(hp))
    write_safetensors(tmp_path / "model.safetensors", [], "F16")
    c = open_source(tmp_path).config
    assert (c.n_layers, c.n_experts, c.n_experts_used, c.head_dim, c.rope_dim, c.rope_theta) == (
        hp["num_hidden_layers"], hp["n_routed_experts"], 8, 128, 64, 1e6)
    assert c.dense_layers == tuple(range(hp["first_k_dense_replace"])) and c.d_ff_dense == hp["intermediate_size"]
    assert (c.d_ff, c.d_ff_shared, c.routed_scaling, c.n_groups) == (hp["moe_intermediate_size"],) * 2 + (
        hp["routed_scaling_factor"], 1)
    assert (c.qk_norm != "none", c.attn_bias, c.gating_func, c.expert_bias) == (hp["use_qk_norm"], True, "sigmoid", True)


def test_config_validation() -> None:
    cfg = dict(arch="glm4_moe", vocab_size=512, d_model=128, d_ff=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=32,
               n_experts=8, n_experts_used=2, context_length=512)
    good = ModelConfig(**cfg, gating_func="sigmoid", n_groups=4, n_groups_used=2, rope_dim=32, routed_scaling=2)
    assert good.rope_dim == 0 and good.rotary_dim == 32 and good.routed_scaling == 2.0  # whole head: one spelling
    for bad, needle in ((dict(gating_func="relu"), "gating_func"), (dict(n_groups=3), "n_groups"),
                        (dict(n_groups=8), "n_groups"), (dict(n_groups=4, n_groups_used=5), "n_groups_used"),
                        (dict(n_groups_used=2), "n_groups_used"), (dict(rope_dim=15), "rope_dim"),
                        (dict(rope_dim=64), "rope_dim"), (dict(routed_scaling=0.0), "routed_scaling"),
                        (dict(expert_bias=1), "expert_bias")):
        with pytest.raises(ValueError, match=needle):
            ModelConfig(**cfg, **bad)


def test_gguf_gating_other_than_sigmoid_is_refused(glm: dict, tmp_path: Path) -> None:
    f = gguf.GGUFReader(glm["main"]["gguf"]).fields["glm4moe.expert_gating_func"]
    start = f.offset + sum(int(p.nbytes) for p in f.parts[:f.data[0]])  # the value's bytes in the file
    raw = bytearray(Path(glm["main"]["gguf"]).read_bytes())
    assert int.from_bytes(raw[start:start + 4], "little") == 2  # ExpertGatingFuncType.SIGMOID
    raw[start:start + 4] = (1).to_bytes(4, "little")  # ExpertGatingFuncType.SOFTMAX
    (tmp_path / "softmax.gguf").write_bytes(bytes(raw))
    with pytest.raises(Exception, match="gating function 'softmax' is not supported"):
        open_source(tmp_path / "softmax.gguf")


def test_a_bad_routing_field_in_a_manifest_is_refused(glm: dict, tmp_path: Path) -> None:
    import shutil

    dst = tmp_path / "bad"
    shutil.copytree(glm["main"]["layout_hf"], dst)
    m = json.loads((dst / "manifest.json").read_text())
    assert m["version"] == 2 and m["config"]["gating_func"] == "sigmoid" and m["config"]["rope_dim"] == 16
    m["config"]["n_groups_used"] = 3
    (dst / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(LayoutError, match="n_groups_used"):
        Layout.open(dst)


# ---------------------------------------------------------------- numerics against transformers
@pytest.mark.parametrize("v", list(VARIANTS))
@pytest.mark.parametrize("which", ["layout_hf", "layout_gguf"])
def test_runtime_matches_transformers(glm: dict, hf_logits, v: str, which: str) -> None:  # noqa: ANN001
    layout = glm[v][which]
    with Engine.open(layout, cache_mb=cache_mb(layout, 2), kv_dtype="f32") as eng:  # 2 slots: one layer's top-2
        for ids in prompts():
            want = hf_logits(v, ids)
            assert_engine_matches(eng, ids, want, REL_BOUND, (v, which))
        assert eng.stats()["expert_misses"] > 0


@pytest.mark.parametrize("v", list(VARIANTS))
def test_numpy_reference_matches_transformers(glm: dict, hf_logits, v: str) -> None:  # noqa: ANN001
    for src in ("hf", "gguf", "layout_gguf"):
        ref = ReferenceModel.from_layout(glm[v][src]) if src.startswith("layout") else ReferenceModel.from_source(glm[v][src])
        for ids in prompts():
            assert_close(ref.forward(ids), hf_logits(v, ids), REL_BOUND, (v, src))


SPOILS = {
    "correction bias": ("main", None, lambda lw: lw if lw.expert_bias is None else replace(lw, expert_bias=0 * lw.expert_bias)),
    "routed scaling": ("main", dict(routed_scaling=1.0), None),
    "partial rotary": ("main", dict(rope_dim=0), None),
    "q/k/v bias": ("main", None, lambda lw: replace(lw, q_bias=0 * lw.q_bias, k_bias=0 * lw.k_bias, v_bias=0 * lw.v_bias)),
    "shared expert": ("main", None, lambda lw: replace(lw, shared=None)),
    "sigmoid vs softmax": ("main", dict(gating_func="softmax"), None),
    "renormalisation": ("main", dict(norm_topk_prob=False), None),
    "q/k norm": ("main", None, lambda lw: replace(lw, q_norm=np.ones_like(lw.q_norm), k_norm=np.ones_like(lw.k_norm))),
    "expert groups": ("grouped", dict(n_groups=1, n_groups_used=1), None),
}


@pytest.mark.parametrize("piece", list(SPOILS))
def test_each_piece_matters(glm: dict, hf_logits, piece: str) -> None:  # noqa: ANN001
    """Leaving a GLM piece out moves the logits far beyond the bound the tests above hold."""
    v, cfg, layer = SPOILS[piece]
    ids = prompts(1)[0]
    want = hf_logits(v, ids)
    ref = ReferenceModel.from_source(glm[v]["hf"])
    assert np.abs(ref.forward(ids) - want).max() <= REL_BOUND * np.abs(want).max()
    assert np.abs(spoil(ref, cfg, layer).forward(ids) - want).max() > 1e-3 * np.abs(want).max(), piece


def test_correction_bias_and_groups_change_the_choice(glm: dict) -> None:
    """The fixtures' bias is large enough to change which experts are chosen (it is in the weights, not just
    in the logits), and so are the groups."""
    for v, cfg, unbias in (("main", {}, lambda lw: replace(lw, expert_bias=None)),
                          ("grouped", dict(n_groups=1, n_groups_used=1), lambda lw: lw)):
        ref = ReferenceModel.from_source(glm[v]["hf"])
        h = np.random.default_rng(3).standard_normal((512, 128))
        lw = ref.layers[1]
        a, _ = ref.route(h, lw)
        b, _ = top_k(replace(ref.config, **cfg), unbias(lw), ref.family.pieces.router_scores(ref.config, lw, h, ref.ops))
        changed = np.mean([set(x) != set(y) for x, y in zip(a, b, strict=True)])
        assert changed > 0.1, (v, changed)  # measured: 84% (bias), 18% (groups)


# ---------------------------------------------------------------- the routing piece, group-limited
def _numpy_transcription(logits: np.ndarray, bias: np.ndarray, g: int, used: int, k: int, scale: float) -> tuple:
    """DeepSeek-V3 / GLM-4.5 routing written out directly (float64): sigmoid, bias for choosing, groups by
    their top-2 sum, top-k in the kept groups, weights unbiased, renormalised, scaled."""
    s = 1 / (1 + np.exp(-logits))
    c = s + bias
    n, e = c.shape
    grp = np.sort(c.reshape(n, g, e // g), axis=-1)[..., -2:].sum(-1)
    keep = np.argsort(-grp, axis=1)[:, :used]
    mask = np.zeros((n, g), bool)
    mask[np.arange(n)[:, None], keep] = True
    c = np.where(np.repeat(mask, e // g, axis=1), c, -np.inf)
    idx = np.argsort(-c, axis=1)[:, :k]
    w = np.take_along_axis(s, idx, 1)
    return idx, w / w.sum(1, keepdims=True) * scale


@pytest.mark.parametrize("router", ["Glm4Moe", "DeepseekV3"])
def test_group_limited_routing_matches_transformers_routers(router: str) -> None:
    """16 experts in 4 groups, the best 2 kept, top-4, scale 2.5: the pieces (float32 runtime ops, float64
    numpy ops) choose what transformers' GLM-4.5 and DeepSeek-V3 routers choose, with their weights."""
    e, g, used, k, d, n = 16, 4, 2, 4, 64, 256
    rng = np.random.default_rng(11)
    router_w = (rng.standard_normal((e, d)) / np.sqrt(d)).astype(np.float32)
    bias = (0.3 * rng.standard_normal(e)).astype(np.float32)
    h = rng.standard_normal((n, d)).astype(np.float32)
    hf_cfg = getattr(transformers, f"{router}Config")(
        n_routed_experts=e, num_experts_per_tok=k, n_group=g, topk_group=used, hidden_size=d, routed_scaling_factor=2.5,
        norm_topk_prob=True)
    snake = {"Glm4Moe": "glm4_moe", "DeepseekV3": "deepseek_v3"}[router]
    hf_router = getattr(importlib.import_module(f"transformers.models.{snake}.modeling_{snake}"), f"{router}TopkRouter")(hf_cfg)
    with torch.no_grad():
        hf_router.weight.copy_(torch.from_numpy(router_w))
        hf_router.e_score_correction_bias.copy_(torch.from_numpy(bias))
        _, hf_w, hf_idx = hf_router(torch.from_numpy(h))
    hf_w, hf_idx = hf_w.numpy(), hf_idx.numpy()
    cfg = ModelConfig(arch="glm4_moe", vocab_size=8, d_model=d, d_ff=32, n_layers=2, n_heads=1, n_kv_heads=1, head_dim=8,
                      n_experts=e, n_experts_used=k, context_length=8, gating_func="sigmoid", expert_bias=True,
                      routed_scaling=2.5, n_groups=g, n_groups_used=used, norm_topk_prob=True)
    z = np.zeros(d, np.float32)
    lw = LayerWeights(attn_norm=z, attn_q=None, attn_k=None, attn_v=None, attn_o=None, ffn_norm=z, router=router_w,
                      expert_bias=bias)
    pieces = get_family("glm4_moe").pieces
    t_idx, t_w = _numpy_transcription(h.astype(np.float64) @ router_w.T.astype(np.float64), bias, g, used, k, 2.5)

    def by_expert(idx: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        order = np.argsort(idx, axis=1)
        return np.take_along_axis(idx, order, 1), np.take_along_axis(w, order, 1)

    for ops, x in ((RuntimeOps(), h), (NumpyOps(np.float64), h.astype(np.float64))):
        idx, w = pieces.select_experts(cfg, lw, pieces.router_scores(cfg, lw, x, ops))
        for other_idx, other_w in ((hf_idx, hf_w), (t_idx, t_w)):
            a, b = by_expert(idx, w), by_expert(other_idx, other_w)
            np.testing.assert_array_equal(a[0], b[0])
            np.testing.assert_allclose(a[1], b[1], rtol=1e-6, atol=1e-6)
    # the groups matter here: without them most tokens would choose other experts
    plain, _ = top_k(replace(cfg, n_groups=1, n_groups_used=1), lw, pieces.router_scores(cfg, lw, h, RuntimeOps()))
    changed = np.mean([set(a) != set(b) for a, b in zip(plain, hf_idx, strict=True)])
    assert changed > 0.2  # measured: 85%


# ---------------------------------------------------------------- prefetch across the leading dense layer
def test_lookahead_across_the_leading_dense_layer(glm: dict) -> None:
    """Layer 0 is dense: nothing guesses for it or from it; layer 1 guesses layer 2 with the biased choice,
    and the guesses are the experts layer 2 then chooses for a single token most of the time."""
    calls: list[int] = []
    guesses: list[tuple[int, list[int]]] = []

    class Recording(LookaheadPrefetcher):
        def guess(self, layer: int, chosen: np.ndarray, hidden: np.ndarray, k: int) -> list[int]:
            out = super().guess(layer, chosen, hidden, k)
            guesses.append((layer, out))
            return out

    def factory(router):  # noqa: ANN001, ANN202
        def recording_router(layer: int, x: np.ndarray) -> np.ndarray:
            calls.append(layer)
            return router(layer, x)

        return Recording(recording_router, 3)

    layout = glm["main"]["layout_hf"]
    chosen: list[tuple[int, np.ndarray]] = []
    trace = lambda pos, layer, c, w: chosen.append((layer, c.copy()))  # noqa: E731
    with Engine.open(layout, cache_mb=cache_mb(layout, 8), prefetch=factory, trace=trace) as eng:
        ids = prompts(1)[0]
        eng.forward(ids[:4])
        for t in ids[4:]:
            eng.forward([t])
        stats = eng.stats()
    assert set(calls) == {2} and {la for la, _ in guesses} == {1, 2}
    assert all(not g for la, g in guesses if la == 2)  # the last layer guesses nothing
    assert {la for la, _ in chosen} == {1, 2}  # the dense layer routes nothing
    layer2 = [c for la, c in chosen if la == 2]
    layer1_guesses = [g for la, g in guesses if la == 1]
    hits = [set(g) == set(c.ravel()) for g, c in zip(layer1_guesses, layer2, strict=True) if len(c) == 1]
    assert np.mean(hits) > 0.5, np.mean(hits)
    assert stats["prefetch_issued"] > 0 and stats["prefetch_used"] > 0


# ---------------------------------------------------------------- llama.cpp's converter
@pytest.mark.skipif(not (LLAMA_CPP / "convert_hf_to_gguf.py").is_file(),
                    reason=f"llama.cpp's converter is not at {LLAMA_CPP} (set LLAMA_CPP_SRC)")
@pytest.mark.parametrize("qtype", ["f16", "q8_0"])
def test_llama_cpp_converter_agrees(glm: dict, tmp_path: Path, qtype: str) -> None:
    """llama.cpp's Glm4MoeModel (vocabulary step swapped: family_checks.llama_convert) writes the tensors (names, shapes,
    types and bytes; the MTP layer as blk.3.*) and keys the fixture's GGUF writer writes: the same file.
    Unswapped, it stops at the vocabulary: GLM's BPE pre-tokenizer is not the fixture's SentencePiece."""
    ref = tmp_path / f"llama-{qtype}.gguf"
    ours = build_gguf(glm["main"]["hf"], tmp_path / f"ours-{qtype}.gguf", qtype)
    llama_convert("glm", "Glm4MoeModel", str(glm["main"]["hf"]), qtype, ref)
    a, b = gguf.GGUFReader(ref), gguf.GGUFReader(ours)
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert sorted(ta) == sorted(tb) and "blk.3.exp_probs_b.bias" in ta and "blk.3.nextn.eh_proj.weight" in ta
    for name, t in ta.items():
        assert (list(t.shape), t.tensor_type) == (list(tb[name].shape), tb[name].tensor_type), name
        assert np.array_equal(t.data, tb[name].data), name
    assert list(a.fields) == list(b.fields)
    for key in a.fields:
        if not key.startswith(("tokenizer.", "GGUF.")):
            assert a.fields[key].contents() == b.fields[key].contents(), key
    assert ref.read_bytes() == ours.read_bytes()  # the whole file, tokenizer and tensor order included
    assert open_source(ref).config == open_source(glm["main"]["hf"]).config


# ---------------------------------------------------------------- CLI and server
def test_cli_inspect_verify_and_run(glm: dict) -> None:
    runner = CliRunner()
    layout = str(glm["main"]["layout_gguf"])
    r = runner.invoke(main, ["inspect", layout])
    assert r.exit_code == 0, r.output
    assert "routing       sigmoid scores; correction bias for choosing (not weighting); weights x 2.5" in r.output
    assert "rotary        partial: the first 16 of 32 dims of each head" in r.output
    r = runner.invoke(main, ["inspect", str(glm["grouped"]["hf"])])
    assert "best 2 of 4 expert groups" in r.output and "more of layers past the model's (MTP)" in r.output
    for engine in ("numpy", "transformers"):
        r = runner.invoke(main, ["verify", layout, "--reference", str(glm["main"]["hf"]), "--reference-engine", engine,
                                 "--max-tokens", "48", "--quiet"])
        assert r.exit_code == 0 and "verdict     OK" in r.output and "100.0% of positions agree" in r.output, r.output
    r = runner.invoke(main, ["run", layout, "-n", "8", "--cache-mb", str(cache_mb(Path(layout), 3))])
    assert r.exit_code == 0 and "generated   8 tokens" in r.output, r.output


def test_serve_chat(glm: dict) -> None:
    """The chat path (the fixture tokenizer's template) through the real app."""
    chat_once(str(glm["main"]["layout_hf"]), "glm")
