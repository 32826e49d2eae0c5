"""Qwen3-MoE (Qwen3MoeForCausalLM; GGUF arch "qwen3moe"): per-head q/k RMSNorm, no biases by default,
experts of width moe_intermediate_size, dense SwiGLU layers where mlp_only_layers / decoder_sparse_step
say so (no expert files for them), top-k weights renormalised when norm_topk_prob."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..layout.config import ModelConfig
from .base import ConfigKey, Family
from .common import CONFIG_KEYS as COMMON_KEYS
from .common import DENSE_MLP, EXPERTS, GLOBALS, ROUTER, attention, finish_common, hf_dense_layers

DENSE = (*GLOBALS, *attention(q_norm=("head_dim",), k_norm=("head_dim",)), ROUTER, *DENSE_MLP)

CONFIG_KEYS = (
    *COMMON_KEYS,
    ConfigKey("d_ff", ("moe_intermediate_size",), ("{arch}.expert_feed_forward_length",)),
    ConfigKey("d_ff_dense", ("intermediate_size",), ("{arch}.feed_forward_length",), default=0),
    # GGUF has no key for it: the GGUF reader looks for the bias tensors
    ConfigKey("attn_bias", ("attention_bias",), (), default=False),
)


def _finish(values: dict[str, Any], raw: Mapping[str, Any]) -> None:
    finish_common(values, raw)
    values["qk_norm"] = "head"
    if raw:  # HF: the config says which layers are dense; GGUF: build_config found them by their tensors
        values["dense_layers"] = hf_dense_layers(raw, values["n_layers"])
    if not values.get("dense_layers"):
        values["dense_layers"], values["d_ff_dense"] = (), 0
    if values["norm_topk_prob"] is None:
        # transformers' default is False; llama.cpp's qwen3moe graph always renormalises (no GGUF key)
        values["norm_topk_prob"] = not raw
    values["attn_bias"] = bool(values["attn_bias"])


def _hf_config(c: ModelConfig) -> dict[str, Any]:
    return dict(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff_dense or c.d_ff,
        moe_intermediate_size=c.d_ff, num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim, num_experts=c.n_experts,
        num_experts_per_tok=c.n_experts_used, max_position_embeddings=c.context_length, rope_theta=c.rope_theta,
        rms_norm_eps=c.norm_eps, tie_word_embeddings=c.tie_embeddings, norm_topk_prob=c.norm_topk_prob,
        mlp_only_layers=list(c.dense_layers), decoder_sparse_step=1, attention_bias=c.attn_bias,
    )


FAMILY = Family(
    name="qwen3_moe",
    hf_architectures=("Qwen3MoeForCausalLM",),
    hf_model_types=("qwen3_moe",),
    gguf_architectures=("qwen3moe",),
    dense=DENSE,
    experts=EXPERTS,
    config_keys=CONFIG_KEYS,
    gguf_permutes_qk=False,
    finish_config=_finish,
    hf_config=_hf_config,
    dense_mlp_layers=True,
)
