"""What every source reader provides: tensors located by (file, offset, nbytes) and read with
pread, so conversion memory is bounded by one tensor, never by the model."""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SourceError
from ..families.base import DenseSpec, Family, fmt, resolve_shape
from ..layout.buffers import page_aligned
from ..layout.config import ModelConfig
from ..layout.constants import DTYPES

# Source dtypes we read directly; any other GGML type is dequantized with gguf-py.
FLOAT_ITEMSIZE = {"f32": 4, "f16": 2, "bf16": 2}
# the unsigned integers a float tensor's values are moved as (bits unchanged: transposes, slices)
FLOAT_BITS = {"f32": np.uint32, "f16": np.uint16, "bf16": np.uint16}
# a tensor's layer in HF ("model.layers.N.") and GGUF ("blk.N.") names
_LAYER = re.compile(r"(?:^blk|\.layers)\.(\d+)\.")


@dataclass(frozen=True)
class SourceTensor:
    name: str  # the tensor's name in the source, for messages
    path: Path
    offset: int  # absolute byte offset of the data in `path`
    nbytes: int
    dtype: str  # a layout dtype (mertools.dtypes), "bf16", or another GGML type name (e.g. "iq2_xxs")
    shape: tuple[int, ...]  # numpy/HF orientation: (rows, cols) or (n,)
    ggml_type: int | None = None  # for GGML types we do not handle natively
    row_perm: tuple[int, int] | None = None  # (n_head, rows): undo llama.cpp's q/k permutation
    # FP8 (dtype "f8_e4m3"): the float32 per-block scales (rows / bn, cols / bk) and the block (bn, bk)
    fp8_scale: SourceTensor | None = None
    fp8_block: tuple[int, int] = (128, 128)

    @property
    def rows(self) -> int:
        return int(np.prod(self.shape[:-1])) if len(self.shape) > 1 else 1

    def read_raw(self) -> np.ndarray:
        """Bytes as stored, uint8 (rows, row_bytes), with the q/k row permutation undone."""
        buf = page_aligned(self.nbytes)
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise SourceError(f"{self.path}: cannot open ({e.strerror}) while reading tensor {self.name}") from None
        try:
            got = os.preadv(fd, [buf], self.offset)
        except OSError as e:
            raise SourceError(f"{self.path}: read error in tensor {self.name} ({e.strerror})") from None
        finally:
            os.close(fd)
        if got != self.nbytes:
            raise SourceError(f"{self.path}: tensor {self.name} is truncated: {got} of {self.nbytes} bytes")
        raw = buf.reshape(self.rows, -1)  # (rows, row_bytes)
        if self.row_perm is not None:
            raw = raw[unpermute_index(*self.row_perm)]
        return raw

    def to_float32(self) -> np.ndarray:
        """Values as float32 (rows, cols) / (n,)."""
        raw = self.read_raw()
        if self.dtype == "f32":
            out = raw.view(np.float32)
        elif self.dtype == "f16":
            out = raw.view(np.float16).astype(np.float32)
        elif self.dtype == "bf16":
            out = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif self.dtype == "f8_e4m3":
            if self.fp8_scale is None or len(self.shape) != 2:
                raise SourceError(f"{self.path}: FP8 tensor {self.name} {list(self.shape)} has no {self.name}_scale_inv "
                                  "beside it (2-D weights with per-block scales are what FP8 checkpoints hold)")
            from .fp8 import dequantize_fp8

            try:
                out = dequantize_fp8(raw, self.fp8_scale.to_float32(), self.fp8_block, f"{self.path}: tensor {self.name}")
            except ValueError as e:
                raise SourceError(str(e)) from None
        elif self.dtype == "u8":  # MXFP4 blocks or scales, never a tensor's values on their own
            raise SourceError(f"{self.path}: tensor {self.name} is u8 (MXFP4 blocks or scales) where weights belong")
        elif self.dtype in DTYPES:
            from ..kernels import dequantize

            out = dequantize(raw, self.dtype, (self.rows, self.shape[-1]))
        else:
            from gguf import GGMLQuantizationType
            from gguf.quants import dequantize as gguf_dequantize

            out = gguf_dequantize(raw, GGMLQuantizationType(self.ggml_type)).astype(np.float32, copy=False)
        return out.reshape(self.shape)


