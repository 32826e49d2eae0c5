"""The fixture generators: determinism, HF/GGUF structure, llama.cpp conventions, tokenizer."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader
from safetensors import safe_open

from fixtures.gguf_common import hf_to_gguf, permute_qk, unpermute_qk
from fixtures.make_tokenizer import SAMPLES, TOKENIZER_DIR, tokenizer_config, train_sentencepiece
from fixtures.safetensors_io import read_hf_weights
from fixtures.tiny_mixtral import TinyConfig, build_all, build_gguf, build_hf, hf_tensor_specs, main
from fixtures.tiny_mixtral import synth_mixtral_gguf as synth

CFG = TinyConfig()
HAS_TRANSFORMERS = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))
needs_transformers = pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs torch + transformers")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _fields(reader: GGUFReader) -> dict[str, object]:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _tensors(path: Path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in GGUFReader(path).tensors}


def _np_shape(t: gguf.ReaderTensor) -> tuple[int, ...]:
    return tuple(int(n) for n in reversed(t.shape.tolist()))


def _values(t: gguf.ReaderTensor) -> np.ndarray:
    return gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(_np_shape(t))


# -- config and HF directory ----------------------------------------------------------------


@pytest.mark.parametrize("bad", [dict(hidden_size=250), dict(num_key_value_heads=3), dict(num_experts_per_tok=5),
                                 dict(vocab_size=0), dict(rms_norm_eps=0.0), dict(sliding_window=-1),
                                 dict(bos_token_id=512), dict(num_hidden_layers=True)])
def test_tiny_config_rejects_bad_values(bad: dict) -> None:
    with pytest.raises(ValueError):
        TinyConfig(**bad)


def test_build_all_is_deterministic(tiny: dict[str, Path], tmp_path: Path) -> None:
    again = build_all(tmp_path, seed=0)
    assert again.keys() == tiny.keys() == {"hf", "f16", "f16_per_expert", "q4_0", "q8_0"}
    for key, path in tiny.items():
        if path.is_dir():
            assert _files(again[key]) == _files(path), key
        else:
            assert again[key].read_bytes() == path.read_bytes(), key
    other = build_hf(tmp_path / "seed1", seed=1)
    w0, w1 = read_hf_weights(tiny["hf"]), read_hf_weights(other)
    assert not np.array_equal(w0["model.embed_tokens.weight"], w1["model.embed_tokens.weight"])


def test_hf_directory_layout(tiny: dict[str, Path]) -> None:
    hf = tiny["hf"]
    config = json.loads((hf / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and config["model_type"] == "mixtral"
    assert config["torch_dtype"] == "float16" and config["rope_theta"] == 1e6
    assert (config["bos_token_id"], config["eos_token_id"], config["sliding_window"]) == (1, 2, None)
    assert TinyConfig.from_hf_config(config) == CFG
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    specs = {name: shape for name, shape, _ in hf_tensor_specs(CFG)}
    assert set(index["weight_map"]) == set(specs) and len(specs) == 3 + (7 + 12) * 2
    assert sorted(set(index["weight_map"].values())) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    total = 0
    for fname in set(index["weight_map"].values()):
        with safe_open(hf / fname, framework="numpy") as f:  # the real library reads our files
            for name in f.keys():
                x = f.get_tensor(name)
                assert index["weight_map"][name] == fname
                assert x.dtype == np.float16 and x.shape == specs[name]
                total += x.nbytes
    assert index["metadata"]["total_size"] == total
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (hf / name).read_bytes() == (TOKENIZER_DIR / name).read_bytes()


def test_weights_are_equal_in_every_dtype_and_shard_count(tiny: dict[str, Path], tmp_path: Path) -> None:
    ref = read_hf_weights(tiny["hf"])
    for dtype, shards, tag in [("bfloat16", 3, "BF16"), ("float32", 1, "F32")]:
        d = build_hf(tmp_path / dtype, dtype=dtype, shards=shards)
        assert (d / "model.safetensors.index.json").is_file() == (shards > 1)
        assert json.loads((d / "config.json").read_text())["torch_dtype"] == dtype
        got = read_hf_weights(d)
        assert got.keys() == ref.keys() and all(np.array_equal(got[k], ref[k]) for k in ref)
        first = sorted(d.glob("model*.safetensors"))[0].read_bytes()
        header = json.loads(first[8 : 8 + int.from_bytes(first[:8], "little")])
        assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {tag}
    with pytest.raises(ValueError):
        build_hf(tmp_path / "bad", dtype="int8")


def test_random_weights_are_numerically_interesting(tiny: dict[str, Path]) -> None:
    w = read_hf_weights(tiny["hf"])
    norm = w["model.layers.0.input_layernorm.weight"]
    assert 0.95 < norm.mean() < 1.05 and norm.std() > 0.05
    assert 0.03 < w["model.layers.0.block_sparse_moe.experts.0.w1.weight"].std() < 0.1

    def rms(x: np.ndarray, g: np.ndarray) -> np.ndarray:
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + CFG.rms_norm_eps) * g

    # layer 0 at position 0 for every token: attention over one token returns its own v
    p = "model.layers.0."
    x = w["model.embed_tokens.weight"]  # [vocab, d]
    v = rms(x, w[p + "input_layernorm.weight"]) @ w[p + "self_attn.v_proj.weight"].T  # [vocab, kv·hd]
    group = CFG.num_attention_heads // CFG.num_key_value_heads
    heads = v.reshape(-1, CFG.num_key_value_heads, CFG.head_dim).repeat(group, axis=1)  # [vocab, H, hd]
    h = x + heads.reshape(len(x), -1) @ w[p + "self_attn.o_proj.weight"].T
    logits = rms(h, w[p + "post_attention_layernorm.weight"]) @ w[p + "block_sparse_moe.gate.weight"].T
    top = np.argsort(-logits, axis=1)[:, : CFG.num_experts_per_tok]  # [vocab, 2]
    share = [(top == e).any(1).mean() for e in range(CFG.num_local_experts)]
    assert min(share) > 0.2 and max(share) < 0.8, share
    assert len({tuple(sorted(r)) for r in top.tolist()}) == 6  # every pair of 4 experts occurs


# -- GGUF -----------------------------------------------------------------------------------


@pytest.mark.parametrize("key,qtype,ftype", [("f16", QT.F16, 1), ("f16_per_expert", QT.F16, 1),
                                             ("q4_0", QT.Q4_0, 2), ("q8_0", QT.Q8_0, 7)])
def test_gguf_names_shapes_types_and_metadata(tiny: dict[str, Path], key: str, qtype: QT, ftype: int) -> None:
    reader = GGUFReader(tiny[key])
    meta = _fields(reader)
    want = {
        "general.architecture": "llama", "general.type": "model", "general.name": "Tiny Mixtral",
        "general.file_type": ftype, "general.quantization_version": 2,
        "llama.context_length": 512, "llama.embedding_length": 256, "llama.block_count": 2,
        "llama.feed_forward_length": 512, "llama.rope.dimension_count": 64, "llama.rope.freq_base": 1e6,
        "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2, "llama.expert_count": 4,
        "llama.expert_used_count": 2, "llama.vocab_size": 512,
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default", "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": False,
        "tokenizer.chat_template": tokenizer_config()["chat_template"],
    }
    assert {k: meta.get(k) for k in want} == want
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    scores = meta["tokenizer.ggml.scores"]
    assert len(tokens) == len(types) == len(scores) == 512
    # special tokens come out CONTROL with score -1000 (added_tokens_decoder), bytes are BYTE
    assert tokens[:4] == ["<unk>", "<s>", "</s>", "<0x00>"] and types[:4] == [3, 3, 3, 6]
    assert scores[:3] == [-1000.0] * 3 and types[-1] == 1 and tokens[3 + 255] == "<0xFF>"

    d, f, e, kv = 256, 512, 4, 128
    shapes: dict[str, tuple[tuple[int, ...], QT]] = {
        "token_embd.weight": ((512, d), qtype), "output.weight": ((512, d), qtype),
        "output_norm.weight": ((d,), QT.F32)}
    for b in range(2):
        shapes.update({
            f"blk.{b}.attn_norm.weight": ((d,), QT.F32), f"blk.{b}.ffn_norm.weight": ((d,), QT.F32),
            f"blk.{b}.ffn_gate_inp.weight": ((e, d), QT.F32), f"blk.{b}.attn_q.weight": ((d, d), qtype),
            f"blk.{b}.attn_k.weight": ((kv, d), qtype), f"blk.{b}.attn_v.weight": ((kv, d), qtype),
            f"blk.{b}.attn_output.weight": ((d, d), qtype)})
        if key == "f16_per_expert":
            for x in range(e):
                shapes.update({f"blk.{b}.ffn_gate.{x}.weight": ((f, d), qtype),
                               f"blk.{b}.ffn_up.{x}.weight": ((f, d), qtype),
                               f"blk.{b}.ffn_down.{x}.weight": ((d, f), qtype)})
        else:
            shapes.update({f"blk.{b}.ffn_gate_exps.weight": ((e, f, d), qtype),
                           f"blk.{b}.ffn_up_exps.weight": ((e, f, d), qtype),
                           f"blk.{b}.ffn_down_exps.weight": ((e, d, f), qtype)})
    got = {t.name: (_np_shape(t), t.tensor_type) for t in reader.tensors}
    assert got == shapes


@pytest.mark.parametrize("key", ["f16", "q8_0", "q4_0"])
def test_gguf_values_are_the_hf_values(tiny: dict[str, Path], key: str) -> None:
    hf = read_hf_weights(tiny["hf"])
    t = _tensors(tiny[key])
    stacked = np.stack([hf[f"model.layers.1.block_sparse_moe.experts.{x}.w2.weight"] for x in range(4)])
    down = t["blk.1.ffn_down_exps.weight"]
    # F16 is exact; quantized blocks equal gguf-py's quantization of the HF values
    assert np.asarray(down.data).tobytes() == gguf.quants.quantize(stacked, down.tensor_type).tobytes()
    assert np.array_equal(_values(t["output_norm.weight"]), hf["model.norm.weight"])
    assert np.array_equal(_values(t["blk.0.ffn_gate_inp.weight"]), hf["model.layers.0.block_sparse_moe.gate.weight"])
    tol = {"f16": 0.0, "q8_0": 0.01, "q4_0": 0.2}[key]
    assert np.abs(_values(t["token_embd.weight"]) - hf["model.embed_tokens.weight"]).max() <= tol * 4
    assert np.abs(_values(t["output.weight"]) - hf["lm_head.weight"]).max() <= tol


def test_qk_permutation_round_trip(tiny: dict[str, Path]) -> None:
    hf = read_hf_weights(tiny["hf"])
    t = _tensors(tiny["f16"])
    hd = CFG.head_dim
    for b in range(CFG.num_hidden_layers):
        q_hf = hf[f"model.layers.{b}.self_attn.q_proj.weight"]  # [H·hd, d]
        k_hf = hf[f"model.layers.{b}.self_attn.k_proj.weight"]  # [KV·hd, d]
        q_gg, k_gg = _values(t[f"blk.{b}.attn_q.weight"]), _values(t[f"blk.{b}.attn_k.weight"])
        assert not np.array_equal(q_gg, q_hf) and not np.array_equal(k_gg, k_hf)
        assert np.array_equal(unpermute_qk(q_gg, 4), q_hf)
        assert np.array_equal(unpermute_qk(k_gg, 4, 2), k_hf)
        # the convention itself: in each head, HF rows i and i + hd/2 become rows 2i and 2i + 1
        head = 1
        for i in (0, 5, hd // 2 - 1):
            assert np.array_equal(k_gg[head * hd + 2 * i], k_hf[head * hd + i])
            assert np.array_equal(k_gg[head * hd + 2 * i + 1], k_hf[head * hd + i + hd // 2])
        assert np.array_equal(_values(t[f"blk.{b}.attn_v.weight"]), hf[f"model.layers.{b}.self_attn.v_proj.weight"])
    w = np.arange(2 * 8 * 3).reshape(16, 3)
    assert np.array_equal(unpermute_qk(permute_qk(w, 4, 2), 4, 2), w)


@pytest.mark.parametrize("qtype", ["f16", "q4_0"])
def test_per_expert_and_merged_hold_identical_expert_bytes(tiny: dict[str, Path], tmp_path: Path, qtype: str) -> None:
    if qtype == "f16":
        merged, split = _tensors(tiny["f16"]), _tensors(tiny["f16_per_expert"])
    else:
        merged = _tensors(tiny["q4_0"])
        split = _tensors(build_gguf(tiny["hf"], tmp_path / "pe.gguf", "per_expert", "q4_0"))
    for b in range(CFG.num_hidden_layers):
        for kind in ("gate", "up", "down"):
            stacked = np.asarray(merged[f"blk.{b}.ffn_{kind}_exps.weight"].data)
            for x in range(CFG.num_local_experts):
                one = np.asarray(split[f"blk.{b}.ffn_{kind}.{x}.weight"].data)
                assert stacked[x].tobytes() == one.tobytes()
    shared = set(merged) & set(split)
    assert len(shared) == 3 + 7 * 2
    assert all(np.asarray(merged[n].data).tobytes() == np.asarray(split[n].data).tobytes() for n in shared)


def test_hf_names_map_through_gguf_py() -> None:
    """hf_to_gguf names tensors through gguf-py's TensorNameMap for the arch, merges a layer's experts in the
    given order once the last one arrives (or names them per expert), and refuses what it cannot place."""
    mt = gguf.MODEL_TENSOR
    x1, x2 = np.zeros((2, 3), np.float32), np.ones((2, 3), np.float32)
    experts = {f"model.layers.1.mlp.experts.{e}.{w}.weight": x1 if e == 0 else x2
               for e in range(2) for w in ("gate_proj", "up_proj", "down_proj")}
    weights = {"model.embed_tokens.weight": x1, "model.layers.0.self_attn.q_proj.bias": x1[0], **experts,
               "model.layers.1.mlp.gate_proj.weight": x1}  # a dense-MLP layer: gguf-py's generic ffn_gate
    got = list(hf_to_gguf(weights, gguf.MODEL_ARCH.QWEN3MOE, 2, 2, ("down_proj", "gate_proj", "up_proj")))
    assert [(t, name) for t, name, _ in got] == [
        (mt.TOKEN_EMBD, "token_embd.weight"), (mt.ATTN_Q, "blk.0.attn_q.bias"),
        (mt.FFN_DOWN_EXP, "blk.1.ffn_down_exps.weight"), (mt.FFN_GATE_EXP, "blk.1.ffn_gate_exps.weight"),
        (mt.FFN_UP_EXP, "blk.1.ffn_up_exps.weight"), (mt.FFN_GATE, "blk.1.ffn_gate.weight")]
    assert got[2][2].shape == (2, 2, 3) and np.array_equal(got[2][2][1], x2)  # expert outermost
    per = [name for _, name, _ in hf_to_gguf(experts, gguf.MODEL_ARCH.QWEN3MOE, 2, 2, (), per_expert=True)]
    assert per[:3] == ["blk.1.ffn_gate.0.weight", "blk.1.ffn_up.0.weight", "blk.1.ffn_down.0.weight"]
    with pytest.raises(ValueError, match="unexpected tensor"):
        list(hf_to_gguf({"model.layers.0.mystery.weight": x1}, gguf.MODEL_ARCH.LLAMA, 1, 2, ()))
    with pytest.raises(ValueError, match="incomplete experts"):
        list(hf_to_gguf(dict(list(experts.items())[:4]), gguf.MODEL_ARCH.QWEN3MOE, 2, 2, ("down_proj",)))


def test_build_gguf_rejects_bad_arguments(tiny: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        build_gguf(tiny["hf"], tmp_path / "x.gguf", expert_layout="fused")
    with pytest.raises(ValueError):
        build_gguf(tiny["hf"], tmp_path / "x.gguf", qtype="q4_k")


# -- synthetic Mixtral-shaped GGUF ------------------------------------------------------------

SMALL = dict(d_model=256, d_ff=512, n_expert=4, n_head=4, n_kv=2, vocab=1024)


def test_synth_writes_a_readable_deterministic_file(tmp_path: Path) -> None:
    a = synth(tmp_path / "a.gguf", 2, seed=3, **SMALL)
    b = synth(tmp_path / "b.gguf", 2, seed=3, chunk_bytes=1000, **SMALL)  # many tiny chunks
    assert a.read_bytes() == b.read_bytes()
    assert synth(tmp_path / "c.gguf", 2, seed=4, **SMALL).read_bytes() != a.read_bytes()
    reader = GGUFReader(a)
    meta = _fields(reader)
    assert meta["general.architecture"] == "llama" and meta["general.file_type"] == 2
    assert (meta["llama.block_count"], meta["llama.expert_count"], meta["llama.vocab_size"]) == (2, 4, 1024)
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(tokens) == 1024 and tokens[1] == "<s>" and tokens[512] == "[PAD512]"
    assert meta["tokenizer.ggml.token_type"][1023] == 5 and meta["tokenizer.ggml.scores"][1023] == -10000.0
    t = {x.name: x for x in reader.tensors}
    assert len(t) == 3 + 10 * 2
    assert _np_shape(t["blk.1.ffn_down_exps.weight"]) == (4, 256, 512)
    assert t["blk.1.ffn_down_exps.weight"].tensor_type == QT.Q4_0
    assert t["blk.1.ffn_gate_inp.weight"].tensor_type == QT.F32 and _np_shape(t["blk.1.ffn_gate_inp.weight"]) == (4, 256)
    blocks = np.asarray(t["blk.0.ffn_gate_exps.weight"].data).reshape(-1, 18)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    assert d.min() >= 2**-8 and d.max() < 2**-7
    x = _values(t["blk.0.ffn_up_exps.weight"])
    assert np.isfinite(x).all() and 0.015 < x.std() < 0.04
    norm = _values(t["blk.0.attn_norm.weight"])
    assert 0.9 < norm.mean() < 1.1
    with pytest.raises(ValueError):
        synth(tmp_path / "bad.gguf", 0, **SMALL)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--synth", str(tmp_path / "s.gguf"), "--layers", "1", "--small"]) == 0
    assert GGUFReader(tmp_path / "s.gguf").fields["llama.block_count"].contents() == 1
    assert main([str(tmp_path / "all")]) == 0
    assert "q4_0" in capsys.readouterr().out and (tmp_path / "all/tiny-mixtral/config.json").is_file()


# -- tokenizer --------------------------------------------------------------------------------


def test_tokenizer_retrains_byte_for_byte() -> None:
    assert train_sentencepiece(TOKENIZER_DIR / "corpus.txt") == (TOKENIZER_DIR / "tokenizer.model").read_bytes()


def test_tokenizer_json_agrees_with_sentencepiece() -> None:
    import sentencepiece as spm
    from tokenizers import Tokenizer

    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER_DIR / "tokenizer.model"))
    assert (sp.vocab_size(), sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (512, 0, 1, 2, -1)
    fast = Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))
    fast.encode_special_tokens = True
    corpus = (TOKENIZER_DIR / "corpus.txt").read_text(encoding="utf-8").splitlines()
    for text in SAMPLES + corpus:
        assert fast.encode(text, add_special_tokens=False).ids == sp.encode(text), text
    assert fast.encode("Hi").ids[0] == 1  # the post-processor adds <s>
    byte_pieces = sp.encode("🙂", out_type=str)
    assert byte_pieces[-4:] == ["<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]  # byte fallback
    assert sp.encode("2024", out_type=str) == ["▁", "2", "0", "2", "4"]  # split digits
    assert sp.encode(" x", out_type=str)[0] == "▁▁"  # the dummy prefix is always added


@needs_transformers
def test_transformers_tokenizer_agrees_and_files_regenerate(tmp_path: Path) -> None:
    from fixtures.make_tokenizer import build, verify

    assert verify() == []
    work = tmp_path / "tok"
    work.mkdir()
    (work / "corpus.txt").write_bytes((TOKENIZER_DIR / "corpus.txt").read_bytes())
    build(work)
    assert _files(work) == _files(TOKENIZER_DIR)


@needs_transformers
def test_transformers_loads_the_hf_directory(tiny: dict[str, Path]) -> None:
    from transformers import AutoConfig, MixtralForCausalLM

    model, info = MixtralForCausalLM.from_pretrained(tiny["hf"], output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    config = AutoConfig.from_pretrained(tiny["hf"])
    for name, value in vars(CFG).items():
        got = getattr(config, name, None)
        if name == "rope_theta" and got is None:  # transformers 5 nests it in rope_parameters
            got = config.rope_parameters["rope_theta"]
        assert got == value, name


@pytest.mark.skipif(not (HAS_TRANSFORMERS and os.environ.get("LLAMA_CPP_CONVERT_HF_TO_GGUF")),
                    reason="set LLAMA_CPP_CONVERT_HF_TO_GGUF to llama.cpp's convert_hf_to_gguf.py (needs torch)")
@pytest.mark.parametrize("qtype", ["f16", "q8_0", "f32"])
def test_matches_llama_cpp_converter(tiny: dict[str, Path], tmp_path: Path, qtype: str) -> None:
    ref = tmp_path / f"ref-{qtype}.gguf"
    subprocess.run([sys.executable, os.environ["LLAMA_CPP_CONVERT_HF_TO_GGUF"], str(tiny["hf"]),
                    "--outtype", qtype, "--outfile", str(ref)], check=True, capture_output=True)
    ours = build_gguf(tiny["hf"], tmp_path / f"ours-{qtype}.gguf", "merged", qtype)
    assert ours.read_bytes() == ref.read_bytes()
