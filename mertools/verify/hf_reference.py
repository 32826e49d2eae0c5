"""HF transformers as a second reference: MixtralForCausalLM loaded with the same dequantized float32
weights the numpy reference holds, so HF directories and GGUFs (quantized ones too) both work."""

from __future__ import annotations

import tempfile

import numpy as np

from ..errors import MertoolsError
from ..reference.forward import ReferenceModel


def _state_dict(ref: ReferenceModel) -> dict[str, np.ndarray]:
    sd = {"model.embed_tokens.weight": ref.embed, "model.norm.weight": ref.output_norm}
    if not ref.config.tie_embeddings:
        sd["lm_head.weight"] = ref.lm_head
    for i, lw in enumerate(ref.layers):
        p = f"model.layers.{i}."
        sd.update({
            p + "input_layernorm.weight": lw.attn_norm, p + "post_attention_layernorm.weight": lw.ffn_norm,
            p + "self_attn.q_proj.weight": lw.wq, p + "self_attn.k_proj.weight": lw.wk,
            p + "self_attn.v_proj.weight": lw.wv, p + "self_attn.o_proj.weight": lw.wo,
            p + "block_sparse_moe.gate.weight": lw.router,
        })
        for e, w in enumerate(lw.experts):
            q = f"{p}block_sparse_moe.experts.{e}."
            sd.update({q + "w1.weight": w["gate"], q + "w3.weight": w["up"], q + "w2.weight": w["down"]})
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sd.items()}


def transformers_logits(ref: ReferenceModel, ids: list[int]) -> np.ndarray:
    try:
        import torch
        from safetensors.numpy import save_file
        from transformers import MixtralConfig, MixtralForCausalLM
    except ImportError:
        raise MertoolsError("the transformers reference needs the `reference` extra: pip install 'mertools[reference]'") from None
    c = ref.config
    hf_cfg = MixtralConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim,
        num_local_experts=c.n_experts, num_experts_per_tok=c.n_experts_used, max_position_embeddings=c.context_length,
        rope_theta=c.rope_theta, rms_norm_eps=c.norm_eps, sliding_window=c.sliding_window,
        tie_word_embeddings=c.tie_embeddings,
    )
    # through transformers' real loading path (it renames and fuses Mixtral's expert weights itself),
    # from a checkpoint written in HF's own names
    with tempfile.TemporaryDirectory() as tmp:
        hf_cfg.save_pretrained(tmp)
        save_file(_state_dict(ref), f"{tmp}/model.safetensors")
        model, info = MixtralForCausalLM.from_pretrained(tmp, output_loading_info=True, dtype=torch.float32)
    bad = [k for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)]
    if bad:
        raise MertoolsError(f"transformers did not take the reference weights: {', '.join(f'{k}: {info[k]}' for k in bad)}")
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()
