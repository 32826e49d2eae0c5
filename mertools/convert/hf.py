"""HF model directories: config.json, safetensors (single, sharded with an index, or a glob), tokenizer.

Safetensors headers are parsed here (the format is an 8-byte length and a JSON header) rather than
through `safe_open`, because numpy has no bfloat16 and because we read data with pread, not mmap.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from ..errors import SourceError
from ..families import family_for_hf, supported
from ..families.base import ConfigKey, DenseSpec, build_config, fmt
from .source import FLOAT_ITEMSIZE, Source, SourceTensor

SAFETENSORS_DTYPES = {"F32": "f32", "F16": "f16", "BF16": "bf16"}
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
            raise SourceError(f"{path}: tensor {name}: unsupported dtype {dtype} (supported: F32, F16, BF16)")
        ours = SAFETENSORS_DTYPES[dtype]
        numel = 1
        for s in shape:
            numel *= s
        if not (0 <= begin <= end <= data_size) or end - begin != numel * FLOAT_ITEMSIZE[ours] or any(s < 0 for s in shape):
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

    def __init__(self, path: Path) -> None:
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
            self.config = build_config(arch, self._lookup, self.raw_config, str(cfg_path))
        except ValueError as e:
            raise SourceError(f"{cfg_path}: {e}") from None
        self.tensors = self._index_tensors()

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
        return self.tensors.get(name) if spec.optional else self._require(name)

    def expert_tensor(self, layer: int, expert: int, role: str) -> SourceTensor:
        return self._require(fmt(self.arch.expert(role).hf, layer, expert))

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
