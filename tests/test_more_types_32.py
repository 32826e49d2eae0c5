"""GGUF tensors of the 32-weight block types q4_1, q5_0, q5_1, iq4_nl, mxfp4 and of bf16 convert byte for
byte (`--dtype auto` keeps each type) and run: the layout's logits match the float64 reference of the GGUF."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from fixtures.gguf_common import LlamaHParams, add_general, add_llama_hparams, add_sp_tokenizer, stays_f32
from fixtures.safetensors_io import read_hf_weights
from fixtures.tiny_mixtral import TinyConfig, _gguf_tensors
from mertools.convert.pipeline import ConvertOptions, convert
from mertools.convert.source import unpermute_index
from mertools.dtypes import DTYPES, iq4_nl
from mertools.layout import Layout
from mertools.reference.forward import ReferenceModel
from mertools.runtime.engine import Engine

TYPES = ("q4_1", "q5_0", "q5_1", "iq4_nl", "mxfp4", "bf16")
PROMPT = [1, 45, 300, 22, 17, 99, 250, 3, 7, 400, 12, 88, 5, 260, 31, 77]
ROLES = {"gate": "ffn_gate_exps", "up": "ffn_up_exps", "down": "ffn_down_exps"}


def _iq4_nl_blocks(x: np.ndarray) -> np.ndarray:
    """float32 (..., cols) -> uint8 (..., cols / 32 * 18): a plain iq4_nl encoding (gguf-py has no
    quantizer): d = max|x| / 127, each weight the nearest table value."""
    xb = x.reshape(-1, 32).astype(np.float32)
    d = (np.abs(xb).max(axis=1, keepdims=True) / 127).astype(np.float16).astype(np.float32)
    k = np.array(iq4_nl.KVALUES, np.float32)
    q = np.abs(xb[:, :, None] - d[:, :, None] * k).argmin(axis=2).astype(np.uint8)  # (nb, 32)
    raw = np.concatenate([d.astype("<f2").view(np.uint8), q[:, :16] | (q[:, 16:] << 4)], axis=1)
    return raw.reshape(*x.shape[:-1], x.shape[-1] // 32 * 18)


def _encode(x: np.ndarray, name: str) -> np.ndarray:
    if name == "iq4_nl":
        return _iq4_nl_blocks(x)
    return gguf.quants.quantize(np.ascontiguousarray(x, dtype=np.float32), T[name.upper()])


def _type_of(name: str, x: np.ndarray, k: int) -> str:
    """Each of our types on experts and on dense matrices, in turn."""
    if name.endswith("_exps.weight"):
        layer = int(name.split(".")[1])
        return TYPES[(3 * layer + list(ROLES.values()).index(name.split(".")[2])) % len(TYPES)]
    return TYPES[k % len(TYPES)]


@pytest.fixture(scope="module")
def gguf_path(tiny: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    hf = tiny["hf"]
    cfg = TinyConfig.from_hf_config(json.loads((hf / "config.json").read_text(encoding="utf-8")))
    out = tmp_path_factory.mktemp("more-types") / "tiny-mixtral-32.gguf"
    w = gguf.GGUFWriter(out, "llama")
    k = 0
    for t, name, x in _gguf_tensors(read_hf_weights(hf), cfg, "merged"):
        if stays_f32(t, name, x):
            w.add_tensor(name, np.ascontiguousarray(x, dtype=np.float32), raw_dtype=T.F32)
            continue
        dtype = _type_of(name, x, k)
        k += not name.endswith("_exps.weight")
        w.add_tensor(name, _encode(x, dtype), raw_dtype=T[dtype.upper()])
    add_general(w, hf, "tiny-mixtral-32")
    add_llama_hparams(w, LlamaHParams(
        n_ctx=cfg.max_position_embeddings, d_model=cfg.hidden_size, n_layer=cfg.num_hidden_layers,
        d_ff=cfg.intermediate_size, n_head=cfg.num_attention_heads, n_head_kv=cfg.num_key_value_heads,
        n_expert=cfg.num_local_experts, n_expert_used=cfg.num_experts_per_tok, rope_theta=cfg.rope_theta,
        rms_eps=cfg.rms_norm_eps, vocab_size=cfg.vocab_size), gguf.LlamaFileType.MOSTLY_F16)  # fmt: skip
    add_sp_tokenizer(w, hf, cfg.vocab_size)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.fixture(scope="module")
def layout(gguf_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert(gguf_path, tmp_path_factory.mktemp("more-types-layout") / "lay", ConvertOptions(progress=False)).out


def test_the_gguf_holds_every_type(gguf_path: Path) -> None:
    types = {t.tensor_type.name.lower() for t in gguf.GGUFReader(gguf_path).tensors}
    assert set(TYPES) <= types


def test_auto_keeps_every_tensor_byte_for_byte(gguf_path: Path, layout: Path) -> None:
    lay = Layout.open(layout)
    tensors = {t.name: t for t in gguf.GGUFReader(gguf_path).tensors}
    seen = set()
    for layer in range(2):
        for role, stem in ROLES.items():
            t = tensors[f"blk.{layer}.{stem}.weight"]
            dtype = t.tensor_type.name.lower()
            seen.add(dtype)
            for e in range(4):
                assert lay.read_expert(layer, e, role).tobytes() == np.asarray(t.data[e]).tobytes(), (layer, role, e)
            entry = next(x for x in lay.manifest.experts if x.layer == layer and x.expert == 0)
            assert entry.tensors[role].dtype == dtype
    assert seen == set(TYPES)
    for name, entry in lay.manifest.dense.items():
        t = tensors[name]
        raw = np.asarray(t.data)
        raw = raw.reshape(raw.shape[0], -1) if raw.ndim > 1 else raw  # (rows, row bytes)
        if name.endswith("attn_q.weight"):
            raw = raw[unpermute_index(4, raw.shape[0])]
        elif name.endswith("attn_k.weight"):
            raw = raw[unpermute_index(2, raw.shape[0])]
        assert entry.dtype == t.tensor_type.name.lower() and entry.dtype in DTYPES, name
        assert lay.read_dense(name).tobytes() == raw.tobytes(), name


def test_layout_matches_the_reference_of_the_gguf(gguf_path: Path, layout: Path) -> None:
    ref = ReferenceModel.from_source(gguf_path).forward(PROMPT)
    with Engine.open(layout, kv_dtype="f32") as eng:  # exact: the weights are what is compared
        got = np.concatenate([eng.forward(PROMPT[:5]), eng.forward(PROMPT[5:6]), eng.forward(PROMPT[6:])])
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() < 2e-4 * max(1.0, np.abs(ref).max())
    assert (got.argmax(1) == ref.argmax(1)).all()


def test_a_bf16_checkpoint_stays_bf16_and_runs(tmp_path: Path) -> None:
    from fixtures.tiny_mixtral import build_hf

    hf = build_hf(tmp_path / "hf-bf16", seed=0, dtype="bfloat16", shards=1)
    lay = convert(hf, tmp_path / "lay", ConvertOptions(progress=False)).out
    man = Layout.open(lay).manifest
    assert {t.dtype for e in man.experts for t in e.tensors.values()} == {"bf16"}
    ref = ReferenceModel.from_source(hf).forward(PROMPT)
    with Engine.open(lay, kv_dtype="f32") as eng:
        got = eng.forward(PROMPT)
    assert np.abs(got - ref).max() < 1e-4  # every fixture value is exact in bf16: as close as the f16 layout
    assert (got.argmax(1) == ref.argmax(1)).all()
