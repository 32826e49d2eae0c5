"""The checkpoints benchmarks/bench_full_size.py writes: full-depth Mixtral 8x7B- and Qwen3-30B-A3B-shaped GGUFs with
random valid weight blocks, streamed (a few chunks in memory whatever the size); and gpt-oss-20b-shaped ones
(benchmarks/bench_decode_shapes.py --shape gpt_oss). Standard library only at import time (bench_full_size's
llama.cpp child imports it in a venv without mertools' dependencies)."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import _common as common

CHUNK_BYTES = 16 << 20

# ---------------------------------------------------------------- shapes


@dataclass(frozen=True)
class Shape:
    name: str
    title: str
    arch: str  # GGUF general.architecture
    qtype: str  # the experts' type, and every other matrix's unless dense_qtype says: "q4_0", "q4_k" or "mxfp4"
    n_layers: int
    d_model: int
    d_ff: int  # expert width
    n_expert: int
    n_expert_used: int
    n_head: int
    n_kv: int
    head_dim: int
    vocab: int
    d_ff_dense: int = 0  # {arch}.feed_forward_length where the arch has the key apart from the experts' width
    n_ctx: int = 32768
    rope_theta: float = 1e6
    rms_eps: float = 1e-5
    dense_qtype: str = ""  # the other matrices' type where it is not qtype's (llama.cpp's MXFP4_MOE preset: q8_0)
    sliding_window: int = 0  # {arch}.attention.sliding_window: every other layer slides, from layer 0 (gpt-oss)


_M = common.MIXTRAL  # fixtures/synth.py writes this one
MIXTRAL = Shape("mixtral", "Mixtral 8x7B", "llama", "q4_0", 32, _M.d_model, _M.d_ff, _M.n_expert, _M.n_expert_used,
                _M.n_head, _M.n_kv, _M.d_model // _M.n_head, _M.vocab)
QWEN3 = Shape("qwen3", "Qwen3-30B-A3B", "qwen3moe", "q4_k", 48, 2048, 768, 128, 8, 32, 4, 128, 151936,
              d_ff_dense=6144, n_ctx=40960, rms_eps=1e-6)
# gpt-oss-20b (24 layers): experts MXFP4, the other matrices Q8_0 as llama.cpp's MXFP4_MOE preset makes them
# (src/llama-quant.cpp: "MoE tensors -> MXFP4, other tensors -> Q8_0", token_embd and output included); norms,
# router, biases and sinks F32. Not in SHAPES: bench_full_size builds every shape there.
GPT_OSS = Shape("gpt_oss", "gpt-oss-20b", "gpt-oss", "mxfp4", 24, 2880, 2880, 32, 4, 64, 8, 64, 201088,
                d_ff_dense=2880, n_ctx=131072, rope_theta=150000.0, dense_qtype="q8_0", sliding_window=128)
GPT_OSS_YARN = (32.0, 4096)  # gpt-oss' rope.scaling.factor and original_context_length (its GGUFs have no beta keys)
SHAPES = {s.name: s for s in (MIXTRAL, QWEN3)}

# (weights per block, bytes per block) of the types written here
BLOCKS = {"f32": (1, 4), "q4_0": (32, 18), "q4_k": (256, 144), "mxfp4": (32, 17), "q8_0": (32, 34)}


def tensor_plan(s: Shape, n_layers: int) -> list[tuple[str, tuple[int, ...], str]]:
    """(GGUF name, numpy shape = reversed ggml ne, type) of every tensor, in the order written."""
    d, f, e, hd = s.d_model, s.d_ff, s.n_expert, s.head_dim
    q, kv, mat, dense = s.n_head * hd, s.n_kv * hd, s.qtype, s.dense_qtype or s.qtype
    if s.arch == "gpt-oss":  # llama.cpp's llama_model_openai_moe::load_arch_tensors
        layer = [("attn_norm.weight", (d,), "f32"), ("attn_q.weight", (q, d), dense), ("attn_q.bias", (q,), "f32"),
                 ("attn_k.weight", (kv, d), dense), ("attn_k.bias", (kv,), "f32"), ("attn_v.weight", (kv, d), dense),
                 ("attn_v.bias", (kv,), "f32"), ("attn_output.weight", (d, q), dense), ("attn_output.bias", (d,), "f32"),
                 ("attn_sinks.weight", (s.n_head,), "f32"), ("post_attention_norm.weight", (d,), "f32"),
                 ("ffn_gate_inp.weight", (e, d), "f32"), ("ffn_gate_inp.bias", (e,), "f32"),
                 ("ffn_gate_exps.weight", (e, f, d), mat), ("ffn_gate_exps.bias", (e, f), "f32"),
                 ("ffn_down_exps.weight", (e, d, f), mat), ("ffn_down_exps.bias", (e, d), "f32"),
                 ("ffn_up_exps.weight", (e, f, d), mat), ("ffn_up_exps.bias", (e, f), "f32")]
    else:
        norm_qk = [("attn_q_norm.weight", (hd,), "f32"), ("attn_k_norm.weight", (hd,), "f32")] if s.arch == "qwen3moe" else []
        layer = [("attn_norm.weight", (d,), "f32"), ("attn_q.weight", (q, d), dense), ("attn_k.weight", (kv, d), dense),
                 ("attn_v.weight", (kv, d), dense), ("attn_output.weight", (d, q), dense), *norm_qk,
                 ("ffn_norm.weight", (d,), "f32"), ("ffn_gate_inp.weight", (e, d), "f32"),
                 ("ffn_gate_exps.weight", (e, f, d), mat), ("ffn_down_exps.weight", (e, d, f), mat),
                 ("ffn_up_exps.weight", (e, f, d), mat)]
    plan = [("token_embd.weight", (s.vocab, d), dense)]
    for b in range(n_layers):
        plan += [(f"blk.{b}.{n}", shape, t) for n, shape, t in layer]
    return plan + [("output_norm.weight", (d,), "f32"), ("output.weight", (s.vocab, d), dense)]


def nbytes(shape: tuple[int, ...], qtype: str) -> int:
    per, size = BLOCKS[qtype]
    n = 1
    for x in shape:
        n *= x
    return n // per * size


def sizes(s: Shape, n_layers: int) -> dict[str, int]:
    """Bytes of the tensor data: experts, the rest (dense), and one expert (its gate, up and down, and their biases
    where the arch has them: a layout keeps them in the expert's file)."""
    plan = tensor_plan(s, n_layers)
    experts = sum(nbytes(sh, t) for n, sh, t in plan if "_exps." in n)
    total = sum(nbytes(sh, t) for _, sh, t in plan)
    return {"experts": experts, "dense": total - experts, "total": total, "expert": experts // (n_layers * s.n_expert)}


# ---------------------------------------------------------------- writing the checkpoints


def random_rows(name: str, shape: tuple[int, ...], qtype: str, seed: int, chunk_bytes: int = CHUNK_BYTES) -> Iterator[Any]:
    """A quantized tensor's bytes as random uint8 arrays of whole rows (at most ~chunk_bytes, at least 8 rows),
    seeded per (seed, name). A multiple of 8 rows is a multiple of 8 bytes, so the stream (8 bytes per draw) and
    thus the file does not depend on the chunk size. The *_chunks below make the blocks' scales sane."""
    import numpy as np

    bitgen = np.random.PCG64(np.random.SeedSequence([seed, zlib.crc32(name.encode())]))
    row_bytes, total = nbytes(shape[-1:], qtype), nbytes(shape, qtype)
    rows = max(8, chunk_bytes // row_bytes // 8 * 8)
    for start in range(0, total, rows * row_bytes):
        n = min(rows * row_bytes, total - start)
        yield bitgen.random_raw((n + 7) // 8).view(np.uint8)[:n]


def q4_k_chunks(name: str, shape: tuple[int, ...], seed: int, chunk_bytes: int = CHUNK_BYTES) -> Iterator[Any]:
    """A Q4_K tensor's bytes (uint8 arrays of at most ~chunk_bytes), seeded per (seed, name): random ggml
    block_q4_K bytes (f16 d, f16 dmin, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles) with d forced
    to [2^-13, 2^-12), dmin = 7.5 d and every sub-block's min equal to its scale, so that weights are
    d·sc·(q - 7.5): zero mean, sc uniform in 0..63 and q in 0..15 (std ~0.03, as fixtures/synth.py's Q4_0)."""
    import numpy as np

    for buf in random_rows(name, shape, "q4_k", seed, chunk_bytes):
        b = buf.reshape(-1, 144)
        d = b[:, 0:2].view("<u2")
        d &= 0x03FF  # random mantissa,
        d |= 0x0800  # sign +, exponent 2^-13
        b[:, 2:4].view("<u2")[...] = (d.view(np.float16).astype(np.float32) * 7.5).astype(np.float16).view("<u2")
        # scales[0..3] low 6 bits: sc 0-3, top 2 bits: sc 4-7's high bits; scales[4..7] the same for the mins;
        # scales[8..11]: low nibble sc 4-7, high nibble min 4-7 (ggml's get_scale_min_k4)
        b[:, 8:12] = b[:, 4:8]
        b[:, 12:16] = (b[:, 12:16] & 0x0F) * 0x11
        yield buf


def mxfp4_chunks(name: str, shape: tuple[int, ...], seed: int, chunk_bytes: int = CHUNK_BYTES) -> Iterator[Any]:
    """An MXFP4 tensor's bytes: random ggml block_mxfp4 (an E8M0 exponent byte e, 16 bytes of nibbles q) with
    e = 120, so that weights are K[q]·2^(e - 128) = K[q] / 256, K = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, ... -12):
    zero mean, std sqrt(34.25) / 256 ~ 0.023."""
    for buf in random_rows(name, shape, "mxfp4", seed, chunk_bytes):
        buf.reshape(-1, 17)[:, 0] = 120
        yield buf


def q8_0_chunks(name: str, shape: tuple[int, ...], seed: int, chunk_bytes: int = CHUNK_BYTES) -> Iterator[Any]:
    """A Q8_0 tensor's bytes: random ggml block_q8_0 (f16 d, 32 int8 q) with d forced to [2^-12, 2^-11) and q
    in -127..127 (-128, which ggml's quantizer never writes, made -127): weights d·q, std ~0.027."""
    for buf in random_rows(name, shape, "q8_0", seed, chunk_bytes):
        b = buf.reshape(-1, 34)
        d = b[:, 0:2].view("<u2")
        d &= 0x03FF  # random mantissa,
        d |= 0x0C00  # sign +, exponent 2^-12
        q = b[:, 2:]
        q[q == 0x80] = 0x81
        yield buf


def bias_chunks(name: str, shape: tuple[int, ...], seed: int) -> Iterator[Any]:
    """A bias' (or gpt-oss' attention sinks') F32 bytes, seeded per (seed, name): N(0, 0.02²)."""
    import numpy as np

    rng = np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(name.encode())]))
    yield (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)).view(np.uint8).reshape(-1)


