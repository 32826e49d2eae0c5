"""`mertools inspect`: what a HF directory, a GGUF file or a layout holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .layout.constants import MANIFEST_NAME
from .layout.reader import Layout


def inspect_path(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir() and (p / MANIFEST_NAME).exists():
        return inspect_layout(Layout.open(p))
    from .convert.source import open_source

    return open_source(p).summary()


def inspect_layout(layout: Layout) -> dict[str, Any]:
    m = layout.manifest
    dtypes: dict[str, int] = {}
    for t in m.dense.values():
        dtypes[t.dtype] = dtypes.get(t.dtype, 0) + 1
    for e in m.experts:
        for t in e.tensors.values():
            dtypes[t.dtype] = dtypes.get(t.dtype, 0) + 1
    expert_bytes = sum(e.nbytes for e in m.experts)
    return {
        "kind": "layout", "path": str(layout.root), "format": m.format, "version": m.version, "arch": m.arch,
        "config": m.config.to_dict(), "tensor_count": len(m.dense) + sum(len(e.tensors) for e in m.experts),
        "dtypes": dict(sorted(dtypes.items())), "dense_bytes": sum(t.nbytes for t in m.dense.values()),
        # the largest expert file (types may differ by layer): a cache slot's size
        "expert_bytes": expert_bytes, "bytes_per_expert": max((e.nbytes for e in m.experts), default=0),
        "expert_files": len(m.experts), "tokenizer": {k: v for k, v in m.tokenizer.items() if k != "files"},
        "source": m.source,
    }


def family_features(cfg: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, text) for the optional architecture features (config fields away from their defaults) this config uses."""
    out = []
    if cfg.get("qk_norm", "none") != "none":
        out.append(("q/k norm", "RMSNorm per head" if cfg["qk_norm"] == "head" else "RMSNorm over the whole projection"))
    if cfg.get("attn_bias") or cfg.get("attn_o_bias"):
        which = (["q", "k", "v"] if cfg.get("attn_bias") else []) + (["output"] if cfg.get("attn_o_bias") else [])
        out.append(("attn bias", ", ".join(which[:-1]) + (" and " if len(which) > 1 else "") + which[-1] + " projections"))
    if cfg.get("attn_sinks"):
        out.append(("attn sinks", "a learned logit per head in each softmax's denominator"))
    if cfg.get("full_attention_layers"):
        full = cfg["full_attention_layers"]
        sliding = [i for i in range(cfg["n_layers"]) if i not in full]
        out.append(("attention", f"sliding window {cfg['sliding_window']} in layers {_layers(sliding)}, "
                                 f"full in {_layers(full)}"))
    if cfg.get("d_ff_shared"):
        gate = ", gated by sigmoid(shared_expert_gate)" if cfg.get("shared_expert_gate") else ""
        out.append(("shared expert", f"width {cfg['d_ff_shared']}, resident{gate}"))
    if cfg.get("dense_layers"):
        layers = cfg["dense_layers"]
        out.append(("dense layers", f"{len(layers)} without experts {list(layers)} (SwiGLU width {cfg['d_ff_dense']})"))
    if cfg.get("nextn_layers"):
        n, first = cfg["nextn_layers"], cfg["n_layers"]
        out.append(("MTP", f"{n} multi-token-prediction block{'s' if n > 1 else ''} after the main layers (layer "
                           f"{first}{f'..{first + n - 1}' if n > 1 else ''}): run --draft mtp"))
    routing = _routing(cfg)
    if routing:
        out.append(("routing", routing))
    if cfg.get("kv_lora_rank"):
        out += _latent_attention(cfg)
    else:
        from .families.mla import kv_bytes_per_token
        from .layout.config import ModelConfig

        per = kv_bytes_per_token(ModelConfig.from_dict(cfg), 2)[0]
        out.append(("KV cache", f"{_kb(per)} per token of context in f16 (--kv-type f32: twice), "
                                f"{per * cfg['context_length'] / 2**30:.2f} GiB at the full {cfg['context_length']}"))
    if cfg.get("rope_dim"):
        out.append(("rotary", f"partial: the first {cfg['rope_dim']} of {cfg['head_dim']} dims of each head"))
    if cfg.get("rope_scaling", "none") == "yarn":
        out.append(("rotary", f"YaRN x{cfg.get('rope_factor', 1.0):g} from {cfg['rope_original_context']} positions "
                              f"(beta {cfg.get('yarn_beta_fast', 32.0):g}/{cfg.get('yarn_beta_slow', 1.0):g}"
                              f", truncate {str(cfg.get('yarn_truncate', True)).lower()}); "
                              f"cos/sin x {cfg.get('rope_attn_factor', 1.0):.4g}"))
    glu = _expert_glu(cfg)
    if glu:
        out.append(("expert GLU", glu))
    return out


