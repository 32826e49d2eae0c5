"""GLM-4.5 / 4.6 (-Air) (Glm4MoeForCausalLM; GGUF arch "glm4moe"): sigmoid router scores, a per-layer
correction bias that only chooses experts (`exp_probs_b`), top-k renormalised then scaled by
routed_scaling_factor, DeepSeek-V3's group-limited choice (n_group / topk_group), an always-resident
shared expert, leading dense layers (first_k_dense_replace), q/k/v biases, per-head q/k RMSNorm when
use_qk_norm, rotary on the first partial_rotary_factor of each head.

The multi-token-prediction (MTP, "nextn") layers after num_hidden_layers (HF's model.layers.<num_hidden_layers>.*;
llama.cpp's GGUFs count them in block_count and say how many in nextn_predict_layers) are kept only when asked
(`convert --mtp`: config.nextn_layers, families.common.MTP), as a drafter for speculative decoding.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from ..layout.config import ModelConfig
from .base import ConfigKey, DenseSpec, Family
from .common import CONFIG_KEYS as COMMON_KEYS
from .common import (
    DENSE_MLP,
    EXPERTS,
    GLOBALS,
    MTP,
    NEXTN_KEY,
    ROUTER,
    attention,
    finish_common,
    finish_nextn,
    leading_dense,
    per_layer,
)

# GGUF expert_gating_func values (gguf-py's ExpertGatingFuncType)
GATING_FUNCS = {1: "softmax", 2: "sigmoid"}


def _attention() -> tuple[DenseSpec, ...]:
    """The shared attention table, but llama.cpp names GLM's FFN input norm post_attention_norm, and the
    per-head q/k norms exist only when the config says (use_qk_norm)."""
    out = []
    for s in attention(q_norm=("head_dim",), k_norm=("head_dim",)):
        if s.field == "ffn_norm":
            s = replace(s, name="blk.{L}.post_attention_norm.weight")
        elif s.field in ("q_norm", "k_norm"):
            s = replace(s, when="qk_norm")
        out.append(s)
    return tuple(out)


_S = "mlp.shared_experts"
MOE = (
    ROUTER,
    per_layer("exp_probs_b.bias", "mlp.gate.e_score_correction_bias", "bias", ("n_experts",), "expert_bias",
              layers="moe", when="expert_bias"),
    per_layer("ffn_gate_shexp.weight", f"{_S}.gate_proj.weight", "ffn", ("d_ff_shared", "d_model"), "shared.gate",
              layers="moe", when="shared_expert"),
    per_layer("ffn_up_shexp.weight", f"{_S}.up_proj.weight", "ffn", ("d_ff_shared", "d_model"), "shared.up",
              layers="moe", when="shared_expert"),
    per_layer("ffn_down_shexp.weight", f"{_S}.down_proj.weight", "ffn", ("d_model", "d_ff_shared"), "shared.down",
              layers="moe", when="shared_expert"),
)

DENSE = (*GLOBALS, *_attention(), *MOE, *DENSE_MLP, *MTP)

_OWN_KEYS = (
    ConfigKey("n_experts", ("n_routed_experts", "num_local_experts"), ("{arch}.expert_count",)),
    ConfigKey("d_ff", ("moe_intermediate_size",), ("{arch}.expert_feed_forward_length",)),
    ConfigKey("d_ff_dense", ("intermediate_size",), ("{arch}.feed_forward_length",), default=0),
    # GGUF has no keys for these: the GGUF reader looks for their tensors (biases, q/k norms, exp_probs_b)
    ConfigKey("attn_bias", ("attention_bias",), (), default=False),
    ConfigKey("qk_norm", ("use_qk_norm",), (), default=False),
    ConfigKey("expert_bias", (), (), default=True),  # transformers' router always has e_score_correction_bias
    ConfigKey("routed_scaling", ("routed_scaling_factor",), ("{arch}.expert_weights_scale",), default=None),
    ConfigKey("n_groups", ("n_group",), ("{arch}.expert_group_count",), default=None),
    ConfigKey("n_groups_used", ("topk_group",), ("{arch}.expert_group_used_count",), default=None),
    ConfigKey("rope_dim", (), ("{arch}.rope.dimension_count",), default=None),
    ConfigKey("gating_func", (), ("{arch}.expert_gating_func",), default=None),
    # raw values _finish turns into fields
    ConfigKey("_rotary_factor", ("rope_parameters.partial_rotary_factor", "partial_rotary_factor"), (), default=None),
    ConfigKey("_n_shared", ("n_shared_experts",), ("{arch}.expert_shared_count",), default=None),
    ConfigKey("_leading_dense", ("first_k_dense_replace",), ("{arch}.leading_dense_block_count",), default=None),
    NEXTN_KEY,
)
CONFIG_KEYS = (*(k for k in COMMON_KEYS if k.field not in {o.field for o in _OWN_KEYS}), *_OWN_KEYS)


def _finish(values: dict[str, Any], raw: Mapping[str, Any]) -> None:
    """`raw` is the HF config, empty for GGUF: where a key is absent, transformers' Glm4MoeConfig default
    applies to HF and llama.cpp's to GGUF, so each source means what its own runtime would run."""
    hf = bool(raw)
    finish_common(values, raw)
    finish_nextn(values, hf)
    hd = values["head_dim"]
    if hf:  # transformers' GLM default is half the head
        factor = values["_rotary_factor"]
        values["rope_dim"] = int(hd * (0.5 if factor is None else float(factor)))
    elif values["rope_dim"] is None:  # llama.cpp's n_rot defaults to the whole head
        values["rope_dim"] = hd
    if values["rope_dim"] % 2:
        raise ValueError(f"partial rotary over {values['rope_dim']} dims of {hd}: must be even")
    gating = values["gating_func"]
    gating = GATING_FUNCS.get(gating, gating) if gating is not None else "sigmoid"
    if gating != "sigmoid":  # transformers' GLM has no other; llama.cpp's glm4moe default is sigmoid
        raise ValueError(f"expert gating function {gating!r} is not supported for glm4moe (GLM-4.5 routes with sigmoid)")
    values["gating_func"] = gating
    values["qk_norm"] = "head" if values["qk_norm"] else "none"
    values["attn_bias"] = bool(values["attn_bias"])
    values["expert_bias"] = bool(values["expert_bias"])
    if values["norm_topk_prob"] is None:
        values["norm_topk_prob"] = hf  # transformers' default True; llama.cpp's expert_weights_norm default false
    values["norm_topk_prob"] = bool(values["norm_topk_prob"])
    # llama.cpp: a scale of 0 (its default) means none, like 1
    values["routed_scaling"] = float(values["routed_scaling"] or 1.0)
    groups, used = values["n_groups"] or 1, values["n_groups_used"] or 1
    values["n_groups"], values["n_groups_used"] = (groups, used) if groups > 1 else (1, 1)
    n_shared = values["_n_shared"]
    if n_shared is None:
        if not hf:  # llama.cpp requires the key too
            raise ValueError("missing hyper-parameter glm4moe.expert_shared_count")
        n_shared = 1
    values["d_ff_shared"] = int(n_shared) * values["d_ff"]
    lead = values["_leading_dense"]
    leading_dense(values, int(lead) if lead is not None else (1 if hf else 0))


