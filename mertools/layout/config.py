"""ModelConfig: every hyper-parameter the runtime needs, as stored in the manifest's `config`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

# "neox": rotate-half pairs (i, i + head_dim/2), HF's convention; "normal": adjacent pairs (2i, 2i+1).
ROPE_STYLES = ("neox", "normal")


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    vocab_size: int
    d_model: int
    d_ff: int  # width of one expert's hidden layer
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_experts: int
    n_experts_used: int
    context_length: int
    rope_theta: float = 10000.0
    rope_style: str = "neox"
    norm_eps: float = 1e-5
    sliding_window: int | None = None
    tie_embeddings: bool = False
    norm_topk_prob: bool = True  # renormalise the top-k router weights to sum to 1

    def __post_init__(self) -> None:
        positive = (
            "vocab_size", "d_model", "d_ff", "n_layers", "n_heads", "n_kv_heads", "head_dim",
            "n_experts", "n_experts_used", "context_length",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"config.{name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"config.n_heads ({self.n_heads}) is not a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.n_experts_used > self.n_experts:
            raise ValueError(f"config.n_experts_used ({self.n_experts_used}) > n_experts ({self.n_experts})")
        if self.head_dim % 2:
            raise ValueError(f"config.head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.rope_style not in ROPE_STYLES:
            raise ValueError(f"config.rope_style must be one of {ROPE_STYLES}, got {self.rope_style!r}")
        for name in ("rope_theta", "norm_eps"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"config.{name} must be a positive number, got {value!r}")
        if self.sliding_window is not None and (
            not isinstance(self.sliding_window, int) or self.sliding_window <= 0
        ):
            raise ValueError(f"config.sliding_window must be a positive integer or null, got {self.sliding_window!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        if not isinstance(d, dict):
            raise ValueError(f"config must be an object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"config has unknown keys {unknown}")
        try:
            return cls(**d)
        except TypeError as e:  # a missing required key
            raise ValueError(f"config is incomplete: {e}") from None
