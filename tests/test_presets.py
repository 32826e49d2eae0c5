"""`convert --dtype q4_k_m` and the other llama-quantize presets: every tensor gets the type llama-quantize
(no importance matrix) gives it, and the same blocks.

In CI: against the files llama.cpp itself made of a tiny 8-expert Mixtral (fixtures/llamacpp): the plan
read off each file's tensor names equals its types, and converting the HF directory with the preset
gives the layout `--dtype auto` makes of llama.cpp's file, tensor for tensor, byte for byte.
Where llama-cpp-python is installed (/tmp/venv-bench, the development machine), llama.cpp also
quantizes models made here that reach the rules 2 layers cannot: 16 and 80 layers, 4 experts, grouped
kv heads, widths that need fallbacks (96, 160, 200 columns), tied embeddings, and the other families.
"""

from __future__ import annotations

import itertools
import json
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from fixtures.llamacpp_presets import CONFIG as FIXTURE_CONFIG
from fixtures.llamacpp_presets import PRESETS as FIXTURE_PRESETS
from fixtures.llamacpp_presets import gguf_path, hf_dir
from mertools.cli import main
from mertools.convert import presets
from mertools.convert.pipeline import ConvertOptions, convert
from mertools.convert.presets import DTYPE_CHOICES, PLAIN_CHOICES, PRESET_CHOICES, PRESETS, ModelFacts, Preset, plan
from mertools.convert.source import open_source, unpermute_index
from mertools.dtypes import DTYPES, GGML_TYPE_TO_DTYPE
from mertools.families import FAMILIES
from mertools.families.base import KEEP_F32_ROLES, fmt, resolve_shape
from mertools.layout import Layout
from mertools.layout.config import ModelConfig

BENCH_PYTHON = Path("/tmp/venv-bench/bin/python")


def _gguf_types_and_shapes(path: Path) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """{name: layout dtype}, {name: numpy-ordered shape} of a GGUF's tensors."""
    tensors = gguf.GGUFReader(path).tensors
    return ({t.name: GGML_TYPE_TO_DTYPE[int(t.tensor_type)] for t in tensors},
            {t.name: tuple(int(d) for d in reversed(t.shape)) for t in tensors})


def _skip_without_quantizers(preset: Preset) -> None:
    if preset.missing:
        pytest.skip(f"{preset.name} may choose {', '.join(preset.missing)}, which have no quantizer yet")


# ------------------------------------------------------------------ the rules


