"""HF model directories: config.json, safetensors (single, sharded with an index, or a glob), tokenizer.

Safetensors headers are parsed here (the format is an 8-byte length and a JSON header) rather than
through `safe_open`, because numpy has no bfloat16 and because we read data with pread, not mmap.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SourceError
from ..families import family_for_hf, supported
from ..families.base import ConfigKey, DenseSpec, ExpertSpec, build_config, fmt
from .source import FLOAT_BITS, FLOAT_ITEMSIZE, Source, SourceTensor, keep_mtp


@dataclass(frozen=True)
class CutTensor(SourceTensor):
    """One expert's tensor cut from an HF tensor holding a layer's experts (families.base.HFMerged): the
    expert's slice is read (offset, nbytes: `stored` elements), transposed if so stored, then every `step`-th
    row from `start`. With `scales`, the slice is OpenAI's MXFP4 blocks (out, in/32, 16), repacked with the
    scales into ggml's mxfp4 blocks, bit for bit (the codes and exponents are the same numbers)."""

    stored: tuple[int, ...] = ()
    transposed: bool = False
    start: int = 0
    step: int = 1
    scales: SourceTensor | None = None

    def read_raw(self) -> np.ndarray:
        buf = SourceTensor.read_raw(replace(self, row_perm=None, shape=(self.nbytes,))).reshape(-1)  # the stored slice
        if self.scales is not None:
            blocks = buf.reshape(self.stored)[self.start::self.step]  # (rows, in/32, 16)
            scales = self.scales.read_raw().reshape(self.stored[:2])[self.start::self.step]  # (rows, in/32)
            return mxfp4_from_openai(blocks, scales).reshape(self.rows, -1)
        x = buf.view(FLOAT_BITS[self.dtype]).reshape(self.stored)
        x = (x.T if self.transposed else x)[self.start::self.step]
        return np.ascontiguousarray(x).view(np.uint8).reshape(self.rows, -1)


def mxfp4_from_openai(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """OpenAI's MXFP4 (OpenAI's checkpoints: byte i of a 32-weight block holds weight 2i in its low nibble and
    2i + 1 in its high one; one E8M0 byte per block beside) -> ggml's block_mxfp4 (the E8M0 byte, then byte j
    holding weight j low and j + 16 high), (..., G, 16) + (..., G) -> (..., G * 17). Only bits move: both index
    the same E2M1 table (ggml's doubled, its scale halved) with the same exponent byte."""
    lo, hi = blocks & 0x0F, blocks >> 4
    w = np.stack([lo, hi], axis=-1).reshape(*blocks.shape[:-1], 32)  # the 4-bit codes in weight order
    qs = w[..., :16] | (w[..., 16:] << 4)
    return np.concatenate([scales[..., None], qs], axis=-1).reshape(*blocks.shape[:-2], -1)

# u8: MXFP4 blocks and scales; f8_e4m3: FP8 weights, each with a <name>_scale_inv (convert/fp8.py)
SAFETENSORS_DTYPES = {"F32": "f32", "F16": "f16", "BF16": "bf16", "U8": "u8", "F8_E4M3": "f8_e4m3"}
ITEMSIZE = {**FLOAT_ITEMSIZE, "u8": 1, "f8_e4m3": 1}
MAX_HEADER = 100 << 20  # safetensors itself refuses headers over 100 MB
MAX_JSON = 64 << 20  # config.json and the shard index are a few KB; never read an endless "file" whole
# pickle-based checkpoints: loading them runs arbitrary code, so they are never opened, only named
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "generation_config.json", "chat_template.jinja", "chat_template.json",
)


