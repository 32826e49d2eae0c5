"""A plain-numpy MoE forward pass: the reference the runtime and its kernels are checked against.

It is deliberately independent of `mertools.runtime` and of the numba kernels: quantized weights
are dequantized with gguf-py (`gguf.quants.dequantize`), float weights with numpy, and the model
follows HF transformers' `MixtralForCausalLM` step by step:

- RMSNorm: `w * (x * rsqrt(mean(x^2) + eps))`;
- rotary embeddings on HF-ordered q/k (rotate-half, `inv_freq = 1 / theta^(arange(0, hd, 2) / hd)`,
  positions 0..n-1);
- grouped-query attention (query head h reads kv head h // (n_heads / n_kv_heads)) with a causal
  mask and, when `sliding_window` is set, HF's window: query i sees keys j with i - window < j <= i;
- softmax router over all experts -> top-k -> top-k weights renormalised to sum to 1 when
  `norm_topk_prob` (Mixtral always does). Exact ties go to the lower expert index; torch.topk's
  choice among exact ties is unspecified (torch 2.13 on CPU picks experts 2, 3 of four equal ones),
  so nothing can match it there. Exact ties need degenerate router weights (e.g. zero rows);
- SwiGLU experts `(silu(x @ G.T) * (x @ U.T)) @ D.T`; final norm; lm_head or tied embeddings.

The other families' pieces follow their HF classes, chosen by config fields: q/k/v biases and a shared
expert scaled by `sigmoid(x . shared_expert_gate)` (Qwen2MoeSparseMoeBlock), RMSNorm of q and k per
head (Qwen3MoeAttention) or over the whole projection (OlmoeAttention), dense SwiGLU MLPs in the
layers listed in `dense_layers` (Qwen's mlp_only_layers), top-k weights not renormalised when
`norm_topk_prob` is false.

Weights are held as float32 (exactly the dequantized values) and every activation is computed in
float64 by default, so rounding in the reference is far below that of any float32 implementation
(HF's included: its rotary angles, for one, are float32). Everything is in RAM: tiny models only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..layout.config import ModelConfig

EXPERT_ROLES = ("gate", "up", "down")


def dequantize(raw: np.ndarray, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Stored bytes (uint8, any shape) of a tensor of `dtype` -> float32 array of `shape`.

    Float types with numpy, every GGML block type with gguf-py; never the project's own kernels.
    """
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    if dtype == "f32":
        out = raw.view(np.float32)
    elif dtype == "f16":
        out = raw.view(np.float16).astype(np.float32)
    elif dtype == "bf16":
        out = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)  # bf16 = top half of f32
    else:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize as gguf_dequantize

        try:
            qtype = GGMLQuantizationType[dtype.upper()]
        except KeyError:
            raise ValueError(f"unknown tensor dtype {dtype!r}") from None
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        out = gguf_dequantize(raw.reshape(rows, -1), qtype)  # (rows, cols) float32
    out = np.asarray(out, dtype=np.float32)
    if out.size != int(np.prod(shape)):
        raise ValueError(f"{dtype} tensor of shape {list(shape)}: {raw.size} bytes decode to {out.size} values")
    return out.reshape(shape)


@dataclass
class LayerWeights:
    attn_norm: np.ndarray  # (d_model,)
    wq: np.ndarray  # (n_heads * head_dim, d_model), HF row order
    wk: np.ndarray  # (n_kv_heads * head_dim, d_model), HF row order
    wv: np.ndarray  # (n_kv_heads * head_dim, d_model)
    wo: np.ndarray  # (d_model, n_heads * head_dim)
    ffn_norm: np.ndarray  # (d_model,)
    router: np.ndarray | None  # (n_experts, d_model); None in a dense-MLP layer
    experts: list[dict[str, np.ndarray]]  # per expert: gate/up (d_ff, d_model), down (d_model, d_ff); [] if dense
    bias: dict[str, np.ndarray] | None = None  # "q" (q_dim,), "k"/"v" (kv_dim,) when config.attn_bias
    q_norm: np.ndarray | None = None  # (head_dim,) or (q_dim,) by config.qk_norm
    k_norm: np.ndarray | None = None  # (head_dim,) or (kv_dim,)
    mlp: dict[str, np.ndarray] | None = None  # dense-MLP layer: gate/up (d_ff_dense, d_model), down (d_model, d_ff_dense)
    shared: dict[str, np.ndarray] | None = None  # shared expert: gate/up (d_ff_shared, d_model), down
    shared_gate: np.ndarray | None = None  # (1, d_model)


