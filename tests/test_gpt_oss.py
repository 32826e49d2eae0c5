"""gpt-oss (gpt_oss) beyond test_families.py's shared checks: its MXFP4 checkpoints (OpenAI's HF format and
llama.cpp's GGUF) kept byte for byte, each of its pieces, its YaRN against transformers', its published
configs, llama.cpp's converter, and the CLI and server paths.

The tiny model (fixtures/tiny_families.py, tiny_gpt_oss.py): 3 layers (sliding window 4, full, sliding 4),
d_model 128, 4 heads of 32 (2 kv), 8 experts of width 64 top-4, random non-zero sinks and biases, gate/up
pre-activations of std ~5 so the clamp at 7 bites, YaRN x8 from 64 positions (truncate false).

Measured (24-token prompts; float32 transformers vs the runtime, experts through a cache of 4 slots, the
engine's minimum for top-4): max |logit diff| 4.2e-6 (prefill) / 4.9e-6 (decode, token by token past a
4-token prefix) with |logits| <= 4.8, for f16 layouts from HF and GGUF; 4.5e-6 / 4.6e-6 for the MXFP4 layout
against transformers' own loading of the MXFP4 checkpoint (|logits| <= 5.0); top-1 identical everywhere; the
float64 numpy reference within 5.1e-6. The bound is 1e-5 of the largest logit (the acceptance asks 1e-3);
each spoiled piece moves the logits by 12% (alpha) to 103% (sliding window) of the largest.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch", reason="torch is not installed (the `reference` extra)")
transformers = pytest.importorskip("transformers", reason="transformers is not installed (the `reference` extra)")

from family_checks import LLAMA_CPP, assert_engine_matches, cache_mb, chat_once, llama_convert, prompts  # noqa: E402

from fixtures.tiny_families import build_gguf, build_hf  # noqa: E402
from fixtures.tiny_gpt_oss import build_hf_mxfp4, ggml_mxfp4, openai_mxfp4  # noqa: E402
from mertools.cli import main  # noqa: E402
from mertools.convert.hf import mxfp4_from_openai  # noqa: E402
from mertools.convert.pipeline import ConvertOptions, convert  # noqa: E402
from mertools.convert.source import open_source  # noqa: E402
from mertools.dtypes import DTYPES  # noqa: E402
from mertools.errors import LayoutError  # noqa: E402
from mertools.families.pieces import _inv_freq  # noqa: E402
from mertools.layout import Layout  # noqa: E402
from mertools.layout.config import ModelConfig  # noqa: E402
from mertools.layout.constants import align_up  # noqa: E402
from mertools.reference import ReferenceModel  # noqa: E402
from mertools.runtime.engine import Engine  # noqa: E402

REL_BOUND = 1e-5


@pytest.fixture(scope="module")
def oss(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gpt_oss")
    d: dict[str, Path] = {"hf": build_hf("gpt_oss", out / "hf", seed=0)}
    d["hf_mxfp4"] = build_hf_mxfp4(d["hf"], out / "hf-mxfp4")
    for q in ("f16", "mxfp4"):
        d[f"gguf_{q}"] = build_gguf(d["hf"], out / f"{q}.gguf", q)
    f16 = ConvertOptions(dtype="f16", progress=False)
    d["layout_hf"] = convert(d["hf"], out / "layout-hf", f16).out
    d["layout_gguf"] = convert(d["gguf_f16"], out / "layout-gguf", f16).out
    auto = ConvertOptions(progress=False)  # --dtype auto: MXFP4 experts stay MXFP4
    d["layout_mxfp4_gguf"] = convert(d["gguf_mxfp4"], out / "layout-mxfp4-gguf", auto).out
    d["layout_mxfp4_hf"] = convert(d["hf_mxfp4"], out / "layout-mxfp4-hf", auto).out
    return d


@pytest.fixture(scope="module")
def hf_logits(oss: dict):  # noqa: ANN201 - (checkpoint, ids) -> logits of transformers' GptOssForCausalLM
    models: dict[str, object] = {}

    def run(which: str, ids: list[int]) -> np.ndarray:
        if which not in models:
            # the MXFP4 checkpoint through transformers' own MXFP4 loading (dequantized on CPU)
            extra = {"quantization_config": transformers.Mxfp4Config(dequantize=True)} if which == "hf_mxfp4" else {}
            models[which] = transformers.GptOssForCausalLM.from_pretrained(oss[which], dtype=torch.float32, **extra).eval()
        with torch.no_grad():
            return models[which](torch.tensor([ids])).logits[0].float().numpy()

    return run


# ---------------------------------------------------------------- configs and layouts
def test_config_from_every_source(oss: dict) -> None:
    cfgs = [open_source(oss[k]).config for k in ("hf", "gguf_f16", "gguf_mxfp4", "hf_mxfp4")]
    assert all(c == cfgs[0] for c in cfgs)
    c = cfgs[0]
    assert (c.arch, c.n_experts, c.n_experts_used, c.d_ff, c.head_dim, c.norm_topk_prob) == ("gpt_oss", 8, 4, 64, 32, True)
    assert (c.sliding_window, c.full_attention_layers, [c.window(la) for la in range(3)]) == (4, (1,), [4, 0, 4])
    assert c.attn_bias and c.attn_o_bias and c.attn_sinks and c.router_bias and c.expert_mlp_bias
    assert (c.swiglu_alpha, c.swiglu_limit, c.swiglu_up_offset) == (1.702, 7.0, 1.0)
    assert (c.rope_scaling, c.rope_factor, c.rope_original_context, c.yarn_truncate) == ("yarn", 8.0, 64, False)
    assert c.rope_attn_factor == pytest.approx(0.1 * math.log(8) + 1) and c.rope_theta == 150000.0


def test_hf_and_gguf_layouts_are_identical(oss: dict) -> None:
    a, b = Layout.open(oss["layout_hf"]), Layout.open(oss["layout_gguf"])
    assert a.manifest.config == b.manifest.config and a.manifest.version == 2
    assert [e.to_dict() for e in a.manifest.experts] == [e.to_dict() for e in b.manifest.experts]
    for e in a.manifest.experts:
        assert (a.root / e.file).read_bytes() == (b.root / e.file).read_bytes()
    assert {n: t.to_dict() for n, t in a.manifest.dense.items()} == {n: t.to_dict() for n, t in b.manifest.dense.items()}
    assert (a.root / "dense.bin").read_bytes() == (b.root / "dense.bin").read_bytes()
    # the biases live in each expert's file (streamed with it), never in dense.bin
    e = a.manifest.expert(2, 5)
    assert list(e.tensors) == ["gate", "up", "down", "gate_bias", "up_bias", "down_bias"]
    assert [(t.dtype, t.shape) for t in e.tensors.values()][3:] == [("f32", (64,)), ("f32", (64,)), ("f32", (128,))]
    assert not [n for n in a.manifest.dense if "_exps" in n]
    assert {"blk.0.attn_sinks.weight", "blk.0.ffn_gate_inp.bias", "blk.0.attn_output.bias"} <= set(a.manifest.dense)
    # the bias of expert 5's gate is HF's gate_up_proj_bias[5, 0::2]
    hf = {n: t for n, t in open_source(oss["hf"]).tensors.items()}
    want = hf["model.layers.2.mlp.experts.gate_up_proj_bias"].to_float32()[5, 0::2]
    np.testing.assert_array_equal(a.read_expert(2, 5, "gate_bias").view(np.float32), want)


def test_mxfp4_experts_are_kept_byte_for_byte(oss: dict) -> None:
    """An MXFP4 GGUF converts with --dtype auto to MXFP4 expert files holding its bytes; OpenAI's HF MXFP4
    checkpoint converts to expert files byte-identical to those (the repack only moves nibbles)."""
    src, lay = open_source(oss["gguf_mxfp4"]), Layout.open(oss["layout_mxfp4_gguf"])
    for e in lay.manifest.experts:
        for role, t in src.expert_tensors(e.layer, e.expert).items():
            assert e.tensors[role].dtype == ("mxfp4" if role in ("gate", "up", "down") else "f32")
            assert lay.read_expert(e.layer, e.expert, role).tobytes() == t.read_raw().tobytes()
    hf = Layout.open(oss["layout_mxfp4_hf"])
    assert hf.manifest.config == lay.manifest.config
    assert [e.to_dict() for e in hf.manifest.experts] == [e.to_dict() for e in lay.manifest.experts]
    for e in lay.manifest.experts:
        assert (hf.root / e.file).read_bytes() == (lay.root / e.file).read_bytes()


def test_openai_mxfp4_repack_matches_transformers_dequantization() -> None:
    """mxfp4_from_openai against transformers' own MXFP4 dequantizer (convert_moe_packed_tensors) and
    gguf-py's: the same values for random blocks and every exponent byte ggml and OCP agree on."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    rng = np.random.default_rng(5)
    blocks = rng.integers(0, 256, (3, 6, 4, 16), dtype=np.uint8)  # (E, out, in/32, 16)
    scales = rng.integers(100, 150, (3, 6, 4), dtype=np.uint8)
    want = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32)
    want = want.transpose(1, 2).numpy()  # transformers returns (E, in, out): back to (E, out, in)
    ggml = mxfp4_from_openai(blocks, scales)  # (E, out, 4 * 17)
    got = gguf.quants.dequantize(ggml.reshape(-1, 4 * 17), gguf.GGMLQuantizationType.MXFP4).reshape(want.shape)
    np.testing.assert_array_equal(got, want)
    # and the fixture's writer is its inverse
    q = ggml_mxfp4(rng.standard_normal((5, 64)).astype(np.float32))
    np.testing.assert_array_equal(mxfp4_from_openai(*openai_mxfp4(q)), q.reshape(5, -1))


