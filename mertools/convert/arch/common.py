"""Name tables shared by the HF decoder families whose layers are `model.layers.N.{self_attn,mlp}`
(Qwen2-MoE, Qwen3-MoE, OLMoE; Mixtral shares the globals, attention and config finishing), as data:
llama.cpp's GGUF name, the HF name, role and shape of each.

GGUF names are gguf-py's (constants.py TENSOR_NAMES, tensor_mapping.py); none of these families has
its q/k rows permuted by llama.cpp's converter (they use NEOX rotary, which is HF's rotate-half).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import ConfigKey, DenseSpec, ExpertSpec

L = "model.layers.{L}"


def attention(q_norm: tuple[str, ...] | None, k_norm: tuple[str, ...] | None) -> tuple[DenseSpec, ...]:
    """Norms, q/k/v/o with optional biases, and optional q/k RMSNorms of the given shapes."""
    specs = [
        DenseSpec("blk.{L}.attn_norm.weight", f"{L}.input_layernorm.weight", "norm", ("d_model",), per_layer=True),
        DenseSpec("blk.{L}.attn_q.weight", f"{L}.self_attn.q_proj.weight", "attn_q", ("q_dim", "d_model"), per_layer=True),
        DenseSpec("blk.{L}.attn_k.weight", f"{L}.self_attn.k_proj.weight", "attn_k", ("kv_dim", "d_model"), per_layer=True),
        DenseSpec("blk.{L}.attn_v.weight", f"{L}.self_attn.v_proj.weight", "attn_v", ("kv_dim", "d_model"), per_layer=True),
        DenseSpec("blk.{L}.attn_q.bias", f"{L}.self_attn.q_proj.bias", "bias", ("q_dim",), per_layer=True, when="attn_bias"),
        DenseSpec("blk.{L}.attn_k.bias", f"{L}.self_attn.k_proj.bias", "bias", ("kv_dim",), per_layer=True, when="attn_bias"),
        DenseSpec("blk.{L}.attn_v.bias", f"{L}.self_attn.v_proj.bias", "bias", ("kv_dim",), per_layer=True, when="attn_bias"),
        DenseSpec("blk.{L}.attn_output.weight", f"{L}.self_attn.o_proj.weight", "attn_o", ("d_model", "q_dim"), per_layer=True),
        DenseSpec("blk.{L}.ffn_norm.weight", f"{L}.post_attention_layernorm.weight", "norm", ("d_model",), per_layer=True),
    ]
    if q_norm is not None and k_norm is not None:
        specs += [
            DenseSpec("blk.{L}.attn_q_norm.weight", f"{L}.self_attn.q_norm.weight", "norm", q_norm, per_layer=True),
            DenseSpec("blk.{L}.attn_k_norm.weight", f"{L}.self_attn.k_norm.weight", "norm", k_norm, per_layer=True),
        ]
    return tuple(specs)


GLOBALS = (
    DenseSpec("token_embd.weight", "model.embed_tokens.weight", "embedding", ("vocab_size", "d_model")),
    DenseSpec("output_norm.weight", "model.norm.weight", "norm", ("d_model",)),
    DenseSpec("output.weight", "lm_head.weight", "output", ("vocab_size", "d_model"), optional=True),
)

ROUTER = DenseSpec("blk.{L}.ffn_gate_inp.weight", f"{L}.mlp.gate.weight", "router", ("n_experts", "d_model"),
                   per_layer=True, layers="moe")

# the dense SwiGLU MLP of layers without experts (Qwen's mlp_only_layers / decoder_sparse_step)
DENSE_MLP = (
    DenseSpec("blk.{L}.ffn_gate.weight", f"{L}.mlp.gate_proj.weight", "ffn", ("d_ff_dense", "d_model"), per_layer=True,
              layers="dense"),
    DenseSpec("blk.{L}.ffn_up.weight", f"{L}.mlp.up_proj.weight", "ffn", ("d_ff_dense", "d_model"), per_layer=True,
              layers="dense"),
    DenseSpec("blk.{L}.ffn_down.weight", f"{L}.mlp.down_proj.weight", "ffn", ("d_model", "d_ff_dense"), per_layer=True,
              layers="dense"),
)

_E = f"{L}.mlp.experts.{{E}}"
# llama.cpp has only ever written these families with merged experts
EXPERTS = (
    ExpertSpec("gate", f"{_E}.gate_proj.weight", "blk.{L}.ffn_gate_exps.weight", "", ("d_ff", "d_model")),
    ExpertSpec("up", f"{_E}.up_proj.weight", "blk.{L}.ffn_up_exps.weight", "", ("d_ff", "d_model")),
    ExpertSpec("down", f"{_E}.down_proj.weight", "blk.{L}.ffn_down_exps.weight", "", ("d_model", "d_ff")),
)

CONFIG_KEYS = (
    ConfigKey("vocab_size", ("vocab_size",), ("{arch}.vocab_size",)),
    ConfigKey("d_model", ("hidden_size",), ("{arch}.embedding_length",)),
    ConfigKey("n_layers", ("num_hidden_layers",), ("{arch}.block_count",)),
    ConfigKey("n_heads", ("num_attention_heads",), ("{arch}.attention.head_count",)),
    ConfigKey("n_kv_heads", ("num_key_value_heads",), ("{arch}.attention.head_count_kv",), default=0),
    ConfigKey("head_dim", ("head_dim",), ("{arch}.attention.key_length",), default=0),
    ConfigKey("n_experts", ("num_experts", "num_local_experts"), ("{arch}.expert_count",)),
    ConfigKey("n_experts_used", ("num_experts_per_tok",), ("{arch}.expert_used_count",)),
    ConfigKey("context_length", ("max_position_embeddings",), ("{arch}.context_length",)),
    ConfigKey("rope_theta", ("rope_theta", "rope_parameters.rope_theta"), ("{arch}.rope.freq_base",), default=1e4),
    ConfigKey("norm_eps", ("rms_norm_eps",), ("{arch}.attention.layer_norm_rms_epsilon",), default=1e-6),
    ConfigKey("tie_embeddings", ("tie_word_embeddings",), (), default=False),
    # None = not stated: the family decides (transformers and llama.cpp disagree for Qwen3-MoE)
    ConfigKey("norm_topk_prob", ("norm_topk_prob",), ("{arch}.expert_weights_norm",), default=None),
)


def finish_common(values: dict[str, Any], raw: Mapping[str, Any]) -> None:
    """head_dim / kv heads defaults, rope scaling and per-layer sliding windows refused, types normalised."""
    if not values["n_kv_heads"]:
        values["n_kv_heads"] = values["n_heads"]
    if not values["head_dim"]:
        values["head_dim"] = values["d_model"] // values["n_heads"]
    for key in ("rope_scaling", "rope_parameters"):
        scaling = raw.get(key)
        if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type", "default")) != "default":
            raise ValueError(f"rope scaling {scaling.get('rope_type', scaling.get('type'))!r} is not supported yet")
    if raw.get("use_sliding_window"):
        raise ValueError("use_sliding_window (per-layer sliding windows) is not supported yet")
    values["rope_theta"] = float(values["rope_theta"])
    values["norm_eps"] = float(values["norm_eps"])
    values["tie_embeddings"] = bool(values["tie_embeddings"])


def hf_dense_layers(raw: Mapping[str, Any], n_layers: int) -> tuple[int, ...]:
    """transformers' rule (Qwen2MoeDecoderLayer / Qwen3MoeDecoderLayer): a layer is a dense MLP when it
    is in mlp_only_layers or (layer + 1) is not a multiple of decoder_sparse_step."""
    only = raw.get("mlp_only_layers") or []
    step = raw.get("decoder_sparse_step") or 1
    if not isinstance(only, list) or not all(isinstance(x, int) for x in only) or not isinstance(step, int) or step < 1:
        raise ValueError(f"mlp_only_layers {only!r} / decoder_sparse_step {step!r} are malformed")
    return tuple(la for la in range(n_layers) if la in only or (la + 1) % step)
