"""GGUF files (llama.cpp): metadata through gguf-py's reader, tensor data by pread.

Both MoE layouts are read: merged (`blk.N.ffn_gate_exps.weight`, expert outermost, so one expert
is one contiguous byte range) and per-expert (`blk.N.ffn_gate.E.weight`, older files).
"""

from __future__ import annotations

import re
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LayoutError, SourceError
from ..families import family_for_gguf, supported
from ..families.base import ConfigKey, DenseSpec, build_config, fmt
from ..layout.constants import GGML_TYPE_TO_DTYPE
from .source import Source, SourceTensor, keep_mtp

_PER_EXPERT = re.compile(r"\.ffn_(gate|up|down)\.\d+\.weight$")
TOKENIZER_FILE = "tokenizer/vocab.gguf"


class GGUFSource(Source):
    kind = "gguf"

    def __init__(self, path: Path, *, mtp: bool = False) -> None:
        from gguf import GGUFReader

        self.path = path
        _check_header(path)
        try:
            self.reader = GGUFReader(path)
        except Exception as e:  # gguf-py raises ValueError, IndexError, struct/numpy errors on bad files
            raise SourceError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
        self.fields = self.reader.fields
        self.gguf_arch = self._field("general.architecture")
        if not isinstance(self.gguf_arch, str):
            raise SourceError(f"{path}: no general.architecture in the GGUF metadata")
        arch = family_for_gguf(self.gguf_arch)
        if arch is None:
            raise SourceError(f"{path}: unsupported GGUF architecture {self.gguf_arch!r} (supported: {supported()})")
        self.arch = arch
        self.tensors = self._index_tensors()
        blocks = self._field(f"{self.gguf_arch}.block_count")
        if isinstance(blocks, int) and not 0 < blocks <= len(self.tensors):  # it bounds loops over layers below
            raise SourceError(f"{path}: {self.gguf_arch}.block_count {blocks} is impossible with {len(self.tensors)} tensors")
        if not self._field(f"{self.gguf_arch}.expert_count"):
            raise SourceError(f"{path}: {self.gguf_arch} model without experts ({self.gguf_arch}.expert_count); not a MoE")
        try:
            # no GGUF key says which layers are dense MLPs (HF's mlp_only_layers): a layer without a router is
            router = next(s.name for s in arch.dense if s.role == "router" and s.layers == "moe") if arch.dense_mlp_layers else ""
            config = build_config(arch, self._lookup, {}, str(path), lambda la: fmt(router, la) in self.tensors)
        except ValueError as e:
            raise SourceError(f"{path}: {e}") from None
        self.config = keep_mtp(config, mtp, path)
        self.merged = any(n.endswith("_exps.weight") for n in self.tensors)

    def _field(self, key: str) -> Any:
        f = self.fields.get(key)
        if f is None:
            return None
        try:
            return f.contents()
        except (UnicodeDecodeError, ValueError, IndexError) as e:
            raise SourceError(f"{self.path}: metadata {key} is corrupt ({e})") from None

    def _lookup(self, key: ConfigKey) -> Any:
        for k in key.gguf:
            value = self._field(k.replace("{arch}", self.gguf_arch))
            if isinstance(value, float):
                # GGUF stores f32: 1e-5 reads back as 9.99999974e-06. The shortest decimal that
                # round-trips through f32 is what the writer meant, and what an HF config says.
                value = float(str(np.float32(value)))
            if value is not None:
                return value
        if key.field == "vocab_size" and "token_embd.weight" in self.tensors:
            return self.tensors["token_embd.weight"].shape[0]
        if key.field == "tie_embeddings":
            return "output.weight" not in self.tensors
        conditional = [s for s in self.arch.dense if s.when == key.field]
        if conditional and not key.gguf:  # e.g. attn_bias: llama.cpp writes no key, only the tensors
            n_layers = self._field(f"{self.gguf_arch}.block_count")
            return isinstance(n_layers, int) and any(fmt(conditional[0].name, la) in self.tensors for la in range(n_layers))
        return None

    def _index_tensors(self) -> dict[str, SourceTensor]:
        size = self.path.stat().st_size
        out: dict[str, SourceTensor] = {}
        for t in self.reader.tensors:
            ggml_type = int(t.tensor_type)
            dtype = GGML_TYPE_TO_DTYPE.get(ggml_type) or t.tensor_type.name.lower()
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # ggml ne[] is innermost-first
            if t.data_offset + t.n_bytes > size:
                raise SourceError(
                    f"{self.path}: tensor {t.name} [{t.data_offset}, {t.data_offset + t.n_bytes}) runs past the end "
                    f"of the {size}-byte file (truncated?)"
                )
            if t.name in out:
                raise SourceError(f"{self.path}: tensor {t.name} appears twice")
            out[t.name] = SourceTensor(t.name, self.path, int(t.data_offset), int(t.n_bytes), dtype, shape, ggml_type)
        spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in out.values() if t.nbytes)
        for (_, a_end, a), (b_start, _, b) in zip(spans, spans[1:], strict=False):
            if b_start < a_end:  # llama.cpp would read one byte as two tensors' weights: the file is corrupt
                raise SourceError(f"{self.path}: tensors {a} and {b} overlap in the data section (corrupt file)")
        return out

    def dense_tensor(self, spec: DenseSpec, layer: int | None) -> SourceTensor | None:
        name = fmt(spec.name, layer)
        if spec.split is not None and name not in self.tensors and fmt(spec.split.gguf, layer) in self.tensors:
            return self.split_tensor(spec, self.tensors[fmt(spec.split.gguf, layer)])  # an older GGUF's whole tensor
        t = self.tensors.get(name) if spec.optional else self._require(name)
        if t is not None and self.arch.gguf_permutes_qk and spec.role in ("attn_q", "attn_k"):
            n_head = self.config.n_heads if spec.role == "attn_q" else self.config.n_kv_heads
            t = _replace(t, row_perm=(n_head, t.shape[0]))
        return t

    def expert_tensor(self, layer: int, expert: int, role: str) -> SourceTensor:
        spec = self.arch.expert(role)
        if not self.merged:
            if not spec.gguf_split:
                raise SourceError(f"{self.path}: no merged expert tensor {fmt(spec.gguf_merged, layer)} "
                                  f"({self.arch.name} GGUFs store experts merged)")
            return self._require(fmt(spec.gguf_split, layer, expert))
        t = self._require(fmt(spec.gguf_merged, layer))
        n = self.config.n_experts
        if len(t.shape) != 1 + len(spec.shape) or t.shape[0] != n or t.nbytes % n:  # matrices, or expert biases
            raise SourceError(f"{self.path}: tensor {t.name} has shape {list(t.shape)}, expected {n} experts outermost")
        if not 0 <= expert < n:
            raise SourceError(f"{self.path}: tensor {t.name} has no expert {expert}")
        per = t.nbytes // n
        return _replace(t, name=f"{t.name}[{expert}]", offset=t.offset + expert * per, nbytes=per, shape=t.shape[1:])

    def tokenizer_files(self) -> tuple[dict[str, Any], dict[str, bytes]]:
        """Carry every tokenizer.* key into a vocabulary-only GGUF (like llama.cpp's ggml-vocab files)."""
        from gguf import GGUFValueType, GGUFWriter

        keys = [k for k in self.fields if k.startswith("tokenizer.")]
        if "tokenizer.ggml.tokens" not in keys:
            raise SourceError(f"{self.path}: no tokenizer.ggml.tokens in the metadata; the layout needs a tokenizer")
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "vocab.gguf"
            w = GGUFWriter(out, self.gguf_arch)
            for k in keys:
                f = self.fields[k]
                sub = f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None
                w.add_key_value(k, self._field(k), f.types[0], sub_type=sub)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            w.close()
            data = out.read_bytes()
        section: dict[str, Any] = {"kind": "gguf", "model": self._field("tokenizer.ggml.model")}
        for key, name in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
            v = self._field(f"tokenizer.ggml.{name}")
            if isinstance(v, int):
                section[key] = v
        return section, {TOKENIZER_FILE: data}

    def all_tensors(self) -> list[SourceTensor]:
        return list(self.tensors.values())

    def is_expert_name(self, name: str) -> bool:
        return name.endswith(("_exps.weight", "_exps.bias")) or bool(_PER_EXPERT.search(name))


def _check_header(path: Path) -> None:
    """Counts in the fixed header bounded by the file size before gguf-py sees the file: each tensor
    info takes >= 24 bytes and each key/value >= 13, so larger counts are lies (absurd allocations)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24:
        raise SourceError(f"{path}: truncated GGUF header ({size} bytes)")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", head, 4)
    if version not in (2, 3):
        raise SourceError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
    if n_tensors * 24 + n_kv * 13 > size:
        raise SourceError(f"{path}: header claims {n_tensors} tensors and {n_kv} metadata keys, "
                          f"impossible in a {size}-byte file (corrupt or truncated)")
    # our own linear metadata reader refuses what llama.cpp refuses (nested arrays, duplicate keys, lengths
    # past the end) quickly; gguf-py would spend seconds per MB on some of those, or recurse
    from ..runtime.tokenizer_gguf import read_gguf_metadata

    try:
        read_gguf_metadata(path)
    except LayoutError as e:
        raise SourceError(str(e)) from None


def _replace(t: SourceTensor, **kw: Any) -> SourceTensor:
    from dataclasses import replace

    return replace(t, **kw)
