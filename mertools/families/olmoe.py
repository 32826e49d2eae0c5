"""OLMoE (OlmoeForCausalLM; GGUF arch "olmoe"): RMSNorm of q and k over the whole projection (before
the split into heads), experts of width intermediate_size, top-k weights not renormalised by default."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..layout.config import ModelConfig
from .base import ConfigKey, Family
from .common import CONFIG_KEYS as COMMON_KEYS
from .common import EXPERTS, GLOBALS, ROUTER, attention, finish_common

DENSE = (*GLOBALS, *attention(q_norm=("q_dim",), k_norm=("kv_dim",)), ROUTER)

CONFIG_KEYS = (
    *COMMON_KEYS,
    ConfigKey("d_ff", ("intermediate_size",), ("{arch}.feed_forward_length",)),
    ConfigKey("attn_bias", ("attention_bias",), (), default=False),
)


def _finish(values: dict[str, Any], raw: Mapping[str, Any]) -> None:
    finish_common(values, raw)
    if raw.get("clip_qkv") is not None:
        raise ValueError(f"clip_qkv {raw['clip_qkv']!r} is not supported yet")
    values["qk_norm"] = "full"
    values["norm_topk_prob"] = bool(values["norm_topk_prob"])  # transformers' and llama.cpp's default: False
    values["attn_bias"] = bool(values["attn_bias"])


def _hf_config(c: ModelConfig) -> dict[str, Any]:
    return dict(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, num_experts=c.n_experts,
        num_experts_per_tok=c.n_experts_used, max_position_embeddings=c.context_length, rope_theta=c.rope_theta,
        rms_norm_eps=c.norm_eps, tie_word_embeddings=c.tie_embeddings, norm_topk_prob=c.norm_topk_prob,
        attention_bias=c.attn_bias, clip_qkv=None, pad_token_id=None, eos_token_id=None, bos_token_id=None,
    )


FAMILY = Family(
    name="olmoe",
    hf_architectures=("OlmoeForCausalLM",),
    hf_model_types=("olmoe",),
    gguf_architectures=("olmoe",),
    dense=DENSE,
    experts=EXPERTS,
    config_keys=CONFIG_KEYS,
    gguf_permutes_qk=False,
    finish_config=_finish,
    hf_config=_hf_config,
)
