"""Qwen3-MoE, OLMoE, Qwen2-MoE, GLM-4.5 and gpt-oss end to end: tiny random models built with transformers' own config
and model classes (fixtures/tiny_families.py), converted from their HF directories and from GGUFs
with llama.cpp's names, run by the streaming runtime and compared with transformers' forward.

Measured (3 layers, d_model 128, 8 experts top-2 (gpt-oss: top-4), 24-token prompts; float32 transformers vs the
runtime's float32 kernels): max |logit diff| <= 3.6e-6 with |logits| <= 4.5, top-1 identical at every
position, for f16 layouts from HF and from GGUF alike. The bound used is 1e-5 relative to the largest
logit, as in test_reference_forward.py.
"""

from __future__ import annotations

import json
import struct
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("torch", reason="torch is not installed (the `reference` extra)")
transformers = pytest.importorskip("transformers", reason="transformers is not installed (the `reference` extra)")

from fixtures.tiny_families import FAMILIES, build_gguf, build_hf  # noqa: E402
from mertools.cli import main  # noqa: E402
from mertools.convert.pipeline import ConvertOptions, convert  # noqa: E402
from mertools.convert.source import open_source  # noqa: E402
from mertools.errors import LayoutError  # noqa: E402
from mertools.families import FAMILIES as REGISTRY  # noqa: E402
from mertools.families.base import fmt  # noqa: E402
from mertools.layout import Layout  # noqa: E402
from mertools.reference import ReferenceModel  # noqa: E402
from mertools.runtime.engine import Engine  # noqa: E402
from mertools.verify.numerics import compare_logits  # noqa: E402

REL_BOUND = 1e-5  # max |diff| / max |logit| against transformers (measured <= 8e-7)
FAMILY_NAMES = ["qwen3_moe", "olmoe", "qwen2_moe", "glm4_moe", "gpt_oss"]
# what each tiny model must come out as (the family's pieces, read from HF config and GGUF alike)
EXPECTED = {
    "qwen3_moe": dict(qk_norm="head", attn_bias=False, dense_layers=(1,), d_ff_dense=192, d_ff_shared=0,
                      shared_expert_gate=False, norm_topk_prob=True, d_ff=64),
    "olmoe": dict(qk_norm="full", attn_bias=False, dense_layers=(), d_ff_dense=0, d_ff_shared=0,
                  shared_expert_gate=False, norm_topk_prob=False, d_ff=64),
    "qwen2_moe": dict(qk_norm="none", attn_bias=True, dense_layers=(), d_ff_dense=0, d_ff_shared=96,
                      shared_expert_gate=True, norm_topk_prob=False, d_ff=64),
    "glm4_moe": dict(qk_norm="head", attn_bias=True, dense_layers=(0,), d_ff_dense=192, d_ff_shared=64,
                     shared_expert_gate=False, norm_topk_prob=True, d_ff=64, gating_func="sigmoid", expert_bias=True,
                     routed_scaling=2.5, n_groups=1, n_groups_used=1, rope_dim=16),
    "gpt_oss": dict(qk_norm="none", attn_bias=True, dense_layers=(), d_ff_dense=0, d_ff_shared=0,
                    shared_expert_gate=False, norm_topk_prob=True, d_ff=64, attn_o_bias=True, attn_sinks=True,
                    sliding_window=4, full_attention_layers=(1,), router_bias=True, expert_mlp_bias=True,
                    swiglu_limit=7.0, rope_scaling="yarn"),
}


def prompts(n: int = 2, length: int = 24) -> list[list[int]]:
    rng = np.random.default_rng(7)
    return [[1] + rng.integers(3, 512, length - 1).tolist() for _ in range(n)]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """Per family: HF dir, f16 and q8_0 GGUFs, and layouts converted from each."""
    out = tmp_path_factory.mktemp("families")
    res: dict[str, dict[str, Path]] = {}
    for fam in FAMILY_NAMES:
        hf = build_hf(fam, out / fam, seed=0)
        d = {"hf": hf, "gguf_f16": build_gguf(hf, out / f"{fam}-f16.gguf", "f16"),
             "gguf_q8_0": build_gguf(hf, out / f"{fam}-q8_0.gguf", "q8_0")}
        opts = ConvertOptions(dtype="f16", progress=False)
        d["layout_hf"] = convert(hf, out / f"{fam}-layout-hf", opts).out
        d["layout_gguf"] = convert(d["gguf_f16"], out / f"{fam}-layout-gguf", opts).out
        d["layout_q8_0"] = convert(d["gguf_q8_0"], out / f"{fam}-layout-q8_0", ConvertOptions(progress=False)).out
        res[fam] = d
    return res