def _latent_attention(cfg: dict[str, Any]) -> list[tuple[str, str]]:
    """Multi-head latent attention: its shapes, and the KV cache it needs per token against full keys and values."""
    from .families.mla import kv_bytes_per_token
    from .layout.config import ModelConfig

    rope, rank, q = cfg["qk_rope_dim"], cfg["kv_lora_rank"], cfg.get("q_lora_rank", 0)
    latent, full = kv_bytes_per_token(ModelConfig.from_dict(cfg), 2)
    out = [("attention", f"multi-head latent: q {'through rank ' + str(q) if q else 'one projection'}, k/v from a "
                         f"{rank}-wide latent; q/k heads {cfg['head_dim'] - rope} + {rope} rotary (adjacent pairs), "
                         f"v heads {cfg['v_head_dim']}"),
           ("KV cache", f"{_kb(latent)} per token of context in f16 ({rope + rank} values per layer), full keys "
                        f"and values would take {_kb(full)} ({full / latent:.1f}x)")]
    if cfg.get("attn_scale", 1.0) != 1.0:
        out.append(("softmax scale", f"x {cfg['attn_scale']:.4g} (YaRN mscale^2)"))
    return out


def _kb(n: int) -> str:
    return f"{n / 1024:,.1f} KiB"


def _layers(layers: list[int]) -> str:
    """[0, 2, 4, ...] as "0, 2, ..., 22 (12)": the first few of a long list, and how many."""
    shown = ", ".join(map(str, layers[:4])) + (f", ..., {layers[-1]}" if len(layers) > 4 else "")
    return f"{shown} ({len(layers)})"


def _expert_glu(cfg: dict[str, Any]) -> str:
    """The routed experts' activation and biases, when not plain silu(gate) * up."""
    alpha, limit, offset = cfg.get("swiglu_alpha", 1.0), cfg.get("swiglu_limit", 0.0), cfg.get("swiglu_up_offset", 0.0)
    parts = []
    if (alpha, limit, offset) != (1.0, 0.0, 0.0):
        up = f"(up + {offset:g})" if offset else "up"
        parts.append(f"{up} * gate * sigmoid({alpha:g} * gate)" + (f", clamped at {limit:g} (gate above, up both sides)"
                                                                  if limit else ""))
    if cfg.get("expert_mlp_bias"):
        parts.append("biases on gate, up and down, in each expert's file")
    return "; ".join(parts)


def _routing(cfg: dict[str, Any]) -> str:
    """How experts are chosen and weighted, when not the plain softmax top-k."""
    parts = []
    if cfg.get("gating_func", "softmax") != "softmax":
        parts.append(f"{cfg['gating_func']} scores")
    if cfg.get("router_bias"):
        parts.append("router logits biased")
    if cfg.get("router_bias") and cfg.get("norm_topk_prob", True) and cfg.get("gating_func", "softmax") == "softmax":
        parts.append(f"weights: softmax over the chosen {cfg['n_experts_used']} logits")
    if cfg.get("expert_bias"):
        parts.append("correction bias for choosing (not weighting)")
    if cfg.get("n_groups", 1) > 1:
        by = "best expert" if cfg.get("group_score") == "max" else "best two experts"
        parts.append(f"best {cfg['n_groups_used']} of {cfg['n_groups']} expert groups (scored by their {by})")
    if cfg.get("routed_scaling", 1.0) != 1.0:
        parts.append(f"weights x {cfg['routed_scaling']:g}"
                     + (" after renormalising" if cfg.get("norm_topk_prob", True) else ""))
    return "; ".join(parts)


def _hf_class(name: str, cfg: dict[str, Any]) -> str:
    from .families import FAMILIES
    from .layout.config import ModelConfig

    family = FAMILIES.get(name)
    if family is None:
        return "unknown family"
    try:
        return family.hf_architectures[family.hf_class(ModelConfig.from_dict(cfg))]
    except ValueError:
        return family.hf_architectures[0]


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"


def format_report(info: dict[str, Any]) -> str:
    cfg = info["config"]
    lines = [f"{info['path']}: {info['kind']}" + (f" (format {info['format']} v{info['version']})" if "format" in info else "")]
    lines.append(f"  arch          {info['arch']} ({_hf_class(info['arch'], cfg)})")
    lines.append(
        f"  model         {cfg['n_layers']} layers, d_model {cfg['d_model']}, d_ff {cfg['d_ff']}, "
        f"{cfg['n_heads']} heads ({cfg['n_kv_heads']} kv, head_dim {cfg['head_dim']}), vocab {cfg['vocab_size']}"
    )
    lines.append(f"  experts       {cfg['n_experts']} per layer, {cfg['n_experts_used']} used per token"
                 + ("" if cfg.get("norm_topk_prob", True) else " (weights not renormalised)"))
    lines += [f"  {k:<13} {v}" for k, v in family_features(cfg)]
    lines.append(
        f"  rope          theta {cfg['rope_theta']:g}, style {cfg['rope_style']}; context {cfg['context_length']}; "
        f"norm eps {cfg['norm_eps']:g}" + (f"; sliding window {cfg['sliding_window']}" if cfg["sliding_window"] else "")
    )
    lines.append(f"  tensors       {info['tensor_count']} ({', '.join(f'{k}: {v}' for k, v in info['dtypes'].items())})"
                 + (f"; {info['unused_tensors']} more of layers past the model's (MTP), not converted"
                    if info.get("unused_tensors") else ""))
    lines.append(f"  dense bytes   {_mb(info['dense_bytes'])}")
    lines.append(f"  expert bytes  {_mb(info['expert_bytes'])} ({_mb(info['bytes_per_expert'])} per expert)")
    if info["kind"] == "layout":
        tok = info["tokenizer"]
        lines.append(f"  tokenizer     {tok.get('kind')}" + (f" ({tok['model']})" if tok.get("model") else ""))
    return "\n".join(lines)
