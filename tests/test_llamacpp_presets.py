"""GGUFs made by llama.cpp itself (fixtures/llamacpp: its converter, then its quantizer into each preset
people download): `convert --dtype auto` keeps every tensor byte for byte, the layout streams and its
logits match llama.cpp's on the very same file, and our quantizers reproduce llama.cpp's blocks from
the same float16 source. No llama.cpp is needed here; fixtures/llamacpp_presets.py made the files."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import gguf
import numpy as np
import pytest

from fixtures.llamacpp_presets import DIR, PRESETS, gguf_path, hf_dir, logits_path, manifest, token_ids
from fixtures.tiny_mixtral import build_gguf
from mertools.convert.pipeline import ConvertOptions, convert
from mertools.convert.source import unpermute_index
from mertools.dtypes import DTYPES, GGML_TYPE_TO_DTYPE
from mertools.kernels import quantize
from mertools.layout import Layout
from mertools.reference.forward import ReferenceModel
from mertools.runtime.engine import Engine
from mertools.verify.numerics import compare_logits

# The bar for a random tiny model, where llama.cpp's 8-bit activations are the difference
# (on its own Q8_0 file the two engines differ by KL ~3e-4 here).
KL_MAX, TOP1_MIN = 0.005, 0.90
EXPERT_ROLES = {"ffn_gate_exps": "gate", "ffn_up_exps": "up", "ffn_down_exps": "down"}


def _tensors(path: Path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llamacpp-presets")
    out = {}
    for preset in PRESETS:
        summary = convert(gguf_path(preset), root / preset, ConvertOptions(progress=False))
        assert summary.copied == summary.tensors, preset  # nothing requantized under auto
        out[preset] = summary.out
    return out


def test_files_are_what_the_manifest_says() -> None:
    info = manifest()
    assert sorted(info["presets"]) == sorted(PRESETS)
    for preset, entry in info["presets"].items():
        data = (DIR / entry["gguf"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], preset
    assert info["token_ids"] == token_ids()


@pytest.mark.parametrize("preset", PRESETS)
def test_auto_keeps_every_tensor_byte_for_byte(layouts: dict[str, Path], preset: str) -> None:
    src = _tensors(gguf_path(preset))
    lay = Layout.open(layouts[preset])
    cfg = lay.manifest.config
    kinds = set()
    for name, t in src.items():
        kind = GGML_TYPE_TO_DTYPE[int(t.tensor_type)]
        block = name.split(".")[-2]
        if block in EXPERT_ROLES:  # merged experts: expert e is the outer dimension
            layer = int(name.split(".")[1])
            for e in range(cfg.n_experts):
                entry = lay.manifest.expert(layer, e).tensors[EXPERT_ROLES[block]]
                assert entry.dtype == kind, (name, e)
                assert lay.read_expert(layer, e, EXPERT_ROLES[block]).tobytes() == np.asarray(t.data[e]).tobytes()
            kinds.add(kind)
            continue
        entry = lay.manifest.dense[name]
        assert entry.dtype == kind, name
        rows = np.asarray(t.data).reshape(int(np.prod(t.shape[1:])) if t.shape.size > 1 else 1, -1)
        if block in ("attn_q", "attn_k"):  # llama.cpp permutes rows for its RoPE; the layout holds HF's order
            heads = cfg.n_heads if block == "attn_q" else cfg.n_kv_heads
            rows = rows[unpermute_index(heads, rows.shape[0])]
        assert lay.read_dense(name).tobytes() == rows.tobytes(), name
    assert kinds, preset
    assert lay.verify_checksums() == []


@pytest.mark.parametrize("preset", PRESETS)
def test_logits_match_llama_cpp_on_the_same_file(layouts: dict[str, Path], preset: str) -> None:
    ids = token_ids()
    lay = Layout.open(layouts[preset])
    slot = max(e.nbytes for e in lay.manifest.experts)
    # a cache of 3 experts out of 16, so experts really stream from disk; a prefill of 120 positions
    # (the GEMM path), then 8 single tokens (the matvec path)
    with Engine.open(layouts[preset], cache_mb=3 * slot / 2**20, kv_dtype="f32") as eng:  # exact: weights compared
        got = np.concatenate([eng.forward(ids[:120]), *(eng.forward([i]) for i in ids[120:])])
        stats = eng.stats()
    assert stats["cache_slots"] < 16 and stats["expert_misses"] >= 16 + 8
    llama = np.load(logits_path(preset))
    vs_llama = compare_logits(ids, got, llama)
    assert vs_llama["kl_mean"] <= KL_MAX and vs_llama["top1_agreement"] >= TOP1_MIN, vs_llama
    # the rest of the gap is llama.cpp's 8-bit activations: against the float64 forward of the same
    # GGUF (gguf-py's dequantizers) the engine is exact to float32 rounding
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ref = ReferenceModel.from_source(gguf_path(preset)).forward(ids)
    vs_ref = compare_logits(ids, got, ref)
    assert vs_ref["kl_mean"] < 1e-8 and vs_ref["top1_agreement"] == 1.0, vs_ref


@pytest.fixture(scope="module")
def source_f16(tmp_path_factory: pytest.TempPathFactory) -> dict[str, gguf.ReaderTensor]:
    """The F16 GGUF llama.cpp quantized from, rebuilt here bit for bit (its converter's output)."""
    root = tmp_path_factory.mktemp("llamacpp-source")
    path = build_gguf(hf_dir(root / "hf"), root / "f16.gguf", "merged", "f16")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == manifest()["source_f16_sha256"]
    return _tensors(path)


@pytest.mark.parametrize("preset", PRESETS)
def test_our_quantizers_write_llama_cpps_blocks(source_f16: dict[str, gguf.ReaderTensor], preset: str) -> None:
    checked = set()
    for name, t in _tensors(gguf_path(preset)).items():
        kind = GGML_TYPE_TO_DTYPE[int(t.tensor_type)]
        if DTYPES[kind].block_size == 1 and kind != "bf16" or DTYPES[kind].quantize is None:
            continue  # f32/f16 tensors are copies; types without a quantizer are copy-only
        x = np.asarray(source_f16[name].data).astype(np.float32)
        ours = quantize(x.reshape(-1, x.shape[-1]), kind, name=name)
        assert ours.tobytes() == np.asarray(t.data).tobytes(), (name, kind)
        checked.add(kind)
    if not checked:
        pytest.skip(f"{preset}: none of its types has a quantizer yet")