class ReferenceModel:
    def __init__(self, config: ModelConfig, dense: dict[str, np.ndarray],
                 experts: dict[tuple[int, int], dict[str, np.ndarray]], compute_dtype: type = np.float64) -> None:
        """`dense`: layout name -> float32 array; `experts`: (layer, expert) -> {role: float32 array}."""
        self.config = config
        self.compute_dtype = compute_dtype
        c = config
        self.embed = dense["token_embd.weight"]  # (vocab, d_model)
        self.output_norm = dense["output_norm.weight"]  # (d_model,)
        # a tied model has no output.weight: the logits reuse the embedding matrix
        self.lm_head = dense.get("output.weight", self.embed)  # (vocab, d_model)
        self.dense, self.experts = dense, experts  # as given, for the transformers reference
        self.layers: list[LayerWeights] = []
        for n in range(c.n_layers):
            p = f"blk.{n}."
            moe = c.is_moe_layer(n)

            def triple(suffix: str, p: str = p) -> dict[str, np.ndarray]:
                return {r: dense[f"{p}ffn_{r}{suffix}.weight"] for r in EXPERT_ROLES}

            self.layers.append(LayerWeights(
                attn_norm=dense[p + "attn_norm.weight"], wq=dense[p + "attn_q.weight"], wk=dense[p + "attn_k.weight"],
                wv=dense[p + "attn_v.weight"], wo=dense[p + "attn_output.weight"], ffn_norm=dense[p + "ffn_norm.weight"],
                router=dense[p + "ffn_gate_inp.weight"] if moe else None,
                experts=[experts[(n, e)] for e in range(c.n_experts)] if moe else [],
                bias={x: dense[f"{p}attn_{x}.bias"] for x in "qkv"} if c.attn_bias else None,
                q_norm=dense[p + "attn_q_norm.weight"] if c.qk_norm != "none" else None,
                k_norm=dense[p + "attn_k_norm.weight"] if c.qk_norm != "none" else None,
                mlp=None if moe else triple(""),
                shared=triple("_shexp") if moe and c.d_ff_shared else None,
                shared_gate=dense[p + "ffn_gate_inp_shexp.weight"] if moe and c.shared_expert_gate else None,
            ))
        self._check_shapes()

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_source(cls, path: str | Path, compute_dtype: type = np.float64) -> ReferenceModel:
        """A HF model directory or a GGUF file (merged or per-expert), every weight as float32."""
        from ..convert.source import open_source

        src = open_source(path)
        if src.config.rope_style != "neox":
            raise ValueError(f"{path}: rope_style {src.config.rope_style!r}; the reference expects HF order (neox)")
        # read_raw() has already undone llama.cpp's q/k row permutation
        dense = {name: dequantize(t.read_raw(), t.dtype, tuple(t.shape)) for name, _spec, t in src.dense_tensors()}
        experts = {}
        for layer in src.config.moe_layers:
            for e in range(src.config.n_experts):
                ts = src.expert_tensors(layer, e)
                experts[(layer, e)] = {r: dequantize(ts[r].read_raw(), ts[r].dtype, tuple(ts[r].shape)) for r in EXPERT_ROLES}
        return cls(src.config, dense, experts, compute_dtype)

    @classmethod
    def from_layout(cls, layout_dir: str | Path, compute_dtype: type = np.float64) -> ReferenceModel:
        """A mertools layout (validated by Layout.open), every weight as float32."""
        from ..layout import Layout

        layout = Layout.open(layout_dir)
        m = layout.manifest
        dense = {name: dequantize(layout.read_dense(name), t.dtype, tuple(t.shape)) for name, t in m.dense.items()}
        experts = {}
        for entry in m.experts:
            experts[(entry.layer, entry.expert)] = {
                r: dequantize(layout.read_expert(entry.layer, entry.expert, r), t.dtype, tuple(t.shape))
                for r, t in entry.tensors.items()
            }
        return cls(m.config, dense, experts, compute_dtype)

    def _check_shapes(self) -> None:
        c = self.config
        q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        want = {"embed": (c.vocab_size, c.d_model), "lm_head": (c.vocab_size, c.d_model), "output_norm": (c.d_model,)}
        for name, shape in want.items():
            if getattr(self, name).shape != shape:
                raise ValueError(f"{name} has shape {getattr(self, name).shape}, the config implies {shape}")
        for n, lw in enumerate(self.layers):
            want = {"attn_norm": (c.d_model,), "wq": (q, c.d_model), "wk": (kv, c.d_model), "wv": (kv, c.d_model),
                    "wo": (c.d_model, q), "ffn_norm": (c.d_model,)}
            if lw.router is not None:
                want["router"] = (c.n_experts, c.d_model)
            for name, shape in want.items():
                if getattr(lw, name).shape != shape:
                    raise ValueError(f"layer {n} {name} has shape {getattr(lw, name).shape}, the config implies {shape}")
            for e, ex in enumerate(lw.experts):
                for r, shape in (("gate", (c.d_ff, c.d_model)), ("up", (c.d_ff, c.d_model)), ("down", (c.d_model, c.d_ff))):
                    if ex[r].shape != shape:
                        raise ValueError(f"layer {n} expert {e} {r} has shape {ex[r].shape}, the config implies {shape}")

    # ------------------------------------------------------------------ forward
    def forward(self, token_ids: list[int]) -> np.ndarray:
        """Logits (len, vocab) float32 of the whole sequence, positions 0..len-1, no cache."""
        ids = np.asarray(token_ids, dtype=np.int64)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError("token_ids must be a non-empty 1-D sequence")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size})")
        dt = self.compute_dtype
        x = self.embed[ids].astype(dt)  # (T, d_model)
        cos, sin = self.rope_tables(len(ids))  # (T, head_dim) each
        mask = self.attention_mask(len(ids))  # (T, T) bool, True = may attend
        for lw in self.layers:
            x = x + self.attention(rms_norm(x, lw.attn_norm, self.config.norm_eps), lw, cos, sin, mask)
            h = rms_norm(x, lw.ffn_norm, self.config.norm_eps)
            x = x + (self.moe(h, lw) if lw.router is not None else self.mlp(h, lw.mlp))
        x = rms_norm(x, self.output_norm, self.config.norm_eps)
        return (x @ self.lm_head.T.astype(dt, copy=False)).astype(np.float32)  # (T, vocab)

    def rope_tables(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin (n, head_dim) as HF builds them: angles pos * inv_freq, the half repeated twice."""
        hd = self.config.head_dim
        inv_freq = 1.0 / (self.config.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))  # (hd/2,)
        freqs = np.arange(n, dtype=np.float64)[:, None] * inv_freq[None, :]  # (n, hd/2)
        emb = np.concatenate([freqs, freqs], axis=-1)  # (n, hd)
        return np.cos(emb).astype(self.compute_dtype), np.sin(emb).astype(self.compute_dtype)

    def attention_mask(self, n: int) -> np.ndarray:
        """(n, n) bool: causal, and within the sliding window (kv > q - window, as HF's overlay)."""
        q = np.arange(n)[:, None]
        kv = np.arange(n)[None, :]
        allowed = kv <= q
        if self.config.sliding_window is not None:
            allowed &= kv > q - self.config.sliding_window
        return allowed

    def attention(self, h: np.ndarray, lw: LayerWeights, cos: np.ndarray, sin: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """h (T, d_model) -> (T, d_model)."""
        c = self.config
        dt = self.compute_dtype
        T, hd = h.shape[0], c.head_dim
        q, k, v = (h @ lw.wq.T.astype(dt, copy=False), h @ lw.wk.T.astype(dt, copy=False),
                   h @ lw.wv.T.astype(dt, copy=False))  # (T, H*hd), (T, KV*hd) x2
        if lw.bias is not None:
            q, k, v = q + lw.bias["q"], k + lw.bias["k"], v + lw.bias["v"]
        if c.qk_norm == "full":  # OlmoeAttention: over the whole projection
            q, k = rms_norm(q, lw.q_norm, c.norm_eps), rms_norm(k, lw.k_norm, c.norm_eps)
        q = q.reshape(T, c.n_heads, hd).transpose(1, 0, 2)  # (H, T, hd)
        k = k.reshape(T, c.n_kv_heads, hd).transpose(1, 0, 2)  # (KV, T, hd)
        v = v.reshape(T, c.n_kv_heads, hd).transpose(1, 0, 2)  # (KV, T, hd)
        if c.qk_norm == "head":  # Qwen3MoeAttention: each head over head_dim
            q, k = rms_norm(q, lw.q_norm, c.norm_eps), rms_norm(k, lw.k_norm, c.norm_eps)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        # repeat_kv: kv head j serves query heads j*rep .. j*rep + rep - 1
        rep = c.n_heads // c.n_kv_heads
        k = np.repeat(k, rep, axis=0)  # (H, T, hd)
        v = np.repeat(v, rep, axis=0)  # (H, T, hd)
        scores = (q @ k.transpose(0, 2, 1)) * (hd ** -0.5)  # (H, T, T)
        scores = np.where(mask[None], scores, -np.inf)
        probs = softmax(scores)  # (H, T, T); the diagonal is always allowed, so no row is all -inf
        out = (probs @ v).transpose(1, 0, 2).reshape(T, c.n_heads * hd)  # (T, H*hd)
        return out @ lw.wo.T.astype(dt, copy=False)  # (T, d_model)

    def route(self, h: np.ndarray, lw: LayerWeights) -> tuple[np.ndarray, np.ndarray]:
        """h (T, d_model) -> (experts (T, k) int, weights (T, k)), best expert first."""
        c = self.config
        probs = softmax(h @ lw.router.T.astype(self.compute_dtype))  # (T, n_experts)
        # stable sort of -p: equal probabilities keep the lower expert index first (deterministic)
        top = np.argsort(-probs, axis=-1, kind="stable")[:, : c.n_experts_used]  # (T, k)
        w = np.take_along_axis(probs, top, axis=-1)  # (T, k)
        if c.norm_topk_prob:
            w = w / w.sum(axis=-1, keepdims=True)
        return top, w

    def moe(self, h: np.ndarray, lw: LayerWeights) -> np.ndarray:
        """h (T, d_model) -> (T, d_model): weighted sum of the chosen experts' SwiGLU outputs."""
        dt = self.compute_dtype
        top, w = self.route(h, lw)
        out = np.zeros_like(h)
        for e, ex in enumerate(lw.experts):
            tok, slot = np.nonzero(top == e)  # tokens that chose expert e, and in which top-k slot
            if tok.size == 0:
                continue
            np.add.at(out, tok, self.mlp(h[tok], ex) * w[tok, slot][:, None])
        if lw.shared is not None:  # Qwen2MoeSparseMoeBlock: every token, scaled by sigmoid(x . gate)
            gate = 1.0 / (1.0 + np.exp(-(h @ lw.shared_gate.T.astype(dt)))) if lw.shared_gate is not None else 1.0  # (T, 1)
            out = out + gate * self.mlp(h, lw.shared)
        return out

    def mlp(self, x: np.ndarray, w: dict[str, np.ndarray]) -> np.ndarray:
        """SwiGLU x (t, d_model) -> (t, d_model) with w gate/up (d_ff, d_model), down (d_model, d_ff)."""
        dt = self.compute_dtype
        act = silu(x @ w["gate"].T.astype(dt, copy=False)) * (x @ w["up"].T.astype(dt, copy=False))  # (t, d_ff)
        return act @ w["down"].T.astype(dt, copy=False)  # (t, d_model)


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """x (T, d) -> w * (x * rsqrt(mean(x^2) + eps)), in HF's MixtralRMSNorm order (weight applied last)."""
    var = np.mean(x * x, axis=-1, keepdims=True)  # (T, 1)
    return w.astype(x.dtype) * (x * (1.0 / np.sqrt(var + eps)))


def rotate_half(x: np.ndarray) -> np.ndarray:
    """(..., hd) -> (..., hd): [-x2, x1] where x1, x2 are the two halves (HF's rotate_half)."""
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, max-subtracted (masked entries are -inf and give 0)."""
    m = np.max(x, axis=-1, keepdims=True)
    e = np.exp(x - m)
    return e / np.sum(e, axis=-1, keepdims=True)


def silu(x: np.ndarray) -> np.ndarray:
    """x * sigmoid(x), with sigmoid as 0.5 * (1 + tanh(x / 2)) so no exp overflows."""
    return x * (0.5 * (1.0 + np.tanh(0.5 * x)))