@dataclass(frozen=True)
class HeadSplitTensor(SourceTensor):
    """One part of a per-head tensor (families.base.HeadSplit): `whole` (heads * sum(sizes), cols) gives each
    head's `sizes[part]` rows from row sum(sizes[:part]) of its block, transposed per head when `transposed`.
    Float sources keep their type and bits; a quantized one (only older GGUFs' attn_kv_b) is dequantized into
    f32 values, which the converter then treats as any f32 source (`--dtype auto`: f16)."""

    whole: SourceTensor | None = None
    heads: int = 1
    sizes: tuple[int, ...] = ()
    part: int = 0
    transposed: bool = False

    @classmethod
    def of(cls, whole: SourceTensor, heads: int, sizes: tuple[int, ...], part: int, transposed: bool) -> HeadSplitTensor:
        if len(whole.shape) != 2 or whole.shape[0] != heads * sum(sizes):
            raise SourceError(f"{whole.path}: tensor {whole.name} has shape {list(whole.shape)}, expected "
                              f"[{heads * sum(sizes)}, cols] ({heads} heads of {' + '.join(map(str, sizes))} rows)")
        dtype = whole.dtype if whole.dtype in FLOAT_ITEMSIZE else "f32"
        cols, rows = whole.shape[1], sizes[part]
        shape = (heads * cols, rows) if transposed else (heads * rows, cols)
        nbytes = shape[0] * shape[1] * FLOAT_ITEMSIZE[dtype]
        return cls(f"{whole.name}[part {part} of each head]", whole.path, whole.offset, nbytes, dtype, shape,
                   whole=whole, heads=heads, sizes=sizes, part=part, transposed=transposed)

    def read_raw(self) -> np.ndarray:
        w = self.whole
        if w is None:
            raise ValueError(f"{self.name}: a head split without its whole tensor")
        if w.dtype in FLOAT_BITS:  # move the stored bits
            x = w.read_raw().view(FLOAT_BITS[w.dtype])
        else:
            x = w.to_float32()
        x = x.reshape(self.heads, sum(self.sizes), -1)
        lo = sum(self.sizes[:self.part])
        x = x[:, lo:lo + self.sizes[self.part]]
        if self.transposed:
            x = x.transpose(0, 2, 1)
        return np.ascontiguousarray(x).view(np.uint8).reshape(self.rows, -1)


def unpermute_index(n_head: int, rows: int) -> np.ndarray:
    """Row index that maps llama.cpp's permuted q/k rows back to HF order.

    llama.cpp writes w.reshape(n_head, 2, hd/2, ...).swapaxes(1, 2) so that adjacent-pair ("normal")
    rotary on the permuted rows equals HF's rotate-half on the original rows. permuted[i] = hf[p[i]],
    so hf = permuted[argsort(p)].
    """
    p = np.arange(rows).reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(rows)
    return np.argsort(p)


