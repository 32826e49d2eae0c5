"""The checkpoints benchmarks/bench_full_size.py writes: full-depth Mixtral 8x7B- and Qwen3-30B-A3B-shaped GGUFs with
random valid weight blocks, streamed (a few chunks in memory whatever the size). Standard library only at import
time (bench_full_size's llama.cpp child imports it in a venv without mertools' dependencies)."""

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
    qtype: str  # every matrix's type: "q4_0" or "q4_k"
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


_M = common.MIXTRAL  # fixtures/synth.py writes this one
MIXTRAL = Shape("mixtral", "Mixtral 8x7B", "llama", "q4_0", 32, _M.d_model, _M.d_ff, _M.n_expert, _M.n_expert_used,
                _M.n_head, _M.n_kv, _M.d_model // _M.n_head, _M.vocab)
QWEN3 = Shape("qwen3", "Qwen3-30B-A3B", "qwen3moe", "q4_k", 48, 2048, 768, 128, 8, 32, 4, 128, 151936,
              d_ff_dense=6144, n_ctx=40960, rms_eps=1e-6)
SHAPES = {s.name: s for s in (MIXTRAL, QWEN3)}

# (weights per block, bytes per block) of the types written here
BLOCKS = {"f32": (1, 4), "q4_0": (32, 18), "q4_k": (256, 144)}


def tensor_plan(s: Shape, n_layers: int) -> list[tuple[str, tuple[int, ...], str]]:
    """(GGUF name, numpy shape = reversed ggml ne, type) of every tensor, in the order written."""
    d, f, e, hd = s.d_model, s.d_ff, s.n_expert, s.head_dim
    q, kv, mat = s.n_head * hd, s.n_kv * hd, s.qtype
    norm_qk = [("attn_q_norm", (hd,), "f32"), ("attn_k_norm", (hd,), "f32")] if s.arch == "qwen3moe" else []
    plan = [("token_embd.weight", (s.vocab, d), mat)]
    for b in range(n_layers):
        plan += [(f"blk.{b}.{n}.weight", shape, t) for n, shape, t in (
            ("attn_norm", (d,), "f32"), ("attn_q", (q, d), mat), ("attn_k", (kv, d), mat), ("attn_v", (kv, d), mat),
            ("attn_output", (d, q), mat), *norm_qk, ("ffn_norm", (d,), "f32"), ("ffn_gate_inp", (e, d), "f32"),
            ("ffn_gate_exps", (e, f, d), mat), ("ffn_down_exps", (e, d, f), mat), ("ffn_up_exps", (e, f, d), mat))]
    return plan + [("output_norm.weight", (d,), "f32"), ("output.weight", (s.vocab, d), mat)]


def nbytes(shape: tuple[int, ...], qtype: str) -> int:
    per, size = BLOCKS[qtype]
    n = 1
    for x in shape:
        n *= x
    return n // per * size


def sizes(s: Shape, n_layers: int) -> dict[str, int]:
    """Bytes of the tensor data: experts, the rest (dense), and one expert (its gate, up and down)."""
    plan = tensor_plan(s, n_layers)
    experts = sum(nbytes(sh, t) for n, sh, t in plan if n.endswith("_exps.weight"))
    total = sum(nbytes(sh, t) for _, sh, t in plan)
    return {"experts": experts, "dense": total - experts, "total": total, "expert": experts // (n_layers * s.n_expert)}


# ---------------------------------------------------------------- writing the checkpoints


def q4_k_chunks(name: str, shape: tuple[int, ...], seed: int, chunk_bytes: int = CHUNK_BYTES) -> Iterator[Any]:
    """A Q4_K tensor's bytes (uint8 arrays of at most ~chunk_bytes), seeded per (seed, name): random ggml
    block_q4_K bytes (f16 d, f16 dmin, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles) with d forced
    to [2^-13, 2^-12), dmin = 7.5 d and every sub-block's min equal to its scale, so that weights are
    d·sc·(q - 7.5): zero mean, sc uniform in 0..63 and q in 0..15 (std ~0.03, as fixtures/synth.py's Q4_0)."""
    import numpy as np

    bitgen = np.random.PCG64(np.random.SeedSequence([seed, zlib.crc32(name.encode())]))
    row_bytes = shape[-1] // 256 * 144
    total = nbytes(shape, "q4_k")
    rows = max(4, chunk_bytes // row_bytes // 4 * 4)  # 144-byte blocks: whole 8-byte draws, chunk-size independent
    for start in range(0, total, rows * row_bytes):
        n = min(rows * row_bytes, total - start)
        buf = bitgen.random_raw(n // 8).view(np.uint8)
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


def write_qwen3moe_gguf(path: Path, s: Shape, n_layers: int, seed: int = 0, chunk_bytes: int = CHUNK_BYTES) -> Path:
    """A qwen3moe GGUF of shape `s` with random Q4_K matrices (norms and routers F32, fixtures/synth.py's), keys
    as fixtures/tiny_families.build_gguf writes them for qwen3_moe; the committed SentencePiece vocabulary
    padded to s.vocab (as fixtures/synth.py does). Streamed: a few chunks in memory whatever the size."""
    import gguf
    import numpy as np

    from fixtures.gguf_common import TOKENIZER_DIR, add_general, add_sp_tokenizer
    from fixtures.synth import _chunks as f32_chunks
    from fixtures.synth import write_streamed

    if s.d_model % 256 or s.d_ff % 256 or (s.n_head * s.head_dim) % 256:
        raise ValueError("Q4_K rows need widths that are multiples of 256")
    plan = tensor_plan(s, n_layers)
    f32, q4_k = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.Q4_K
    w = gguf.GGUFWriter(path, s.arch)
    for name, shape, t in plan:
        if t == "f32":
            w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes(shape, t), raw_dtype=f32)
        else:  # declared by their byte shape, as add_tensor would
            w.add_tensor_info(name, (*shape[:-1], shape[-1] // 256 * 144), np.dtype(np.uint8), nbytes(shape, t),
                              raw_dtype=q4_k)
    add_general(w, TOKENIZER_DIR, f"Synthetic {s.title}")
    w.add_block_count(n_layers)
    w.add_context_length(s.n_ctx)
    w.add_embedding_length(s.d_model)
    w.add_feed_forward_length(s.d_ff_dense)
    w.add_head_count(s.n_head)
    w.add_head_count_kv(s.n_kv)
    w.add_rope_freq_base(s.rope_theta)
    w.add_layer_norm_rms_eps(s.rms_eps)
    w.add_expert_count(s.n_expert)
    w.add_expert_used_count(s.n_expert_used)
    w.add_key_length(s.head_dim)
    w.add_value_length(s.head_dim)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_S)
    w.add_expert_feed_forward_length(s.d_ff)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_sp_tokenizer(w, TOKENIZER_DIR, s.vocab)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()

    def chunks(name: str, shape: tuple[int, ...], t: str) -> Iterator[Any]:
        return f32_chunks(name, shape, f32, seed, chunk_bytes) if t == "f32" else q4_k_chunks(name, shape, seed, chunk_bytes)

    write_streamed(w, [lambda n=name, sh=shape, t=t: chunks(n, sh, t) for name, shape, t in plan])
    return path


def write_gguf(path: Path, s: Shape, n_layers: int, seed: int) -> Path:
    if s.name == "mixtral":
        from fixtures.synth import synth_mixtral_gguf

        return synth_mixtral_gguf(path, n_layers, seed=seed, **common.MIXTRAL.kwargs())
    return write_qwen3moe_gguf(path, s, n_layers, seed)
