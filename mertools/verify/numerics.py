"""Numerics of a layout: its logits through the real streaming runtime against a reference forward
pass of the source checkpoint; the figures llama.cpp users know from `llama-perplexity --kl-divergence`."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from ..dtypes import DTYPES, Thresholds
from ..errors import MertoolsError
from ..layout.config import ModelConfig
from ..layout.manifest import EXPERT_ROLES, Manifest

DEFAULT_TEXT = (
    "It was a bright cold day in April, and the clocks were striking thirteen. The harbour lay quiet under a "
    "grey sky, and the fishermen mended their nets beside the old stone wall, talking of the weather, of the "
    "price of herring, and of the stranger who had come to the inn the night before with a heavy trunk and no name."
)
# Config fields that do not tell models apart: how much context a source declares, its rotary
# pairing convention and whether lm_head is tied are how one model is stored, which may differ
# between its HF directory and a GGUF of it.
NOT_COMPARED = frozenset({"context_length", "rope_style", "tie_embeddings"})
COMPARED_FIELDS = tuple(f.name for f in fields(ModelConfig) if f.name not in NOT_COMPARED)


class ReferenceMismatch(MertoolsError):
    """The reference is not the model the layout was made from."""


# Defaults by expert dtype, each set in its type module. Mean KL is the primary figure: top-1
# agreement flips easily wherever the top two logits are close, so its limits sit well below what
# real models reach yet far above chance.
DEFAULT_THRESHOLDS: dict[str, Thresholds] = {t.name: t.verify for t in DTYPES.values() if t.verify is not None}


@dataclass
class NumericsReport:
    layout: str
    reference: str
    reference_engine: str
    dtype: str
    tokens: int
    max_abs_diff: float
    mean_abs_diff: float
    kl_mean: float
    kl_p99: float
    kl_max: float
    top1_agreement: float
    ppl_layout: float
    ppl_reference: float
    ppl_ratio: float
    thresholds: Thresholds
    per_position: list[dict[str, float]]

    @property
    def failures(self) -> list[str]:
        t, out = self.thresholds, []
        if not self.kl_mean <= t.kl_mean:
            out.append(f"mean KL {self.kl_mean:.3g} > {t.kl_mean:g}")
        if not self.top1_agreement >= t.top1:
            out.append(f"top-1 agreement {self.top1_agreement:.1%} < {t.top1:.0%}")
        if not 1 / t.ppl_ratio <= self.ppl_ratio <= t.ppl_ratio:
            out.append(f"perplexity ratio {self.ppl_ratio:.4f} outside [{1 / t.ppl_ratio:.4f}, {t.ppl_ratio:.4f}]")
        return out

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"], d["failures"] = self.ok, self.failures
        return d

    def format(self) -> str:
        t = self.thresholds
        lines = [
            f"numerics: {self.layout} ({self.dtype}) vs {self.reference} ({self.reference_engine} reference), "
            f"{self.tokens} tokens",
            f"  logits      max |diff| {self.max_abs_diff:.4g}, mean |diff| {self.mean_abs_diff:.4g}",
            f"  KL          mean {self.kl_mean:.4g}, p99 {self.kl_p99:.4g}, max {self.kl_max:.4g}"
            f"   (limit: mean <= {t.kl_mean:g})",
            f"  top-1       {self.top1_agreement:.1%} of positions agree   (limit: >= {t.top1:.0%})",
            f"  perplexity  layout {self.ppl_layout:.4f}, reference {self.ppl_reference:.4f}, ratio {self.ppl_ratio:.4f}"
            f"   (limit: within x{t.ppl_ratio:g})",
        ]
        lines.append("  verdict     " + ("OK" if self.ok else "FAILED: " + "; ".join(self.failures)))
        return "\n".join(lines)


def expert_dtype(manifest: Manifest) -> str:
    """The dtype whose limits apply to a layout: the most common among its expert tensors (ties: the
    first one met), so a few tensors stored otherwise (a down projection kept at 8 bits) do not decide."""
    counts = Counter(t.dtype for e in manifest.experts for r, t in e.tensors.items() if r in EXPERT_ROLES)  # not biases
    if not counts:
        raise MertoolsError("the layout has no expert tensors to compare")
    return counts.most_common(1)[0][0]


def check_same_model(layout_cfg: ModelConfig, ref_cfg: ModelConfig, layout: str, reference: str) -> None:
    diffs = [f"{f} {getattr(layout_cfg, f)!r} vs {getattr(ref_cfg, f)!r}" for f in COMPARED_FIELDS
             if getattr(layout_cfg, f) != getattr(ref_cfg, f)]
    if diffs:
        raise ReferenceMismatch(f"{reference} is not the model of {layout}: " + ", ".join(diffs))


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def compare_logits(ids: list[int], got: np.ndarray, ref: np.ndarray) -> dict[str, Any]:
    """got/ref: (n, vocab) logits for the same ids. KL is KL(ref || got) per position, in nats."""
    lg, lr = _log_softmax(got), _log_softmax(ref)
    pr = np.exp(lr)
    kl = np.maximum((pr * (lr - lg)).sum(axis=1), 0.0)  # (n,); tiny negatives are rounding
    diff = np.abs(got.astype(np.float64) - ref)
    nxt = np.asarray(ids[1:])
    nll_g = -lg[np.arange(len(nxt)), nxt]
    nll_r = -lr[np.arange(len(nxt)), nxt]
    top_g, top_r = got.argmax(axis=1), ref.argmax(axis=1)
    per_pos = [{"pos": i, "max_abs_diff": float(diff[i].max()), "kl": float(kl[i]), "top1_same": bool(top_g[i] == top_r[i])}
               for i in range(len(ids))]
    ppl_g, ppl_r = float(np.exp(nll_g.mean())), float(np.exp(nll_r.mean()))
    return {
        "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()), "kl_mean": float(kl.mean()),
        "kl_p99": float(np.percentile(kl, 99)), "kl_max": float(kl.max()),
        "top1_agreement": float((top_g == top_r).mean()), "ppl_layout": ppl_g, "ppl_reference": ppl_r,
        "ppl_ratio": ppl_g / ppl_r, "per_position": per_pos,
    }


def reference_logits(source: str | Path, ids: list[int], engine: str) -> tuple[np.ndarray, ModelConfig]:
    from ..reference.forward import ReferenceModel

    ref = ReferenceModel.from_source(source)
    if engine == "numpy":
        return ref.forward(ids), ref.config
    if engine == "transformers":
        from .hf_reference import transformers_logits

        return transformers_logits(ref, ids), ref.config
    raise ValueError(f"reference engine must be numpy or transformers, got {engine!r}")


def check_numerics(layout: str | Path, source: str | Path, *, text: str | None = None, max_tokens: int = 128,
                   engine: str = "numpy", thresholds: Thresholds | None = None) -> NumericsReport:
    from ..convert.source import open_source
    from ..layout.reader import Layout
    from ..runtime.engine import Engine

    lay = Layout.open(layout)
    cfg = lay.manifest.config
    check_same_model(cfg, open_source(source).config, str(layout), str(source))
    slot = max(e.nbytes for e in lay.manifest.experts)
    # the streaming path, with a cache of one layer's active experts plus one so reads really happen
    # an exact (f32) KV cache: verify judges the layout's weights, not the runtime's KV storage
    with Engine.open(layout, cache_mb=(cfg.n_experts_used + 1) * slot / 2**20, kv_dtype="f32") as eng:
        ids = eng.tokenizer.encode(text or DEFAULT_TEXT)[:max_tokens]
        if len(ids) < 2:
            raise MertoolsError(f"{layout}: the text gives {len(ids)} token(s); perplexity needs at least 2")
        got = eng.forward(ids)
    ref, _ = reference_logits(source, ids, engine)
    dtype = expert_dtype(lay.manifest)
    figures = compare_logits(ids, got, ref)
    return NumericsReport(layout=str(layout), reference=str(source), reference_engine=engine, dtype=dtype,
                          tokens=len(ids), thresholds=thresholds or DEFAULT_THRESHOLDS[dtype], **figures)


# The 8-bit kernels' mean KL against the exact ones that verify accepts: their difference is activation rounding
# (~1e-4 to 1e-3 on the trained fixture and the tiny families: tests/test_int8.py), far below what a quant type's
# own rounding costs (4-bit types' limits against the source are 0.05)
KERNELS_KL_LIMIT = 2e-3


@dataclass
class KernelsReport:
    """A layout's logits with `kernels` against its exact kernels' (the model's definition), same tokens."""

    layout: str
    kernels: str
    tokens: int
    kl_mean: float
    kl_p99: float
    kl_max: float
    top1_agreement: float
    ppl_ratio: float
    limit: float = KERNELS_KL_LIMIT

    @property
    def ok(self) -> bool:
        return self.kl_mean <= self.limit

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}

    def format(self) -> str:
        return "\n".join([
            f"kernels: {self.kernels} vs exact on {self.layout}, {self.tokens} tokens",
            f"  KL          mean {self.kl_mean:.4g}, p99 {self.kl_p99:.4g}, max {self.kl_max:.4g}   (limit: mean <= "
            f"{self.limit:g})",
            f"  top-1       {self.top1_agreement:.1%} of positions agree; perplexity ratio {self.ppl_ratio:.4f}",
            "  verdict     " + ("OK" if self.ok else f"FAILED: mean KL {self.kl_mean:.3g} > {self.limit:g}"),
        ])


def check_kernels(layout: str | Path, kernels: str = "int8", *, text: str | None = None,
                  max_tokens: int = 256) -> KernelsReport:
    """The same text through the layout with `kernels` and with the exact kernels, every expert resident (a KV cache
    in f32, as check_numerics), one token per step, as decoding computes each position (a long prompt's rows may take
    another path): what the faster kernels change in the model's output."""
    from ..runtime.engine import Engine

    logits = {}
    for k in ("exact", kernels):
        with Engine.open(layout, kv_dtype="f32", kernels=k) as eng:
            ids = eng.tokenizer.encode(text or DEFAULT_TEXT)[:max_tokens]
            if len(ids) < 2:
                raise MertoolsError(f"{layout}: the text gives {len(ids)} token(s); perplexity needs at least 2")
            logits[k] = np.concatenate([eng.forward([i]) for i in ids])
    f = compare_logits(ids, logits[kernels], logits["exact"])
    return KernelsReport(layout=str(layout), kernels=kernels, tokens=len(ids), kl_mean=f["kl_mean"], kl_p99=f["kl_p99"],
                         kl_max=f["kl_max"], top1_agreement=f["top1_agreement"], ppl_ratio=f["ppl_ratio"])