class Source(ABC):
    """A checkpoint to convert: an HF directory or a GGUF file."""

    kind: str
    path: Path
    arch: Family
    config: ModelConfig

    @abstractmethod
    def dense_tensor(self, spec: DenseSpec, layer: int | None) -> SourceTensor | None:
        """The dense tensor, or None when an optional one is absent (tied lm_head)."""

    def split_tensor(self, spec: DenseSpec, whole: SourceTensor) -> HeadSplitTensor:
        """spec's part of the per-head tensor `whole` (spec.split says which)."""
        sp = spec.split
        if sp is None:
            raise ValueError(f"{spec.name} is not split from a per-head tensor")
        sizes = tuple(resolve_shape((p,), self.config)[0] for p in sp.parts)
        return HeadSplitTensor.of(whole, self.config.n_heads, sizes, sp.part, sp.transposed)

    @abstractmethod
    def expert_tensor(self, layer: int, expert: int, role: str) -> SourceTensor: ...

    @abstractmethod
    def tokenizer_files(self) -> tuple[dict[str, Any], dict[str, bytes]]:
        """(manifest tokenizer section without `files`, {relative path: bytes})."""

    @abstractmethod
    def all_tensors(self) -> list[SourceTensor]: ...

    @abstractmethod
    def is_expert_name(self, name: str) -> bool: ...

    def summary(self) -> dict[str, Any]:
        """Facts for `inspect`: tensor count, dtypes, bytes of dense and expert weights. Tensors of layers
        past n_layers (GLM's multi-token-prediction layers) are not the model's: counted apart."""
        every = self.all_tensors()
        tensors = [t for t in every if (m := _LAYER.search(t.name)) is None or int(m.group(1)) < self.config.n_layers]
        dtypes: dict[str, int] = {}
        expert_bytes = dense_bytes = 0
        for t in tensors:
            dtypes[t.dtype] = dtypes.get(t.dtype, 0) + 1
            if self.is_expert_name(t.name):
                expert_bytes += t.nbytes
            else:
                dense_bytes += t.nbytes
        n = len(self.config.moe_layers) * self.config.n_experts  # dense-MLP layers have no experts
        return {
            "kind": self.kind, "path": str(self.path), "arch": self.arch.name, "config": self.config.to_dict(),
            "tensor_count": len(tensors), "dtypes": dict(sorted(dtypes.items())),
            "dense_bytes": dense_bytes, "expert_bytes": expert_bytes, "bytes_per_expert": expert_bytes // max(n, 1),
            "unused_tensors": len(every) - len(tensors),
        }

    tensors: dict[str, SourceTensor]

    def _require(self, name: str) -> SourceTensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise SourceError(f"{self.path}: missing tensor {name}") from None

    def check_counts(self) -> None:
        """Layer and expert counts come from metadata and bound every loop over them (names, the
        expert grid): refuse counts that the tensors actually present cannot back."""
        cfg = self.config
        total = sum(t.nbytes for t in self.tensors.values())
        if cfg.n_layers > len(self.tensors) or cfg.n_layers * cfg.n_experts > max(total, 1):
            raise SourceError(
                f"{self.path}: the metadata's {cfg.n_layers} layers x {cfg.n_experts} experts cannot fit in its "
                f"{len(self.tensors)} tensors ({total} bytes); corrupt metadata"
            )

    def dense_tensors(self) -> list[tuple[str, DenseSpec, SourceTensor]]:
        self.check_counts()
        out = []
        for spec, layer in self.arch.dense_names(self.config):
            t = self.dense_tensor(spec, layer)
            if t is None:
                if not spec.optional:
                    raise SourceError(f"{self.path}: missing tensor {fmt(spec.name, layer)}")
                continue
            want = resolve_shape(spec.shape, self.config)
            if tuple(t.shape) != tuple(want) and (_squeezed(t.shape) == _squeezed(want) or (
                    len(t.shape) == 3 and len(want) == 2 and (t.shape[0] * t.shape[1], t.shape[2]) == tuple(want))):
                # llama-quantize writes Qwen2-MoE's (1, d) gate vector as [d]; llama.cpp's MLA k_b/v_b are
                # (heads, rows, cols), the same bytes as the (heads * rows, cols) a layout holds
                t = replace(t, shape=tuple(want))
            self.check_shape(t, want)
            out.append((fmt(spec.name, layer), spec, t))
        return out

    def expert_tensors(self, layer: int, expert: int) -> dict[str, SourceTensor]:
        out = {}
        for spec in self.arch.expert_specs(self.config):  # with expert_mlp_bias, its biases too
            t = self.expert_tensor(layer, expert, spec.role)
            self.check_shape(t, resolve_shape(spec.shape, self.config))
            out[spec.role] = t
        return out

    def check_shape(self, t: SourceTensor, want: tuple[int, ...]) -> None:
        if tuple(t.shape) != tuple(want):
            raise SourceError(
                f"{t.path}: tensor {t.name} has shape {list(t.shape)}, the config implies {list(want)}"
            )


def keep_mtp(config: ModelConfig, keep: bool, where: Path) -> ModelConfig:
    """The config with the checkpoint's multi-token-prediction blocks (`convert --mtp`), or without them."""
    if not keep:
        return replace(config, nextn_layers=0) if config.nextn_layers else config
    if not config.nextn_layers:
        raise SourceError(f"{where}: has no multi-token-prediction (nextn) layers to keep (--mtp)")
    return config


def _squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(d for d in shape if d != 1)


def open_source(path: str | Path, *, mtp: bool = False) -> Source:
    """The checkpoint at `path`; `mtp`: keep its multi-token-prediction blocks (config.nextn_layers)."""
    p = Path(path)
    if p.is_dir():
        from .hf import HFSource

        return HFSource(p, mtp=mtp)
    if not p.exists():
        raise SourceError(f"{p}: no such file or directory")
    if not p.is_file():  # a FIFO would block the open below; a device would never end
        raise SourceError(f"{p}: not a regular file")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        from .gguf_source import GGUFSource

        return GGUFSource(p, mtp=mtp)
    raise SourceError(f"{p}: neither a HF model directory nor a GGUF file (magic {magic!r})")