def _hf_config(c: ModelConfig) -> dict[str, Any]:
    if c.d_ff_shared % c.d_ff or c.dense_layers != tuple(range(len(c.dense_layers))):
        raise ValueError("Glm4MoeConfig needs d_ff_shared a multiple of d_ff and the dense layers leading")
    return dict(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff_dense or c.d_ff,
        moe_intermediate_size=c.d_ff, num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim, n_routed_experts=c.n_experts,
        num_experts_per_tok=c.n_experts_used, n_shared_experts=c.d_ff_shared // c.d_ff,
        first_k_dense_replace=len(c.dense_layers), max_position_embeddings=c.context_length,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta,
                         "partial_rotary_factor": c.rotary_dim / c.head_dim},
        rms_norm_eps=c.norm_eps, tie_word_embeddings=c.tie_embeddings, norm_topk_prob=c.norm_topk_prob,
        routed_scaling_factor=c.routed_scaling, n_group=c.n_groups, topk_group=c.n_groups_used,
        attention_bias=c.attn_bias, use_qk_norm=c.qk_norm != "none", num_nextn_predict_layers=0,
        pad_token_id=None, bos_token_id=None, eos_token_id=None,
    )


FAMILY = Family(
    name="glm4_moe",
    hf_architectures=("Glm4MoeForCausalLM",),
    hf_model_types=("glm4_moe",),
    gguf_architectures=("glm4moe",),
    dense=DENSE,
    experts=EXPERTS,
    config_keys=CONFIG_KEYS,
    gguf_permutes_qk=False,  # llama.cpp's glm4moe rotary is NEOX: GGUF q/k rows are in HF order
    finish_config=_finish,
    hf_config=_hf_config,
)
