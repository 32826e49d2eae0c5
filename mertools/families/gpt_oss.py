"""gpt-oss (GptOssForCausalLM; GGUF arch "gpt-oss"): attention sinks (a learned logit per head in each
softmax's denominator), sliding-window and full attention alternating by `layer_types`, biases on q/k/v/o,
the router and the experts, softmax over the chosen top-k logits, YaRN rotary, and experts that apply
(up + 1) * gate * sigmoid(1.702 * gate) with gate clamped above and up on both sides at swiglu_limit.

HF keeps each layer's experts merged: gate_up_proj (E, d_model, 2 d_ff) with gate and up interleaved
(gate = [..., ::2], up = [..., 1::2]), down_proj (E, d_ff, d_model), both used as x @ W, and biases
gate_up_proj_bias (E, 2 d_ff), down_proj_bias (E, d_model); OpenAI's release stores the matrices as MXFP4
`*_blocks` / `*_scales`, which convert to ggml's mxfp4 bit for bit. llama.cpp splits them into
ffn_{gate,up,down}_exps weights and biases. A layout keeps each expert's biases in its own file.

GGUF has no keys for what llama.cpp hard-codes for this arch (swiglu alpha 1.702 and limit 7, the
alternation of sliding layers from layer 0, softmax over the top-k): the same values are the defaults
here. YaRN's `truncate`: every gpt-oss config says false (OpenAI's reference implementation does not floor
or ceil the correction range); llama.cpp's ggml always does, a deviation of its own that a GGUF does not
state, so a GGUF means the model's rule (false) and converts to the config its HF checkpoint gives.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from ..layout.config import ModelConfig, RopeScaling
from .base import ConfigKey, DenseSpec, ExpertSpec, Family, HFMerged
from .common import CONFIG_KEYS as COMMON_KEYS
from .common import GLOBALS, ROUTER, attention, finish_common, per_layer, yarn_from_hf, yarn_mscale

SWIGLU_ALPHA, SWIGLU_LIMIT = 1.702, 7.0  # transformers' GptOssConfig defaults; llama.cpp's constants


def _attention() -> tuple[DenseSpec, ...]:
    """The shared table with biases on q/k/v/o, and llama.cpp's name for the FFN input norm."""
    out = [replace(s, name="blk.{L}.post_attention_norm.weight") if s.field == "ffn_norm" else s
           for s in attention(q_norm=None, k_norm=None)]
    out += [
        per_layer("attn_output.bias", "self_attn.o_proj.bias", "bias", ("d_model",), "o_bias", when="attn_o_bias"),
        per_layer("attn_sinks.weight", "self_attn.sinks", "bias", ("n_heads",), "attn_sinks", when="attn_sinks"),
    ]
    return tuple(out)


MOE = (
    replace(ROUTER, hf="model.layers.{L}.mlp.router.weight"),
    per_layer("ffn_gate_inp.bias", "mlp.router.bias", "bias", ("n_experts",), "router_bias", layers="moe",
              when="router_bias"),
)
DENSE = (*GLOBALS, *_attention(), *MOE)

_E = "model.layers.{L}.mlp.experts"
EXPERTS = (
    ExpertSpec("gate", f"{_E}.gate_up_proj", "blk.{L}.ffn_gate_exps.weight", "", ("d_ff", "d_model"),
               HFMerged(transposed=True, start=0, step=2)),
    ExpertSpec("up", f"{_E}.gate_up_proj", "blk.{L}.ffn_up_exps.weight", "", ("d_ff", "d_model"),
               HFMerged(transposed=True, start=1, step=2)),
    ExpertSpec("down", f"{_E}.down_proj", "blk.{L}.ffn_down_exps.weight", "", ("d_model", "d_ff"),
               HFMerged(transposed=True)),
    ExpertSpec("gate_bias", f"{_E}.gate_up_proj_bias", "blk.{L}.ffn_gate_exps.bias", "", ("d_ff",),
               HFMerged(start=0, step=2)),
    ExpertSpec("up_bias", f"{_E}.gate_up_proj_bias", "blk.{L}.ffn_up_exps.bias", "", ("d_ff",),
               HFMerged(start=1, step=2)),
    ExpertSpec("down_bias", f"{_E}.down_proj_bias", "blk.{L}.ffn_down_exps.bias", "", ("d_model",), HFMerged()),
)

