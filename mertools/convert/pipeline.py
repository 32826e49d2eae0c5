"""Source -> layout. One expert at a time, read ahead by one, so memory is bounded by an expert."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..dtypes import CONVERT_CHOICES, DTYPES, auto_dtype
from ..errors import ConversionError, QuantizationError
from ..families.base import KEEP_F32_ROLES, DenseSpec, Family
from ..layout.config import ModelConfig
from ..layout.manifest import EXPERT_BIAS_ROLES
from ..layout.writer import EncodedTensor, LayoutWriter
from .presets import (
    DENSE_DTYPE_CHOICES,
    DTYPE_CHOICES,
    PRESET_CHOICES,
    PRESETS,
    ModelFacts,
    Plan,
    Preset,
    model_tensors,
    plan,
)
from .source import SourceTensor, open_source


@dataclass(frozen=True)
class ConvertOptions:
    dtype: str = "auto"  # a preset (PRESET_CHOICES), a type for the experts, or "auto" (the source's type)
    # big dense matrices: "auto" follows --dtype (the preset's choice, or the type where the shape allows);
    # a type overrides even a preset's choice, as llama-quantize's --tensor-type would
    dense_dtype: str = "auto"
    force: bool = False
    progress: bool = True
    mtp: bool = False  # keep the checkpoint's multi-token-prediction blocks (a drafter: `run --draft mtp`)

    def __post_init__(self) -> None:
        for name, choices in (("dtype", DTYPE_CHOICES), ("dense_dtype", DENSE_DTYPE_CHOICES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")

    @property
    def preset(self) -> Preset | None:
        return PRESETS[self.dtype] if self.dtype in PRESET_CHOICES else None


@dataclass
class ConvertSummary:
    out: Path
    tensors: int = 0
    experts: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    copied: int = 0  # tensors whose bytes were copied unchanged
    dtypes: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out), "tensors": self.tensors, "experts": self.experts, "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out, "seconds": round(self.seconds, 3), "copied": self.copied,
            "dtypes": self.dtypes, "mb_per_s_in": round(self.bytes_in / 1e6 / max(self.seconds, 1e-9), 1),
            "mb_per_s_out": round(self.bytes_out / 1e6 / max(self.seconds, 1e-9), 1), "notes": self.notes,
        }


def expert_dtype(t: SourceTensor, opts: ConvertOptions, planned: str | None = None) -> str:
    """`planned`: the preset's type for the tensor (None without a preset)."""
    if planned is not None:
        return planned
    if opts.dtype != "auto":
        return opts.dtype
    kept = auto_dtype(t.dtype)
    if kept is None:
        raise QuantizationError(
            f"{t.path}: tensor {t.name} is {t.dtype}, a type layouts do not hold; convert with --dtype "
            f"({', '.join(c for c in CONVERT_CHOICES if c != 'auto')}) to requantize it"
        )
    return kept


def dense_dtype(t: SourceTensor, spec: DenseSpec, opts: ConvertOptions, notes: list[str], name: str,
                planned: str | None = None) -> str:
    if spec.role in KEEP_F32_ROLES:
        return "f32"
    if planned is not None and opts.dense_dtype == "auto":
        return planned
    want = opts.dense_dtype if opts.dense_dtype != "auto" else expert_dtype(t, opts)
    if t.shape[-1] % DTYPES[want].block_size:
        if opts.dense_dtype != "auto":
            raise QuantizationError(
                f"{t.path}: tensor {t.name}: {t.shape[-1]} columns is not a multiple of {want}'s block "
                f"of {DTYPES[want].block_size}; choose another --dense-dtype"
            )
        notes.append(f"{name}: {t.shape[-1]} columns do not fit {want} blocks, kept as f16")
        return "f16"
    return want


def encode(t: SourceTensor, dtype: str, name: str) -> tuple[EncodedTensor, bool]:
    """(encoded tensor, whether its bytes were copied unchanged from the source)."""
    from ..kernels import quantize

    shape = (t.rows, t.shape[-1]) if len(t.shape) > 1 else (t.shape[0],)
    if t.dtype == dtype:
        raw = t.read_raw()
        _check_finite(raw, dtype, t)
        return EncodedTensor(raw, dtype, shape), True
    x = t.to_float32().reshape(t.rows, t.shape[-1])  # (rows, cols) f32
    try:
        data = quantize(x, dtype, name=f"{t.name} in {t.path}")
    except QuantizationError:
        raise
    except ValueError as e:
        raise QuantizationError(f"{t.path}: tensor {t.name}: {e}") from None
    _check_finite(data, dtype, t)  # finite weights can still give a block scale that overflows f16
    return EncodedTensor(data, dtype, shape), False