# ---------------------------------------------------------------- numerics against transformers
@pytest.mark.parametrize("which", ["layout_hf", "layout_gguf", "layout_mxfp4_hf"])
def test_runtime_matches_transformers(oss: dict, hf_logits, which: str) -> None:  # noqa: ANN001
    layout, ckpt = oss[which], "hf_mxfp4" if "mxfp4" in which else "hf"
    with Engine.open(layout, cache_mb=cache_mb(layout, 4), kv_dtype="f32") as eng:  # 4 slots: one layer's top-4
        for ids in prompts():
            want = hf_logits(ckpt, ids)
            assert_engine_matches(eng, ids, want, REL_BOUND, which)
        assert eng.stats()["expert_misses"] > 0


def test_int8_kernels_pack_the_mxfp4_experts(oss: dict, hf_logits) -> None:  # noqa: ANN001
    """With the 8-bit kernels and a cache holding every expert, the MXFP4 experts are packed in their slots as they
    load. Decoding token by token with every expert resident runs a layer's experts in one call (experts8: biases and
    the clamped GLU compiled); a fresh engine without prefetch computes a step's experts one at a time through the
    family's expert piece while it reads them: the same bits. Within 4% of transformers' largest logit (measured
    1.0-2.0%; the exact kernels: 1e-6). A cache of 4 slots streams: its MXFP4 experts stay on the exact kernels."""
    layout = oss["layout_mxfp4_hf"]
    for ids in prompts():
        want, got = hf_logits("hf_mxfp4", ids), {}
        for preload in (False, True):
            with Engine.open(layout, kernels="int8", kv_dtype="f32", compiled_step=False, prefetch="none") as eng:
                assert eng.store.prepare is not None and all(all(f) for f in eng.model.moe.full.int8.values())
                if preload:  # every expert resident before the first step
                    keys = [(la, e) for la in range(eng.config.n_layers) for e in range(eng.config.n_experts)]
                    for key, _ in eng.cache.acquire(keys):
                        eng.cache.release(key)
                before = eng.cache.stats.misses
                got[preload] = np.concatenate([eng.forward(ids[:4])] + [eng.forward([t]) for t in ids[4:]])
                assert (eng.cache.stats.misses > before) != preload
        assert np.array_equal(got[False].view(np.uint32), got[True].view(np.uint32))
        err = np.abs(got[True] - want).max() / np.abs(want).max()
        assert 1e-4 < err < 0.04 and (got[True].argmax(-1) == want.argmax(-1)).mean() >= 0.85
    with Engine.open(layout, kernels="int8", cache_mb=cache_mb(layout, 4)) as eng:
        assert eng.store.prepare is None and not any(any(f) for f in eng.model.moe.full.int8.values())


