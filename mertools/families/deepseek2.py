"""DeepSeek-V2 / V2-Lite / V3 / R1 and Kimi K2 (DeepseekV2ForCausalLM, DeepseekV3ForCausalLM; GGUF arch
"deepseek2" for all): multi-head latent attention (families/mla.py; q through a LoRA bottleneck except
V2-Lite's plain q_proj), YaRN with DeepSeek's softmax scale (mscale_all_dim), leading dense layers
(first_k_dense_replace), always-resident shared experts, and routing by softmax (V2: top-k of every expert,
or with group_limited_greedy the best topk_group of n_group groups, a group scored by its best expert; no
renormalisation unless norm_topk_prob) or by sigmoid (V3: a correction bias for choosing, groups scored by
their best two, renormalised, times routed_scaling_factor).

HF's kv_b_proj (per head k_b then v_b rows) is held as llama.cpp holds it now: attn_k_b (k_b transposed per
head) and attn_v_b; older GGUFs' attn_kv_b is split on reading (families.base.HeadSplit). Modern GGUFs say
MLA's shapes in key_length_mla / value_length_mla (key_length, value_length and head_count_kv = 1 then
describe the absorbed cache); older ones in key_length / value_length.

Where GGUF and HF mean different things the model's rule wins: llama.cpp scores groups by their best two
experts even under softmax gating, whereas DeepSeek-V2's rule (transformers' and DeepSeek's own code) is
the group's best expert, which is what a softmax-gated GGUF means here. GGUF's YaRN log multiplier is 0.1 x
mscale_all_dim (llama.cpp's converter) and its cos/sin factor 1 (every DeepSeek config has mscale =
mscale_all_dim). The multi-token-prediction layer (V3's model.layers.61) is kept only when asked (`convert --mtp`,
config.nextn_layers): llama.cpp's deepseek2 GGUFs leave it out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ..layout.config import ModelConfig, RopeScaling
from .base import ConfigKey, Family, HeadSplit
from .common import CONFIG_KEYS as COMMON_KEYS
from .common import (
    DENSE_MLP,
    EXPERTS,
    GLOBALS,
    MTP,
    NEXTN_KEY,
    finish_common,
    finish_nextn,
    leading_dense,
    per_layer,
    yarn_from_hf,
    yarn_mscale,
)
from .glm4_moe import GATING_FUNCS
from .glm4_moe import MOE as GLM_MOE  # router, correction bias, shared experts: the same names
from .mla import mla_attention_inputs, mla_attention_output
from .pieces import Pieces

_A = "self_attn"
ATTENTION = (
    per_layer("attn_norm.weight", "input_layernorm.weight", "norm", ("d_model",), "attn_norm"),
    per_layer("attn_q.weight", f"{_A}.q_proj.weight", "attn_q", ("q_dim", "d_model"), "attn_q", when="no_q_lora"),
    per_layer("attn_q_a.weight", f"{_A}.q_a_proj.weight", "attn_q", ("q_lora_rank", "d_model"), "attn_q_a", when="q_lora"),
    per_layer("attn_q_a_norm.weight", f"{_A}.q_a_layernorm.weight", "norm", ("q_lora_rank",), "q_a_norm", when="q_lora"),
    per_layer("attn_q_b.weight", f"{_A}.q_b_proj.weight", "attn_q", ("q_dim", "q_lora_rank"), "attn_q_b", when="q_lora"),
    per_layer("attn_kv_a_mqa.weight", f"{_A}.kv_a_proj_with_mqa.weight", "attn_k", ("kv_a_dim", "d_model"), "attn_kv_a"),
    per_layer("attn_kv_a_norm.weight", f"{_A}.kv_a_layernorm.weight", "norm", ("kv_lora_rank",), "kv_a_norm"),
    per_layer("attn_k_b.weight", f"{_A}.kv_b_proj.weight", "attn_k", ("k_b_rows", "qk_nope_dim"), "attn_k_b",
              split=HeadSplit("blk.{L}.attn_kv_b.weight", ("qk_nope_dim", "v_head_dim"), 0, transposed=True)),
    per_layer("attn_v_b.weight", f"{_A}.kv_b_proj.weight", "attn_v", ("v_b_rows", "kv_lora_rank"), "attn_v_b",
              split=HeadSplit("blk.{L}.attn_kv_b.weight", ("qk_nope_dim", "v_head_dim"), 1)),
    per_layer("attn_output.weight", f"{_A}.o_proj.weight", "attn_o", ("d_model", "o_dim"), "attn_o"),
    per_layer("ffn_norm.weight", "post_attention_layernorm.weight", "norm", ("d_model",), "ffn_norm"),
)
DENSE = (*GLOBALS, *ATTENTION, *GLM_MOE, *DENSE_MLP, *MTP)

_R = "{arch}.rope.scaling."
_OWN_KEYS = (
    ConfigKey("n_experts", ("n_routed_experts",), ("{arch}.expert_count",)),
    ConfigKey("d_ff", ("moe_intermediate_size",), ("{arch}.expert_feed_forward_length",)),
    ConfigKey("d_ff_dense", ("intermediate_size",), ("{arch}.feed_forward_length",), default=0),
    # HF's head_dim is the rotary part: the q/k head is qk_nope + qk_rope (_finish); GGUF's key_length_mla, or in
    # older files key_length
    ConfigKey("head_dim", (), ("{arch}.attention.key_length_mla", "{arch}.attention.key_length"), default=0),
    ConfigKey("v_head_dim", ("v_head_dim",), ("{arch}.attention.value_length_mla", "{arch}.attention.value_length")),
    ConfigKey("q_lora_rank", ("q_lora_rank",), ("{arch}.attention.q_lora_rank",), default=0),
    ConfigKey("kv_lora_rank", ("kv_lora_rank",), ("{arch}.attention.kv_lora_rank",)),
    ConfigKey("qk_rope_dim", ("qk_rope_head_dim",), ("{arch}.rope.dimension_count",)),
    ConfigKey("expert_bias", (), (), default=None),  # GGUF: the exp_probs_b tensors; HF: the router kind
    ConfigKey("routed_scaling", ("routed_scaling_factor",), ("{arch}.expert_weights_scale",), default=None),
    ConfigKey("n_groups", ("n_group",), ("{arch}.expert_group_count",), default=None),
    ConfigKey("n_groups_used", ("topk_group",), ("{arch}.expert_group_used_count",), default=None),
    ConfigKey("gating_func", ("scoring_func",), ("{arch}.expert_gating_func",), default=None),
    # raw values _finish turns into fields
    ConfigKey("_qk_nope", ("qk_nope_head_dim",), (), default=None),
    ConfigKey("_attention_bias", ("attention_bias",), (), default=False),
    ConfigKey("_topk_method", ("topk_method",), (), default=None),
    ConfigKey("_interleave", ("rope_interleave",), (), default=True),
    ConfigKey("_n_shared", ("n_shared_experts",), ("{arch}.expert_shared_count",), default=None),
    ConfigKey("_leading_dense", ("first_k_dense_replace",), ("{arch}.leading_dense_block_count",), default=None),
    NEXTN_KEY,
    ConfigKey("_rope", ("rope_parameters", "rope_scaling"), (), default=None),
    ConfigKey("_rope_type", (), (_R + "type",), default=None),
    ConfigKey("_rope_factor", (), (_R + "factor",), default=None),
    ConfigKey("_rope_original", (), (_R + "original_context_length",), default=None),
    ConfigKey("_log_mul", (), (_R + "yarn_log_multiplier",), default=None),
    ConfigKey("_beta_fast", (), (_R + "yarn_beta_fast",), default=None),
    ConfigKey("_beta_slow", (), (_R + "yarn_beta_slow",), default=None),
)
CONFIG_KEYS = (*(k for k in COMMON_KEYS if k.field not in {o.field for o in _OWN_KEYS}), *_OWN_KEYS)


def _yarn(values: dict[str, Any], raw: Mapping[str, Any]) -> None:
    """YaRN on the rotary part, and DeepSeek's softmax scale: x mscale(factor, mscale_all_dim)^2."""
    if raw:
        rope = values["_rope"] or {}
        fields = yarn_from_hf(rope, values["context_length"], "deepseek2")
        all_dim = rope.get("mscale_all_dim") or 0.0
    else:
        kind = values["_rope_type"] or "none"
        if kind == "none":
            return
        if kind != "yarn":
            raise ValueError(f"rope scaling {kind!r} is not supported for deepseek2 (YaRN is)")
        factor, original = values["_rope_factor"], values["_rope_original"]
        if factor is None or original is None:
            raise ValueError("YaRN without rope.scaling.factor and original_context_length")
        fields = dict(rope_scaling="yarn", rope_factor=float(factor), rope_original_context=int(original),
                      yarn_beta_fast=float(values["_beta_fast"] or 32.0), yarn_beta_slow=float(values["_beta_slow"] or 1.0),
                      yarn_truncate=True, rope_attn_factor=1.0)  # ggml always truncates; cos/sin x 1: see the docstring
        all_dim = float(values["_log_mul"] or 0.0) / 0.1
    if fields is None:
        return
    values.update(fields)
    if all_dim:
        values["attn_scale"] = yarn_mscale(fields["rope_factor"], float(all_dim)) ** 2


