"""Name tables shared by the HF decoder families whose layers are `model.layers.N.{self_attn,mlp}`, as
data: llama.cpp's GGUF name, the HF name, role, shape and weights field of each. A family module takes
the pieces it has (see each family's `Family(gguf_permutes_qk=...)` for llama.cpp's q/k row order).

GGUF names are gguf-py's (constants.py TENSOR_NAMES, tensor_mapping.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .base import ConfigKey, DenseSpec, ExpertSpec

L = "model.layers.{L}"


def per_layer(gguf: str, hf: str, role: str, shape: tuple[str, ...], field: str, **kw: Any) -> DenseSpec:
    """A per-layer tensor: "attn_q.weight" is blk.{L}.attn_q.weight in GGUF, model.layers.{L}.<hf> in HF."""
    return DenseSpec(f"blk.{{L}}.{gguf}", f"{L}.{hf}", role, shape, field=field, per_layer=True, **kw)


def attention(q_norm: tuple[str, ...] | None, k_norm: tuple[str, ...] | None) -> tuple[DenseSpec, ...]:
    """Norms, q/k/v/o with optional biases, and optional q/k RMSNorms of the given shapes."""
    specs = [
        per_layer("attn_norm.weight", "input_layernorm.weight", "norm", ("d_model",), "attn_norm"),
        per_layer("attn_q.weight", "self_attn.q_proj.weight", "attn_q", ("q_dim", "d_model"), "attn_q"),
        per_layer("attn_k.weight", "self_attn.k_proj.weight", "attn_k", ("kv_dim", "d_model"), "attn_k"),
        per_layer("attn_v.weight", "self_attn.v_proj.weight", "attn_v", ("kv_dim", "d_model"), "attn_v"),
        per_layer("attn_q.bias", "self_attn.q_proj.bias", "bias", ("q_dim",), "q_bias", when="attn_bias"),
        per_layer("attn_k.bias", "self_attn.k_proj.bias", "bias", ("kv_dim",), "k_bias", when="attn_bias"),
        per_layer("attn_v.bias", "self_attn.v_proj.bias", "bias", ("kv_dim",), "v_bias", when="attn_bias"),
        per_layer("attn_output.weight", "self_attn.o_proj.weight", "attn_o", ("d_model", "o_dim"), "attn_o"),
        per_layer("ffn_norm.weight", "post_attention_layernorm.weight", "norm", ("d_model",), "ffn_norm"),
    ]
    if q_norm is not None and k_norm is not None:
        specs += [
            per_layer("attn_q_norm.weight", "self_attn.q_norm.weight", "norm", q_norm, "q_norm"),
            per_layer("attn_k_norm.weight", "self_attn.k_norm.weight", "norm", k_norm, "k_norm"),
        ]
    return tuple(specs)


GLOBALS = (
    DenseSpec("token_embd.weight", "model.embed_tokens.weight", "embedding", ("vocab_size", "d_model"), field="embed"),
    DenseSpec("output_norm.weight", "model.norm.weight", "norm", ("d_model",), field="output_norm"),
    DenseSpec("output.weight", "lm_head.weight", "output", ("vocab_size", "d_model"), field="output", optional=True),
)

ROUTER = per_layer("ffn_gate_inp.weight", "mlp.gate.weight", "router", ("n_experts", "d_model"), "router", layers="moe")

# the dense SwiGLU MLP of layers without experts (HF configs: mlp_only_layers / decoder_sparse_step)
DENSE_MLP = (
    per_layer("ffn_gate.weight", "mlp.gate_proj.weight", "ffn", ("d_ff_dense", "d_model"), "mlp.gate", layers="dense"),
    per_layer("ffn_up.weight", "mlp.up_proj.weight", "ffn", ("d_ff_dense", "d_model"), "mlp.up", layers="dense"),
    per_layer("ffn_down.weight", "mlp.down_proj.weight", "ffn", ("d_model", "d_ff_dense"), "mlp.down", layers="dense"),
)

# A multi-token-prediction block (config.nextn_layers; DeepSeek-V3's and GLM-4.5's model.layers.<num_hidden_layers>)
# is an MoE decoder layer plus these: the next token's embedding and the main model's hidden state, each RMS-normed,
# concatenated and projected to d_model; its output normed and scored by a head. DeepSeek's checkpoints hold their
# own copy of the embedding and the head; GLM's use the model's (llama.cpp's nextn tensors)
MTP = (
    per_layer("nextn.eh_proj.weight", "eh_proj.weight", "ffn", ("d_model", "two_d_model"), "mtp_eh_proj", layers="mtp"),
    per_layer("nextn.enorm.weight", "enorm.weight", "norm", ("d_model",), "mtp_enorm", layers="mtp"),
    per_layer("nextn.hnorm.weight", "hnorm.weight", "norm", ("d_model",), "mtp_hnorm", layers="mtp"),
    per_layer("nextn.shared_head_norm.weight", "shared_head.norm.weight", "norm", ("d_model",), "mtp_head_norm",
              layers="mtp"),
    per_layer("nextn.shared_head_head.weight", "shared_head.head.weight", "output", ("vocab_size", "d_model"),
              "mtp_head", layers="mtp", optional=True),
    per_layer("nextn.embed_tokens.weight", "embed_tokens.weight", "embedding", ("vocab_size", "d_model"),
              "mtp_embed", layers="mtp", optional=True),
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
    # None = not stated: the family decides (transformers' and llama.cpp's defaults may disagree)
    ConfigKey("norm_topk_prob", ("norm_topk_prob",), ("{arch}.expert_weights_norm",), default=None),
)

# the MTP blocks: HF counts them apart from num_hidden_layers, llama.cpp's GGUFs within block_count
NEXTN_KEY = ConfigKey("nextn_layers", ("num_nextn_predict_layers",), ("{arch}.nextn_predict_layers",), default=0)


def finish_nextn(values: dict[str, Any], hf: bool) -> None:
    """nextn_layers as an int, and n_layers without the MTP blocks a GGUF's block_count includes."""
    nextn = values["nextn_layers"] = int(values["nextn_layers"] or 0)
    if not hf:
        if not 0 <= nextn < values["n_layers"]:
            raise ValueError(f"{nextn} MTP (nextn) layers of {values['n_layers']} blocks: no model layer is left")
        values["n_layers"] -= nextn


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
    """transformers' rule for configs with these keys: a layer is a dense MLP when it is in
    mlp_only_layers or (layer + 1) is not a multiple of decoder_sparse_step."""
    only = raw.get("mlp_only_layers") or []
    step = raw.get("decoder_sparse_step") or 1
    if not isinstance(only, list) or not all(isinstance(x, int) for x in only) or not isinstance(step, int) or step < 1:
        raise ValueError(f"mlp_only_layers {only!r} / decoder_sparse_step {step!r} are malformed")
    return tuple(la for la in range(n_layers) if la in only or (la + 1) % step)


