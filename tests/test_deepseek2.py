"""DeepSeek-V2 / V3 (deepseek2): multi-head latent attention and its latent KV cache, V2's and V3's routing,
YaRN with DeepSeek's softmax scale, llama.cpp's two GGUF forms of MLA, the CLI and the server.

Tiny models (fixtures/tiny_families.py, transformers' own classes): "v2" is V2-Lite-shaped (plain q
projection, softmax top-2 of 8 experts, no renormalisation, 2 shared experts, 1 leading dense layer);
"v2grouped" adds V2's group_limited_greedy (top-3; 4 groups scored by their best expert, the best 2 kept) and
routed scaling 16; "v3" has q LoRA, sigmoid routing with a random correction bias, 16 experts in 4 groups
(scored by their best two) top-4, renormalised, x 2.5, and an MTP layer in its checkpoint. All use YaRN x8
with mscale = mscale_all_dim = 0.707 (cos/sin x 1, softmax x mscale^2). Each converts from its HF directory,
from a GGUF as llama.cpp writes it now (attn_k_b / attn_v_b) and from an older one (attn_kv_b).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch", reason="torch is not installed (the `reference` extra)")
transformers = pytest.importorskip("transformers", reason="transformers is not installed (the `reference` extra)")

from family_checks import LLAMA_CPP, assert_close, assert_engine_matches, cache_mb, chat_once, llama_convert, prompts, spoil  # noqa: E402

from fixtures import tiny_deepseek  # noqa: E402
from fixtures.tiny_families import build_gguf, build_hf  # noqa: E402
from mertools.cli import main  # noqa: E402
from mertools.convert.pipeline import ConvertOptions, convert  # noqa: E402
from mertools.convert.source import open_source  # noqa: E402
from mertools.families import mla  # noqa: E402
from mertools.families.pieces import top_k  # noqa: E402
from mertools.families.weights import LayerWeights  # noqa: E402
from mertools.layout import Layout  # noqa: E402
from mertools.layout.config import YARN_DEFAULTS, ModelConfig  # noqa: E402
from mertools.reference import ReferenceModel  # noqa: E402
from mertools.reference.forward import NumpyOps  # noqa: E402
from mertools.runtime.engine import Engine  # noqa: E402
from mertools.runtime.ops import RuntimeOps  # noqa: E402

REL_BOUND = 1e-5
VARIANTS = {
    "v2": ("deepseek_v2", {}),
    "v2grouped": ("deepseek_v2", dict(topk_method="group_limited_greedy", n_group=4, topk_group=2, num_experts_per_tok=3,
                                       routed_scaling_factor=16.0)),
    "v3": ("deepseek_v3", {}),
}
SOURCES = ("hf", "gguf", "legacy")
MSCALE2 = (0.1 * 0.707 * np.log(8.0) + 1) ** 2


@pytest.fixture(scope="module")
def ds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    out = tmp_path_factory.mktemp("deepseek")
    res = {}
    opts = ConvertOptions(dtype="f16", progress=False)
    for v, (family, overrides) in VARIANTS.items():
        hf = build_hf(family, out / v, seed=0, **overrides)
        d = {"hf": hf, "gguf": build_gguf(hf, out / f"{v}-f16.gguf", "f16"),
             "legacy": tiny_deepseek.build_gguf(hf, out / f"{v}-legacy-f16.gguf", "f16", legacy=True)}
        for src in SOURCES:
            d[f"layout_{src}"] = convert(d[src], out / f"{v}-layout-{src}", opts).out
        res[v] = d
    return res


@pytest.fixture(scope="module")
def hf_logits(ds: dict):  # noqa: ANN201 - (variant, ids) -> logits of transformers' own class
    models: dict[str, object] = {}

    def run(v: str, ids: list[int]) -> np.ndarray:
        if v not in models:
            cls = transformers.DeepseekV3ForCausalLM if v == "v3" else transformers.DeepseekV2ForCausalLM
            models[v] = cls.from_pretrained(ds[v]["hf"], dtype=torch.float32).eval()
        with torch.no_grad():
            return models[v](torch.tensor([ids])).logits[0].float().numpy()

    return run


# ---------------------------------------------------------------- config and conversion
def test_config_from_every_source(ds: dict) -> None:
    for v in VARIANTS:
        cfgs = [open_source(ds[v][s]).config for s in SOURCES]
        assert cfgs[0] == cfgs[1] == cfgs[2], v
        c = cfgs[0]
        assert (c.arch, c.n_heads, c.n_kv_heads, c.head_dim, c.qk_rope_dim, c.v_head_dim, c.kv_lora_rank) == (
            "deepseek2", 4, 4, 48, 16, 32, 64)
        assert (c.rope_scaling, c.rope_factor, c.rope_original_context, c.rope_attn_factor) == ("yarn", 8.0, 64, 1.0)
        assert c.attn_scale == pytest.approx(MSCALE2) and c.rotary_dim == 16 and c.mla
        assert (c.dense_layers, c.d_ff_dense) == ((0,), 192)
    v2, g2, v3 = (open_source(ds[v]["hf"]).config for v in VARIANTS)
    assert (v2.q_lora_rank, v2.gating_func, v2.expert_bias, v2.norm_topk_prob, v2.n_groups, v2.d_ff_shared) == (
        0, "softmax", False, False, 1, 128)
    assert (g2.n_groups, g2.n_groups_used, g2.group_score, g2.routed_scaling) == (4, 2, "max", 16.0)
    assert (v3.q_lora_rank, v3.gating_func, v3.expert_bias, v3.norm_topk_prob, v3.routed_scaling) == (
        64, "sigmoid", True, True, 2.5)
    assert (v3.n_experts, v3.n_experts_used, v3.n_groups, v3.n_groups_used, v3.group_score, v3.n_layers) == (
        16, 4, 4, 2, "top2", 3)


def test_every_source_gives_the_same_layout(ds: dict) -> None:
    """HF's kv_b_proj, the modern GGUF's attn_k_b / attn_v_b and the older attn_kv_b all become the same bytes."""
    for v in VARIANTS:
        a = Layout.open(ds[v]["layout_hf"])
        for src in ("gguf", "legacy"):
            b = Layout.open(ds[v][f"layout_{src}"])
            assert a.manifest.config == b.manifest.config
            assert {n: t.to_dict() for n, t in a.manifest.dense.items()} == {n: t.to_dict() for n, t in b.manifest.dense.items()}
            assert (a.root / "dense.bin").read_bytes() == (b.root / "dense.bin").read_bytes(), (v, src)
            assert [e.to_dict() for e in a.manifest.experts] == [e.to_dict() for e in b.manifest.experts]
            for e in a.manifest.experts:
                assert (a.root / e.file).read_bytes() == (b.root / e.file).read_bytes()
    m = Layout.open(ds["v3"]["layout_hf"]).manifest
    assert {n: tuple(t.shape) for n, t in m.dense.items() if n.startswith("blk.1.attn_")} == {
        "blk.1.attn_q_a.weight": (64, 128), "blk.1.attn_q_b.weight": (192, 64), "blk.1.attn_kv_a_mqa.weight": (80, 128),
        "blk.1.attn_k_b.weight": (256, 32), "blk.1.attn_v_b.weight": (128, 64), "blk.1.attn_output.weight": (128, 128),
        "blk.1.attn_norm.weight": (128,), "blk.1.attn_q_a_norm.weight": (64,), "blk.1.attn_kv_a_norm.weight": (64,)}
    assert not [n for n in m.dense if n.startswith("blk.3.")] and {e.layer for e in m.experts} == {1, 2}  # no MTP layer
    # k_b is HF's kv_b_proj k rows of each head, transposed: head 2's (rank, nope) block
    kv_b = open_source(ds["v3"]["hf"]).tensors["model.layers.1.self_attn.kv_b_proj.weight"].to_float32()
    k_b = Layout.open(ds["v3"]["layout_hf"]).read_dense("blk.1.attn_k_b.weight").view(np.float16).reshape(4, 64, 32)
    np.testing.assert_array_equal(k_b[2].astype(np.float32), kv_b.reshape(4, 64, 64)[2, :32].T)


def test_a_legacy_gguf_with_a_quantized_kv_b_splits_exactly(ds: dict, tmp_path: Path) -> None:
    """An older q8_0 GGUF's attn_kv_b is dequantized once into f32 k_b / v_b parts (llama.cpp's values, moved),
    which `--dtype auto` stores as f16 like any f32 source (rounding only), and which run like the rest."""
    q8 = tiny_deepseek.build_gguf(ds["v2"]["hf"], tmp_path / "legacy-q8.gguf", "q8_0", legacy=True)
    src = open_source(q8)
    kv_b = src.tensors["blk.1.attn_kv_b.weight"]
    assert kv_b.dtype == "q8_0" and src.config == open_source(ds["v2"]["hf"]).config
    parts = {spec.field: t for _, spec, t in src.dense_tensors() if _.startswith("blk.1.attn_")}
    whole = kv_b.to_float32().reshape(4, 64, 64)
    assert parts["attn_k_b"].dtype == parts["attn_v_b"].dtype == "f32"
    np.testing.assert_array_equal(parts["attn_v_b"].to_float32().reshape(4, 32, 64), whole[:, 32:])
    np.testing.assert_array_equal(parts["attn_k_b"].to_float32().reshape(4, 64, 32), whole[:, :32].transpose(0, 2, 1))
    out = convert(q8, tmp_path / "layout", ConvertOptions(dtype="auto", progress=False)).out
    lay = Layout.open(out)
    assert lay.manifest.dense["blk.1.attn_k_b.weight"].dtype == "f16"
    np.testing.assert_array_equal(lay.read_dense("blk.1.attn_v_b.weight").view(np.float16).reshape(4, 32, 64),
                                  whole[:, 32:].astype(np.float16))
    ids = prompts(1)[0]
    ref = ReferenceModel.from_source(q8).forward(ids)  # the GGUF's own values, float64
    with Engine.open(out, cache_mb=cache_mb(out, 2)) as eng:
        got = eng.forward(ids)
    assert np.abs(got - ref).max() <= 1e-2 * np.abs(ref).max() and (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


def test_fp8_checkpoints_read_as_transformers_dequantizes_them(ds: dict, tmp_path: Path) -> None:
    """DeepSeek-V3's release form (fixtures/tiny_deepseek.build_hf_fp8): each e4m3 weight with its 128x128 block
    scales reads as transformers' own _dequantize_fp8_weight gives it, bit for bit (partial blocks included);
    `--dtype auto` refuses and writes nothing (a layout holds no FP8), `--dtype f16` converts (values rounded once
    to f16), and the runtime on that layout follows the float64 reference of the FP8 directory (measured: within
    6.9e-4 of the largest logit; the tiny random model is so sensitive that FP8 itself moved its logits by 33%,
    a further q8_0 rounding by 31%)."""
    from safetensors.torch import load_file
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    from mertools.errors import QuantizationError, SourceError

    fp8 = tiny_deepseek.build_hf_fp8(ds["v3"]["hf"], tmp_path / "fp8")
    src = open_source(fp8)
    assert src.config == open_source(ds["v3"]["hf"]).config
    stored = load_file(str(fp8 / "model.safetensors"))
    checked = 0
    for name, t in src.tensors.items():
        if t.dtype == "f8_e4m3":
            want = _dequantize_fp8_weight(stored[name], stored[name + "_scale_inv"], [128, 128], torch.float32).numpy()
            np.testing.assert_array_equal(t.to_float32(), want, err_msg=name)
            checked += 1
    # 5 attention projections in each of 4 layers (the MTP layer's too), the dense layer's MLP, and in 3 MoE
    # layers 16 experts and the shared one
    assert checked == 4 * 5 + 3 + 3 * (16 * 3 + 3)
    lone = replace(src.tensors["model.layers.1.self_attn.o_proj.weight"], fp8_scale=None)  # a scale gone missing
    with pytest.raises(SourceError, match="o_proj.weight .* has no model.layers.1.self_attn.o_proj.weight_scale_inv"):
        lone.to_float32()
    with pytest.raises(QuantizationError, match="f8_e4m3"):
        convert(fp8, tmp_path / "auto", ConvertOptions(dtype="auto", progress=False))
    assert not (tmp_path / "auto").exists()
    out = convert(fp8, tmp_path / "f16", ConvertOptions(dtype="f16", progress=False)).out
    ids = prompts(1)[0]
    with Engine.open(out, cache_mb=cache_mb(out, 4)) as eng:
        assert_close(eng.forward(ids), ReferenceModel.from_source(fp8).forward(ids), 2e-3)


# the published config.json files (shapes only)
_V2_LITE = dict(architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2", hidden_size=2048, intermediate_size=10944,
                moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16,
                n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1, q_lora_rank=None,
                kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, topk_method="greedy",
                n_group=1, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0, scoring_func="softmax",
                max_position_embeddings=163840, rms_norm_eps=1e-6, rope_theta=10000, vocab_size=102400,
                rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                              "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707})
_V3 = dict(_V2_LITE, architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", hidden_size=7168,
           intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128,
           num_key_value_heads=128, n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8,
           first_k_dense_replace=3, q_lora_rank=1536, topk_method="noaux_tc", n_group=8, topk_group=4,
           norm_topk_prob=True, routed_scaling_factor=2.5, scoring_func="sigmoid", vocab_size=129280,
           num_nextn_predict_layers=1,
           rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                         "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})


@pytest.mark.parametrize("hp", [_V2_LITE, _V3], ids=["DeepSeek-V2-Lite", "DeepSeek-V3"])
def test_published_configs_and_their_kv_cache(tmp_path: Path, hp: dict) -> None:
    from fixtures.safetensors_io import write_safetensors

    (tmp_path / "config.json").write_text(json.dumps(hp))
    write_safetensors(tmp_path / "model.safetensors", [], "F16")
    c = open_source(tmp_path).config
    assert (c.n_layers, c.head_dim, c.v_head_dim, c.kv_lora_rank, c.qk_rope_dim, c.q_lora_rank or None) == (
        hp["num_hidden_layers"], 192, 128, 512, 64, hp["q_lora_rank"])
    assert c.dense_layers == tuple(range(hp["first_k_dense_replace"]))
    assert c.d_ff_shared == hp["n_shared_experts"] * hp["moe_intermediate_size"]
    assert c.attn_scale == pytest.approx((0.1 * hp["rope_scaling"]["mscale_all_dim"] * np.log(40) + 1) ** 2)
    latent, full = mla.kv_bytes_per_token(c)
    # the latent cache: 512 + 64 floats per layer and token, against 2 x heads x 192/128 floats of full keys/values
    assert latent == hp["num_hidden_layers"] * 576 * 4
    assert full == hp["num_hidden_layers"] * hp["num_attention_heads"] * (192 + 128) * 4
    assert (latent, round(full / latent, 1)) == {27: (62208, 8.9), 61: (140544, 71.1)}[c.n_layers]


def test_config_validation() -> None:
    base = dict(arch="deepseek2", vocab_size=512, d_model=128, d_ff=64, n_layers=3, n_heads=4, n_kv_heads=4, head_dim=48,
                n_experts=8, n_experts_used=2, context_length=512)
    good = ModelConfig(**base, kv_lora_rank=64, qk_rope_dim=16, v_head_dim=32, attn_scale=2)
    assert good.mla and good.rotary_dim == 16 and good.softmax_divisor == pytest.approx(48 ** 0.5 / 2)
    for bad, needle in ((dict(kv_lora_rank=64, qk_rope_dim=15, v_head_dim=32), "qk_rope_dim"),
                        (dict(kv_lora_rank=64, qk_rope_dim=48, v_head_dim=32), "qk_rope_dim"),
                        (dict(kv_lora_rank=64, qk_rope_dim=16), "v_head_dim"),
                        (dict(q_lora_rank=32), "latent attention"), (dict(kv_lora_rank=-1), "kv_lora_rank"),
                        (dict(kv_lora_rank=64, qk_rope_dim=16, v_head_dim=32, n_kv_heads=1), "n_kv_heads"),
                        (dict(attn_scale=0.0), "attn_scale"), (dict(group_score="sum"), "group_score")):
        with pytest.raises(ValueError, match=needle):
            ModelConfig(**{**base, **bad})


# ---------------------------------------------------------------- numerics against transformers
@pytest.mark.parametrize("v", list(VARIANTS))
@pytest.mark.parametrize("src", SOURCES)
def test_runtime_matches_transformers(ds: dict, hf_logits, v: str, src: str) -> None:  # noqa: ANN001
    layout = ds[v][f"layout_{src}"]
    k = Layout.open(layout).manifest.config.n_experts_used
    with Engine.open(layout, cache_mb=cache_mb(layout, k), kv_dtype="f32") as eng:  # one layer's top-k, no more
        for ids in prompts():
            want = hf_logits(v, ids)
            assert_engine_matches(eng, ids, want, REL_BOUND, (v, src))
        assert eng.stats()["expert_misses"] > 0


@pytest.mark.parametrize("v", list(VARIANTS))
def test_numpy_reference_matches_transformers(ds: dict, hf_logits, v: str) -> None:  # noqa: ANN001
    for src in ("hf", "legacy", "layout_gguf"):
        ref = ReferenceModel.from_layout(ds[v][src]) if src.startswith("layout") else ReferenceModel.from_source(ds[v][src])
        for ids in prompts():
            assert_close(ref.forward(ids), hf_logits(v, ids), REL_BOUND, (v, src))


def test_the_kv_cache_holds_the_latent(ds: dict, hf_logits) -> None:  # noqa: ANN001
    """Per token and layer the cache holds rope + rank floats (16 + 64 here: 960 bytes for 3 layers, against
    3,840 for full keys and values), attention reads its values from the latent there, and a cache that has
    grown keeps giving transformers' logits."""
    layout = ds["v3"]["layout_hf"]
    ids = prompts(1, 40)[0]
    with Engine.open(layout, cache_mb=cache_mb(layout, 16), kv_dtype="f32") as eng:
        kv = eng.model.new_kv()
        assert kv.v is None and kv.k.shape[2:] == (1, 16 + 64) and kv.bytes_per_token == 3 * 80 * 4 == 960
        assert mla.kv_bytes_per_token(eng.model.cfg) == (960, 3 * 4 * (48 + 32) * 4)
        before = kv.k.nbytes
        kv.ensure(1000)
        assert kv.k.nbytes - before == (1000 - 256) * kv.bytes_per_token  # what growing costs, nothing else
        want = hf_logits("v3", ids)
        eng.reset()
        got = np.concatenate([eng.forward(ids[:30])] + [eng.forward([t]) for t in ids[30:]])
        assert np.abs(got - want).max() <= REL_BOUND * np.abs(want).max()
        # the values are the cached latent: spoil it (not the rotary key) and the next token's logits move
        eng.reset()
        eng.forward(ids[:30])
        eng.model.kv.k[:, :30, :, 16:] *= 0.5
        spoiled = eng.forward(ids[30:31])
        assert np.abs(spoiled - want[30]).max() > 1e-2 * np.abs(want).max()