@pytest.mark.parametrize("src", ["hf", "gguf_f16", "gguf_mxfp4", "layout_mxfp4_hf"])
def test_numpy_reference_matches_transformers(oss: dict, hf_logits, src: str) -> None:  # noqa: ANN001
    ref = ReferenceModel.from_layout(oss[src]) if src.startswith("layout") else ReferenceModel.from_source(oss[src])
    for ids in prompts():
        want = hf_logits("hf_mxfp4" if "mxfp4" in src else "hf", ids)
        got = ref.forward(ids)
        assert np.abs(got - want).max() <= REL_BOUND * np.abs(want).max()
        np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


def _expert_biases(factor: float):  # noqa: ANN202
    return lambda m: replace(m, gate_bias=factor * m.gate_bias, up_bias=factor * m.up_bias, down_bias=factor * m.down_bias)


SPOILS = {  # (config changes, layer weights change, expert change)
    "attention sinks": (None, lambda lw: replace(lw, attn_sinks=None), None),
    "sliding window": (dict(sliding_window=None, full_attention_layers=()), None, None),
    "yarn": (dict(rope_scaling="none", rope_factor=1.0, rope_original_context=0, yarn_truncate=True,
                  rope_attn_factor=1.0), None, None),
    "yarn truncate": (dict(yarn_truncate=True), None, None),
    "clamp": (dict(swiglu_limit=0.0), None, None),
    "alpha": (dict(swiglu_alpha=1.0), None, None),
    "up + 1": (dict(swiglu_up_offset=0.0), None, None),
    "expert biases": (None, None, _expert_biases(0.0)),
    "router bias": (None, lambda lw: replace(lw, router_bias=0 * lw.router_bias), None),
    "softmax over the top-k": (dict(norm_topk_prob=False), None, None),
    "output bias": (None, lambda lw: replace(lw, o_bias=0 * lw.o_bias), None),
    "q/k/v biases": (None, lambda lw: replace(lw, q_bias=0 * lw.q_bias, k_bias=0 * lw.k_bias, v_bias=0 * lw.v_bias), None),
}