_R = "{arch}.rope.scaling."
_OWN_KEYS = (
    ConfigKey("d_ff", ("intermediate_size",), ("{arch}.expert_feed_forward_length",)),
    ConfigKey("sliding_window", ("sliding_window",), ("{arch}.attention.sliding_window",), default=None),
    # GGUF has no keys for these: the reader looks for their tensors
    ConfigKey("attn_bias", ("attention_bias",), (), default=True),
    ConfigKey("attn_o_bias", ("attention_bias",), (), default=True),
    ConfigKey("attn_sinks", (), (), default=True),
    ConfigKey("router_bias", (), (), default=True),
    ConfigKey("swiglu_alpha", ("swiglu_alpha",), (), default=SWIGLU_ALPHA),
    ConfigKey("swiglu_limit", ("swiglu_limit",), (), default=SWIGLU_LIMIT),
    # raw values _finish turns into fields
    ConfigKey("_layer_types", ("layer_types",), (), default=None),
    ConfigKey("_swa_pattern", (), ("{arch}.attention.sliding_window_pattern",), default=None),
    ConfigKey("_rope", ("rope_parameters", "rope_scaling"), (), default=None),
    ConfigKey("_rope_type", (), (_R + "type",), default=None),
    ConfigKey("_rope_factor", (), (_R + "factor",), default=None),
    ConfigKey("_rope_original", (), (_R + "original_context_length",), default=None),
    ConfigKey("_beta_fast", (), (_R + "yarn_beta_fast",), default=None),
    ConfigKey("_beta_slow", (), (_R + "yarn_beta_slow",), default=None),
    ConfigKey("_yarn_unsupported", (), (_R + "yarn_attn_factor", _R + "yarn_ext_factor", _R + "yarn_log_multiplier"),
              default=None),
)
CONFIG_KEYS = (*(k for k in COMMON_KEYS if k.field not in {o.field for o in _OWN_KEYS}), *_OWN_KEYS)


def _yarn(values: dict[str, Any], raw: Mapping[str, Any]) -> None:
    """The YaRN fields from HF's rope_parameters / rope_scaling (transformers' _compute_yarn_parameters) or
    llama.cpp's rope.scaling.* keys."""
    if raw:
        fields = yarn_from_hf(values["_rope"], values["context_length"], "gpt-oss")
        if fields is not None:
            values.update(fields)
        return
    kind = values["_rope_type"] or "none"
    if kind == "none":
        return
    if kind != "yarn":
        raise ValueError(f"rope scaling {kind!r} is not supported for gpt-oss (YaRN is)")
    if values["_yarn_unsupported"] is not None:
        raise ValueError("YaRN attention/extrapolation factors in GGUF metadata are not supported yet")
    factor, original = values["_rope_factor"], values["_rope_original"]
    if factor is None or original is None:
        raise ValueError("YaRN without rope.scaling.factor and original_context_length")
    values.update(rope_scaling="yarn", rope_factor=float(factor), rope_original_context=int(original),
                  yarn_beta_fast=float(values["_beta_fast"] or 32.0), yarn_beta_slow=float(values["_beta_slow"] or 1.0),
                  yarn_truncate=False, rope_attn_factor=yarn_mscale(float(factor)))  # truncate: see the docstring