QUANT_CHUNKS = {"q4_k": q4_k_chunks, "mxfp4": mxfp4_chunks, "q8_0": q8_0_chunks}


def _write_streamed_gguf(path: Path, s: Shape, n_layers: int, seed: int, chunk_bytes: int) -> Path:
    """The GGUF of tensor_plan(s, n_layers): tensor infos, general.*, the {arch}.* keys in convert_hf_to_gguf.py's
    order (TextModel.set_gguf_parameters, then the model's own), the committed SentencePiece vocabulary padded to
    s.vocab (as fixtures/synth.py does); then every tensor's data streamed (a few chunks in memory whatever the
    size). Matrices: QUANT_CHUNKS' random blocks; F32: norms ~1 and routers as fixtures/synth.py's, biases and
    sinks small."""
    import gguf
    import numpy as np

    from fixtures.gguf_common import TOKENIZER_DIR, add_general, add_sp_tokenizer
    from fixtures.synth import _chunks as f32_chunks
    from fixtures.synth import write_streamed

    plan = tensor_plan(s, n_layers)
    for name, shape, t in plan:
        if t != "f32" and shape[-1] % BLOCKS[t][0]:
            raise ValueError(f"{name}: rows of {shape[-1]} weights are not whole {t} blocks of {BLOCKS[t][0]}")
    f32 = gguf.GGMLQuantizationType.F32
    w = gguf.GGUFWriter(path, s.arch)
    for name, shape, t in plan:
        if t == "f32":
            w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes(shape, t), raw_dtype=f32)
        else:  # declared by their byte shape, as add_tensor would
            w.add_tensor_info(name, (*shape[:-1], nbytes(shape[-1:], t)), np.dtype(np.uint8), nbytes(shape, t),
                              raw_dtype=gguf.GGMLQuantizationType[t.upper()])
    add_general(w, TOKENIZER_DIR, f"Synthetic {s.title}")
    w.add_block_count(n_layers)
    w.add_context_length(s.n_ctx)
    w.add_embedding_length(s.d_model)
    w.add_feed_forward_length(s.d_ff_dense)
    w.add_head_count(s.n_head)
    w.add_head_count_kv(s.n_kv)
    if s.arch == "gpt-oss":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(GPT_OSS_YARN[0])
        w.add_rope_scaling_orig_ctx_len(GPT_OSS_YARN[1])
    w.add_rope_freq_base(s.rope_theta)
    w.add_layer_norm_rms_eps(s.rms_eps)
    w.add_expert_count(s.n_expert)
    w.add_expert_used_count(s.n_expert_used)
    w.add_key_length(s.head_dim)
    w.add_value_length(s.head_dim)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_MXFP4_MOE if s.qtype == "mxfp4" else gguf.LlamaFileType.MOSTLY_Q4_K_S)
    if s.sliding_window:
        w.add_sliding_window(s.sliding_window)
    w.add_expert_feed_forward_length(s.d_ff)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_sp_tokenizer(w, TOKENIZER_DIR, s.vocab)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()

    def chunks(name: str, shape: tuple[int, ...], t: str) -> Iterator[Any]:
        if t != "f32":
            return QUANT_CHUNKS[t](name, shape, seed, chunk_bytes)
        if name.endswith(".bias") or ".attn_sinks." in name:
            return bias_chunks(name, shape, seed)
        return f32_chunks(name, shape, f32, seed, chunk_bytes)

    write_streamed(w, [lambda n=name, sh=shape, t=t: chunks(n, sh, t) for name, shape, t in plan])
    return path


