"""ModelConfig: every hyper-parameter the runtime needs, as stored in the manifest's `config`."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from enum import StrEnum
from typing import Any

# A layout always holds q/k rows in HF order, whose rotary pairs are (i, i + head_dim/2) ("neox",
# rotate-half); converters undo llama.cpp's permutation for the adjacent-pair convention, so no
# other style is ever stored. (Latent attention's rotary part is DeepSeek's adjacent pairs in HF's and
# llama.cpp's order alike; its family's attention inputs de-interleave it.)
ROPE_STYLES = ("neox",)


class QKNorm(StrEnum):
    """RMSNorm of q and k before rotary."""

    NONE = "none"
    HEAD = "head"  # per head, over head_dim
    FULL = "full"  # over the whole projection, before the split into heads


QK_NORMS = tuple(q.value for q in QKNorm)


class GatingFunc(StrEnum):
    """How router logits become the scores experts are chosen by and weighted with."""

    SOFTMAX = "softmax"  # over every expert
    SIGMOID = "sigmoid"  # each expert on its own (GLM-4.5, DeepSeek-V3)


GATING_FUNCS = tuple(g.value for g in GatingFunc)


class GroupScore(StrEnum):
    """What an expert group is ranked by when routing is group-limited."""

    TOP2 = "top2"  # the sum of its best two choice scores (DeepSeek-V3, GLM-4.5)
    MAX = "max"  # its best score (DeepSeek-V2's group_limited_greedy)


GROUP_SCORES = tuple(g.value for g in GroupScore)


class RopeScaling(StrEnum):
    """How rotary frequencies are stretched past the trained context."""

    NONE = "none"
    YARN = "yarn"  # YaRN (transformers' _compute_yarn_parameters)


ROPE_SCALINGS = tuple(r.value for r in RopeScaling)
# the YaRN fields, with the values that mean "no YaRN" (a config without scaling must hold exactly these)
YARN_DEFAULTS: dict[str, Any] = {
    "rope_factor": 1.0, "rope_original_context": 0, "yarn_beta_fast": 32.0, "yarn_beta_slow": 1.0,
    "yarn_truncate": True, "rope_attn_factor": 1.0,
}

# Fields added after format version 1, with the value that means "absent": a config whose extension
# fields all hold these is a version-1 config and is written without them (old readers still read it).
EXTENSION_DEFAULTS: dict[str, Any] = {
    "qk_norm": "none", "attn_bias": False, "dense_layers": (), "d_ff_dense": 0, "d_ff_shared": 0,
    "shared_expert_gate": False, "gating_func": "softmax", "expert_bias": False, "routed_scaling": 1.0,
    "n_groups": 1, "n_groups_used": 1, "rope_dim": 0,
    # attention sinks, per-layer windows, biases everywhere, a clamped GLU, YaRN (OpenAI's open-weight MoE)
    "attn_o_bias": False, "attn_sinks": False, "full_attention_layers": (), "router_bias": False,
    "expert_mlp_bias": False, "swiglu_alpha": 1.0, "swiglu_limit": 0.0, "swiglu_up_offset": 0.0,
    "rope_scaling": "none", **YARN_DEFAULTS,
    # multi-head latent attention (DeepSeek-V2/V3, Kimi K2), V2's group rule, a scaled softmax
    "group_score": "top2", "q_lora_rank": 0, "kv_lora_rank": 0, "qk_rope_dim": 0, "v_head_dim": 0, "attn_scale": 1.0,
    # multi-token-prediction blocks kept after the main layers (DeepSeek-V3, GLM-4.5), a drafter's
    "nextn_layers": 0,
}


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
    qk_norm: QKNorm = QKNorm.NONE
    attn_bias: bool = False  # q/k/v projections carry biases
    dense_layers: tuple[int, ...] = ()  # layers with a dense SwiGLU MLP instead of experts (no expert files)
    d_ff_dense: int = 0  # width of those dense MLPs; > 0 exactly when dense_layers is not empty
    d_ff_shared: int = 0  # width of an always-resident shared expert in every MoE layer; 0 = none
    shared_expert_gate: bool = False  # the shared expert's output is scaled by sigmoid(x . w)
    gating_func: GatingFunc = GatingFunc.SOFTMAX  # router logits -> scores
    expert_bias: bool = False  # MoE layers add a bias to the scores for choosing experts only (not to their weights)
    routed_scaling: float = 1.0  # the chosen experts' weights are multiplied by it (after any renormalisation)
    n_groups: int = 1  # experts split in n_groups equal groups; only the best n_groups_used groups may be chosen
    n_groups_used: int = 1
    rope_dim: int = 0  # rotary on the first rope_dim dims of each head only (partial rotary); 0 = all head_dim
    attn_o_bias: bool = False  # the output projection carries a bias
    attn_sinks: bool = False  # a learned logit per head joins each softmax's denominator
    full_attention_layers: tuple[int, ...] = ()  # layers that ignore sliding_window (the others use it)
    router_bias: bool = False  # the router's logits carry a bias
    expert_mlp_bias: bool = False  # each expert's gate, up and down carry biases, stored in its file
    # routed experts: (up + offset) * gate * sigmoid(alpha * gate), gate <= limit and |up| <= limit (0: no clamp)
    swiglu_alpha: float = 1.0
    swiglu_limit: float = 0.0
    swiglu_up_offset: float = 0.0
    rope_scaling: RopeScaling = RopeScaling.NONE
    rope_factor: float = 1.0  # YaRN: context stretch factor
    rope_original_context: int = 0  # YaRN: the context the model was pretrained with
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_truncate: bool = True  # the correction range is floored/ceiled to whole dims
    rope_attn_factor: float = 1.0  # cos and sin are multiplied by it (YaRN's mscale)
    group_score: GroupScore = GroupScore.TOP2
    # Multi-head latent attention when kv_lora_rank > 0: head_dim is a q/k head (qk_nope + qk_rope_dim wide), k and v
    # come from one shared latent of kv_lora_rank (plus one shared rotary key of qk_rope_dim), v heads are v_head_dim
    q_lora_rank: int = 0  # q through a low-rank bottleneck of this width (0: one plain projection)
    kv_lora_rank: int = 0
    qk_rope_dim: int = 0  # the rotary part of each q/k head (its last dims in HF's order; adjacent pairs)
    v_head_dim: int = 0
    attn_scale: float = 1.0  # the softmax scale is attn_scale / sqrt(head_dim) (DeepSeek's YaRN: mscale^2)
    # multi-token-prediction ("nextn") blocks the layout keeps as layers n_layers.. n_layers + nextn_layers - 1: each
    # an MoE decoder layer fed with [norm(embedding of token t+1), norm(hidden state at t)], predicting token t+2
    nextn_layers: int = 0

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
            raise ValueError(f"config.rope_style must be 'neox' (q/k rows in HF order), got {self.rope_style!r}")
        for name in ("rope_theta", "norm_eps"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"config.{name} must be a positive number, got {value!r}")
        if self.sliding_window is not None and (
            not isinstance(self.sliding_window, int) or self.sliding_window <= 0
        ):
            raise ValueError(f"config.sliding_window must be a positive integer or null, got {self.sliding_window!r}")
        self._check_extensions()

    def _check_extensions(self) -> None:
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"config.qk_norm must be one of {QK_NORMS}, got {self.qk_norm!r}")
        object.__setattr__(self, "qk_norm", QKNorm(self.qk_norm))
        for name in ("attn_bias", "shared_expert_gate", "norm_topk_prob", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"config.{name} must be true or false, got {getattr(self, name)!r}")
        if isinstance(self.dense_layers, list):  # from JSON
            object.__setattr__(self, "dense_layers", tuple(self.dense_layers))
        dl = self.dense_layers
        if not isinstance(dl, tuple) or not all(isinstance(x, int) and not isinstance(x, bool) for x in dl):
            raise ValueError(f"config.dense_layers must be a list of layer numbers, got {dl!r}")
        if list(dl) != sorted(set(dl)) or (dl and not 0 <= dl[0] <= dl[-1] < self.n_layers):
            raise ValueError(f"config.dense_layers must be increasing layer numbers below {self.n_layers}, got {list(dl)}")
        if len(dl) == self.n_layers:
            raise ValueError("config.dense_layers covers every layer: not a mixture-of-experts model")
        for name in ("d_ff_dense", "d_ff_shared"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"config.{name} must be a non-negative integer, got {value!r}")
        if bool(dl) != (self.d_ff_dense > 0):
            raise ValueError(f"config.d_ff_dense ({self.d_ff_dense}) must be > 0 exactly when dense_layers is set ({list(dl)})")
        if self.shared_expert_gate and not self.d_ff_shared:
            raise ValueError("config.shared_expert_gate needs a shared expert (d_ff_shared > 0)")
        self._check_routing()
        rd = self.rope_dim
        if not isinstance(rd, int) or isinstance(rd, bool) or rd < 0 or rd % 2 or rd > self.head_dim:
            raise ValueError(f"config.rope_dim must be 0 (whole head) or an even number <= head_dim ({self.head_dim}), "
                             f"got {rd!r}")
        if rd == self.head_dim:  # the whole head is the default: one spelling, so HF and GGUF configs compare equal
            object.__setattr__(self, "rope_dim", 0)
        self._check_sinks_glu_yarn()
        self._check_mla()
        nn = self.nextn_layers
        if not isinstance(nn, int) or isinstance(nn, bool) or nn < 0:
            raise ValueError(f"config.nextn_layers must be a non-negative integer, got {nn!r}")

    def _check_mla(self) -> None:
        for name in ("q_lora_rank", "kv_lora_rank", "qk_rope_dim", "v_head_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"config.{name} must be a non-negative integer, got {v!r}")
        a = self.attn_scale
        if not isinstance(a, int | float) or isinstance(a, bool) or not 0 < a < float("inf"):
            raise ValueError(f"config.attn_scale must be a positive number, got {a!r}")
        object.__setattr__(self, "attn_scale", float(a))
        if not self.kv_lora_rank:
            if self.q_lora_rank or self.qk_rope_dim or self.v_head_dim:
                raise ValueError("config: q_lora_rank, qk_rope_dim and v_head_dim belong to latent attention (kv_lora_rank > 0)")
            return
        rope = self.qk_rope_dim
        if not rope or rope % 2 or rope >= self.head_dim or not self.v_head_dim:
            raise ValueError(f"config: latent attention needs an even qk_rope_dim in (0, head_dim {self.head_dim}) and "
                             f"v_head_dim > 0, got {rope!r} and {self.v_head_dim!r}")
        if self.n_kv_heads != self.n_heads or self.rope_dim or self.attn_bias or self.qk_norm is not QKNorm.NONE:
            raise ValueError("config: latent attention has one key per query head (n_kv_heads = n_heads), its own rotary "
                             "part (rope_dim 0) and no q/k/v biases or q/k norm")

    def _check_sinks_glu_yarn(self) -> None:
        for name in ("attn_o_bias", "attn_sinks", "router_bias", "expert_mlp_bias", "yarn_truncate"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"config.{name} must be true or false, got {getattr(self, name)!r}")
        if isinstance(self.full_attention_layers, list):  # from JSON
            object.__setattr__(self, "full_attention_layers", tuple(self.full_attention_layers))
        fl = self.full_attention_layers
        if not isinstance(fl, tuple) or not all(isinstance(x, int) and not isinstance(x, bool) for x in fl) or (
                list(fl) != sorted(set(fl)) or (fl and not 0 <= fl[0] <= fl[-1] < self.n_layers)):
            raise ValueError(f"config.full_attention_layers must be increasing layer numbers below {self.n_layers}, got {fl!r}")
        if fl and self.sliding_window is None:
            raise ValueError("config.full_attention_layers needs a sliding_window (for the other layers)")
        # alpha > 0, limit >= 0 (0: no clamp), the offset any finite number
        for name, ok in (("swiglu_alpha", lambda v: v > 0), ("swiglu_limit", lambda v: v >= 0),
                         ("swiglu_up_offset", lambda v: True)):
            v = getattr(self, name)
            if not isinstance(v, int | float) or isinstance(v, bool) or not abs(v) < float("inf") or not ok(v):
                raise ValueError(f"config.{name}: {v!r} is not allowed (alpha > 0, limit >= 0, finite numbers)")
            object.__setattr__(self, name, float(v))
        self._check_rope_scaling()

    def _check_rope_scaling(self) -> None:
        if self.rope_scaling not in ROPE_SCALINGS:
            raise ValueError(f"config.rope_scaling must be one of {ROPE_SCALINGS}, got {self.rope_scaling!r}")
        object.__setattr__(self, "rope_scaling", RopeScaling(self.rope_scaling))
        for name in ("rope_factor", "yarn_beta_fast", "yarn_beta_slow", "rope_attn_factor"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or isinstance(v, bool) or not (0 < v < float("inf")):
                raise ValueError(f"config.{name} must be a positive number, got {v!r}")
            object.__setattr__(self, name, float(v))
        oc = self.rope_original_context
        if not isinstance(oc, int) or isinstance(oc, bool) or oc < 0:
            raise ValueError(f"config.rope_original_context must be a non-negative integer, got {oc!r}")
        if self.rope_scaling is RopeScaling.NONE:
            odd = {k: getattr(self, k) for k, v in YARN_DEFAULTS.items() if getattr(self, k) != v}
            if odd:
                raise ValueError(f"config.rope_scaling is 'none' but YaRN fields are set: {odd}")
        elif not oc or self.rope_factor < 1.0:
            raise ValueError(f"config: YaRN needs rope_original_context > 0 and rope_factor >= 1, got "
                             f"{oc!r} and {self.rope_factor!r}")

    def _check_routing(self) -> None:
        if self.gating_func not in GATING_FUNCS:
            raise ValueError(f"config.gating_func must be one of {GATING_FUNCS}, got {self.gating_func!r}")
        object.__setattr__(self, "gating_func", GatingFunc(self.gating_func))
        if not isinstance(self.expert_bias, bool):
            raise ValueError(f"config.expert_bias must be true or false, got {self.expert_bias!r}")
        rs = self.routed_scaling
        if not isinstance(rs, int | float) or isinstance(rs, bool) or not (0 < rs < float("inf")):
            raise ValueError(f"config.routed_scaling must be a positive number, got {rs!r}")
        object.__setattr__(self, "routed_scaling", float(rs))
        for name in ("n_groups", "n_groups_used"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"config.{name} must be a positive integer, got {value!r}")
        if self.group_score not in GROUP_SCORES:
            raise ValueError(f"config.group_score must be one of {GROUP_SCORES}, got {self.group_score!r}")
        object.__setattr__(self, "group_score", GroupScore(self.group_score))
        g, used = self.n_groups, self.n_groups_used
        if g == 1:
            if used != 1:
                raise ValueError(f"config.n_groups_used must be 1 without expert groups, got {used}")
            return
        # DeepSeek-V3's rule scores a group by its best two experts, and top-k must find k experts in the kept groups
        if self.n_experts % g or self.n_experts // g < (2 if self.group_score is GroupScore.TOP2 else 1):
            raise ValueError(f"config.n_groups ({g}) must split n_experts ({self.n_experts}) into groups of >= 2")
        if used > g or self.n_experts_used > used * (self.n_experts // g):
            raise ValueError(f"config.n_groups_used ({used}) must be <= n_groups ({g}) and keep at least "
                             f"n_experts_used ({self.n_experts_used}) experts")

    @property
    def rotary_dim(self) -> int:
        """How many leading dims of each q/k head are rotated (latent attention: its rotary part, which the
        family's attention inputs put first)."""
        return self.qk_rope_dim or self.rope_dim or self.head_dim

    @property
    def mla(self) -> bool:
        """Multi-head latent attention: the KV cache holds one latent and one rotary key per token."""
        return self.kv_lora_rank > 0

    @property
    def softmax_divisor(self) -> float:
        """Attention scores are q.k divided by this: sqrt(head_dim), over attn_scale when that is not 1."""
        return math.sqrt(self.head_dim) / self.attn_scale

    def window(self, layer: int) -> int:
        """The sliding window of layer `layer`'s attention; 0 = none (full causal attention)."""
        if self.sliding_window is None or layer in self.full_attention_layers:
            return 0
        return self.sliding_window

    @property
    def plain_swiglu(self) -> bool:
        """The routed experts are silu(gate) * up with no biases (the fused kernel's case)."""
        return (not self.expert_mlp_bias and self.swiglu_alpha == 1.0 and self.swiglu_limit == 0.0
                and self.swiglu_up_offset == 0.0)

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """Layers with routed experts (every layer but the dense ones), in order."""
        dense = set(self.dense_layers)
        return tuple(i for i in range(self.n_layers) if i not in dense)

    def is_moe_layer(self, layer: int) -> bool:
        return layer not in self.dense_layers

    @property
    def mtp_layers(self) -> tuple[int, ...]:
        """The multi-token-prediction blocks after the main layers (MoE layers, never run by the main forward)."""
        return tuple(range(self.n_layers, self.n_layers + self.nextn_layers))

    @property
    def expert_layers(self) -> tuple[int, ...]:
        """Every layer with expert files: the MoE layers, then the MTP blocks."""
        return self.moe_layers + self.mtp_layers

    @property
    def uses_extensions(self) -> bool:
        """Whether the config needs format version 2 (any field beyond version 1 away from its default)."""
        return any(getattr(self, k) != v for k, v in EXTENSION_DEFAULTS.items())

    def to_dict(self) -> dict[str, Any]:
        """Version-2 fields are left out while they hold their defaults, so a config that needs none of them (and its
        manifest) is exactly what version 1 wrote."""
        d = asdict(self)
        d["dense_layers"] = list(self.dense_layers)
        d["qk_norm"] = self.qk_norm.value
        d["gating_func"] = self.gating_func.value
        d["full_attention_layers"] = list(self.full_attention_layers)
        d["rope_scaling"] = self.rope_scaling.value
        d["group_score"] = self.group_score.value
        for k, v in EXTENSION_DEFAULTS.items():
            if getattr(self, k) == v:
                del d[k]
        return d

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