@pytest.mark.parametrize(("v", "kv"), [("v2", "f16"), ("v3", "f16"), ("v3", "q8_0")])
def test_f16_latent_cache_is_within_verify_f16_limits(ds: dict, v: str, kv: str) -> None:
    """The latent cache in f16 (and q8_0: the 16-wide rotary part of the tiny model is not a whole block, so it
    is refused there; V2-Lite's 64 + 512 are) against f32."""
    from family_checks import assert_f16_kv_within_f16_limits

    from mertools.runtime.engine import RuntimeConfigError

    if kv == "q8_0":
        with pytest.raises(RuntimeConfigError, match="multiples of 32"):
            Engine.open(ds[v]["layout_hf"], kv_dtype=kv)
        return
    assert_f16_kv_within_f16_limits(ds[v]["layout_hf"], prompts(1, 48)[0], kv=kv)


SPOILS = {
    "correction bias": ("v3", None, lambda lw: lw if lw.expert_bias is None else replace(lw, expert_bias=0 * lw.expert_bias)),
    "sigmoid vs softmax": ("v3", dict(gating_func="softmax", expert_bias=False, group_score="max"), None),
    "groups (V3)": ("v3", dict(n_groups=1, n_groups_used=1), None),
    "groups (V2)": ("v2grouped", dict(n_groups=1, n_groups_used=1), None),
    "routed scaling": ("v2grouped", dict(routed_scaling=1.0), None),
    "renormalisation": ("v3", dict(norm_topk_prob=False), None),
    "V2 renormalises not": ("v2", dict(norm_topk_prob=True), None),
    "shared experts": ("v2", None, lambda lw: replace(lw, shared=None)),
    "q LoRA norm": ("v3", None, lambda lw: replace(lw, q_a_norm=np.ones_like(lw.q_a_norm))),
    "latent norm": ("v2", None, lambda lw: replace(lw, kv_a_norm=np.ones_like(lw.kv_a_norm))),
    "YaRN softmax scale": ("v2", dict(attn_scale=1.0), None),
    "YaRN": ("v3", dict(rope_scaling="none", **YARN_DEFAULTS, attn_scale=MSCALE2), None),
    "rotary": ("v2", dict(rope_theta=1e9), None),  # (nearly) no rotation
}