def _routing(values: dict[str, Any], raw: Mapping[str, Any]) -> None:
    hf = bool(raw)
    v3 = raw.get("model_type") in ("deepseek_v3", "kimi_k2")
    gating = values["gating_func"]
    if hf:  # transformers' DeepseekV2 router is softmax, V3's sigmoid, whatever scoring_func says
        gating = "sigmoid" if v3 else "softmax"
        if values["gating_func"] not in (None, gating):
            raise ValueError(f"scoring_func {values['gating_func']!r} with {raw.get('model_type')}: not supported")
        method = values["_topk_method"] or ("noaux_tc" if v3 else "greedy")
        if method not in ("greedy", "group_limited_greedy", "noaux_tc") or (method == "noaux_tc") != v3:
            raise ValueError(f"topk_method {method!r} is not supported for {raw.get('model_type')}")
        grouped = method != "greedy"
        values["expert_bias"] = v3  # transformers' V3 router always has e_score_correction_bias
        if values["norm_topk_prob"] is None:
            values["norm_topk_prob"] = v3  # transformers' defaults: V2 false, V3 true
    else:
        gating = GATING_FUNCS.get(gating, gating) if gating is not None else "softmax"  # llama.cpp's default
        if gating not in ("softmax", "sigmoid"):
            raise ValueError(f"expert gating function {gating!r} is not supported for deepseek2")
        grouped = True
        if values["norm_topk_prob"] is None:
            values["norm_topk_prob"] = False  # llama.cpp's expert_weights_norm default
    values["gating_func"] = gating
    values["expert_bias"] = bool(values["expert_bias"])
    values["norm_topk_prob"] = bool(values["norm_topk_prob"])
    values["routed_scaling"] = float(values["routed_scaling"] or 1.0)  # llama.cpp: 0 (its default) means none
    groups, used = values["n_groups"] or 1, values["n_groups_used"] or 1
    values["n_groups"], values["n_groups_used"] = (groups, used) if grouped and groups > 1 else (1, 1)
    values["group_score"] = "max" if gating == "softmax" else "top2"