@pytest.fixture(scope="module")
def hf_logits(models: dict[str, dict[str, Path]]):  # noqa: ANN201 - (family, ids) -> logits
    import torch

    cache: dict[str, object] = {}

    def run(fam: str, ids: list[int]) -> np.ndarray:
        if fam not in cache:
            cls = getattr(transformers, FAMILIES[fam][1])
            cache[fam] = cls.from_pretrained(models[fam]["hf"], dtype=torch.float32).eval()
        with torch.no_grad():
            return cache[fam](torch.tensor([ids])).logits[0].float().numpy()  # (T, vocab)

    return run


def _cache_mb(layout: Path) -> float:
    """One layer's active experts plus one: every step really reads experts from disk."""
    m = Layout.open(layout).manifest
    return (m.config.n_experts_used + 1) * max(e.nbytes for e in m.experts) / 2**20


# ---------------------------------------------------------------- converter
@pytest.mark.parametrize("fam", FAMILY_NAMES)
def test_config_from_hf_and_gguf(models: dict, fam: str) -> None:
    hf, gg = open_source(models[fam]["hf"]).config, open_source(models[fam]["gguf_f16"]).config
    assert hf == gg and hf.arch == fam
    assert {k: getattr(hf, k) for k in EXPECTED[fam]} == EXPECTED[fam]
    top_k = FAMILIES[fam][2].get("num_experts_per_tok", 2)  # gpt-oss's is 4
    assert (hf.n_experts, hf.n_experts_used, hf.n_layers, hf.head_dim) == (8, top_k, 3, 32)


@pytest.mark.parametrize("fam", FAMILY_NAMES)
def test_hf_and_gguf_layouts_are_identical(models: dict, fam: str) -> None:
    a, b = Layout.open(models[fam]["layout_hf"]), Layout.open(models[fam]["layout_gguf"])
    assert a.manifest.config == b.manifest.config
    assert [e.to_dict() for e in a.manifest.experts] == [e.to_dict() for e in b.manifest.experts]
    for e in a.manifest.experts:
        assert (a.root / e.file).read_bytes() == (b.root / e.file).read_bytes()
    assert {n: t.to_dict() for n, t in a.manifest.dense.items()} == {n: t.to_dict() for n, t in b.manifest.dense.items()}
    assert (a.root / "dense.bin").read_bytes() == (b.root / "dense.bin").read_bytes()
    cfg = a.manifest.config
    # no expert files for dense-MLP layers; the manifest says version 2 (it uses fields beyond Mixtral's)
    assert sorted({e.layer for e in a.manifest.experts}) == list(cfg.moe_layers)
    assert sorted(p.name for p in (a.root / "experts").iterdir()) == [f"layer_{la:03d}" for la in cfg.moe_layers]
    assert a.manifest.version == 2 and json.loads((a.root / "manifest.json").read_text())["version"] == 2


def test_q8_0_gguf_is_copied_byte_for_byte(models: dict) -> None:
    for fam in FAMILY_NAMES:
        src, lay = open_source(models[fam]["gguf_q8_0"]), Layout.open(models[fam]["layout_q8_0"])
        for e in lay.manifest.experts:
            for role, t in src.expert_tensors(e.layer, e.expert).items():
                want = "f32" if role.endswith("_bias") else "q8_0"  # expert biases (gpt-oss) are never quantized
                assert t.dtype == want and e.tensors[role].dtype == want
                assert lay.read_expert(e.layer, e.expert, role).tobytes() == t.read_raw().tobytes()