@pytest.mark.parametrize("piece", list(SPOILS))
def test_each_piece_matters(ds: dict, hf_logits, piece: str) -> None:  # noqa: ANN001
    """Leaving a DeepSeek piece out moves the logits far beyond the bound the tests above hold."""
    v, cfg, layer = SPOILS[piece]
    ids = prompts(1)[0]
    want = hf_logits(v, ids)
    ref = ReferenceModel.from_source(ds[v]["hf"])
    assert np.abs(ref.forward(ids) - want).max() <= REL_BOUND * np.abs(want).max()
    assert np.abs(spoil(ref, cfg, layer).forward(ids) - want).max() > 1e-3 * np.abs(want).max(), piece


def test_rotary_pairs_are_adjacent(ds: dict, hf_logits, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """DeepSeek rotates adjacent dims (2i, 2i + 1): rotating HF's halves instead (no de-interleaving) is wrong."""
    ids = prompts(1)[0]
    want = hf_logits("v2", ids)
    monkeypatch.setattr(mla, "_pairs_first", lambda rope: np.arange(rope))
    got = ReferenceModel.from_source(ds["v2"]["hf"]).forward(ids)
    assert np.abs(got - want).max() > 1e-3 * np.abs(want).max()


def test_group_max_routing_matches_transformers_v2_router() -> None:
    """V2's group_limited_greedy (a group scored by its best expert, softmax scores, no renormalisation,
    scaled) equals transformers' DeepseekV2TopkRouter, on both backends; scoring groups by their best two
    instead (V3's rule, which llama.cpp applies to every deepseek2 GGUF) chooses other experts."""
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

    rng = np.random.default_rng(5)
    d, e, g, used, k = 32, 16, 4, 2, 3
    router_w = (rng.standard_normal((e, d)) * 0.6).astype(np.float32)
    h = rng.standard_normal((2048, d)).astype(np.float32)
    hf_cfg = transformers.DeepseekV2Config(hidden_size=d, n_routed_experts=e, num_experts_per_tok=k, n_group=g,
                                           topk_group=used, topk_method="group_limited_greedy", routed_scaling_factor=16.0)
    hf_router = DeepseekV2TopkRouter(hf_cfg)
    with torch.no_grad():
        hf_router.weight.copy_(torch.from_numpy(router_w))
        _, hf_w, hf_idx = hf_router(torch.from_numpy(h))
    order = np.argsort(hf_idx.numpy(), axis=1)
    hf_idx, hf_w = np.take_along_axis(hf_idx.numpy(), order, 1), np.take_along_axis(hf_w.numpy(), order, 1)
    cfg = ModelConfig(arch="deepseek2", vocab_size=8, d_model=d, d_ff=32, n_layers=2, n_heads=1, n_kv_heads=1, head_dim=8,
                      n_experts=e, n_experts_used=k, context_length=8, routed_scaling=16.0, n_groups=g,
                      n_groups_used=used, group_score="max", norm_topk_prob=False)
    z = np.zeros(d, np.float32)
    lw = LayerWeights(attn_norm=z, attn_o=None, ffn_norm=z, router=router_w)
    for ops, x in ((RuntimeOps(), h), (NumpyOps(np.float64), h.astype(np.float64))):
        idx, w = top_k(cfg, lw, _scores(cfg, lw, x, ops))
        o = np.argsort(idx, axis=1)
        np.testing.assert_array_equal(np.take_along_axis(idx, o, 1), hf_idx)
        np.testing.assert_allclose(np.take_along_axis(w, o, 1), hf_w, rtol=1e-5, atol=1e-6)
    top2, _ = top_k(replace(cfg, group_score="top2"), lw, _scores(cfg, lw, h, RuntimeOps()))
    changed = np.mean([set(a) != set(b) for a, b in zip(top2, hf_idx, strict=True)])
    assert changed > 0.02, changed  # measured: 5.7%


def _scores(cfg: ModelConfig, lw: LayerWeights, x: np.ndarray, ops) -> np.ndarray:  # noqa: ANN001
    from mertools.families import get_family

    return get_family("deepseek2").pieces.router_scores(cfg, lw, x, ops)


# ---------------------------------------------------------------- llama.cpp's converter
@pytest.mark.skipif(not (LLAMA_CPP / "conversion" / "deepseek.py").is_file(),
                    reason=f"llama.cpp's converter is not at {LLAMA_CPP} (set LLAMA_CPP_SRC)")
@pytest.mark.parametrize("v", ["v2", "v3"])
def test_llama_cpp_converter_agrees(ds: dict, tmp_path: Path, v: str) -> None:
    """llama.cpp's DeepseekV2Model (vocabulary step swapped: family_checks.llama_convert) writes byte for byte
    the GGUF the fixture writes (attn_k_b / attn_v_b split from kv_b, MTP layer skipped), which converts to the
    config the HF directory gives."""
    ref = tmp_path / "llama.gguf"
    llama_convert("deepseek", "DeepseekV2Model", str(ds[v]["hf"]), "f16", ref)
    assert ref.read_bytes() == ds[v]["gguf"].read_bytes()
    assert open_source(ref).config == open_source(ds[v]["hf"]).config


# ---------------------------------------------------------------- CLI and server
def test_cli_inspect_verify_and_run(ds: dict) -> None:
    runner = CliRunner()
    layout = str(ds["v3"]["layout_gguf"])
    r = runner.invoke(main, ["inspect", layout])
    assert r.exit_code == 0, r.output
    assert "deepseek2 (DeepseekV3ForCausalLM)" in r.output
    assert "multi-head latent: q through rank 64, k/v from a 64-wide latent" in r.output
    assert "KV cache      0.5 KiB per token of context in f16 (80 values per layer), full keys and values would take " \
        "1.9 KiB (4.0x)" in r.output
    assert "best 2 of 4 expert groups (scored by their best two experts)" in r.output
    r = runner.invoke(main, ["inspect", str(ds["v2grouped"]["gguf"])])
    assert r.exit_code == 0 and "deepseek2 (DeepseekV2ForCausalLM)" in r.output and "scored by their best expert" in r.output
    for v in ("v2grouped", "v3"):
        for engine in ("numpy", "transformers"):
            r = runner.invoke(main, ["verify", str(ds[v]["layout_legacy"]), "--reference", str(ds[v]["hf"]),
                                     "--reference-engine", engine, "--max-tokens", "48", "--quiet"])
            assert r.exit_code == 0 and "verdict     OK" in r.output and "100.0% of positions agree" in r.output, r.output
    r = runner.invoke(main, ["run", layout, "-n", "8", "--cache-mb", str(cache_mb(Path(layout), 5))])
    assert r.exit_code == 0 and "generated   8 tokens" in r.output, r.output


def test_serve_chat(ds: dict) -> None:
    """The chat path (the fixture tokenizer's template) through the real app."""
    chat_once(str(ds["v2"]["layout_hf"]), "ds")


def test_verification_rows_are_decode_steps(ds: dict) -> None:
    """Speculative decoding's verification step through latent attention: each row a decode step, bit for bit."""
    for v in VARIANTS:
        ids = prompts(1, 20)[0]
        layout = ds[v]["layout_gguf"]
        k = Layout.open(layout).manifest.config.n_experts_used
        with Engine.open(layout, cache_mb=cache_mb(layout, k + 1)) as eng:
            eng.forward(ids[:12])
            one = np.concatenate([eng.forward([i]) for i in ids[12:]])
            eng.reset()
            eng.forward(ids[:12])
            assert np.array_equal(eng.model.forward(np.array(ids[12:]), rows_apart=True), one), v


@pytest.mark.parametrize("v", ["v2", "v3"])
def test_int8_kernels_with_latent_attention(ds: dict, v: str, tmp_path: Path) -> None:
    """The 8-bit kernels on a q8_0 layout of each variant, the per-head k_b / v_b products included (a packed weight's
    rows taken head by head): within verify's limit of the exact kernels."""
    from mertools.verify.numerics import KERNELS_KL_LIMIT, check_kernels

    out = convert(ds[v]["gguf"], tmp_path / "q8", ConvertOptions(dtype="q8_0", dense_dtype="q8_0", progress=False)).out
    rep = check_kernels(out, "int8", max_tokens=64)
    print(f"{v}: int8 vs exact mean KL {rep.kl_mean:.3g}, max {rep.kl_max:.3g}, top-1 {rep.top1_agreement:.1%}")
    assert 0 < rep.kl_mean <= KERNELS_KL_LIMIT
    with Engine.open(out, kernels="int8") as eng:
        w = eng.model.layers[1]
        assert w.attn_k_b.checked.packed and w.attn_v_b.checked.packed