@pytest.mark.parametrize("piece", list(SPOILS))
def test_each_piece_matters(oss: dict, hf_logits, piece: str) -> None:  # noqa: ANN001
    """Leaving a gpt-oss piece out moves the logits far beyond the bound the tests above hold."""
    cfg, layer, expert = SPOILS[piece]
    ids = prompts(1)[0]
    want = hf_logits("hf", ids)
    ref = ReferenceModel.from_source(oss["hf"])
    assert np.abs(ref.forward(ids) - want).max() <= REL_BOUND * np.abs(want).max()
    ref.config = replace(ref.config, **(cfg or {}))
    if layer is not None:
        ref.layers = [layer(lw) for lw in ref.layers]
    if expert is not None:
        ref.layer_experts = [[expert(m) for m in ms] for ms in ref.layer_experts]
    assert np.abs(ref.forward(ids) - want).max() > 1e-3 * np.abs(want).max(), piece


def test_clamp_bites_in_the_fixture(oss: dict) -> None:
    """The fixture's gate/up pre-activations pass the limit of 7 often (the clamp is exercised, not idle)."""
    ref = ReferenceModel.from_source(oss["hf"])
    h = np.random.default_rng(0).standard_normal((64, 128))
    m = ref.layer_experts[1][3]
    g, u = h @ m.gate.T + m.gate_bias, h @ m.up.T + m.up_bias
    assert (g > 7).mean() > 0.05 and (np.abs(u) > 7).mean() > 0.05