@pytest.mark.parametrize("fam", FAMILY_NAMES)
def test_tables_agree_with_gguf_py(fam: str) -> None:
    """Every HF name in the family's table maps to its layout (GGUF) name through gguf-py's own tensor
    map for llama.cpp's arch; the dense-MLP tensors, which llama.cpp's map lacks for these archs, to
    gguf-py's generic FFN_GATE/UP/DOWN names."""
    import gguf

    arch = REGISTRY[fam]
    gguf_arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch.gguf_architectures[0]]
    tmap = gguf.get_tensor_name_map(gguf_arch, 4)
    generic = {gguf.TENSOR_NAMES[t].format(bid=2): t for t in (gguf.MODEL_TENSOR.FFN_GATE, gguf.MODEL_TENSOR.FFN_UP,
                                                               gguf.MODEL_TENSOR.FFN_DOWN)}
    for spec in arch.dense:
        want = fmt(spec.name, 2)
        # llama.cpp's converter renames it first (ModelBase.filter_tensors), for the ".bias" suffix
        hf = fmt(spec.hf, 2).replace("e_score_correction_bias", "e_score_correction.bias")
        hf += ".weight" if hf.endswith(".sinks") else ""  # GptOssModel.filter_tensors appends it
        got = tmap.get_name(hf, try_suffixes=(".weight", ".bias"))
        if got is None and spec.layers == "dense":
            assert want.rsplit(".", 1)[0] in generic, want
            continue
        assert got == want, (spec.hf, got, want)
    for spec in arch.experts:  # llama.cpp merges a layer's experts first, then maps the merged name
        if spec.hf_merged is not None:  # already merged (gpt-oss): test_gpt_oss runs llama.cpp's converter itself
            continue
        merged = fmt(spec.hf.replace(".{E}", ""), 2)  # model.layers.2.mlp.experts.gate_proj.weight
        assert tmap.get_name(merged, try_suffixes=(".weight",)) == fmt(spec.gguf_merged, 2)


# ---------------------------------------------------------------- runtime and references
@pytest.mark.parametrize("fam", FAMILY_NAMES)
@pytest.mark.parametrize("which", ["layout_hf", "layout_gguf"])
def test_runtime_matches_transformers(models: dict, hf_logits, fam: str, which: str) -> None:  # noqa: ANN001
    layout = models[fam][which]
    with Engine.open(layout, cache_mb=_cache_mb(layout), kv_dtype="f32") as eng:
        for ids in prompts():
            want = hf_logits(fam, ids)
            eng.reset()
            got = eng.forward(ids)
            diff = np.abs(got - want).max()
            assert diff <= REL_BOUND * np.abs(want).max(), f"{fam}/{which}: max |diff| {diff}"
            np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
        # decoding token by token (the n = 1 attention kernel, the KV cache) agrees too
        ids = prompts(1)[0]
        eng.reset()
        steps = [eng.forward(ids[:16])] + [eng.forward([t]) for t in ids[16:]]
        got, want = np.concatenate(steps), hf_logits(fam, ids)
        assert np.abs(got - want).max() <= REL_BOUND * np.abs(want).max()
        np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
        assert eng.stats()["expert_misses"] > 0  # experts really came from disk


@pytest.mark.parametrize("fam", FAMILY_NAMES)
def test_numpy_reference_matches_transformers(models: dict, hf_logits, fam: str) -> None:  # noqa: ANN001
    for src in ("hf", "gguf_f16"):
        ref = ReferenceModel.from_source(models[fam][src])
        for ids in prompts():
            want, got = hf_logits(fam, ids), ref.forward(ids)
            assert np.abs(got - want).max() <= REL_BOUND * np.abs(want).max()
            np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("fam", FAMILY_NAMES)
def test_q8_0_layout_close_to_transformers(models: dict, hf_logits, fam: str) -> None:  # noqa: ANN001
    """q8_0 everywhere (embeddings and lm_head too): close, not exact; limits are verify's q8_0 defaults."""
    layout = models[fam]["layout_q8_0"]
    with Engine.open(layout, cache_mb=_cache_mb(layout), kv_dtype="f32") as eng:
        for ids in prompts():
            eng.reset()
            fig = compare_logits(ids, eng.forward(ids), hf_logits(fam, ids))
            assert fig["kl_mean"] <= 2e-3 and fig["top1_agreement"] >= 0.9, (fam, fig["kl_mean"], fig["top1_agreement"])


def test_family_pieces_matter(models: dict, hf_logits) -> None:  # noqa: ANN001
    """Each piece changes the logits when left out, so the tests above have teeth."""
    ids = prompts(1)[0]
    cases = [("qwen3_moe", lambda lw: replace(lw, q_norm=np.ones_like(lw.q_norm))),
             ("olmoe", lambda lw: replace(lw, k_norm=np.ones_like(lw.k_norm))),
             ("qwen2_moe", lambda lw: replace(lw, q_bias=np.zeros_like(lw.q_bias), k_bias=np.zeros_like(lw.k_bias),
                                              v_bias=np.zeros_like(lw.v_bias))),
             ("qwen2_moe", lambda lw: lw if lw.shared_gate is None else replace(lw, shared_gate=np.zeros_like(lw.shared_gate)))]
    for fam, spoil in cases:
        ref = ReferenceModel.from_source(models[fam]["hf"])
        ref.layers = [spoil(lw) for lw in ref.layers]
        assert np.abs(ref.forward(ids) - hf_logits(fam, ids)).max() > 1e-3, fam