def yarn_mscale(factor: float, m: float = 1.0) -> float:
    """YaRN's attention factor (transformers' get_mscale): 0.1 * m * ln(factor) + 1 above factor 1."""
    return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0


def yarn_from_hf(rope: Mapping[str, Any] | None, context_length: int, family: str) -> dict[str, Any] | None:
    """The YaRN config fields of an HF rope_parameters / rope_scaling dict (transformers'
    _compute_yarn_parameters), None for the default rotary; any other kind is refused."""
    rope = rope or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return None
    if kind != "yarn":
        raise ValueError(f"rope scaling {kind!r} is not supported for {family} (YaRN is)")
    original = rope.get("original_max_position_embeddings") or context_length
    factor = rope.get("factor") or context_length / original
    attn = rope.get("attention_factor")
    if attn is None:
        mscale, all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
        attn = yarn_mscale(factor, mscale) / yarn_mscale(factor, all_dim) if mscale and all_dim else yarn_mscale(factor)
    return dict(rope_scaling="yarn", rope_factor=float(factor), rope_original_context=int(original),
                yarn_beta_fast=float(rope.get("beta_fast") or 32.0), yarn_beta_slow=float(rope.get("beta_slow") or 1.0),
                yarn_truncate=bool(rope.get("truncate", True)), rope_attn_factor=float(attn))


def leading_dense(values: dict[str, Any], lead: int) -> None:
    """The first `lead` layers are dense MLPs (HF first_k_dense_replace, GGUF leading_dense_block_count)."""
    if not 0 <= lead < values["n_layers"]:
        raise ValueError(f"{lead} leading dense layers of {values['n_layers']}: no MoE layer is left")
    values["dense_layers"] = tuple(range(lead))
    if not lead:
        values["d_ff_dense"] = 0
