"""The manifest schema: dataclasses, JSON (de)serialisation and structural validation.

Validation here is pure (no filesystem); `reader.py` adds the checks against the files on disk.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from .config import ModelConfig
from .constants import ALIGNMENT, DTYPES, EXPERT_DTYPES, FORMAT_NAME, FORMAT_VERSION, READABLE_VERSIONS

EXPERT_ROLES = ("gate", "up", "down")
# with config.expert_mlp_bias, each expert file also holds its own biases: f32 vectors read with the
# expert, so they are streamed like its matrices rather than kept resident for every expert
EXPERT_BIAS_ROLES = ("gate_bias", "up_bias", "down_bias")
ALL_EXPERT_ROLES = EXPERT_ROLES + EXPERT_BIAS_ROLES


def expert_roles(cfg: ModelConfig) -> tuple[str, ...]:
    """The tensors each expert file of a layout with this config holds, in file order."""
    return ALL_EXPERT_ROLES if cfg.expert_mlp_bias else EXPERT_ROLES


def expert_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """role -> the shape the config implies (HF orientation: gate/up (d_ff, d_model), down (d_model, d_ff))."""
    return {"gate": (cfg.d_ff, cfg.d_model), "up": (cfg.d_ff, cfg.d_model), "down": (cfg.d_model, cfg.d_ff),
            "gate_bias": (cfg.d_ff,), "up_bias": (cfg.d_ff,), "down_bias": (cfg.d_model,)}


_HEX64 = re.compile(r"^[0-9a-f]{16}$")
TOKENIZER_KINDS = ("hf", "gguf")


class ManifestError(ValueError):
    """Structural problem in a manifest; the reader wraps it into a LayoutError naming the file."""


@dataclass(frozen=True)
class TensorEntry:
    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]
    xxh3: str
    file: str = ""  # set for dense tensors; expert tensors live in their expert's file

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"file": self.file} if self.file else {}
        d.update(offset=self.offset, nbytes=self.nbytes, dtype=self.dtype, shape=list(self.shape), xxh3=self.xxh3)
        return d


@dataclass(frozen=True)
class ExpertEntry:
    layer: int
    expert: int
    file: str
    nbytes: int
    xxh3: str
    tensors: dict[str, TensorEntry]

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer, "expert": self.expert, "file": self.file, "nbytes": self.nbytes,
            "xxh3": self.xxh3, "tensors": {r: self.tensors[r].to_dict() for r in ALL_EXPERT_ROLES if r in self.tensors},
        }


@dataclass(frozen=True)
class FileEntry:
    nbytes: int
    xxh3: str


@dataclass
class Manifest:
    arch: str
    config: ModelConfig
    tokenizer: dict[str, Any]
    dense: dict[str, TensorEntry]
    experts: list[ExpertEntry]
    files: dict[str, FileEntry]  # non-expert files (dense data, tokenizer files) with their checksums
    source: dict[str, Any] = field(default_factory=dict)  # provenance only; never read by the runtime
    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION
    # optional low-bit copies of the experts (`convert --standins`), same grid and order as `experts`;
    # readers that predate them ignore the key and lose nothing (the full experts are all there)
    standins: list[ExpertEntry] = field(default_factory=list)

    def expert(self, layer: int, expert: int) -> ExpertEntry:
        # entries cover the MoE layers only (dense-MLP layers have no experts), layer-major
        cfg = self.config
        index = cfg.expert_layers.index(layer) if cfg.dense_layers else layer  # ValueError for a dense layer
        return self.experts[index * cfg.n_experts + expert]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "version": self.version,
            "arch": self.arch,
            "config": self.config.to_dict(),
            "tokenizer": self.tokenizer,
            "source": self.source,
            "files": {p: {"nbytes": f.nbytes, "xxh3": f.xxh3} for p, f in sorted(self.files.items())},
            "dense": {n: t.to_dict() for n, t in self.dense.items()},
            "experts": [e.to_dict() for e in self.experts],
            **({"standins": [e.to_dict() for e in self.standins]} if self.standins else {}),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, d: Any) -> Manifest:
        return _parse_manifest(d)


# ---------------------------------------------------------------- parsing helpers


def _get(d: dict[str, Any], key: str, typ: type | tuple[type, ...], where: str) -> Any:
    if key not in d:
        raise ManifestError(f"{where}: missing key {key!r}")
    value = d[key]
    # bool is an int in Python; a manifest saying `"offset": true` is still wrong
    if isinstance(value, bool) and bool not in (typ if isinstance(typ, tuple) else (typ,)):
        raise ManifestError(f"{where}.{key}: expected {_tname(typ)}, got bool")
    if not isinstance(value, typ):
        raise ManifestError(f"{where}.{key}: expected {_tname(typ)}, got {type(value).__name__}")
    return value


def _tname(typ: type | tuple[type, ...]) -> str:
    return "/".join(t.__name__ for t in typ) if isinstance(typ, tuple) else typ.__name__


def check_relpath(path: str, where: str) -> str:
    """A manifest path must be relative, POSIX, and free of `..`: it can only name a file inside the layout."""
    p = PurePosixPath(path)
    if not path or p.is_absolute() or "\\" in path or "\x00" in path or any(part in ("..", "") for part in p.parts):
        raise ManifestError(f"{where}: path {path!r} must be relative and stay inside the layout")
    if path.startswith("~") or (len(path) > 1 and path[1] == ":"):
        raise ManifestError(f"{where}: path {path!r} must be relative and stay inside the layout")
    return path


def _parse_tensor(d: Any, where: str, *, with_file: bool) -> TensorEntry:
    if not isinstance(d, dict):
        raise ManifestError(f"{where}: expected an object")
    file = check_relpath(_get(d, "file", str, where), f"{where}.file") if with_file else ""
    offset = _get(d, "offset", int, where)
    nbytes = _get(d, "nbytes", int, where)
    dtype = _get(d, "dtype", str, where)
    shape = _get(d, "shape", list, where)
    xxh3 = _get(d, "xxh3", str, where)
    if offset < 0 or offset % ALIGNMENT:
        raise ManifestError(f"{where}.offset: {offset} is not a non-negative multiple of {ALIGNMENT}")
    if dtype not in DTYPES:
        raise ManifestError(f"{where}.dtype: unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
    if not shape or len(shape) > 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        raise ManifestError(f"{where}.shape: expected 1 or 2 positive integers, got {shape!r}")
    dt = DTYPES[dtype]
    if shape[-1] % dt.block_size:
        raise ManifestError(f"{where}.shape: {shape[-1]} columns is not a multiple of {dtype}'s block of {dt.block_size}")
    if nbytes != dt.nbytes(shape):
        raise ManifestError(f"{where}.nbytes: {dtype} {shape} needs {dt.nbytes(shape)} bytes, manifest says {nbytes}")
    if not _HEX64.match(xxh3):
        raise ManifestError(f"{where}.xxh3: expected 16 lowercase hex digits, got {xxh3!r}")
    return TensorEntry(offset, nbytes, dtype, tuple(shape), xxh3, file)


def _check_no_overlap(spans: list[tuple[int, int, str]], where: str) -> None:
    spans = sorted(spans)
    for (a0, a1, an), (b0, _b1, bn) in zip(spans, spans[1:], strict=False):
        if b0 < a1:
            raise ManifestError(f"{where}: tensors {an} [{a0}, {a1}) and {bn} [{b0}, ...) overlap")


def _parse_expert(d: Any, where: str, cfg: ModelConfig) -> ExpertEntry:
    if not isinstance(d, dict):
        raise ManifestError(f"{where}: expected an object")
    layer = _get(d, "layer", int, where)
    expert = _get(d, "expert", int, where)
    where = f"{'stand-in' if where.startswith('manifest.standins') else 'expert'} (layer {layer}, expert {expert})"
    file = check_relpath(_get(d, "file", str, where), f"{where}.file")
    nbytes = _get(d, "nbytes", int, where)
    xxh3 = _get(d, "xxh3", str, where)
    if not _HEX64.match(xxh3):
        raise ManifestError(f"{where}.xxh3: expected 16 lowercase hex digits, got {xxh3!r}")
    if nbytes <= 0 or nbytes % ALIGNMENT:
        raise ManifestError(f"{where}.nbytes: file size {nbytes} is not a positive multiple of {ALIGNMENT}")
    raw = _get(d, "tensors", dict, where)
    roles = expert_roles(cfg)
    if sorted(raw) != sorted(roles):
        raise ManifestError(f"{where}.tensors: expected exactly {list(roles)}, got {sorted(raw)}")
    tensors = {r: _parse_tensor(raw[r], f"{where}.{r}", with_file=False) for r in roles}
    expected = expert_shapes(cfg)
    for role, t in tensors.items():
        if t.shape != expected[role]:
            raise ManifestError(f"{where}.{role}: shape {list(t.shape)} disagrees with config, expected {list(expected[role])}")
        if role in EXPERT_BIAS_ROLES and t.dtype != "f32":
            raise ManifestError(f"{where}.{role}: dtype {t.dtype}, expected f32 (biases are never quantized)")
        if role in EXPERT_ROLES and t.dtype not in EXPERT_DTYPES:
            raise ManifestError(f"{where}.{role}: dtype {t.dtype} is not an expert dtype ({', '.join(EXPERT_DTYPES)})")
        if t.offset + t.nbytes > nbytes:
            raise ManifestError(f"{where}.{role}: [{t.offset}, {t.offset + t.nbytes}) lies beyond the file's {nbytes} bytes")
    _check_no_overlap([(t.offset, t.offset + t.nbytes, r) for r, t in tensors.items()], where)
    return ExpertEntry(layer, expert, file, nbytes, xxh3, tensors)


def _parse_manifest(d: Any) -> Manifest:
    if not isinstance(d, dict):
        raise ManifestError("manifest: expected a JSON object")
    fmt = _get(d, "format", str, "manifest")
    if fmt != FORMAT_NAME:
        raise ManifestError(f"manifest.format: expected {FORMAT_NAME!r}, got {fmt!r}")
    version = _get(d, "version", int, "manifest")
    if version not in READABLE_VERSIONS:
        raise ManifestError(f"manifest.version: this mertools reads versions {list(READABLE_VERSIONS)}, got {version}")
    arch = _get(d, "arch", str, "manifest")
    try:
        cfg = ModelConfig.from_dict(_get(d, "config", dict, "manifest"))
    except ValueError as e:
        raise ManifestError(f"manifest.{e}") from None
    if cfg.arch != arch:
        raise ManifestError(f"manifest: arch {arch!r} disagrees with config.arch {cfg.arch!r}")
    if version < 2 and cfg.uses_extensions:
        raise ManifestError("manifest.config: uses fields of format version 2 (q/k norm, biases, shared or dense MLPs, "
                            "sigmoid/biased/grouped routing, partial rotary, sinks, expert biases, a clamped GLU, YaRN) "
                            f"in a version {version} manifest")
    tok = _get(d, "tokenizer", dict, "manifest")
    kind = _get(tok, "kind", str, "manifest.tokenizer")
    if kind not in TOKENIZER_KINDS:
        raise ManifestError(f"manifest.tokenizer.kind: expected one of {TOKENIZER_KINDS}, got {kind!r}")
    for p in _get(tok, "files", list, "manifest.tokenizer"):
        check_relpath(p if isinstance(p, str) else "", "manifest.tokenizer.files")
    files_raw = _get(d, "files", dict, "manifest")
    files: dict[str, FileEntry] = {}
    for p, fe in files_raw.items():
        where = f"manifest.files[{p!r}]"
        check_relpath(p, where)
        if not isinstance(fe, dict):
            raise ManifestError(f"{where}: expected an object")
        nbytes, xxh3 = _get(fe, "nbytes", int, where), _get(fe, "xxh3", str, where)
        if nbytes < 0 or not _HEX64.match(xxh3):
            raise ManifestError(f"{where}: bad nbytes {nbytes} or xxh3 {xxh3!r}")
        files[p] = FileEntry(nbytes, xxh3)
    for p in tok["files"]:
        if p not in files:
            raise ManifestError(f"manifest.tokenizer.files: {p!r} is not listed in manifest.files")
    dense = {
        n: _parse_tensor(t, f"dense[{n!r}]", with_file=True) for n, t in _get(d, "dense", dict, "manifest").items()
    }
    by_file: dict[str, list[tuple[int, int, str]]] = {}
    for n, t in dense.items():
        if t.file not in files:
            raise ManifestError(f"dense[{n!r}].file: {t.file!r} is not listed in manifest.files")
        if t.offset + t.nbytes > files[t.file].nbytes:
            end, size = t.offset + t.nbytes, files[t.file].nbytes
            raise ManifestError(f"dense[{n!r}]: [{t.offset}, {end}) lies beyond {t.file}'s {size} bytes")
        by_file.setdefault(t.file, []).append((t.offset, t.offset + t.nbytes, n))
    for f, spans in by_file.items():
        _check_no_overlap(spans, f"dense tensors in {f}")
    experts = [_parse_expert(e, f"manifest.experts[{i}]", cfg) for i, e in enumerate(_get(d, "experts", list, "manifest"))]
    _check_expert_grid(experts, cfg)
    expert_files = {e.file for e in experts}
    if len(expert_files) != len(experts) or expert_files & set(files):
        raise ManifestError("manifest.experts: two entries share a file, or an expert file is also a dense file")
    standins = []
    if "standins" in d:
        standins = [_parse_expert(e, f"manifest.standins[{i}]", cfg) for i, e in enumerate(_get(d, "standins", list, "manifest"))]
        _check_expert_grid(standins, cfg, "manifest.standins")
        standin_files = {e.file for e in standins}
        if len(standin_files) != len(standins) or standin_files & (expert_files | set(files)):
            raise ManifestError("manifest.standins: two entries share a file, or a stand-in file is also an expert or dense file")
        for s, e in zip(standins, experts, strict=True):
            for role, t in s.tensors.items():
                if DTYPES[t.dtype].bits_per_weight > DTYPES[e.tensors[role].dtype].bits_per_weight:
                    raise ManifestError(f"manifest.standins: layer {s.layer} expert {s.expert} {role}: {t.dtype} is "
                                        f"larger than the expert's own {e.tensors[role].dtype}")
    return Manifest(arch, cfg, tok, dense, experts, files, _get(d, "source", dict, "manifest"), fmt, version, standins)


def _check_expert_grid(experts: list[ExpertEntry], cfg: ModelConfig, where: str = "manifest.experts") -> None:
    """Experts are listed once each, in (layer, expert) order, covering every MoE layer (all layers but
    config.dense_layers, then the nextn_layers MTP blocks) and every expert."""
    n_moe = cfg.n_layers - len(cfg.dense_layers) + cfg.nextn_layers
    short = n_moe * cfg.n_experts - len(experts)
    if short:  # checked first: the config's counts bound the loops below, and a hostile one could be 2**60
        detail = f"missing {short} entries" if short > 0 else f"{-short} unexpected entries"
        raise ManifestError(f"{where}: {len(experts)} entries for {n_moe} MoE layers x {cfg.n_experts} "
                            f"experts: {detail}")
    seen: set[tuple[int, int]] = set()
    for e in experts:
        key = (e.layer, e.expert)
        if key in seen:
            raise ManifestError(f"{where}: duplicate entry for layer {e.layer}, expert {e.expert}")
        seen.add(key)
    want = [(layer, x) for layer in cfg.expert_layers for x in range(cfg.n_experts)]
    if [(e.layer, e.expert) for e in experts] != want:
        missing = sorted(set(want) - seen)
        extra = sorted(seen - set(want))
        detail = f"missing {missing[:4]}" if missing else f"unexpected {extra[:4]}" if extra else "out of order"
        raise ManifestError(
            f"{where}: expected {len(want)} entries for {len(cfg.expert_layers)} MoE layers x {cfg.n_experts} experts "
            f"in order, {detail}"
        )