def read_safetensors_header(path: Path) -> dict[str, SourceTensor]:
    if path.exists() and not path.is_file():  # a FIFO would block the open; a device would never end
        raise SourceError(f"{path}: not a regular file")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SourceError(f"{path}: truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise SourceError(f"{path}: safetensors header length {n} is impossible for a {size}-byte file")
            header = json.loads(f.read(n).decode("utf-8"))
    except OSError as e:
        raise SourceError(f"{path}: cannot read ({e.strerror})") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise SourceError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise SourceError(f"{path}: corrupt safetensors header (not an object)")
    data_start, data_size = 8 + n, size - 8 - n
    out: dict[str, SourceTensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            shape = tuple(int(s) for s in shape)
            begin, end = int(begin), int(end)
        except (KeyError, TypeError, ValueError, OverflowError):
            raise SourceError(f"{path}: tensor {name}: malformed header entry {repr(info)[:200]}") from None
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
            raise SourceError(f"{path}: tensor {name}: unsupported dtype {dtype} (supported: F32, F16, BF16, U8, F8_E4M3)")
        ours = SAFETENSORS_DTYPES[dtype]
        numel = 1
        for s in shape:
            numel *= s
        if not (0 <= begin <= end <= data_size) or end - begin != numel * ITEMSIZE[ours] or any(s < 0 for s in shape):
            raise SourceError(
                f"{path}: tensor {name}: data [{begin}, {end}) does not fit shape {list(shape)} {dtype} "
                f"in the file's {data_size} data bytes (truncated or corrupt)"
            )
        out[name] = SourceTensor(name, path, data_start + begin, end - begin, ours, shape)
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in out.values() if t.nbytes)
    for (_, a_end, a), (b_start, _, b) in zip(spans, spans[1:], strict=False):
        if b_start < a_end:  # safetensors refuses this too: one byte cannot belong to two tensors
            raise SourceError(f"{path}: tensors {a} and {b} overlap in the data section (corrupt header)")
    return out


def _read_json(path: Path) -> Any:
    """A small JSON file of the model directory, read with a bound (a FIFO or /dev/zero never ends)."""
    if not path.is_file():
        raise SourceError(f"{path}: not a regular file")
    with open(path, "rb") as f:
        raw = f.read(MAX_JSON + 1)
    if len(raw) > MAX_JSON:
        raise SourceError(f"{path}: larger than {MAX_JSON >> 20} MiB; not a config file")
    return json.loads(raw.decode("utf-8"))


class HFSource(Source):
    kind = "hf"

    def __init__(self, path: Path, *, mtp: bool = False) -> None:
        self.path = path
        cfg_path = path / "config.json"
        if not cfg_path.exists():
            raise SourceError(f"{cfg_path}: missing; {path} is not a HF model directory")
        try:
            self.raw_config: dict[str, Any] = _read_json(cfg_path)
        except (OSError, ValueError, RecursionError) as e:
            raise SourceError(f"{cfg_path}: unreadable ({e})") from None
        if not isinstance(self.raw_config, dict):
            raise SourceError(f"{cfg_path}: not a JSON object")
        archs = self.raw_config.get("architectures") or []
        arch = family_for_hf(archs if isinstance(archs, list) else [], self.raw_config.get("model_type"))
        if arch is None:
            raise SourceError(
                f"{cfg_path}: unsupported architecture {archs or self.raw_config.get('model_type')!r} (supported: {supported()})"
            )
        self.arch = arch
        try:
            config = build_config(arch, self._lookup, self.raw_config, str(cfg_path))
        except ValueError as e:
            raise SourceError(f"{cfg_path}: {e}") from None
        self.config = keep_mtp(config, mtp, cfg_path)
        self.tensors = self._fp8_scales(self._index_tensors())

    def _fp8_scales(self, tensors: dict[str, SourceTensor]) -> dict[str, SourceTensor]:
        """Each FP8 weight with its `_scale_inv` and the checkpoint's block size (quantization_config)."""
        quant = self.raw_config.get("quantization_config")
        block = quant.get("weight_block_size") if isinstance(quant, dict) else None
        block = block or [128, 128]
        if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            raise SourceError(f"{self.path / 'config.json'}: quantization_config.weight_block_size {block!r} is not [rows, cols]")
        return {name: replace(t, fp8_scale=tensors.get(name + "_scale_inv"), fp8_block=(block[0], block[1]))
                if t.dtype == "f8_e4m3" else t for name, t in tensors.items()}

    def _lookup(self, key: ConfigKey) -> Any:
        for k in key.hf:
            node: Any = self.raw_config
            for part in k.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if node is not None:
                return node
        return None

    def _index_tensors(self) -> dict[str, SourceTensor]:
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = _read_json(index)["weight_map"]
                files = sorted(set(weight_map.values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
                raise SourceError(f"{index}: unreadable index ({e})") from None
            for f in files:
                if not isinstance(f, str) or "/" in f or f.startswith(".."):
                    raise SourceError(f"{index}: shard name {f!r} must be a file in the model directory")
                if not (self.path / f).exists():
                    raise SourceError(f"{self.path / f}: missing (listed in {index.name})")
            paths = [self.path / f for f in files]
        else:
            paths = sorted(self.path.glob("*.safetensors"))
            if not paths:
                pickles = sorted(p.name for pat in PICKLE_PATTERNS for p in self.path.glob(pat))
                if pickles:
                    raise SourceError(
                        f"{self.path}: only pickle checkpoints ({', '.join(pickles[:3])}); mertools never loads "
                        "pickles (they can run code): convert them to safetensors first"
                    )
                raise SourceError(f"{self.path}: no *.safetensors files (and no model.safetensors.index.json)")
        tensors: dict[str, SourceTensor] = {}
        for p in paths:
            for name, t in read_safetensors_header(p).items():
                if name in tensors:
                    raise SourceError(f"{p}: tensor {name} also appears in {tensors[name].path.name}")
                tensors[name] = t
        return tensors

    def dense_tensor(self, spec: DenseSpec, layer: int | None) -> SourceTensor | None:
        name = fmt(spec.hf, layer)
        if spec.split is not None:
            return self.split_tensor(spec, self._require(name))
        return self.tensors.get(name) if spec.optional else self._require(name)

    def expert_tensor(self, layer: int, expert: int, role: str) -> SourceTensor:
        spec = self.arch.expert(role)
        if spec.hf_merged is None:
            return self._require(fmt(spec.hf, layer, expert))
        return self._cut(spec, layer, expert)

    def _cut(self, spec: ExpertSpec, layer: int, expert: int) -> SourceTensor:
        """Expert `expert`'s slice of a merged HF tensor, or of its MXFP4 `_blocks` / `_scales` pair."""
        name, cut, n = fmt(spec.hf, layer), spec.hf_merged, self.config.n_experts
        if cut is None:
            raise SourceError(f"{self.path}: expert {spec.role} of {self.arch.name} is not cut from a merged tensor")
        if name not in self.tensors and name + "_blocks" in self.tensors:
            blocks, scales = self._require(name + "_blocks"), self._require(name + "_scales")
            out = blocks.shape[1] if len(blocks.shape) == 4 else -1
            if (len(blocks.shape) != 4 or blocks.shape[0] != n or blocks.shape[3] != 16 or blocks.dtype != "u8"
                    or tuple(scales.shape) != tuple(blocks.shape[:3]) or scales.dtype != "u8"):
                raise SourceError(f"{blocks.path}: {blocks.name} {blocks.dtype} {list(blocks.shape)} / {scales.name} "
                                  f"{scales.dtype} {list(scales.shape)}: expected u8 ({n}, rows, cols/32, 16) and "
                                  f"({n}, rows, cols/32)")
            rows = len(range(cut.start, out, cut.step))
            s_per = scales.nbytes // n
            sc = replace(scales, name=f"{scales.name}[{expert}]", offset=scales.offset + expert * s_per, nbytes=s_per,
                         shape=(s_per,))
            per = blocks.nbytes // n
            return CutTensor(f"{blocks.name}[{expert}]", blocks.path, blocks.offset + expert * per, per, "mxfp4",
                             (rows, blocks.shape[2] * 32), stored=tuple(blocks.shape[1:]), start=cut.start,
                             step=cut.step, scales=sc)
        t = self._require(name)
        if len(t.shape) < 2 or t.shape[0] != n or t.dtype not in FLOAT_ITEMSIZE:
            raise SourceError(f"{t.path}: tensor {t.name} is {t.dtype} {list(t.shape)}, expected {n} experts outermost")
        stored = tuple(t.shape[1:])
        logical = stored[::-1] if cut.transposed else stored
        shape = (len(range(cut.start, logical[0], cut.step)), *logical[1:])
        per = t.nbytes // n
        return CutTensor(f"{t.name}[{expert}]", t.path, t.offset + expert * per, per, t.dtype, shape, stored=stored,
                         transposed=cut.transposed, start=cut.start, step=cut.step)

    def tokenizer_files(self) -> tuple[dict[str, Any], dict[str, bytes]]:
        files = {f"tokenizer/{n}": (self.path / n).read_bytes() for n in TOKENIZER_FILES if (self.path / n).is_file()}
        if "tokenizer/tokenizer.json" not in files and "tokenizer/tokenizer.model" not in files:
            raise SourceError(f"{self.path}: no tokenizer.json or tokenizer.model; the layout needs a tokenizer")
        section: dict[str, Any] = {"kind": "hf"}
        cfg = self.raw_config
        for key in ("bos_token_id", "eos_token_id"):
            if isinstance(cfg.get(key), int):
                section[key] = cfg[key]
        return section, files

    def all_tensors(self) -> list[SourceTensor]:
        return list(self.tensors.values())

    def is_expert_name(self, name: str) -> bool:
        return ".experts." in name
