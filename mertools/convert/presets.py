"""llama.cpp's quantization presets (`llama-quantize MODEL OUT Q4_K_M`) as conversion targets: the
type of every tensor, chosen as llama-quantize chooses it without an importance matrix.

Written from llama.cpp's src/llama-quant.cpp (llama-cpp-python 0.3.36's vendored copy):
`llama_ftype_get_default_type` (a preset's default type), `tensor_allows_quantization` (what is never
quantized), `llama_tensor_get_type_impl` (the per-tensor rules) and `tensor_type_fallback` (rows that
do not fit the chosen type's blocks). The rules are kept here as tables, one `Preset` per ftype; the
branches llama.cpp has for architectures we do not read (Falcon, GLM, BailingMoE...) and for types no
layout holds (IQ1/IQ2/IQ3, TQ) are left out, and so are the presets that need them or an importance
matrix (Q2_K_S: llama-quantize refuses it without one).

Names are llama.cpp's GGUF names; the experts of a layer are its merged `blk.L.ffn_*_exps.weight`
tensors, shape (n_experts, rows, cols): llama.cpp decides once per merged tensor, so every expert of a
layer gets the same type for a role.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ..dtypes import CONVERT_CHOICES, DTYPES
from ..families.base import Family, fmt, resolve_shape
from ..layout.config import ModelConfig

# ------------------------------------------------------------------ categories (tensor_get_category)

OUTPUT, TOKEN_EMBD, ATTN_V, ATTN_K, ATTN_Q, ATTN_OUTPUT, FFN_UP, FFN_GATE, FFN_DOWN, OTHER = (
    "output", "token_embd", "attn_v", "attn_k", "attn_q", "attn_output", "ffn_up", "ffn_gate", "ffn_down", "other")
_EXACT = {"output.weight": OUTPUT, "token_embd.weight": TOKEN_EMBD, "per_layer_token_embd.weight": TOKEN_EMBD}
# first match wins, as in llama.cpp; qkv and MLA's kv_b count as attn_v (category_is_attn_v), which makes
# llama.cpp's own ATTENTION_QKV branch unreachable, so it has no table here
_CONTAINS = (
    ("attn_qkv.weight", ATTN_V), ("attn_kv_b.weight", ATTN_V), ("attn_v.weight", ATTN_V), ("attn_k.weight", ATTN_K),
    ("attn_q.weight", ATTN_Q), ("attn_output.weight", ATTN_OUTPUT), ("ffn_up", FFN_UP), ("ffn_gate", FFN_GATE),
    ("ffn_down", FFN_DOWN),
)
# tensor_allows_quantization: names never quantized (the rest of its list names tensors of
# architectures we do not read); also 1-D tensors and names not ending in "weight"
_NEVER = ("_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel", "per_layer_model_proj",
          "ssm_conv1d", "shortconv.conv.weight", "attn_rel_b.weight", "position_embd", "token_types.weight")
# tensor_type_fallback: a row (ne[0]) that is not a whole number of the chosen type's blocks; a
# 32-weight type that does not fit either becomes f16
FALLBACK = {"iq4_xs": "iq4_nl", "q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}


def category(name: str) -> str:
    if name in _EXACT:
        return _EXACT[name]
    return next((cat for part, cat in _CONTAINS if part in name), OTHER)


def ggml_n_dims(shape: tuple[int, ...]) -> int:
    """ggml's dimension count of a numpy-ordered shape: trailing (ggml order) sizes of 1 do not count,
    so a (1, d) gate vector is 1-D."""
    return next((len(shape) - i for i, d in enumerate(shape) if d > 1), 1)


def quantizable(name: str, shape: tuple[int, ...]) -> bool:
    return ggml_n_dims(shape) >= 2 and name.endswith("weight") and not any(p in name for p in _NEVER)


def layer_of(name: str) -> int:
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of layers that get more bits: the first and last eighth, and every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


# ------------------------------------------------------------------ the rules, as data


@dataclass(frozen=True)
class Where:
    """What a rule's condition sees: the tensor's index among its kind and how many there are (attn_v:
    llama.cpp's running count of attn_v tensors; ffn_down: the layer and the layer count), and the model's
    expert count and query heads per kv head."""

    i: int
    n: int
    n_expert: int
    n_gqa: int


WHEN: dict[str, Callable[[Where], bool]] = {
    "always": lambda w: True,
    "gqa>=4": lambda w: w.n_gqa >= 4,
    "first 2": lambda w: w.i < 2,
    "first 4": lambda w: w.i < 4,
    "first 1/8": lambda w: w.i < w.n // 8,
    "first 1/16": lambda w: w.i < w.n // 16,
    "more bits": lambda w: use_more_bits(w.i, w.n),
    "8 experts": lambda w: w.n_expert == 8,
    "not 8 experts": lambda w: w.n_expert != 8,
}


@dataclass(frozen=True)
class Rule:
    to: str  # layout dtype
    when: str = "always"  # a WHEN name

    def __post_init__(self) -> None:
        if self.when not in WHEN or self.to not in DTYPES:
            raise ValueError(f"rule {self}: unknown condition or dtype")


def _first(rules: tuple[Rule, ...], w: Where, otherwise: str) -> str:
    return next((r.to for r in rules if WHEN[r.when](w)), otherwise)


@dataclass(frozen=True)
class Preset:
    name: str  # --dtype name: llama-quantize's, lower case
    ftype: str  # llama.cpp's LLAMA_FTYPE_MOSTLY_<ftype>
    default: str  # llama_ftype_get_default_type, as a layout dtype
    attn_v: tuple[Rule, ...] = ()  # first match wins; then the general rules (70B, 8 experts)
    ffn_down: tuple[Rule, ...] = ()
    attn_output: tuple[Rule, ...] = ()
    dense: str | None = None  # MXFP4_MOE: every tensor but the merged experts has this type

    def __post_init__(self) -> None:
        if self.default not in DTYPES or (self.dense is not None and self.dense not in DTYPES):
            raise ValueError(f"preset {self.name}: unknown dtype")

    @property
    def quantized(self) -> bool:
        """llama.cpp applies its rules only when the default type is a block type (not F16/BF16)."""
        return DTYPES[self.default].block_size > 1

    def may_choose(self) -> frozenset[str]:
        """Every type this preset can give some tensor of some model (the fallbacks included)."""
        if not self.quantized:
            return frozenset({self.default})
        rules = (*self.attn_v, *self.ffn_down, *self.attn_output)
        out = {self.default, "q8_0", *(r.to for r in rules)}
        if self.dense is None and self.default != "q8_0":
            out.add("q6_k")  # output.weight
        if {self.default, *(r.to for r in self.attn_v)} & {"q3_k", "q4_k"}:
            out.add("q5_k")  # 70B attn_v
        for t in list(out):
            while t in FALLBACK:
                t = FALLBACK[t]
                out.add(t)
        return frozenset(out | {"f16"})

    @property
    def available(self) -> bool:
        """Whether every type it may choose has a quantizer (the ones missing: `missing`)."""
        return not self.missing

    @property
    def missing(self) -> tuple[str, ...]:
        return tuple(sorted(t for t in self.may_choose() if DTYPES[t].quantize is None))


_K_M_V = (Rule("q6_k", "more bits"),)
_Q5K_8X = (Rule("q5_k", "8 experts"),)
PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("q2_k", "Q2_K", "q2_k", attn_v=(Rule("q4_k", "gqa>=4"), Rule("q3_k")), ffn_down=(Rule("q3_k"),),
           attn_output=(Rule("q5_k", "8 experts"), Rule("q3_k"))),
    Preset("q3_k_s", "Q3_K_S", "q3_k", attn_output=_Q5K_8X),
    Preset("q3_k_m", "Q3_K_M", "q3_k", attn_v=(Rule("q5_k", "first 2"), Rule("q4_k")),
           ffn_down=(Rule("q5_k", "first 1/16"), Rule("q4_k")), attn_output=(Rule("q5_k", "8 experts"), Rule("q4_k"))),
    # Q3_K_L is not among the 8-expert attn_output bumps: with 8 experts its attn_output stays Q3_K
    Preset("q3_k_l", "Q3_K_L", "q3_k", attn_v=(Rule("q5_k"),), ffn_down=(Rule("q5_k"),),
           attn_output=(Rule("q5_k", "not 8 experts"),)),
    Preset("q4_k_s", "Q4_K_S", "q4_k", attn_v=(Rule("q5_k", "first 4"),), ffn_down=(Rule("q5_k", "first 1/8"),),
           attn_output=_Q5K_8X),
    Preset("q4_k_m", "Q4_K_M", "q4_k", attn_v=_K_M_V, ffn_down=_K_M_V, attn_output=_Q5K_8X),
    Preset("q5_k_s", "Q5_K_S", "q5_k"),
    Preset("q5_k_m", "Q5_K_M", "q5_k", attn_v=_K_M_V, ffn_down=_K_M_V),
    Preset("q6_k", "Q6_K", "q6_k"),
    Preset("q4_0", "Q4_0", "q4_0"),  # its ffn_down rule needs an importance matrix
    Preset("q4_1", "Q4_1", "q4_1"),
    Preset("q5_0", "Q5_0", "q5_0"),
    Preset("q5_1", "Q5_1", "q5_1"),
    Preset("q8_0", "Q8_0", "q8_0"),
    Preset("iq4_nl", "IQ4_NL", "iq4_nl", attn_v=(Rule("q5_k", "gqa>=4"),), ffn_down=(Rule("q5_k", "first 1/8"),),
           attn_output=_Q5K_8X),
    Preset("iq4_xs", "IQ4_XS", "iq4_xs", attn_v=(Rule("q5_k", "gqa>=4"),), ffn_down=(Rule("q5_k", "first 1/8"),),
           attn_output=_Q5K_8X),
    Preset("mxfp4_moe", "MXFP4_MOE", "mxfp4", dense="q8_0"),
    Preset("f16", "F16", "f16"),
    Preset("bf16", "BF16", "bf16"),
)}

# `--dtype`: "auto"; each of llama-quantize's presets whose types all have quantizers, which then choose
# every tensor's type as llama-quantize does (a preset's name wins over the tensor type of the same name:
# `q4_0` is llama.cpp's Q4_0 mix, its output.weight Q6_K); and each other type we can quantize to,
# meaning that type for the experts and the big dense matrices
PRESET_CHOICES = tuple(name for name, p in PRESETS.items() if p.available)
PLAIN_CHOICES = tuple(d for d in CONVERT_CHOICES if d != "auto" and d not in PRESET_CHOICES)
DTYPE_CHOICES = ("auto", *PLAIN_CHOICES, *PRESET_CHOICES)
DENSE_DTYPE_CHOICES = CONVERT_CHOICES  # never a preset: one type for every big dense matrix


# ------------------------------------------------------------------ a model's plan


@dataclass(frozen=True)
class ModelFacts:
    """The hyper-parameters llama.cpp's rules read (llama_hparams, llm_type)."""

    n_layers: int
    n_expert: int
    n_gqa: int  # n_head / n_head_kv, as integers
    is_70b: bool  # LLM_TYPE_70B: llama.cpp's `llama` architecture, 80 layers, grouped kv heads, not 8 experts

    @classmethod
    def of(cls, cfg: ModelConfig, family: Family) -> ModelFacts:
        llama = family.gguf_architectures[0] == "llama"  # what llama.cpp's converter writes for the family
        return cls(cfg.n_layers, cfg.n_experts, cfg.n_heads // cfg.n_kv_heads,
                   llama and cfg.n_experts != 8 and cfg.n_layers == 80 and cfg.n_heads != cfg.n_kv_heads)


@dataclass(frozen=True)
class Plan:
    preset: Preset
    types: dict[str, str]  # GGUF tensor name -> layout dtype; "f32" for tensors llama.cpp never quantizes
    notes: dict[str, str] = field(default_factory=dict)  # tensor name -> its fallback, as llama-quantize warns

    def expert(self, family: Family, layer: int, role: str) -> str:
        return self.types[fmt(family.expert(role).gguf_merged, layer)]


def model_tensors(cfg: ModelConfig, family: Family, dense: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The model's tensors as llama.cpp sees them: `dense` ({GGUF name: shape}, the tensors present) and
    each MoE layer's merged experts, shape (n_experts, rows, cols)."""
    out = dict(dense)
    for layer in cfg.expert_layers:  # MTP blocks too (nextn_layers)
        for spec in family.expert_specs(cfg):  # expert biases are .bias: llama.cpp never quantizes them
            out[fmt(spec.gguf_merged, layer)] = (cfg.n_experts, *resolve_shape(spec.shape, cfg))
    return out


@dataclass
class _Visit:
    """llama.cpp's running counts (quantize_state_impl): attn_v tensors seen and in all, ffn_down seen."""

    n_attn_v: int
    i_attn_v: int = 0
    i_ffn_down: int = 0


def plan(preset: Preset | str, tensors: Mapping[str, tuple[int, ...]], model: ModelFacts) -> Plan:
    """The type llama-quantize gives each tensor. `tensors`: {GGUF name: numpy-ordered shape}. llama.cpp
    visits tensors by layer, then by name (its weight_name_comparer), so blk.10 comes after blk.9; its
    counters run in that order."""
    p = PRESETS[preset] if isinstance(preset, str) else preset
    names = sorted(tensors, key=lambda n: (layer_of(n), n))
    tied = "output.weight" not in tensors  # the token embedding is also the output matrix
    visit = _Visit(n_attn_v=sum(category(n) == ATTN_V for n in names))
    types: dict[str, str] = {}
    notes: dict[str, str] = {}
    for name in names:
        shape = tensors[name]
        if not quantizable(name, shape):
            types[name] = "f32"
        elif not p.quantized:
            types[name] = p.default
        else:
            types[name] = _fallback(name, shape[-1], _rules(p, name, shape, model, tied, visit), notes)
    return Plan(p, types, notes)


def _rules(p: Preset, name: str, shape: tuple[int, ...], m: ModelFacts, tied: bool, visit: _Visit) -> str:
    """llama_tensor_get_type_impl, for one quantizable tensor of a quantized preset."""
    cat, t = category(name), p.default
    if cat == OUTPUT or (tied and cat == TOKEN_EMBD):
        if p.dense is not None or shape[-1] % DTYPES[t].block_size:
            t = "q8_0"
        elif t != "q8_0":
            t = "q6_k"
    elif p.dense is not None:  # MXFP4_MOE: merged experts (ne[2] > 1) keep the default
        t = t if len(shape) == 3 and shape[0] > 1 else p.dense
    elif cat == ATTN_V:
        t = _first(p.attn_v, Where(visit.i_attn_v, visit.n_attn_v, m.n_expert, m.n_gqa), t)
        if m.is_70b and t in ("q3_k", "q4_k"):  # a 70B shares each v among 8 query heads: more bits cost little
            t = "q5_k"
        if m.n_expert == 8:
            t = "q8_0"
        visit.i_attn_v += 1
    elif cat == ATTN_K and m.n_expert == 8:
        t = "q8_0"
    elif cat == FFN_DOWN:
        # a MoE model's layer comes from the name (Mixtral's per-expert tensors do not come in layer order)
        layer = layer_of(name) if m.n_expert > 1 else visit.i_ffn_down
        t = _first(p.ffn_down, Where(layer, m.n_layers, m.n_expert, m.n_gqa), t)
        visit.i_ffn_down += 1
    elif cat == ATTN_OUTPUT:  # its rules read only the expert count
        t = _first(p.attn_output, Where(0, 0, m.n_expert, m.n_gqa), t)
    return t


def _fallback(name: str, cols: int, want: str, notes: dict[str, str]) -> str:
    if cols % DTYPES[want].block_size == 0:
        return want
    got = FALLBACK.get(want, want)
    if cols % DTYPES[got].block_size:
        got = "f16"
    notes[name] = f"{name}: {cols} columns do not fit {want} blocks, {got} instead (llama-quantize's fallback)"
    return got