def _finish(values: dict[str, Any], raw: Mapping[str, Any]) -> None:
    """HF (raw = config.json) and GGUF (raw empty) give the same config; see the module's docstring."""
    hf = bool(raw)
    finish_common(values, {k: v for k, v in raw.items() if k not in ("rope_scaling", "rope_parameters")})
    finish_nextn(values, hf)
    if hf:
        if values["_qk_nope"] is None:
            raise ValueError("missing hyper-parameter 'qk_nope_head_dim'")
        values["head_dim"] = int(values["_qk_nope"]) + int(values["qk_rope_dim"])
        if values["_attention_bias"]:
            raise ValueError("attention_bias: DeepSeek's latent attention with biases is not supported")
        if not values["_interleave"]:
            raise ValueError("rope_interleave false is not supported (every DeepSeek checkpoint pairs adjacent dims)")
    values["n_kv_heads"] = values["n_heads"]  # MLA: a key per head (GGUF's head_count_kv 1 describes the latent)
    values["q_lora_rank"] = int(values["q_lora_rank"] or 0)
    _yarn(values, raw)
    _routing(values, raw)
    n_shared = values["_n_shared"]
    values["d_ff_shared"] = int(n_shared or 0) * values["d_ff"]
    leading_dense(values, int(values["_leading_dense"] or 0))


