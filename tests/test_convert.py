"""`mertools convert` on real files: HF and both GGUF layouts give byte-identical experts."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGUFReader

from mertools.cli import main
from mertools.convert.pipeline import ConvertOptions, convert
from mertools.convert.source import unpermute_index
from mertools.kernels import dequantize
from mertools.layout import ALIGNMENT, Layout

DTYPES = ("f16", "q8_0", "q4_0", "q4_k")


@pytest.fixture(scope="module")
def layouts(tiny_layout: Callable[..., Path]) -> dict[tuple[str, str], Path]:
    """(source key, dtype) -> layout, for every source and target dtype."""
    return {(src, dtype): tiny_layout(src, dtype) for src in ("hf", "f16", "f16_per_expert", "q4_0", "q8_0") for dtype in DTYPES
            if src not in ("q4_0", "q8_0") or dtype in (src, "q4_k")}


def _expert_bytes(layout: Path) -> dict[str, bytes]:
    return {str(p.relative_to(layout)): p.read_bytes() for p in sorted((layout / "experts").rglob("*.bin"))}


@pytest.mark.parametrize("dtype", DTYPES)
def test_hf_merged_and_per_expert_gguf_give_identical_expert_files(layouts: dict, dtype: str) -> None:
    ref = _expert_bytes(layouts[("hf", dtype)])
    assert len(ref) == 8
    assert _expert_bytes(layouts[("f16", dtype)]) == ref
    assert _expert_bytes(layouts[("f16_per_expert", dtype)]) == ref


@pytest.mark.parametrize("qtype", ["q4_0", "q8_0"])
def test_quantized_gguf_is_copied_byte_for_byte_and_matches_our_quantizer(layouts: dict, tiny: dict, qtype: str) -> None:
    # the GGUF was quantized by gguf-py from the same f16 values; copying its blocks must equal
    # quantizing the HF weights ourselves, byte for byte
    lay = Layout.open(layouts[(qtype, qtype)])
    assert _expert_bytes(layouts[(qtype, qtype)]) == _expert_bytes(layouts[("hf", qtype)])
    reader = GGUFReader(tiny[qtype])
    gate = {t.name: t for t in reader.tensors}["blk.1.ffn_gate_exps.weight"]
    assert lay.read_expert(1, 2, "gate").tobytes() == np.asarray(gate.data[2]).tobytes()


def test_converting_twice_gives_identical_bytes(tiny: dict, tmp_path: Path) -> None:
    a = convert(tiny["hf"], tmp_path / "a", ConvertOptions(dtype="q4_k", progress=False)).out
    b = convert(tiny["hf"], tmp_path / "b", ConvertOptions(dtype="q4_k", progress=False)).out
    files = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


@pytest.mark.parametrize("key", [("hf", "q4_0"), ("f16_per_expert", "q4_k"), ("q8_0", "q8_0")])
def test_layout_alignment_and_checksums(layouts: dict, key: tuple[str, str]) -> None:
    lay = Layout.open(layouts[key])
    for e in lay.manifest.experts:
        assert e.nbytes % ALIGNMENT == 0 and (lay.root / e.file).stat().st_size == e.nbytes
        assert all(t.offset % ALIGNMENT == 0 and t.dtype == key[1] for t in e.tensors.values())
    assert all(t.offset % ALIGNMENT == 0 for t in lay.manifest.dense.values())
    assert lay.verify_checksums() == []


def _hf_tensor(hf_dir: Path, name: str) -> np.ndarray:
    from safetensors.numpy import load_file

    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())["weight_map"]
    return load_file(hf_dir / index[name])[name]


def test_f16_layout_holds_the_hf_values_exactly(layouts: dict, tiny: dict) -> None:
    lay = Layout.open(layouts[("f16", "f16")])  # from the GGUF: q/k permutation undone
    hf = tiny["hf"]
    for name, hf_name, rows in [
        ("blk.1.attn_q.weight", "model.layers.1.self_attn.q_proj.weight", 256),
        ("blk.1.attn_k.weight", "model.layers.1.self_attn.k_proj.weight", 128),
        ("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj.weight", 128),
        ("token_embd.weight", "model.embed_tokens.weight", 512),
    ]:
        got = lay.read_dense(name).view(np.float16).reshape(rows, -1)
        np.testing.assert_array_equal(got, _hf_tensor(hf, hf_name))
    norm = lay.read_dense("blk.0.ffn_norm.weight").view(np.float32)
    np.testing.assert_array_equal(norm, _hf_tensor(hf, "model.layers.0.post_attention_layernorm.weight").astype(np.float32))
    up = lay.read_expert(1, 3, "up").view(np.float16).reshape(512, 256)
    np.testing.assert_array_equal(up, _hf_tensor(hf, "model.layers.1.block_sparse_moe.experts.3.w3.weight"))
    # the GGUF really is permuted: reading its q rows as they are would not match
    q = {t.name: t for t in GGUFReader(tiny["f16"]).tensors}["blk.1.attn_q.weight"]
    raw = np.asarray(q.data).reshape(256, 256)
    assert not np.array_equal(raw, _hf_tensor(hf, "model.layers.1.self_attn.q_proj.weight"))
    np.testing.assert_array_equal(raw[unpermute_index(4, 256)], _hf_tensor(hf, "model.layers.1.self_attn.q_proj.weight"))


def test_dense_attention_agrees_between_hf_and_gguf_sources(layouts: dict) -> None:
    for dtype in DTYPES:
        a, b = Layout.open(layouts[("hf", dtype)]), Layout.open(layouts[("f16_per_expert", dtype)])
        assert a.manifest.config == b.manifest.config
        assert a.manifest.dense.keys() == b.manifest.dense.keys()
        for name in a.manifest.dense:
            assert a.read_dense(name).tobytes() == b.read_dense(name).tobytes(), (dtype, name)


def test_quantized_layout_dequantizes_close_to_source(layouts: dict, tiny: dict) -> None:
    ref = _hf_tensor(tiny["hf"], "model.layers.0.block_sparse_moe.experts.1.w2.weight").astype(np.float32)
    for dtype, tol in [("q8_0", 0.01), ("q4_k", 0.09), ("q4_0", 0.12)]:
        lay = Layout.open(layouts[("hf", dtype)])
        got = dequantize(lay.read_expert(0, 1, "down"), dtype, (256, 512))
        rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
        assert rel < tol, (dtype, rel)


def test_tokenizer_is_carried(layouts: dict, tiny: dict) -> None:
    hf = Layout.open(layouts[("hf", "q4_0")])
    assert hf.manifest.tokenizer["kind"] == "hf"
    assert (hf.root / "tokenizer/tokenizer.json").read_bytes() == (tiny["hf"] / "tokenizer.json").read_bytes()
    gg = Layout.open(layouts[("f16", "q4_0")])
    assert gg.manifest.tokenizer["kind"] == "gguf" and gg.manifest.tokenizer["model"] == "llama"
    vocab = GGUFReader(gg.root / "tokenizer/vocab.gguf")
    src = GGUFReader(tiny["f16"])
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.chat_template"):
        assert vocab.fields[key].contents() == src.fields[key].contents(), key


def test_inspect_every_kind(layouts: dict, tiny: dict) -> None:
    runner = CliRunner()
    for path, kind in [(tiny["hf"], "hf"), (tiny["q4_0"], "gguf"), (layouts[("hf", "q4_k")], "layout")]:
        res = runner.invoke(main, ["inspect", str(path), "--json"])
        assert res.exit_code == 0, res.output
        info = json.loads(res.output)
        assert info["kind"] == kind and info["arch"] == "mixtral" and info["config"]["n_experts"] == 4
        assert info["expert_bytes"] > 0 and info["dense_bytes"] > 0
        text = runner.invoke(main, ["inspect", str(path)]).output
        assert "4 per layer, 2 used per token" in text
    info = json.loads(runner.invoke(main, ["inspect", str(layouts[("hf", "q4_k")]), "--json"]).output)
    assert info["version"] == 1 and info["dtypes"] == {"f32": 7, "q4_k": 34}
    assert info["bytes_per_expert"] % ALIGNMENT == 0