def _full_layers(values: dict[str, Any], hf: bool) -> tuple[int, ...]:
    """Layers with full attention: HF's layer_types (transformers' default: layers 1, 3, ... full), llama.cpp's
    sliding_window_pattern (an array of per-layer flags, or n: layer i slides when i % n < n - 1; default 2)."""
    n = values["n_layers"]
    if hf:
        types = values["_layer_types"] or ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
        if not isinstance(types, list) or len(types) != n or not set(types) <= {"sliding_attention", "full_attention"}:
            raise ValueError(f"layer_types must list 'sliding_attention' or 'full_attention' for each of {n} layers, "
                             f"got {types!r}")
        return tuple(i for i, t in enumerate(types) if t == "full_attention")
    pattern = values["_swa_pattern"]
    if isinstance(pattern, list):
        if len(pattern) != n:
            raise ValueError(f"sliding_window_pattern has {len(pattern)} entries for {n} layers")
        return tuple(i for i, slides in enumerate(pattern) if not slides)
    p = 2 if pattern is None else int(pattern)
    return tuple(i for i in range(n) if not (p == 0 or i % p < p - 1))


def _finish(values: dict[str, Any], raw: Mapping[str, Any]) -> None:
    hf = bool(raw)
    finish_common(values, {k: v for k, v in raw.items() if k not in ("rope_scaling", "rope_parameters")})
    _yarn(values, raw)
    full = _full_layers(values, hf)
    if values["sliding_window"] is None or len(full) == values["n_layers"]:
        values["sliding_window"], full = None, ()  # no layer slides
    values["sliding_window"] = None if values["sliding_window"] is None else int(values["sliding_window"])
    values["full_attention_layers"] = full
    for name in ("attn_bias", "attn_o_bias", "attn_sinks", "router_bias"):
        values[name] = bool(values[name])
    # softmax over the chosen k's logits is the softmax over all, renormalised over the k
    values["norm_topk_prob"] = True
    values["expert_mlp_bias"] = True
    values["swiglu_alpha"], values["swiglu_limit"] = float(values["swiglu_alpha"]), float(values["swiglu_limit"])
    values["swiglu_up_offset"] = 1.0


def _hf_config(c: ModelConfig) -> dict[str, Any]:
    if not (c.attn_bias == c.attn_o_bias and c.attn_sinks and c.router_bias and c.expert_mlp_bias
            and c.swiglu_up_offset == 1.0 and c.norm_topk_prob and not c.rope_dim):
        raise ValueError("GptOssConfig cannot express this config (biases, sinks or the expert GLU differ from gpt-oss's)")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_scaling is RopeScaling.YARN:
        rope.update(rope_type="yarn", factor=c.rope_factor, original_max_position_embeddings=c.rope_original_context,
                    beta_fast=c.yarn_beta_fast, beta_slow=c.yarn_beta_slow, truncate=c.yarn_truncate,
                    attention_factor=c.rope_attn_factor)
    return dict(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim,
        num_local_experts=c.n_experts, num_experts_per_tok=c.n_experts_used, max_position_embeddings=c.context_length,
        rms_norm_eps=c.norm_eps, tie_word_embeddings=c.tie_embeddings, sliding_window=c.sliding_window,
        layer_types=["sliding_attention" if c.window(i) else "full_attention" for i in range(c.n_layers)],
        swiglu_alpha=c.swiglu_alpha, swiglu_limit=c.swiglu_limit if c.swiglu_limit else float("inf"),
        attention_bias=c.attn_bias, rope_parameters=rope, pad_token_id=None, bos_token_id=None, eos_token_id=None,
    )


FAMILY = Family(
    name="gpt_oss",
    hf_architectures=("GptOssForCausalLM",),
    hf_model_types=("gpt_oss",),
    gguf_architectures=("gpt-oss",),
    dense=DENSE,
    experts=EXPERTS,
    config_keys=CONFIG_KEYS,
    gguf_permutes_qk=False,  # llama.cpp's gpt-oss rotary is NEOX: GGUF q/k rows are in HF order
    finish_config=_finish,
    hf_config=_hf_config,
)