def test_use_more_bits_is_llama_cpps_pattern() -> None:
    # Mixtral 8x7B's 32 layers: the first and last 4, and every third between
    assert [i for i in range(32) if presets.use_more_bits(i, 32)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert [i for i in range(2) if presets.use_more_bits(i, 2)] == [1]


def test_categories_and_what_is_never_quantized() -> None:
    cases = {  # name: (category, quantizable as a 2-D tensor)
        "output.weight": ("output", True), "token_embd.weight": ("token_embd", True),
        "blk.3.attn_v.weight": ("attn_v", True), "blk.3.attn_qkv.weight": ("attn_v", True),
        "blk.3.attn_k.weight": ("attn_k", True), "blk.3.attn_output.weight": ("attn_output", True),
        "blk.3.ffn_down_exps.weight": ("ffn_down", True), "blk.3.ffn_down_shexp.weight": ("ffn_down", True),
        "blk.3.ffn_gate_exps.weight": ("ffn_gate", True), "blk.3.ffn_up.weight": ("ffn_up", True),
        "blk.3.ffn_gate_inp.weight": ("ffn_gate", False), "blk.3.attn_k_norm.weight": ("other", False),
        "blk.3.attn_q.bias": ("other", False),
    }
    for name, (cat, quant) in cases.items():
        assert (presets.category(name), presets.quantizable(name, (64, 64))) == (cat, quant), name
    assert presets.ggml_n_dims((1, 128)) == 1 and presets.ggml_n_dims((128, 1)) == 2 and presets.ggml_n_dims((8, 64, 32)) == 3
    assert not presets.quantizable("blk.0.ffn_gate_inp_shexp.weight", (1, 128))  # a gate vector, 1-D to ggml


def _facts(n_layers: int = 32, n_expert: int = 8, n_gqa: int = 4, is_70b: bool = False) -> ModelFacts:
    return ModelFacts(n_layers, n_expert, n_gqa, is_70b)


def test_fallbacks_follow_llama_cpp() -> None:
    tensors = {"token_embd.weight": (512, 256), "output.weight": (512, 200), "blk.0.attn_q.weight": (256, 96),
               "blk.0.attn_output.weight": (256, 96), "blk.0.ffn_down_exps.weight": (4, 256, 96)}
    want = {"q4_k_m": ("q4_k", "f16", "q5_0", "q5_0", "q8_0"),  # output: q6_k does not fit -> q8_0 -> f16
            "q5_k_s": ("q5_k", "f16", "q5_1", "q5_1", "q5_1"),
            "q6_k": ("q6_k", "f16", "q8_0", "q8_0", "q8_0"),
            "q2_k": ("q2_k", "f16", "q4_0", "q4_0", "q4_0"),  # ffn_down q3_k -> q4_0
            "iq4_xs": ("iq4_xs", "f16", "iq4_nl", "iq4_nl", "iq4_nl")}
    for name, types in want.items():
        pl = plan(name, tensors, _facts(n_layers=1, n_expert=4))
        assert tuple(pl.types[n] for n in tensors) == types, name
        assert "blk.0.attn_q.weight" in pl.notes and "token_embd.weight" not in pl.notes


def test_counters_and_model_rules() -> None:
    n = 16
    tensors = {f"blk.{i}.{t}.weight": (256, 256) for i in range(n) for t in ("attn_v", "attn_k", "attn_output")}
    tensors |= {f"blk.{i}.ffn_down_exps.weight": (4, 256, 256) for i in range(n)}
    tensors |= {"token_embd.weight": (512, 256)}  # tied: no output.weight
    four = plan("q3_k_m", tensors, _facts(n, n_expert=4))
    # llama.cpp visits blk.10 after blk.9 (by layer number, not by name): attn_v 0 and 1 get q5_k
    assert [four.types[f"blk.{i}.attn_v.weight"] for i in range(n)] == ["q5_k"] * 2 + ["q4_k"] * 14
    assert [four.types[f"blk.{i}.ffn_down_exps.weight"] for i in (0, 1)] == ["q5_k", "q4_k"]
    assert four.types["blk.5.attn_output.weight"] == "q4_k" and four.types["token_embd.weight"] == "q6_k"
    eight = plan("q3_k_m", tensors, _facts(n, n_expert=8))
    assert {eight.types[f"blk.{i}.{t}.weight"] for i in range(n) for t in ("attn_v", "attn_k")} == {"q8_0"}
    assert eight.types["blk.5.attn_output.weight"] == "q5_k"
    km = plan("q4_k_m", tensors, _facts(n, n_expert=4))
    more = [i for i in range(n) if presets.use_more_bits(i, n)]
    assert [i for i in range(n) if km.types[f"blk.{i}.attn_v.weight"] == "q6_k"] == more
    assert [i for i in range(n) if km.types[f"blk.{i}.ffn_down_exps.weight"] == "q6_k"] == more
    # a 70B-type llama: 8 query heads share each v, so Q3_K/Q4_K attn_v become Q5_K
    assert set(plan("q3_k_s", tensors, _facts(n, n_expert=4, is_70b=True)).types[f"blk.{i}.attn_v.weight"]
               for i in range(n)) == {"q5_k"}
    mx = plan("mxfp4_moe", tensors, _facts(n, n_expert=4))
    assert {mx.types[k] for k in tensors if "exps" in k} == {"mxfp4"}
    assert {mx.types[k] for k in tensors if "exps" not in k} == {"q8_0"}


def test_plans_choose_only_what_the_preset_declares() -> None:
    """`Preset.may_choose` decides whether a preset is offered (all its types have quantizers): no
    model may get a type outside it."""
    for layers, experts, gqa, cols, tied, big in itertools.product((1, 2, 16, 80), (4, 8), (1, 4), (64, 96, 200, 256),
                                                                   (False, True), (False, True)):
        tensors = {f"blk.{i}.{t}.weight": (256, cols) for i in range(layers)
                   for t in ("attn_q", "attn_k", "attn_v", "attn_output")}
        tensors |= {f"blk.{i}.ffn_{r}_exps.weight": (experts, 256, cols) for i in range(layers) for r in ("gate", "up", "down")}
        tensors |= {"token_embd.weight": (512, cols), "output_norm.weight": (cols,)}
        if not tied:
            tensors["output.weight"] = (512, cols)
        for p in PRESETS.values():
            got = set(plan(p, tensors, _facts(layers, experts, gqa, big)).types.values()) - {"f32"}
            assert got <= p.may_choose(), (p.name, layers, experts, gqa, cols, tied, big, got - p.may_choose())


def _every_tensor_config(family: str) -> ModelConfig:
    """A small config of `family` with every optional tensor it can have."""
    extra = {"qwen2_moe": dict(attn_bias=True, d_ff_shared=96, shared_expert_gate=True, dense_layers=(1,), d_ff_dense=192),
             "qwen3_moe": dict(qk_norm="head", dense_layers=(1,), d_ff_dense=192), "olmoe": dict(qk_norm="full"),
             "glm4_moe": dict(qk_norm="head", attn_bias=True, d_ff_shared=64, dense_layers=(0,), d_ff_dense=192,
                              gating_func="sigmoid", expert_bias=True),
             "gpt_oss": dict(attn_bias=True, attn_o_bias=True, attn_sinks=True, router_bias=True, expert_mlp_bias=True,
                             sliding_window=4, full_attention_layers=(1,)),
             # with q LoRA (V3): V2-Lite's attn_q is the alternative, not an addition
             "deepseek2": dict(n_kv_heads=4, head_dim=48, kv_lora_rank=64, q_lora_rank=64, qk_rope_dim=16, v_head_dim=32,
                               d_ff_shared=128, dense_layers=(0,), d_ff_dense=192, gating_func="sigmoid", expert_bias=True),
             "mixtral": {}}[family]
    base = dict(arch=family, vocab_size=512, d_model=128, d_ff=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=32,
                n_experts=8, n_experts_used=2, context_length=512)
    return ModelConfig(**{**base, **extra})


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_what_llama_cpp_never_quantizes_is_what_layouts_keep_f32(family: str) -> None:
    fam = FAMILIES[family]
    cfg = _every_tensor_config(family)
    dense = {fmt(s.name, layer): (s, resolve_shape(s.shape, cfg)) for s, layer in fam.dense_names(cfg)}
    pl = plan("q4_k_m", presets.model_tensors(cfg, fam, {n: shape for n, (_, shape) in dense.items()}), ModelFacts.of(cfg, fam))
    for name, (spec, _) in dense.items():
        assert (pl.types[name] == "f32") == (spec.role in KEEP_F32_ROLES), name
    # experts' matrices are quantized, their biases (gpt-oss) never
    assert all((pl.expert(fam, layer, e.role) == "f32") == e.role.endswith("_bias")
               for layer in cfg.moe_layers for e in fam.expert_specs(cfg))


def test_names_that_kept_their_meaning() -> None:
    """q8_0, f16 and bf16 as presets are what they meant before (each big matrix that type where its width
    fits, else f16); q4_0's preset differs from the old meaning only in output.weight (q6_k) and, with 8
    experts, attn_k / attn_v (q8_0)."""
    tensors = {f"blk.{i}.{t}.weight": (256, cols) for i in range(4) for t, cols in
               (("attn_q", 256), ("attn_k", 200), ("attn_v", 256), ("attn_output", 256))}
    tensors |= {f"blk.{i}.ffn_{r}_exps.weight": (8, 256, 96) for i in range(4) for r in ("gate", "up", "down")}
    tensors |= {"token_embd.weight": (512, 256), "output.weight": (512, 256), "blk.0.ffn_gate_inp.weight": (8, 256)}
    for name in ("q8_0", "f16", "bf16", "q4_0"):
        plain = {n: "f32" if not presets.quantizable(n, s) else name if s[-1] % DTYPES[name].block_size == 0 else "f16"
                 for n, s in tensors.items()}
        for experts in (4, 8):
            got = plan(name, tensors, _facts(4, n_expert=experts)).types
            changed = {n for n in tensors if got[n] != plain[n]}
            if name != "q4_0":
                assert not changed, (name, experts)
                continue
            attn_kv = {n for n in tensors if ("attn_k." in n or "attn_v." in n) and plain[n] != "f16"}
            assert changed == {"output.weight"} | (attn_kv if experts == 8 else set()), experts
            assert got["output.weight"] == "q6_k" and {got[n] for n in attn_kv} == {"q4_0" if experts == 4 else "q8_0"}


def test_choices() -> None:
    assert not set(PLAIN_CHOICES) & set(PRESETS)  # a preset's name always means the preset
    assert set(PRESET_CHOICES) == {n for n, p in PRESETS.items() if not p.missing}
    assert DTYPE_CHOICES[0] == "auto" and set(DTYPE_CHOICES) == {"auto", *PLAIN_CHOICES, *PRESET_CHOICES}
    with pytest.raises(ValueError, match="dense_dtype must be one of"):
        ConvertOptions(dense_dtype="q4_k_m")
    with pytest.raises(ValueError, match="dtype must be one of"):
        ConvertOptions(dtype="q2_k_s")  # llama-quantize refuses it without an importance matrix


# ------------------------------------------------------------------ llama.cpp's own files (CI)


@pytest.fixture(scope="module")
def fixture_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return hf_dir(tmp_path_factory.mktemp("presets-hf") / "hf")


@pytest.mark.parametrize("ftype", FIXTURE_PRESETS)
def test_plan_of_llama_cpps_file_is_its_types(ftype: str) -> None:
    src = open_source(gguf_path(ftype))
    types, shapes = _gguf_types_and_shapes(gguf_path(ftype))
    assert plan(ftype.lower(), shapes, ModelFacts.of(src.config, src.arch)).types == types


def _compare_layouts(ours: Path, theirs: Path) -> set[str]:
    """Every tensor of two layouts: same dtype, same bytes. Returns the dtypes seen."""
    a, b = Layout.open(ours), Layout.open(theirs)
    assert a.manifest.dense.keys() == b.manifest.dense.keys()
    for name, entry in b.manifest.dense.items():
        assert a.manifest.dense[name].dtype == entry.dtype, name
        assert a.read_dense(name).tobytes() == b.read_dense(name).tobytes(), (name, entry.dtype)
    assert [(e.layer, e.expert) for e in a.manifest.experts] == [(e.layer, e.expert) for e in b.manifest.experts]
    for e in b.manifest.experts:
        for role, entry in e.tensors.items():
            assert a.manifest.expert(e.layer, e.expert).tensors[role].dtype == entry.dtype, (e.layer, e.expert, role)
            assert a.read_expert(e.layer, e.expert, role).tobytes() == b.read_expert(e.layer, e.expert, role).tobytes()
    return {t.dtype for t in b.manifest.dense.values()} | {t.dtype for e in b.manifest.experts for t in e.tensors.values()}


@pytest.mark.parametrize("ftype", FIXTURE_PRESETS)
def test_hf_with_the_preset_is_llama_cpps_file(fixture_hf: Path, tmp_path: Path, ftype: str) -> None:
    preset = PRESETS[ftype.lower()]
    _skip_without_quantizers(preset)
    ours = convert(fixture_hf, tmp_path / "ours", ConvertOptions(dtype=preset.name, progress=False))
    theirs = convert(gguf_path(ftype), tmp_path / "theirs", ConvertOptions(progress=False))
    assert theirs.copied == theirs.tensors
    seen = _compare_layouts(ours.out, theirs.out)
    assert preset.default in seen and "f32" in seen  # norms and routers: f32 both ways
    manifest = json.loads((ours.out / "manifest.json").read_text())
    assert manifest["source"]["requested"]["llama_ftype"] == ftype


def test_dense_dtype_overrides_the_preset(fixture_hf: Path, tmp_path: Path) -> None:
    _skip_without_quantizers(PRESETS["q4_k_m"])
    lay = Layout.open(convert(fixture_hf, tmp_path / "o", ConvertOptions(dtype="q4_k_m", dense_dtype="q8_0",
                                                                       progress=False)).out)
    theirs, _ = _gguf_types_and_shapes(gguf_path("Q4_K_M"))
    for e in lay.manifest.experts:  # experts still follow the preset
        for role, entry in e.tensors.items():
            assert entry.dtype == theirs[f"blk.{e.layer}.ffn_{role}_exps.weight"]
    assert {n: t.dtype for n, t in lay.manifest.dense.items() if t.dtype != "f32"} == {
        n: "q8_0" for n, t in theirs.items() if t != "f32" and "exps" not in n}


def test_plain_type_keeps_its_meaning(fixture_hf: Path, tmp_path: Path) -> None:
    assert "q4_k" in PLAIN_CHOICES
    lay = Layout.open(convert(fixture_hf, tmp_path / "o", ConvertOptions(dtype="q4_k", progress=False)).out)
    assert {t.dtype for e in lay.manifest.experts for t in e.tensors.values()} == {"q4_k"}
    assert {t.dtype for t in lay.manifest.dense.values()} == {"q4_k", "f32"}  # output and attn_k/v too


def test_cli_lists_and_takes_presets(fixture_hf: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    text = " ".join(runner.invoke(main, ["convert", "--help"]).output.split())
    assert "llama-quantize preset" in text and all(p in text for p in PRESET_CHOICES)
    res = runner.invoke(main, ["convert", str(fixture_hf), str(tmp_path / "o"), "--dtype", "q2_k_s", "--quiet"])
    assert res.exit_code == 2 and "q2_k_s" in res.output
    _skip_without_quantizers(PRESETS["q4_k_m"])
    # llama-quantize's own spelling works too
    res = runner.invoke(main, ["convert", str(fixture_hf), str(tmp_path / "o"), "--dtype", "Q4_K_M", "--quiet"])
    assert res.exit_code == 0, res.output
    assert Layout.open(tmp_path / "o").manifest.expert(1, 0).tensors["down"].dtype == "q6_k"  # layer 1 of 2: more bits
    assert FIXTURE_CONFIG.num_hidden_layers == 2


# ------------------------------------------------------------------ deeper models, llama.cpp on this machine


_QUANTIZE_ALL = """
import sys, llama_cpp
src = sys.argv[1]
for spec in sys.argv[2:]:
    ftype, dst = spec.split("=", 1)
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + ftype)
    p.nthread = 2
    if llama_cpp.llama_model_quantize(src.encode(), dst.encode(), p) != 0:
        sys.exit(f"llama_model_quantize failed for {ftype}")
"""


def _has_llama_cpp() -> bool:
    if not BENCH_PYTHON.exists():
        return False
    return subprocess.run([str(BENCH_PYTHON), "-c", "import llama_cpp"], capture_output=True).returncode == 0


def _mixtral(key: str, root: Path) -> tuple[Path, Path]:
    from fixtures.tiny_mixtral import TinyConfig, build_gguf, build_hf

    cfg = {
        # 16 layers of 4 experts, 4 query heads per kv head, experts 96 wide, tied embeddings
        "m16": TinyConfig(num_hidden_layers=16, num_local_experts=4, num_attention_heads=8, num_key_value_heads=2,
                          intermediate_size=96, tie_word_embeddings=True),
        # 8 experts, one kv head, a 160-wide model (no K type fits attention, output or token_embd)
        "m8x160": TinyConfig(num_hidden_layers=8, hidden_size=160, num_attention_heads=4, num_key_value_heads=1,
                             num_local_experts=8, intermediate_size=256),
        # 200 columns fit no block at all: f16
        "m200": TinyConfig(num_hidden_layers=3, hidden_size=200, num_attention_heads=4, num_key_value_heads=4,
                           num_local_experts=8, intermediate_size=96),
        # llama.cpp's LLM_TYPE_70B: a llama with 80 layers, grouped kv heads and not 8 experts
        "m80": TinyConfig(num_hidden_layers=80, num_local_experts=4, intermediate_size=32),
    }[key]
    hf = build_hf(root / "hf", cfg, seed=3, dtype="float16", shards=1)
    return hf, build_gguf(hf, root / "f16.gguf", "merged", "f16")


def _family(family: str, root: Path) -> tuple[Path, Path]:
    pytest.importorskip("transformers")
    from fixtures import tiny_families

    hf = tiny_families.build_hf(family, root / "hf", seed=3)
    return hf, tiny_families.build_gguf(hf, root / "f16.gguf", "f16")


MODELS = ("m16", "m8x160", "m200", "m80", "qwen3_moe", "qwen2_moe", "olmoe", "gpt_oss")
# the 80-layer model only where attn_v can be Q3_K/Q4_K (the 70B rule), to keep the test short
M80_PRESETS = ("q2_k", "q3_k_s", "q3_k_m", "q4_k_s", "q4_k_m", "q4_0")


@pytest.mark.skipif(not _has_llama_cpp(), reason=f"needs llama-cpp-python in {BENCH_PYTHON}")
@pytest.mark.parametrize("model", MODELS)
def test_llama_cpp_quantizes_deeper_models_the_same(model: str, tmp_path: Path) -> None:
    hf, src = (_family if model in FAMILIES else _mixtral)(model, tmp_path)
    presets = [p for p in PRESETS.values() if model != "m80" or p.name in M80_PRESETS]
    subprocess.run([str(BENCH_PYTHON), "-c", _QUANTIZE_ALL, str(src), *[f"{p.ftype}={tmp_path / p.ftype}.gguf" for p in presets]],
                   check=True, capture_output=True)
    source = open_source(src)
    facts = ModelFacts.of(source.config, source.arch)
    for p in presets:
        path = tmp_path / f"{p.ftype}.gguf"
        types, shapes = _gguf_types_and_shapes(path)
        assert plan(p, shapes, facts).types == types, p.name
        if not p.missing:
            lay = Layout.open(convert(hf, tmp_path / p.name, ConvertOptions(dtype=p.name, progress=False)).out)
            _compare_with_gguf(lay, path, source.arch.gguf_permutes_qk)


def _compare_with_gguf(lay: Layout, path: Path, permuted_qk: bool) -> None:
    """Read llama.cpp's file directly (not through our GGUF reader): every tensor's type and bytes."""
    cfg = lay.manifest.config
    for t in gguf.GGUFReader(path).tensors:
        kind = GGML_TYPE_TO_DTYPE[int(t.tensor_type)]
        block = t.name.split(".")[-2]
        if block.endswith("_exps"):
            layer, role = int(t.name.split(".")[1]), block[len("ffn_"):-len("_exps")]
            role += "_bias" if t.name.endswith(".bias") else ""  # an expert's bias (gpt-oss), in its file too
            for e in range(cfg.n_experts):
                assert lay.manifest.expert(layer, e).tensors[role].dtype == kind, (path.name, t.name)
                assert lay.read_expert(layer, e, role).tobytes() == np.asarray(t.data[e]).tobytes(), (path.name, t.name, e)
            continue
        assert lay.manifest.dense[t.name].dtype == kind, (path.name, t.name)
        rows = np.asarray(t.data).reshape(int(np.prod(t.shape[1:])) if t.shape.size > 1 else 1, -1)
        if permuted_qk and block in ("attn_q", "attn_k"):
            rows = rows[unpermute_index(cfg.n_heads if block == "attn_q" else cfg.n_kv_heads, rows.shape[0])]
        assert lay.read_dense(t.name).tobytes() == rows.tobytes(), (path.name, t.name)
