"""A plain-numpy MoE forward pass: the reference the runtime and its kernels are checked against.

It is independent of `mertools.runtime` and of the numba kernels: quantized weights are dequantized
with gguf-py (`gguf.quants.dequantize`), float weights with numpy, and every activation is computed in
float64 by default, so rounding here is far below that of any float32 implementation (HF's included:
its rotary angles, for one, are float32). It runs the same family definitions as the runtime
(`mertools.families`: typed weights loaded through the family's name tables, the family's pieces for
attention inputs, routing and shared experts) on a numpy backend; HF transformers, each family's own
class, stays the independent oracle in the tests. What is written here follows HF's decoders:

- RMSNorm: `w * (x * rsqrt(mean(x^2) + eps))`;
- rotary embeddings on HF-ordered q/k (rotate-half, `inv_freq = 1 / theta^(arange(0, rd, 2) / rd)`,
  positions 0..n-1) over the first rd = `rotary_dim` dims of each head (the family's `rotary` piece;
  rd < head_dim is HF's partial rotary);
- grouped-query attention (query head h reads kv head h // (n_heads / n_kv_heads)) with a causal
  mask and, in layers with a window (`cfg.window(layer)`), HF's: query i sees keys j with
  i - window < j <= i; attention sinks as HF's eager_attention_forward: one more logit per
  head in the softmax, dropped after it;
- experts chosen by the family's routing; exact ties go to the lower expert index (torch.topk's
  choice among exact ties is unspecified, so nothing can match it there; exact ties need degenerate
  router weights, e.g. zero rows); SwiGLU experts `(silu(x @ G.T) * (x @ U.T)) @ D.T`, or the family's
  `expert_mlp` piece (expert biases, a clamped GLU); final norm; lm_head or tied embeddings.

Weights are held as float32 (exactly the dequantized values). Everything is in RAM: tiny models only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..families import get_family
from ..families.base import fmt, resolve_shape
from ..families.pieces import glu, softmax
from ..families.weights import GlobalWeights, LayerWeights, Mlp, load_globals, load_layer
from ..layout.config import ModelConfig


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


class NumpyOps:
    """`families.pieces.Ops` on float32 arrays, computed in `dtype` (float64 by default)."""

    def __init__(self, dtype: type) -> None:
        self.dtype = dtype

    def linear(self, w: np.ndarray, x: np.ndarray) -> np.ndarray:
        return x @ w.T.astype(self.dtype, copy=False)

    def dense(self, x: np.ndarray, a: np.ndarray) -> np.ndarray:
        return x @ a.T.astype(self.dtype, copy=False)

    def mlp(self, m: Mlp, x: np.ndarray) -> np.ndarray:
        """SwiGLU x (t, d_model) -> (t, d_model) with gate/up (d_ff, d_model), down (d_model, d_ff)."""
        act = silu(self.linear(m.gate, x)) * self.linear(m.up, x)  # (t, d_ff)
        return self.linear(m.down, act)

    def rms_norm(self, x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
        return rms_norm(x, w, eps)

    def glu(self, cfg: ModelConfig, g: np.ndarray, u: np.ndarray) -> np.ndarray:
        return glu(cfg, g, u)

    def softmax(self, x: np.ndarray) -> np.ndarray:
        return softmax(x)

    def per_head(self, w: np.ndarray, x: np.ndarray) -> np.ndarray:
        """x (n, heads, cols) @ each head's (rows, cols) block of w (heads * rows, cols), transposed -> (n, heads, rows)."""
        heads = x.shape[1]
        blocks = w.reshape(heads, -1, w.shape[-1]).astype(self.dtype, copy=False)  # (heads, rows, cols)
        return np.einsum("nhc,hrc->nhr", x, blocks)


