"""HF transformers as a second reference: the family's own model class (`hf_architectures[hf_class(config)]`)
loaded with the same dequantized float32 weights the numpy reference holds, so HF directories and
GGUFs (quantized ones too) both work. HF names come from the family's tensor tables, the config from
its `hf_config`."""

from __future__ import annotations

import tempfile

import numpy as np

from ..errors import MertoolsError
from ..families import get_family
from ..families.base import Family, fmt, resolve_shape
from ..reference.forward import ReferenceModel


def _state_dict(ref: ReferenceModel, arch: Family) -> dict[str, np.ndarray]:
    """Layout-named weights -> HF-named ones, through the arch's name tables."""
    sd: dict[str, np.ndarray] = {}
    cfg = ref.config
    merged: dict[str, np.ndarray] = {}
    for spec, layer in arch.dense_names(cfg):
        name = fmt(spec.name, layer)
        if name in ref.dense and spec.split is not None:  # one part of a per-head HF tensor (MLA's kv_b)
            sizes = [resolve_shape((p,), cfg)[0] for p in spec.split.parts]
            part = ref.dense[name].reshape(cfg.n_heads, -1, ref.dense[name].shape[-1])  # (heads, rows, cols)
            part = part.transpose(0, 2, 1) if spec.split.transposed else part
            hf_name = fmt(spec.hf, layer)
            whole = merged.setdefault(hf_name, np.zeros((cfg.n_heads, sum(sizes), part.shape[-1]), np.float32))
            lo = sum(sizes[:spec.split.part])
            whole[:, lo:lo + sizes[spec.split.part]] = part
            sd[hf_name] = whole.reshape(-1, whole.shape[-1])  # a view: later parts fill it too
        elif name in ref.dense:
            sd[fmt(spec.hf, layer)] = ref.dense[name]
        elif not spec.optional:
            raise MertoolsError(f"the reference has no tensor {name} for {arch.name}")
    for (layer, e), tensors in ref.experts.items():
        for spec in arch.expert_specs(cfg):
            x, cut = tensors[spec.role], spec.hf_merged
            if cut is None:
                sd[fmt(spec.hf, layer, e)] = x
                continue
            # a layer's experts in one tensor (families.base.HFMerged): expert e's rows start::step of the (out, in) slice,
            # stored transposed when the family says so (the inverse of the converter's cut)
            logical = (x.shape[0] * cut.step, *x.shape[1:])
            name = fmt(spec.hf, layer)
            if name not in sd:
                sd[name] = np.zeros((cfg.n_experts, *(logical[::-1] if cut.transposed else logical)), np.float32)
            (sd[name][e].T if cut.transposed else sd[name][e])[cut.start::cut.step] = x
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sd.items()}


def transformers_logits(ref: ReferenceModel, ids: list[int]) -> np.ndarray:
    try:
        import torch
        import transformers
        from safetensors.numpy import save_file
    except ImportError:
        raise MertoolsError("the transformers reference needs the `reference` extra: pip install 'mertools[reference]'") from None
    arch = get_family(ref.config.arch)
    if arch.hf_config is None:
        raise MertoolsError(f"no transformers reference for architecture {arch.name}")
    which = arch.hf_class(ref.config)
    model_cls = getattr(transformers, arch.hf_architectures[which], None)
    if model_cls is None:
        raise MertoolsError(f"transformers {transformers.__version__} has no {arch.hf_architectures[which]}")
    hf_cfg = transformers.AutoConfig.for_model(arch.hf_model_types[which], **arch.hf_config(ref.config))
    # through transformers' real loading path (it renames and fuses expert weights itself), from a
    # checkpoint written in HF's own names
    with tempfile.TemporaryDirectory() as tmp:
        hf_cfg.save_pretrained(tmp)
        save_file(_state_dict(ref, arch), f"{tmp}/model.safetensors")
        # a directory we wrote, safetensors only, the model class named by us: never a pickle, never model code
        model, info = model_cls.from_pretrained(tmp, output_loading_info=True, dtype=torch.float32,
                                                use_safetensors=True, trust_remote_code=False)
    bad = [k for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)]
    if bad:
        raise MertoolsError(f"transformers did not take the reference weights: {', '.join(f'{k}: {info[k]}' for k in bad)}")
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()