# ---------------------------------------------------------------- CLI
@pytest.mark.parametrize("fam", FAMILY_NAMES)
def test_cli_inspect_and_verify(models: dict, fam: str) -> None:
    runner = CliRunner()
    r = runner.invoke(main, ["inspect", str(models[fam]["layout_gguf"])])
    assert r.exit_code == 0 and f"arch          {fam}" in r.output and "v2" in r.output, r.output
    label = {"qwen3_moe": "dense layers", "olmoe": "q/k norm", "qwen2_moe": "shared expert", "glm4_moe": "routing",
             "gpt_oss": "attn sinks"}[fam]
    assert label in r.output
    for src in ("hf", "gguf_f16"):
        r = runner.invoke(main, ["inspect", "--json", str(models[fam][src])])
        assert r.exit_code == 0 and json.loads(r.output)["arch"] == fam
    r = runner.invoke(main, ["verify", str(models[fam]["layout_gguf"]), "--reference", str(models[fam]["hf"]),
                             "--reference-engine", "transformers", "--max-tokens", "48", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "is intact" in r.output and "verdict     OK" in r.output and "100.0% of positions agree" in r.output


# ---------------------------------------------------------------- the manifest's expert grid
def _edit_manifest(src: Path, dst: Path, edit) -> Path:  # noqa: ANN001
    import shutil

    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    edit(m)
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def test_manifest_grid_skips_dense_layers(models: dict, tmp_path: Path) -> None:
    src = models["qwen3_moe"]["layout_hf"]
    m = Layout.open(src).manifest
    assert m.expert(2, 5).layer == 2 and m.expert(2, 5).expert == 5
    with pytest.raises(ValueError):
        m.expert(1, 0)  # layer 1 is a dense MLP: it has no experts

    def add_dense_layer_expert(d: dict) -> None:
        e = dict(d["experts"][0], layer=1)
        d["experts"].insert(8, e)

    with pytest.raises(LayoutError, match="unexpected"):
        Layout.open(_edit_manifest(src, tmp_path / "extra", add_dense_layer_expert))
    with pytest.raises(LayoutError, match="version 2"):
        Layout.open(_edit_manifest(src, tmp_path / "v1", lambda d: d.update(version=1)))
    with pytest.raises(LayoutError, match="dense_layers"):
        Layout.open(_edit_manifest(src, tmp_path / "all-dense", lambda d: d["config"].update(dense_layers=[0, 1, 2])))
    with pytest.raises(LayoutError, match="d_ff_dense"):
        Layout.open(_edit_manifest(src, tmp_path / "no-width", lambda d: d["config"].update(d_ff_dense=0)))


def test_mixtral_layout_is_still_version_1(tiny: dict, tmp_path: Path) -> None:
    out = convert(tiny["q4_0"], tmp_path / "mixtral", ConvertOptions(progress=False)).out
    raw = json.loads((out / "manifest.json").read_text())
    assert raw["version"] == 1
    assert set(raw["config"]) == {"arch", "vocab_size", "d_model", "d_ff", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                                  "n_experts", "n_experts_used", "context_length", "rope_theta", "rope_style", "norm_eps",
                                  "sliding_window", "tie_embeddings", "norm_topk_prob"}


def test_store_reads_small_experts_in_chunks(models: dict) -> None:
    """ExpertStore(chunk_bytes=...) (benchmarks/bench_small_experts.py): an expert read as many aligned
    pieces in flight is byte for byte the file, checksum verified."""
    from mertools.runtime.store import CHUNK, ExpertStore

    layout = Layout.open(models["qwen3_moe"]["layout_hf"])
    with pytest.raises(ValueError, match="multiple of 4096"):
        ExpertStore(layout, 1, chunk_bytes=1000)
    default = ExpertStore(layout, 1)
    assert default.chunk_size(10**6) == CHUNK
    default.close()
    store = ExpertStore(layout, 2, chunk_bytes=4096, io_depth=4)
    try:
        assert store.chunk_size(10**6) == 4096
        for e in layout.manifest.experts[:10]:
            store.load((e.layer, e.expert), 1)
            assert store.buffers[1][: e.nbytes].tobytes() == (layout.root / e.file).read_bytes()
        assert store.bytes_read == sum(e.nbytes for e in layout.manifest.experts[:10])
    finally:
        store.close()


def _squeeze_gguf_tensors(src: Path, dst: Path, suffix: str) -> int:
    """Copy a GGUF, rewriting the tensor infos whose name ends with `suffix` from 2-D [d, 1] (ggml order)
    to 1-D [d], as llama-quantize writes Qwen2-MoE's shared-expert gate; the data is copied unchanged."""
    r = gguf.GGUFReader(src)
    raw = src.read_bytes()
    infos, n = b"", 0
    for t in r.tensors:
        f = t.field
        end = f.offset + sum(int(p.nbytes) for p in f.parts)
        if t.name.endswith(suffix):
            dims = [int(d) for d in t.shape.tolist() if d != 1]
            name = t.name.encode()
            infos += struct.pack(f"<Q{len(name)}sI", len(name), name, len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
            infos += struct.pack("<IQ", int(t.tensor_type), int(t.data_offset) - r.data_offset)
            n += 1
        else:
            infos += raw[f.offset : end]
    head = raw[: r.tensors[0].field.offset] + infos
    align = 32  # general.alignment's default; the fixtures do not set it
    dst.write_bytes(head + b"\0" * (-len(head) % align) + raw[r.data_offset :])
    return n


def test_a_one_dimensional_shared_expert_gate_loads(models: dict, tmp_path: Path) -> None:
    """llama-quantize writes blk.N.ffn_gate_inp_shexp.weight as [d_model]; the config implies (1, d_model)."""
    src = tmp_path / "squeezed.gguf"
    assert _squeeze_gguf_tensors(models["qwen2_moe"]["gguf_f16"], src, "ffn_gate_inp_shexp.weight") == 3
    assert {tuple(t.shape) for t in gguf.GGUFReader(src).tensors if t.name.endswith("gate_inp_shexp.weight")} == {(128,)}
    lay = convert(src, tmp_path / "lay", ConvertOptions(dtype="f16", progress=False)).out
    a, b = Layout.open(lay), Layout.open(models["qwen2_moe"]["layout_gguf"])
    assert {n: t.to_dict() for n, t in a.manifest.dense.items()} == {n: t.to_dict() for n, t in b.manifest.dense.items()}
    assert (a.root / "dense.bin").read_bytes() == (b.root / "dense.bin").read_bytes()


@pytest.mark.parametrize("fam", FAMILY_NAMES)
def test_f16_kv_cache_is_within_verify_f16_limits(models: dict, fam: str) -> None:
    from family_checks import assert_f16_kv_within_f16_limits

    assert_f16_kv_within_f16_limits(models[fam]["layout_hf"], list(range(1, 49)))


@pytest.mark.parametrize("fam", FAMILY_NAMES)
def test_verification_rows_are_decode_steps(models: dict, fam: str) -> None:
    """Speculative decoding's verification step (rows apart) gives each row bit for bit a decode step's logits,
    whatever the family's attention (sliding windows, sinks, partial rotary, biases) and MoE pieces."""
    ids = prompts(1, 20)[0]
    with Engine.open(models[fam]["layout_q8_0"], cache_mb=_cache_mb(models[fam]["layout_q8_0"])) as eng:
        eng.forward(ids[:12])
        one = np.concatenate([eng.forward([i]) for i in ids[12:]])
        eng.reset()
        eng.forward(ids[:12])
        assert np.array_equal(eng.model.forward(np.array(ids[12:]), rows_apart=True), one)


@pytest.mark.parametrize("fam", FAMILY_NAMES)
def test_int8_kernels_close_to_exact(models: dict, fam: str) -> None:
    """The 8-bit kernels (run/serve's default) on each family's q8_0 layout: its matrices packed where they can be,
    the logits within verify's limit of the exact kernels', and each row of a verification step a decode step's."""
    from mertools.verify.numerics import KERNELS_KL_LIMIT, check_kernels

    lay = models[fam]["layout_q8_0"]
    rep = check_kernels(lay, "int8", max_tokens=64)
    print(f"{fam}: int8 vs exact mean KL {rep.kl_mean:.3g}, max {rep.kl_max:.3g}, top-1 {rep.top1_agreement:.1%}")
    assert 0 < rep.kl_mean <= KERNELS_KL_LIMIT
    ids = prompts(1, 20)[0]
    with Engine.open(lay, kernels="int8", cache_mb=_cache_mb(lay)) as eng:
        assert eng.model.layers[0].attn_o.checked.packed
        eng.forward(ids[:12])
        one = np.concatenate([eng.forward([i]) for i in ids[12:]])
        eng.reset()
        eng.forward(ids[:12])
        assert np.array_equal(eng.model.forward(np.array(ids[12:]), rows_apart=True), one)