def write_qwen3moe_gguf(path: Path, s: Shape, n_layers: int, seed: int = 0, chunk_bytes: int = CHUNK_BYTES) -> Path:
    """A qwen3moe GGUF of shape `s` with random Q4_K matrices (norms and routers F32, fixtures/synth.py's), keys
    as fixtures/tiny_families.build_gguf writes them for qwen3_moe; the committed SentencePiece vocabulary
    padded to s.vocab (as fixtures/synth.py does). Streamed: a few chunks in memory whatever the size."""
    return _write_streamed_gguf(path, s, n_layers, seed, chunk_bytes)


def write_gpt_oss_gguf(path: Path, s: Shape, n_layers: int, seed: int = 0, chunk_bytes: int = CHUNK_BYTES) -> Path:
    """A gpt-oss GGUF of shape `s` with random MXFP4 experts and Q8_0 attention, embedding and output (llama.cpp's
    MXFP4_MOE preset), F32 norms, routers, biases and sinks; keys as llama.cpp's convert_hf_to_gguf.py
    (GptOssModel) writes them for gpt-oss-20b, YaRN as its GGUF has it (GPT_OSS_YARN); no sliding_window_pattern
    key: llama.cpp and mertools both slide layers 0, 2, 4, ... The committed SentencePiece vocabulary padded to
    s.vocab (gpt-oss' own is a GPT-2 BPE one: only token ids matter here). Streamed like write_qwen3moe_gguf."""
    return _write_streamed_gguf(path, s, n_layers, seed, chunk_bytes)


def write_gguf(path: Path, s: Shape, n_layers: int, seed: int) -> Path:
    if s.name == "mixtral":
        from fixtures.synth import synth_mixtral_gguf

        return synth_mixtral_gguf(path, n_layers, seed=seed, **common.MIXTRAL.kwargs())
    if s.arch == "gpt-oss":
        return write_gpt_oss_gguf(path, s, n_layers, seed)
    return write_qwen3moe_gguf(path, s, n_layers, seed)
