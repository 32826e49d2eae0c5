"""Qwen2-MoE (Qwen2MoeForCausalLM; GGUF arch "qwen2moe"): q/k/v biases, an always-resident shared
expert in every MoE layer scaled by sigmoid(shared_expert_gate . x), experts of width
moe_intermediate_size, top-k weights not renormalised by default (llama.cpp never renormalises)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..layout.config import ModelConfig
from .base import ConfigKey, Family
from .common import CONFIG_KEYS as COMMON_KEYS
from .common import DENSE_MLP, EXPERTS, GLOBALS, ROUTER, attention, finish_common, hf_dense_layers, per_layer

SHARED = (
    per_layer("ffn_gate_inp_shexp.weight", "mlp.shared_expert_gate.weight", "router", ("one", "d_model"), "shared_gate",
              layers="moe", when="shared_expert_gate"),
    per_layer("ffn_gate_shexp.weight", "mlp.shared_expert.gate_proj.weight", "ffn", ("d_ff_shared", "d_model"), "shared.gate",
              layers="moe", when="shared_expert"),
    per_layer("ffn_up_shexp.weight", "mlp.shared_expert.up_proj.weight", "ffn", ("d_ff_shared", "d_model"), "shared.up",
              layers="moe", when="shared_expert"),
    per_layer("ffn_down_shexp.weight", "mlp.shared_expert.down_proj.weight", "ffn", ("d_model", "d_ff_shared"), "shared.down",
              layers="moe", when="shared_expert"),
)

DENSE = (*GLOBALS, *attention(q_norm=None, k_norm=None), ROUTER, *SHARED, *DENSE_MLP)

CONFIG_KEYS = (
    *COMMON_KEYS,
    ConfigKey("d_ff", ("moe_intermediate_size",), ("{arch}.expert_feed_forward_length",)),
    ConfigKey("d_ff_dense", ("intermediate_size",), ("{arch}.feed_forward_length",), default=0),
    ConfigKey("d_ff_shared", ("shared_expert_intermediate_size",), ("{arch}.expert_shared_feed_forward_length",)),
    # Qwen1.5-MoE configs predate the key: their projections always carry biases
    ConfigKey("attn_bias", ("qkv_bias",), (), default=True),
)


def _finish(values: dict[str, Any], raw: Mapping[str, Any]) -> None:
    finish_common(values, raw)
    if raw:
        values["dense_layers"] = hf_dense_layers(raw, values["n_layers"])
    if not values.get("dense_layers"):
        values["dense_layers"], values["d_ff_dense"] = (), 0
    values["norm_topk_prob"] = bool(values["norm_topk_prob"])
    values["attn_bias"] = bool(values["attn_bias"])
    values["shared_expert_gate"] = values["d_ff_shared"] > 0  # the gate comes with the shared expert


def _hf_config(c: ModelConfig) -> dict[str, Any]:
    return dict(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff_dense or c.d_ff,
        moe_intermediate_size=c.d_ff, shared_expert_intermediate_size=c.d_ff_shared, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, num_experts=c.n_experts,
        num_experts_per_tok=c.n_experts_used, max_position_embeddings=c.context_length, rope_theta=c.rope_theta,
        rms_norm_eps=c.norm_eps, tie_word_embeddings=c.tie_embeddings, norm_topk_prob=c.norm_topk_prob,
        mlp_only_layers=list(c.dense_layers), decoder_sparse_step=1, qkv_bias=c.attn_bias, use_sliding_window=False,
    )


FAMILY = Family(
    name="qwen2_moe",
    hf_architectures=("Qwen2MoeForCausalLM",),
    hf_model_types=("qwen2_moe",),
    gguf_architectures=("qwen2moe",),
    dense=DENSE,
    experts=EXPERTS,
    config_keys=CONFIG_KEYS,
    gguf_permutes_qk=False,
    finish_config=_finish,
    hf_config=_hf_config,
    dense_mlp_layers=True,
)