def _hf_config(c: ModelConfig) -> dict[str, Any]:
    if c.d_ff_shared % c.d_ff or c.dense_layers != tuple(range(len(c.dense_layers))):
        raise ValueError("DeepseekV2/V3Config need d_ff_shared a multiple of d_ff and the dense layers leading")
    v3 = c.gating_func == "sigmoid"
    if v3 != c.expert_bias or (c.n_groups > 1 and (c.group_score == "top2") != v3):
        raise ValueError("transformers' DeepSeek routers are softmax without a correction bias (V2) or sigmoid with one (V3)")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_scaling is RopeScaling.YARN:
        all_dim = 0.0
        if c.attn_scale != 1.0:  # attn_scale = (0.1 m ln f + 1)^2
            all_dim = (c.attn_scale ** 0.5 - 1.0) / (0.1 * math.log(c.rope_factor))
        rope.update(rope_type="yarn", factor=c.rope_factor, original_max_position_embeddings=c.rope_original_context,
                    beta_fast=c.yarn_beta_fast, beta_slow=c.yarn_beta_slow, truncate=c.yarn_truncate,
                    attention_factor=c.rope_attn_factor, mscale_all_dim=all_dim)
    method = "noaux_tc" if v3 else ("group_limited_greedy" if c.n_groups > 1 else "greedy")
    return dict(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff_dense or c.d_ff,
        moe_intermediate_size=c.d_ff, num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_heads, n_routed_experts=c.n_experts, num_experts_per_tok=c.n_experts_used,
        n_shared_experts=c.d_ff_shared // c.d_ff, first_k_dense_replace=len(c.dense_layers),
        max_position_embeddings=c.context_length, rope_parameters=rope, rms_norm_eps=c.norm_eps,
        tie_word_embeddings=c.tie_embeddings, norm_topk_prob=c.norm_topk_prob, routed_scaling_factor=c.routed_scaling,
        n_group=c.n_groups, topk_group=c.n_groups_used, topk_method=method, q_lora_rank=c.q_lora_rank or None,
        kv_lora_rank=c.kv_lora_rank, qk_nope_head_dim=c.head_dim - c.qk_rope_dim, qk_rope_head_dim=c.qk_rope_dim,
        v_head_dim=c.v_head_dim, attention_bias=False, pad_token_id=None, bos_token_id=None, eos_token_id=None,
    )


FAMILY = Family(
    name="deepseek2",
    hf_architectures=("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"),
    hf_model_types=("deepseek_v2", "deepseek_v3", "kimi_k2"),
    gguf_architectures=("deepseek2",),
    dense=DENSE,
    experts=EXPERTS,
    config_keys=CONFIG_KEYS,
    gguf_permutes_qk=False,  # llama.cpp's deepseek2 rotary pairs adjacent dims, as the checkpoints do: no permutation
    finish_config=_finish,
    hf_config=_hf_config,
    hf_class=lambda c: 1 if c.gating_func == "sigmoid" else 0,
    pieces=Pieces(attention_inputs=mla_attention_inputs, attention_output=mla_attention_output),
)
