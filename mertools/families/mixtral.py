"""Mixtral (MixtralForCausalLM; GGUF arch "llama" with experts): names and hyper-parameter keys."""

from __future__ import annotations

from typing import Any

from ..layout.config import ModelConfig
from .base import ConfigKey, DenseSpec, ExpertSpec, Family
from .common import GLOBALS, attention, finish_common

_L = "model.layers.{L}"

# embeddings, norms and attention are named as in the other HF decoders; the router and experts are not
DENSE = (
    *GLOBALS,
    *attention(q_norm=None, k_norm=None),
    DenseSpec("blk.{L}.ffn_gate_inp.weight", f"{_L}.block_sparse_moe.gate.weight", "router", ("n_experts", "d_model"),
              field="router", per_layer=True),
)

_E = f"{_L}.block_sparse_moe.experts.{{E}}"
EXPERTS = (
    ExpertSpec("gate", f"{_E}.w1.weight", "blk.{L}.ffn_gate_exps.weight", "blk.{L}.ffn_gate.{E}.weight", ("d_ff", "d_model")),
    ExpertSpec("up", f"{_E}.w3.weight", "blk.{L}.ffn_up_exps.weight", "blk.{L}.ffn_up.{E}.weight", ("d_ff", "d_model")),
    ExpertSpec("down", f"{_E}.w2.weight", "blk.{L}.ffn_down_exps.weight", "blk.{L}.ffn_down.{E}.weight", ("d_model", "d_ff")),
)

CONFIG_KEYS = (
    ConfigKey("vocab_size", ("vocab_size",), ("{arch}.vocab_size",)),
    ConfigKey("d_model", ("hidden_size",), ("{arch}.embedding_length",)),
    ConfigKey("d_ff", ("intermediate_size",), ("{arch}.expert_feed_forward_length", "{arch}.feed_forward_length")),
    ConfigKey("n_layers", ("num_hidden_layers",), ("{arch}.block_count",)),
    ConfigKey("n_heads", ("num_attention_heads",), ("{arch}.attention.head_count",)),
    ConfigKey("n_kv_heads", ("num_key_value_heads",), ("{arch}.attention.head_count_kv",), default=0),
    ConfigKey("head_dim", ("head_dim",), ("{arch}.attention.key_length", "{arch}.rope.dimension_count"), default=0),
    ConfigKey("n_experts", ("num_local_experts",), ("{arch}.expert_count",)),
    ConfigKey("n_experts_used", ("num_experts_per_tok",), ("{arch}.expert_used_count",)),
    ConfigKey("context_length", ("max_position_embeddings",), ("{arch}.context_length",)),
    ConfigKey("rope_theta", ("rope_theta", "rope_parameters.rope_theta"), ("{arch}.rope.freq_base",), default=1e6),
    ConfigKey("norm_eps", ("rms_norm_eps",), ("{arch}.attention.layer_norm_rms_epsilon",), default=1e-5),
    ConfigKey("sliding_window", ("sliding_window",), ("{arch}.attention.sliding_window",), default=None),
    ConfigKey("tie_embeddings", ("tie_word_embeddings",), (), default=False),
)


def _hf_config(c: ModelConfig) -> dict[str, Any]:
    return dict(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim,
        num_local_experts=c.n_experts, num_experts_per_tok=c.n_experts_used, max_position_embeddings=c.context_length,
        rope_theta=c.rope_theta, rms_norm_eps=c.norm_eps, sliding_window=c.sliding_window,
        tie_word_embeddings=c.tie_embeddings,
    )


FAMILY = Family(
    name="mixtral",
    hf_architectures=("MixtralForCausalLM",),
    hf_model_types=("mixtral",),
    gguf_architectures=("llama", "mixtral"),
    dense=DENSE,
    experts=EXPERTS,
    config_keys=CONFIG_KEYS,
    gguf_permutes_qk=True,
    finish_config=finish_common,
    hf_config=_hf_config,
)