@pytest.mark.parametrize("truncate", [False, True])
def test_yarn_frequencies_match_transformers(truncate: bool) -> None:
    """gpt-oss-120b's rotary (head_dim 64, theta 150000, YaRN x32 from 4096): our inverse frequencies and
    attention factor against transformers' _compute_yarn_parameters."""
    from transformers.modeling_rope_utils import _compute_yarn_parameters

    rope = {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
            "truncate": truncate, "original_max_position_embeddings": 4096}
    hf_cfg = transformers.GptOssConfig(head_dim=64, rope_parameters=rope)
    inv, attn = _compute_yarn_parameters(hf_cfg)
    ours = _inv_freq(150000.0, 64, (32.0, 4096, 32.0, 1.0, truncate))
    np.testing.assert_allclose(ours, inv.double().numpy(), rtol=2e-6)  # transformers computes in float32
    assert attn == pytest.approx(0.1 * math.log(32) + 1)
    plain = _inv_freq(150000.0, 64)
    assert (ours[:8] == plain[:8]).all() and np.allclose(ours[-8:], plain[-8:] / 32)  # extrapolated / interpolated


# ---------------------------------------------------------------- published configs
# the config.json files OpenAI published (transformers 4.55's format: rope_scaling, flat rope_theta)
_20B = dict(architectures=["GptOssForCausalLM"], model_type="gpt_oss", attention_bias=True, attention_dropout=0.0,
            eos_token_id=200002, experts_per_token=4, head_dim=64, hidden_act="silu", hidden_size=2880,
            initial_context_length=4096, initializer_range=0.02, intermediate_size=2880,
            layer_types=["sliding_attention", "full_attention"] * 12, max_position_embeddings=131072,
            num_attention_heads=64, num_experts_per_tok=4, num_hidden_layers=24, num_key_value_heads=8,
            num_local_experts=32, output_router_logits=False, pad_token_id=199999,
            quantization_config={"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                            "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"},
            rms_norm_eps=1e-05, rope_scaling={"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                                              "original_max_position_embeddings": 4096, "rope_type": "yarn",
                                              "truncate": False},
            rope_theta=150000, router_aux_loss_coef=0.9, sliding_window=128, swiglu_limit=7.0,
            tie_word_embeddings=False, use_cache=True, vocab_size=201088)
_120B = dict(_20B, layer_types=["sliding_attention", "full_attention"] * 18, num_hidden_layers=36, num_local_experts=128)


@pytest.mark.parametrize("hp", [_20B, _120B], ids=["gpt-oss-20b", "gpt-oss-120b"])
def test_published_configs(tmp_path: Path, hp: dict) -> None:
    from fixtures.safetensors_io import write_safetensors

    (tmp_path / "config.json").write_text(json.dumps(hp))
    write_safetensors(tmp_path / "model.safetensors", [], "F16")
    c = open_source(tmp_path).config
    n = hp["num_hidden_layers"]
    assert (c.n_layers, c.n_experts, c.n_experts_used, c.d_model, c.d_ff, c.head_dim, c.n_heads, c.n_kv_heads) == (
        n, hp["num_local_experts"], 4, 2880, 2880, 64, 64, 8)
    assert c.sliding_window == 128 and c.full_attention_layers == tuple(range(1, n, 2))
    assert (c.rope_scaling, c.rope_factor, c.rope_original_context, c.yarn_truncate, c.rope_theta) == (
        "yarn", 32.0, 4096, False, 150000.0)
    assert (c.swiglu_alpha, c.swiglu_limit, c.swiglu_up_offset) == (1.702, 7.0, 1.0)
    # an MXFP4 expert file: three 2880 x 2880 matrices and three 2880-float biases, each 4 KiB-aligned; the
    # biases add 0.3%, where keeping every expert's resident would hold n x E x 8640 floats (159 MB for 120b)
    matrix, bias = align_up(DTYPES["mxfp4"].nbytes((2880, 2880))), align_up(2880 * 4)
    assert 3 * bias / (3 * matrix) < 0.003
    if n == 36:
        assert n * c.n_experts * 3 * 2880 * 4 == 159_252_480


def test_config_validation() -> None:
    base = dict(arch="gpt_oss", vocab_size=512, d_model=128, d_ff=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=32,
                n_experts=8, n_experts_used=4, context_length=512)
    good = ModelConfig(**base, sliding_window=4, full_attention_layers=[1], swiglu_limit=7, rope_scaling="yarn",
                       rope_factor=8, rope_original_context=64)
    assert good.full_attention_layers == (1,) and good.swiglu_limit == 7.0 and good.window(1) == 0
    assert ModelConfig(**base).plain_swiglu and not good.plain_swiglu and good.uses_extensions
    for bad, needle in ((dict(full_attention_layers=(1,)), "sliding_window"),
                        (dict(sliding_window=4, full_attention_layers=(3,)), "full_attention_layers"),
                        (dict(sliding_window=4, full_attention_layers=(1, 1)), "full_attention_layers"),
                        (dict(swiglu_limit=-1.0), "swiglu_limit"), (dict(swiglu_alpha=0.0), "swiglu_alpha"),
                        (dict(swiglu_up_offset=float("nan")), "swiglu_up_offset"),
                        (dict(rope_factor=8.0), "rope_scaling"), (dict(rope_scaling="yarn"), "YaRN"),
                        (dict(rope_scaling="linear"), "rope_scaling"), (dict(attn_sinks=1), "attn_sinks"),
                        (dict(expert_mlp_bias="yes"), "expert_mlp_bias")):
        with pytest.raises(ValueError, match=needle):
            ModelConfig(**base, **bad)


def _edited(src: Path, dst: Path, edit) -> Path:  # noqa: ANN001
    import shutil

    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    edit(m)
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def test_manifests_with_wrong_expert_biases_are_refused(oss: dict, tmp_path: Path) -> None:
    src = oss["layout_hf"]

    def drop_bias(m: dict) -> None:
        del m["experts"][3]["tensors"]["up_bias"]

    def f16_bias(m: dict) -> None:
        m["experts"][3]["tensors"]["down_bias"].update(dtype="f16", nbytes=256)

    def no_biases_in_config(m: dict) -> None:
        m["config"]["expert_mlp_bias"] = False

    for edit, needle in ((drop_bias, "expected exactly"), (f16_bias, "f32"), (no_biases_in_config, "expected exactly")):
        with pytest.raises(LayoutError, match=needle):
            Layout.open(_edited(src, tmp_path / edit.__name__, edit))


# ---------------------------------------------------------------- llama.cpp's converter
@pytest.mark.skipif(not (LLAMA_CPP / "convert_hf_to_gguf.py").is_file(),
                    reason=f"llama.cpp's converter is not at {LLAMA_CPP} (set LLAMA_CPP_SRC)")
@pytest.mark.parametrize("qtype", ["f16", "q8_0", "mxfp4"])
def test_llama_cpp_converter_agrees(oss: dict, tmp_path: Path, qtype: str) -> None:
    """llama.cpp's GptOssModel (vocabulary step swapped: family_checks.llama_convert) writes the fixture's GGUF:
    the same file for f16 and q8_0; from OpenAI's MXFP4 checkpoint (its repack of *_blocks / *_scales), the same
    tensors, bytes and keys as the fixture's MXFP4 GGUF of the same weights (general.name comes from the
    directory's name)."""
    ref = tmp_path / f"llama-{qtype}.gguf"
    mx = qtype == "mxfp4"
    ours = oss["gguf_mxfp4"] if mx else build_gguf(oss["hf"], tmp_path / f"ours-{qtype}.gguf", qtype)
    llama_convert("gpt_oss", "GptOssModel", str(oss["hf_mxfp4" if mx else "hf"]), "f16" if mx else qtype, ref)
    a, b = gguf.GGUFReader(ref), gguf.GGUFReader(ours)
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    tb = {t.name: t for t in b.tensors}
    for t in a.tensors:
        assert (list(t.shape), t.tensor_type) == (list(tb[t.name].shape), tb[t.name].tensor_type), t.name
        assert np.array_equal(t.data, tb[t.name].data), t.name
    assert list(a.fields) == list(b.fields)
    for key in a.fields:
        if not key.startswith("GGUF.") and key != "general.name":
            assert a.fields[key].contents() == b.fields[key].contents(), key
    if not mx:
        assert ref.read_bytes() == ours.read_bytes()  # the whole file
    assert open_source(ref).config == open_source(oss["hf"]).config


# ---------------------------------------------------------------- CLI and server
def test_cli_inspect_verify_and_run(oss: dict) -> None:
    runner = CliRunner()
    layout = str(oss["layout_gguf"])
    r = runner.invoke(main, ["inspect", layout])
    assert r.exit_code == 0, r.output
    for line in ("attn bias     q, k, v and output projections",
                 "attn sinks    a learned logit per head in each softmax's denominator",
                 "attention     sliding window 4 in layers 0, 2 (2), full in 1 (1)",
                 "routing       router logits biased; weights: softmax over the chosen 4 logits",
                 "rotary        YaRN x8 from 64 positions (beta 32/1, truncate false); cos/sin x 1.208",
                 "expert GLU    (up + 1) * gate * sigmoid(1.702 * gate), clamped at 7 (gate above, up both sides); "
                 "biases on gate, up and down, in each expert's file"):
        assert line in r.output, (line, r.output)
    r = runner.invoke(main, ["inspect", str(oss["layout_mxfp4_hf"])])
    assert "tensors       186 (bf16: 14, f32: 100, mxfp4: 72)" in r.output, r.output
    for engine in ("numpy", "transformers"):
        r = runner.invoke(main, ["verify", layout, "--reference", str(oss["hf"]), "--reference-engine", engine,
                                 "--max-tokens", "48", "--quiet"])
        assert r.exit_code == 0 and "verdict     OK" in r.output and "100.0% of positions agree" in r.output, r.output
    r = runner.invoke(main, ["verify", str(oss["layout_mxfp4_hf"]), "--reference", str(oss["gguf_mxfp4"]),
                             "--reference-engine", "transformers", "--max-tokens", "48", "--quiet"])
    assert r.exit_code == 0 and "verdict     OK" in r.output, r.output
    r = runner.invoke(main, ["run", layout, "-n", "8", "--cache-mb", str(cache_mb(Path(layout), 5))])
    assert r.exit_code == 0 and "generated   8 tokens" in r.output, r.output


@pytest.mark.skipif(not (LLAMA_CPP / "models/templates/openai-gpt-oss-120b.jinja").is_file(),
                    reason=f"llama.cpp's copy of gpt-oss's template is not under {LLAMA_CPP}")
def test_the_real_harmony_template_renders() -> None:
    """gpt-oss's own chat template (harmony; llama.cpp keeps a copy) renders in our sandboxed jinja (it needs
    strftime_now, namespaces, loop controls): the prompt a real gpt-oss checkpoint's tokenizer would get."""
    from mertools.runtime.chat import _compile

    template = (LLAMA_CPP / "models/templates/openai-gpt-oss-120b.jinja").read_text(encoding="utf-8")
    text = _compile(template).render(messages=[{"role": "system", "content": "Be brief."},
                                               {"role": "user", "content": "2+2?"}],
                                     add_generation_prompt=True, bos_token="", eos_token="")
    assert text.startswith("<|start|>system<|message|>") and "<|start|>developer<|message|># Instructions" in text
    assert text.endswith("<|start|>user<|message|>2+2?<|end|><|start|>assistant")


def test_serve_chat(oss: dict) -> None:
    """The chat path (the fixture tokenizer's template; gpt-oss's own is harmony) through the real app."""
    chat_once(str(oss["layout_mxfp4_hf"]), "oss")