def _check_finite(raw: np.ndarray, dtype: str, t: SourceTensor) -> None:
    """Refuse NaN/Inf weights, and quantized blocks whose f16 scales are NaN/Inf (copied or computed):
    a NaN/Inf scale spoils its whole block."""
    dt = DTYPES[dtype]
    flat = raw.reshape(-1)  # uint8
    if dt.float_dtype is not None:
        bad = np.flatnonzero(~np.isfinite(dt.floats(flat)))
        if bad.size:
            raise QuantizationError(f"{t.path}: tensor {t.name} holds NaN or Inf (first at flat index {bad[0]})")
        return
    bad = np.flatnonzero(dt.bad_blocks(flat.reshape(-1, dt.type_size)))  # blocks with a NaN/Inf scale
    if bad.size:
        raise QuantizationError(
            f"{t.path}: tensor {t.name}: {dtype} block {bad[0]} has a NaN or Inf scale (its weights would be NaN/Inf)"
        )


def convert(src_path: str | Path, out: str | Path, opts: ConvertOptions | None = None) -> ConvertSummary:
    from tqdm import tqdm

    opts = opts or ConvertOptions()
    t0 = time.perf_counter()
    src = open_source(src_path, mtp=opts.mtp)
    cfg = src.config
    out = Path(out)
    summary = ConvertSummary(out)
    dense = src.dense_tensors()
    # validate every expert's names and shapes before writing anything
    experts = [(la, e) for la in cfg.expert_layers for e in range(cfg.n_experts)]  # dense-MLP layers have none
    expert_tensors = {k: src.expert_tensors(*k) for k in experts}
    total_in = sum(t.nbytes for _, _, t in dense) + sum(t.nbytes for ts in expert_tensors.values() for t in ts.values())
    tok_section, tok_files = src.tokenizer_files()
    pl = _plan(opts, src.arch, cfg, dense, summary.notes)

    def note(enc: EncodedTensor, copied: bool, t: SourceTensor) -> None:
        summary.tensors += 1
        summary.copied += copied
        summary.bytes_in += t.nbytes
        summary.dtypes[enc.dtype] = summary.dtypes.get(enc.dtype, 0) + 1
        bar.update(t.nbytes)

    def encode_expert(key: tuple[int, int]) -> dict[str, tuple[EncodedTensor, bool, SourceTensor]]:
        def dtype(role: str, t: SourceTensor) -> str:
            if role in EXPERT_BIAS_ROLES:  # an expert's biases stay f32, as every bias does
                return "f32"
            return expert_dtype(t, opts, pl.expert(src.arch, key[0], role) if pl else None)

        return {role: (*encode(t, dtype(role, t), t.name), t) for role, t in expert_tensors[key].items()}

    with (
        LayoutWriter(out, force=opts.force) as writer,
        tqdm(total=total_in, unit="B", unit_scale=True, unit_divisor=1024, desc=f"convert {out.name}",
             disable=not opts.progress, dynamic_ncols=True) as bar,
    ):
        for name, spec, t in dense:
            enc, copied = encode(t, dense_dtype(t, spec, opts, summary.notes, name, pl.types[name] if pl else None), name)
            writer.write_dense(name, enc)
            note(enc, copied, t)
        # one worker encodes the next expert while this thread writes the current one
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(encode_expert, experts[0])
            for i, key in enumerate(experts):
                done = pending.result()
                if i + 1 < len(experts):
                    pending = pool.submit(encode_expert, experts[i + 1])
                writer.write_expert(*key, {role: enc for role, (enc, _, _) in done.items()})
                for enc, copied, t in done.values():
                    note(enc, copied, t)
                summary.experts += 1
        for rel, data in sorted(tok_files.items()):
            writer.add_file(rel, data)
        tok_section["files"] = sorted(tok_files)
        source = {"kind": src.kind, "name": src.path.name, "dtypes": src.summary()["dtypes"]}
        if src.kind == "gguf":
            source["expert_layout"] = "merged" if getattr(src, "merged", False) else "per_expert"
        source["requested"] = {"dtype": opts.dtype, "dense_dtype": opts.dense_dtype}
        if pl is not None:
            source["requested"]["llama_ftype"] = pl.preset.ftype  # whose choices the tensor types follow
        if cfg.arch != src.arch.name:
            raise ConversionError(f"{src.path}: config arch {cfg.arch} disagrees with {src.arch.name}")
        writer.commit(cfg, tok_section, source)
        summary.bytes_out = writer.bytes_written
    summary.seconds = time.perf_counter() - t0
    return summary


def _plan(opts: ConvertOptions, family: Family, cfg: ModelConfig, dense: list[tuple[str, DenseSpec, SourceTensor]],
          notes: list[str]) -> Plan | None:
    """The preset's type for every tensor (None without a preset); its fallbacks go to the notes, but
    not for dense tensors whose type --dense-dtype sets."""
    if opts.preset is None:
        return None
    pl = plan(opts.preset, model_tensors(cfg, family, {name: t.shape for name, _, t in dense}), ModelFacts.of(cfg, family))
    dense_names = {name for name, _, _ in dense}
    notes.extend(msg for name, msg in pl.notes.items() if opts.dense_dtype == "auto" or name not in dense_names)
    return pl
