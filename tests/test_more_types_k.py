"""The K-quant and IQ4_XS types of real GGUF downloads (q2_k, q3_k, q5_k, q6_k, iq4_xs): a GGUF mixing
them per layer and role converts with `--dtype auto` keeping every expert tensor byte for byte, and
the engine on that layout matches the float64 reference of the GGUF (which dequantizes with gguf-py)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from fixtures.gguf_common import MT, LlamaHParams, add_general, add_llama_hparams, add_sp_tokenizer, gguf_quantize, stays_f32
from fixtures.safetensors_io import read_hf_weights
from fixtures.tiny_mixtral import TinyConfig, _gguf_tensors, build_hf
from mertools import dtypes as registry
from mertools.convert.pipeline import ConvertOptions, convert
from mertools.layout import Layout
from mertools.reference.forward import ReferenceModel
from mertools.runtime.engine import Engine

K_TYPES = ("q2_k", "q3_k", "q5_k", "q6_k", "iq4_xs")
# (layer, role) -> the type of that layer's merged expert tensor; every type appears, mixed within a layer
EXPERT_TYPES = {
    (0, MT.FFN_GATE_EXP): T.Q5_K, (0, MT.FFN_UP_EXP): T.Q5_K, (0, MT.FFN_DOWN_EXP): T.Q6_K,
    (1, MT.FFN_GATE_EXP): T.Q3_K, (1, MT.FFN_UP_EXP): T.IQ4_XS, (1, MT.FFN_DOWN_EXP): T.Q2_K,
}
DENSE_TYPES = {MT.OUTPUT: T.Q6_K, MT.ATTN_V: T.Q6_K}  # as llama.cpp's Q4_K_M presets put them
ROLE = {MT.FFN_GATE_EXP: "gate", MT.FFN_UP_EXP: "up", MT.FFN_DOWN_EXP: "down"}
PROMPT = [1, 45, 300, 22, 17, 99, 250, 3, 7, 400, 12, 88, 5, 260, 31, 77, 9, 140, 23, 401]


def random_blocks(qtype: T, shape: tuple[int, ...], std: float, rng: np.random.Generator) -> np.ndarray:
    """Bytes of a `qtype` tensor of float `shape` (..., cols): random codes and scales, ordinary f16
    scales chosen so that the weights' standard deviation is about `std` (gguf-py has no quantizer
    for these types). uint8 (..., row_bytes), as GGUFWriter.add_tensor takes quantized data."""
    t = registry.DTYPES[qtype.name.lower()]
    nb = int(np.prod(shape)) // t.block_size
    raw = rng.integers(0, 256, (nb, t.type_size), dtype=np.uint8)
    scales = rng.uniform(0.5, 1.0, (nb, len(t.scale_offsets))).astype(np.float32)
    for i, o in enumerate(t.scale_offsets):
        raw[:, o : o + 2] = scales[:, i].astype("<f2").view(np.uint8).reshape(nb, 2)
    factor = std / float(gguf.quants.dequantize(raw, qtype).std())
    for i, o in enumerate(t.scale_offsets):
        raw[:, o : o + 2] = (scales[:, i] * np.float32(factor)).astype("<f2").view(np.uint8).reshape(nb, 2)
    return raw.reshape(*shape[:-1], shape[-1] // t.block_size * t.type_size)


def iq2_xs_blocks(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Random IQ2_XS bytes (a type no layout holds: 74-byte super-blocks, f16 d first)."""
    nb = int(np.prod(shape)) // 256
    raw = rng.integers(0, 256, (nb, 74), dtype=np.uint8)
    raw[:, :2] = np.full(nb, 0.01, "<f2").view(np.uint8).reshape(nb, 2)
    return raw.reshape(*shape[:-1], shape[-1] // 256 * 74)


def write_gguf(root: Path, expert_types: dict) -> Path:
    """The tiny Mixtral as a GGUF whose experts have the given types (output and attn_v: q6_k)."""
    hf = build_hf(root / "tiny-mixtral", seed=3, dtype="float16", shards=1)
    cfg = TinyConfig.from_hf_config(json.loads((hf / "config.json").read_text(encoding="utf-8")))
    out = root / "tiny-mixtral-k.gguf"
    rng = np.random.default_rng(7)
    w = gguf.GGUFWriter(out, "llama")
    for t, name, x in _gguf_tensors(read_hf_weights(hf), cfg, "merged"):
        layer = int(name.split(".")[1]) if name.startswith("blk.") else None
        qt = expert_types.get((layer, t), DENSE_TYPES.get(t))
        if qt == T.IQ2_XS:
            w.add_tensor(name, iq2_xs_blocks(x.shape, rng), raw_dtype=qt)
        elif qt is not None:
            w.add_tensor(name, random_blocks(qt, x.shape, float(x.std()), rng), raw_dtype=qt)
        else:
            qt = T.F32 if stays_f32(t, name, x) else T.F16
            w.add_tensor(name, gguf_quantize(x, qt), raw_dtype=qt)
    add_general(w, hf)
    add_llama_hparams(w, LlamaHParams(
        n_ctx=cfg.max_position_embeddings, d_model=cfg.hidden_size, n_layer=cfg.num_hidden_layers,
        d_ff=cfg.intermediate_size, n_head=cfg.num_attention_heads, n_head_kv=cfg.num_key_value_heads,
        n_expert=cfg.num_local_experts, n_expert_used=cfg.num_experts_per_tok, rope_theta=cfg.rope_theta,
        rms_eps=cfg.rms_norm_eps, vocab_size=cfg.vocab_size), gguf.LlamaFileType.MOSTLY_Q4_K_M)
    add_sp_tokenizer(w, hf, cfg.vocab_size)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.fixture(scope="module")
def mixed_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Mixtral as a GGUF whose experts (and output, attn_v) have the K types."""
    return write_gguf(tmp_path_factory.mktemp("k-types"), EXPERT_TYPES)


def test_a_type_no_layout_holds_is_refused_under_auto_and_requantized_on_request(tmp_path: Path) -> None:
    """--dtype auto never requantizes silently: one line names the file, tensor and type, and suggests
    --dtype; with --dtype q8_0 the tensor is dequantized (gguf-py) and requantized, and the layout runs."""
    from click.testing import CliRunner

    from mertools.cli import main

    src = write_gguf(tmp_path, {**EXPERT_TYPES, (1, MT.FFN_DOWN_EXP): T.IQ2_XS})
    res = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "auto"), "--quiet"])
    assert res.exit_code == 2, res.output
    err = [line for line in res.output.splitlines() if line.startswith("mertools: error")]
    assert len(err) == 1 and "blk.1.ffn_down_exps.weight" in err[0] and "iq2_xs" in err[0] and "--dtype" in err[0]
    assert str(src) in err[0]
    assert not (tmp_path / "auto").exists() and not (tmp_path / "auto.partial").exists()
    lay = convert(src, tmp_path / "q8", ConvertOptions(dtype="q8_0", progress=False)).out
    with Engine.open(lay) as eng:
        assert np.isfinite(eng.forward(PROMPT[:4])).all()


@pytest.fixture(scope="module")
def mixed_layout(mixed_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert(mixed_gguf, tmp_path_factory.mktemp("k-layout") / "lay", ConvertOptions(progress=False)).out


def test_auto_keeps_every_k_type_byte_for_byte(mixed_gguf: Path, mixed_layout: Path) -> None:
    src = {t.name: t for t in gguf.GGUFReader(mixed_gguf).tensors}
    lay = Layout.open(mixed_layout)
    seen = set()
    for entry in lay.manifest.experts:
        for (layer, mt), qt in EXPERT_TYPES.items():
            if entry.layer != layer:
                continue
            role = ROLE[mt]
            gg = src[gguf.TENSOR_NAMES[mt].format(bid=layer) + ".weight"]
            assert gg.tensor_type == qt
            assert entry.tensors[role].dtype == qt.name.lower()
            assert lay.read_expert(layer, entry.expert, role).tobytes() == np.asarray(gg.data[entry.expert]).tobytes()
            seen.add(qt.name.lower())
    assert seen == set(K_TYPES)
    for name in ("output.weight", "blk.0.attn_v.weight", "blk.1.attn_v.weight"):  # dense q6_k, copied too
        assert lay.manifest.dense[name].dtype == "q6_k"
        assert lay.read_dense(name).tobytes() == np.asarray(src[name].data).tobytes()
    assert lay.verify_checksums() == []


def test_engine_matches_the_reference_of_the_gguf(mixed_gguf: Path, mixed_layout: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the random blocks stay finite
        ref = ReferenceModel.from_source(mixed_gguf).forward(PROMPT)
    assert np.isfinite(ref).all() and ref.std() > 0.1
    bound = 2e-4 * max(1.0, np.abs(ref).max())  # test_engine's tolerance for quantized layouts
    # one prefill of 20 (the GEMM), then 8 (the tiled kernel), single tokens (the matvec) and 3 more
    for chunks in ((), (8, 9, 10, 11, 17)):
        with Engine.open(mixed_layout, kv_dtype="f32") as eng:  # exact: the weights are what is compared
            parts, start = [], 0
            for end in (*chunks, len(PROMPT)):
                parts.append(eng.forward(PROMPT[start:end]))
                start = end
        got = np.concatenate(parts)
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() < bound, (chunks, np.abs(got - ref).max())
        assert (got.argmax(1) == ref.argmax(1)).all()


def test_k_types_are_kept_under_auto_and_are_conversion_targets() -> None:
    for name in K_TYPES:
        t = registry.DTYPES[name]
        assert t.quantize is not None and t.expert and registry.auto_dtype(name) == name
        assert name in registry.EXPERT_DTYPES and name in registry.CONVERT_CHOICES
        assert ConvertOptions(dtype=name).dtype == name


@pytest.mark.parametrize("avx512", [True, False])
def test_vlut32_paths(avx512: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """q5_k's 32-entry table lookup gives (lo, hi)[idx & 31] on the AVX-512 path and the portable one."""
    from numba import njit

    from mertools.dtypes import q5_k
    from mertools.kernels import simd

    if avx512 and not q5_k.AVX512:
        pytest.skip("host has no AVX-512")
    monkeypatch.setattr(q5_k, "AVX512", avx512)

    @njit(cache=False)
    def lookup(table, idx, out):  # out[:16] = table[idx & 31] through vlut32
        simd.vstore(out, 0, q5_k.vlut32(simd.vload(table, 0), simd.vload(table, 16), simd.sbyte16(idx, 0)))

    table = np.arange(32, dtype=np.float32) * np.float32(-1.5) + np.float32(0.25)
    for seed in range(3):
        idx = np.random.default_rng(seed).integers(0, 256, 16).astype(np.uint8)
        out = np.zeros(16, np.float32)
        lookup(table, idx, out)
        np.testing.assert_array_equal(out, table[idx & 31])