class ReferenceModel:
    def __init__(self, config: ModelConfig, dense: dict[str, np.ndarray],
                 experts: dict[tuple[int, int], dict[str, np.ndarray]], compute_dtype: type = np.float64) -> None:
        """`dense`: layout name -> float32 array; `experts`: (layer, expert) -> {role: float32 array}."""
        self.config = c = config
        self.family = get_family(c.arch)
        self.compute_dtype = compute_dtype
        self.ops = NumpyOps(compute_dtype)
        self.dense, self.experts = dense, experts  # as given, for the transformers reference
        loaders = (lambda name, role: dense[name], dense.__getitem__, dense.__contains__)
        self.weights: GlobalWeights[np.ndarray] = load_globals(self.family, c, *loaders)
        # a tied model has no output.weight: the logits reuse the embedding matrix
        self.lm_head = self.weights.output if self.weights.output is not None else self.weights.embed  # (vocab, d_model)
        self.layers: list[LayerWeights[np.ndarray]] = [load_layer(self.family, c, n, *loaders) for n in range(c.n_layers)]
        self.layer_experts: list[list[Mlp[np.ndarray]]] = [
            [Mlp(**experts[(n, e)]) for e in range(c.n_experts)] if c.is_moe_layer(n) else [] for n in range(c.n_layers)
        ]
        # multi-token-prediction blocks (config.nextn_layers): an MoE layer each, plus their own tensors
        self.mtp_layers = [load_layer(self.family, c, n, *loaders) for n in c.mtp_layers]
        self.mtp_experts = [[Mlp(**experts[(n, e)]) for e in range(c.n_experts)] for n in c.mtp_layers]
        self._check_shapes()

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_source(cls, path: str | Path, compute_dtype: type = np.float64, mtp: bool = False) -> ReferenceModel:
        """A HF model directory or a GGUF file (merged or per-expert), every weight as float32; `mtp`: with its
        multi-token-prediction blocks."""
        from ..convert.source import open_source

        src = open_source(path, mtp=mtp)
        def values(t) -> np.ndarray:  # noqa: ANN001 - read_raw() has already undone llama.cpp's q/k row permutation
            if t.dtype == "f8_e4m3":  # FP8 with block scales: no GGML type (convert/fp8.py, checked against transformers)
                return t.to_float32()
            return dequantize(t.read_raw(), t.dtype, tuple(t.shape))

        dense = {name: values(t) for name, _spec, t in src.dense_tensors()}
        experts = {}
        for layer in src.config.expert_layers:
            for e in range(src.config.n_experts):
                experts[(layer, e)] = {r: values(t) for r, t in src.expert_tensors(layer, e).items()}
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
        """Every tensor against the shape its family's table implies (weights built by hand included)."""
        c = self.config
        for spec, layer in self.family.dense_names(c):
            name = fmt(spec.name, layer)
            if name in self.dense and self.dense[name].shape != resolve_shape(spec.shape, c):
                raise ValueError(f"{name} has shape {self.dense[name].shape}, the config implies {resolve_shape(spec.shape, c)}")
        for (layer, e), tensors in self.experts.items():
            for spec in self.family.expert_specs(c):
                want = resolve_shape(spec.shape, c)
                if tensors[spec.role].shape != want:
                    raise ValueError(f"layer {layer} expert {e} {spec.role} has shape {tensors[spec.role].shape}, "
                                     f"the config implies {want}")

    # ------------------------------------------------------------------ forward
    def forward(self, token_ids: list[int]) -> np.ndarray:
        """Logits (len, vocab) float32 of the whole sequence, positions 0..len-1, no cache."""
        x = rms_norm(self.hidden_states(token_ids), self.weights.output_norm, self.config.norm_eps)
        return (x @ self.lm_head.T.astype(self.compute_dtype, copy=False)).astype(np.float32)  # (T, vocab)

    def _ids(self, token_ids: list[int]) -> np.ndarray:
        ids = np.asarray(token_ids, dtype=np.int64)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError("token_ids must be a non-empty 1-D sequence")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size})")
        return ids

    def _layer(self, n: int, lw: LayerWeights, experts: list[Mlp], x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        c = self.config
        mask = self.attention_mask(len(x), n)  # (T, T) bool, True = may attend
        x = x + self.attention(rms_norm(x, lw.attn_norm, c.norm_eps), lw, pos, mask)
        h = rms_norm(x, lw.ffn_norm, c.norm_eps)
        return x + (self.ops.mlp(lw.mlp, h) if lw.mlp is not None else self.moe(h, lw, experts))

    def hidden_states(self, token_ids: list[int]) -> np.ndarray:
        """The last layer's output (len, d_model), before the final norm."""
        ids = self._ids(token_ids)
        x = self.weights.embed[ids].astype(self.compute_dtype)  # (T, d_model)
        pos = np.arange(len(ids))
        for n, lw in enumerate(self.layers):
            x = self._layer(n, lw, self.layer_experts[n], x, pos)
        return x

    def mtp(self, token_ids: list[int], block: int = 0) -> np.ndarray:
        """MTP block `block`'s logits (len - 1, vocab) float32: row p predicts token p + 2 from the model's normed
        final state at p and the embedding of token p + 1 (zero at position 0, as vLLM's MTP), the block attending
        over rows 0..p (DeepSeek-V3's multi-token prediction, depth 1)."""
        c, dt = self.config, self.compute_dtype
        ids = self._ids(token_ids)
        if len(ids) < 2:
            raise ValueError("the MTP block needs at least two tokens")
        lw = self.mtp_layers[block]
        h = rms_norm(self.hidden_states(token_ids)[:-1], self.weights.output_norm, c.norm_eps)
        table = lw.mtp_embed if lw.mtp_embed is not None else self.weights.embed
        e = table[ids[1:]].astype(dt)
        e[0] = 0.0
        both = np.concatenate([rms_norm(e, lw.mtp_enorm, c.norm_eps), rms_norm(h, lw.mtp_hnorm, c.norm_eps)], axis=1)
        x = self.ops.linear(lw.mtp_eh_proj, both)
        x = self._layer(c.n_layers + block, lw, self.mtp_experts[block], x, np.arange(len(x)))
        head = lw.mtp_head if lw.mtp_head is not None else self.lm_head
        return (rms_norm(x, lw.mtp_head_norm, c.norm_eps) @ head.T.astype(dt, copy=False)).astype(np.float32)

    def attention_mask(self, n: int, layer: int = 0) -> np.ndarray:
        """(n, n) bool for layer `layer`: causal, and within its sliding window if it has one (kv > q - window,
        as HF's overlay)."""
        window = self.config.window(layer)
        q = np.arange(n)[:, None]
        kv = np.arange(n)[None, :]
        allowed = kv <= q
        if window > 0:
            allowed &= kv > q - window
        return allowed

    def attention(self, h: np.ndarray, lw: LayerWeights, pos: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """h (T, d_model) at positions pos (T,) -> (T, d_model)."""
        c, pieces = self.config, self.family.pieces
        T = h.shape[0]
        q, k, v = pieces.attention_inputs(c, lw, h, self.ops)  # (T, H, hd), (T, KV, hd), (T, KV, dv)
        q, k = pieces.rotary(c, q, pos), pieces.rotary(c, k, pos)
        q, k, v = q.transpose(1, 0, 2), k.transpose(1, 0, 2), v.transpose(1, 0, 2)  # heads first
        # repeat_kv: kv head j serves query heads j*rep .. j*rep + rep - 1 (latent attention: one kv "head")
        rep = c.n_heads // k.shape[0]
        k = np.repeat(k, rep, axis=0)  # (H, T, hd)
        v = np.repeat(v, rep, axis=0)  # (H, T, dv)
        scores = (q @ k.transpose(0, 2, 1)) / c.softmax_divisor  # (H, T, T)
        scores = np.where(mask[None], scores, -np.inf)
        if lw.attn_sinks is not None:  # each head's sink: one more column in its softmax, dropped after it
            sink = np.broadcast_to(lw.attn_sinks.astype(scores.dtype)[:, None, None], (c.n_heads, T, 1))
            probs = softmax(np.concatenate([scores, sink], axis=-1))[..., :-1]
        else:
            probs = softmax(scores)  # (H, T, T); the diagonal is always allowed, so no row is all -inf
        out = (probs @ v).transpose(1, 0, 2).reshape(T, -1)  # (T, H*dv)
        return pieces.attention_output(c, lw, out, self.ops)  # (T, d_model)

    def route(self, h: np.ndarray, lw: LayerWeights) -> tuple[np.ndarray, np.ndarray]:
        """h (T, d_model) -> (experts (T, k) int, weights (T, k)), best expert first."""
        pieces = self.family.pieces
        return pieces.select_experts(self.config, lw, pieces.router_scores(self.config, lw, h, self.ops))

    def moe(self, h: np.ndarray, lw: LayerWeights, experts: list[Mlp]) -> np.ndarray:
        """h (T, d_model) -> (T, d_model): weighted sum of the chosen experts' outputs, plus the shared expert."""
        top, w = self.route(h, lw)
        out = np.zeros_like(h)
        for e, ex in enumerate(experts):
            tok, slot = np.nonzero(top == e)  # tokens that chose expert e, and in which top-k slot
            if tok.size == 0:
                continue
            np.add.at(out, tok, self.family.pieces.expert_mlp(self.config, ex, h[tok], self.ops) * w[tok, slot][:, None])
        shared = self.family.pieces.shared_expert(self.config, lw, h, self.ops)
        return out if shared is None else out + shared


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """x (T, d) -> w * (x * rsqrt(mean(x^2) + eps)), in HF's RMSNorm order (weight applied last)."""
    var = np.mean(x * x, axis=-1, keepdims=True)  # (T, 1)
    return w.astype(x.dtype) * (x * (1.0 / np.sqrt(var + eps)))


def silu(x: np.ndarray) -> np.ndarray:
    """x * sigmoid(x), with sigmoid as 0.5 * (1 + tanh(x / 2)) so no exp overflows."""
    return x * (0.5 * (1.0 + np.tanh(0.5 * x)))
