"""A `tokenizers` pipeline equivalent to llama.cpp's, built from a GGUF's `tokenizer.*` metadata.

- `tokenizer.ggml.model == "llama"` (SentencePiece BPE): a BPE model with byte fallback whose merges
  are recovered from the vocabulary, best score first (what transformers' `generate_merges` does),
  behind the "legacy" Llama normalizer (`Prepend("▁")` + `Replace(" ", "▁")`). That is also what
  llama.cpp does: a space before the text and after every special token, spaces escaped to "▁".
- `"gpt2"` (byte-level BPE): the file's merges behind a sequence of `Split(regex, "isolated")` chosen
  by `tokenizer.ggml.pre` (llama.cpp applies its regex list the same way: each one re-splits the
  pieces of the previous one), then `ByteLevel` without its own regex.
Control (3) and unknown (2) tokens are special added tokens, user-defined (4) plain added tokens, so
both are matched whole in the text, like llama.cpp's `tokenizer_st_partition`.
"""

from __future__ import annotations

import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LayoutError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")

# --- pre-tokenizer regexes (llama.cpp's src/llama-vocab.cpp; where llama.cpp rewrote a regex for
# its own engine, the original from the model's tokenizer.json, which Oniguruma runs as is) ---
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DEEPSEEK_LLM_LETTERS = (  # escaped: an editor's Unicode normalisation would silently change some of these
    "A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373"
    "\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481"
    "\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b"
    "\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b"
    "\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb"
    "\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128"
    "\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4"
    "\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf"
    "\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3"
    "\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943"
)
_CJK_HANGUL = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
_CJK_KANA = "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"
_DEEPSEEK3 = (r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
              r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_BLOOM = " ?[^(\\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+"

PRE_TOKENIZERS: dict[str, tuple[str, ...]] = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]"),
    "gpt2": (_GPT2,),
    "llama3": (_LLAMA3,),
    "qwen2": (_QWEN2,),
    "qwen35": (_QWEN35,),
    "starcoder": (r"\p{N}", _GPT2),
    "falcon": (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, "[0-9][0-9][0-9]"),
    "deepseek-llm": ("[\r\n]", f"\\s?[{_DEEPSEEK_LLM_LETTERS}]+",
                     "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+", r"\s+$", _CJK_HANGUL, r"\p{N}+"),
    "deepseek-coder": ("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK_HANGUL, r"\p{N}"),
    "deepseek-v3": (r"\p{N}{1,3}", _CJK_KANA, _DEEPSEEK3),
    "bloom": (_BLOOM,),
    "viking": (_BLOOM, r"\p{N}"),
    "tekken": (_TEKKEN,),
    "gpt-4o": (_GPT4O,),
    "seed-coder": (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+"
                   r"|\s+(?!\S)|\s+",),
    "bailingmoe": (r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",),
}
# tokenizer.ggml.pre -> PRE_TOKENIZERS key, as llama.cpp's llama_vocab::impl::load maps them
_PRE_ALIASES = {
    "default": "default",
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano", "dbrx", "smaug-bpe", "chatglm-bpe", "glm4", "glm5"), "llama3"),
    **dict.fromkeys(("gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0", "mellum",
                     "modern-bert", "jina-v1-en", "jina-v2-code", "roberta-bpe", "mpt", "olmo", "jais", "trillion",
                     "granite-docling", "exaone4"), "gpt2"),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan", "solar-open",
                     "grok-2"), "qwen2"),
    "qwen35": "qwen35",
    **dict.fromkeys(("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b", "mellum2"),
                    "starcoder"),
    "falcon": "falcon",
    "deepseek-llm": "deepseek-llm",
    "deepseek-coder": "deepseek-coder",
    **dict.fromkeys(("deepseek-v3", "hunyuan-dense", "joyai-llm", "hy_v4"), "deepseek-v3"),
    **dict.fromkeys(("poro-chat", "bloom", "gpt3-finnish"), "bloom"),
    "viking": "viking",
    "tekken": "tekken",
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), "gpt-4o"),
    "seed-coder": "seed-coder",
    **dict.fromkeys(("bailingmoe", "bailingmoe2", "llada-moe"), "bailingmoe"),
}
# llama.cpp sets ignore_merges for these: a word that is itself a token is taken whole
_IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                  "jina-v5-nano", "glm4", "glm5", "tekken"}
# a BPE vocabulary with one of these pre-tokenizers adds BOS whatever the file says (llama.cpp)
_FORCE_BOS = {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
              "jina-v5-nano", "tekken"}

# --- a minimal GGUF metadata reader: gguf-py's GGUFReader takes ~10 s on a 128k-token vocabulary ---
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}


def read_gguf_metadata(path: Path) -> dict[str, Any]:
    """Every key/value of a GGUF file (v2/v3, little-endian); numeric arrays as Python lists.
    The file is mapped, not read, so a whole model's GGUF costs only its metadata."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _parse_metadata(data)
    except OSError as e:
        raise LayoutError(f"{path}: cannot read ({e.strerror})") from None
    except (ValueError, struct.error, UnicodeDecodeError, RecursionError) as e:  # mmap of an empty file: ValueError
        raise LayoutError(f"{path}: not a readable GGUF file ({e})") from None


def _parse_metadata(data: Any) -> dict[str, Any]:
    if data[:4] != b"GGUF":
        raise ValueError("no GGUF magic")
    version, _n_tensors, n_kv = struct.unpack_from("<IQQ", data, 4)
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} (only 2 and 3 are read)")
    if n_kv * 13 > len(data):  # a key/value takes at least 13 bytes: refuse absurd counts before looping
        raise ValueError(f"{n_kv} key/value pairs cannot fit in {len(data)} bytes")
    off, out = 24, {}
    for _ in range(n_kv):
        key, off = _string(data, off)
        if key in out:  # as llama.cpp: a second value for a key is a corrupt file, not an override
            raise ValueError(f"duplicate key {key!r}")
        (vtype,) = struct.unpack_from("<I", data, off)
        out[key], off = _value(data, off + 4, vtype)
    return out


def _string(data: bytes, off: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", data, off)
    end = off + 8 + n
    if end > len(data):
        raise ValueError("string runs past the end of the file")
    return data[off + 8:end].decode("utf-8"), end


def _value(data: bytes, off: int, vtype: int, depth: int = 0) -> tuple[Any, int]:
    if vtype == 8:
        return _string(data, off)
    if vtype in _SCALAR:
        return struct.unpack_from(_SCALAR[vtype], data, off)[0], off + struct.calcsize(_SCALAR[vtype])
    if vtype != 9:
        raise ValueError(f"unknown GGUF value type {vtype}")
    sub, n = struct.unpack_from("<IQ", data, off)
    off += 12
    if depth:  # llama.cpp refuses arrays of arrays too; a hostile file could nest them until the stack ends
        raise ValueError("nested arrays are not valid GGUF metadata")
    if sub not in _NUMPY and n * 8 > len(data) - off:  # strings and arrays take >= 8 bytes each
        raise ValueError(f"array of {n} items runs past the end of the file")
    if sub in _NUMPY:
        size = n * np.dtype(_NUMPY[sub]).itemsize
        if off + size > len(data):
            raise ValueError("array runs past the end of the file")
        return np.frombuffer(data[off:off + size], dtype=_NUMPY[sub]).tolist(), off + size
    items = []
    for _ in range(n):
        item, off = _value(data, off, sub, depth + 1)
        items.append(item)
    return items, off


# --- building the `tokenizers` pipeline ---
@dataclass(frozen=True)
class GGUFVocab:
    tokenizer: Any  # tokenizers.Tokenizer
    pieces: list[bytes]  # id -> the bytes it decodes to (llama.cpp's token_to_piece)
    special_ids: frozenset[int]  # control and unknown: dropped by decode(skip_special=True)
    strip_leading_space: bool
    add_bos: bool
    add_eos: bool


def build_gguf_vocab(meta: dict[str, Any], path: Path) -> GGUFVocab:
    model = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise LayoutError(f"{path}: no tokenizer.ggml.tokens")
    n = len(tokens)
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * n
    if len(types) != n:
        raise LayoutError(f"{path}: {len(types)} token types for {n} tokens")
    if model == "llama":
        tok, pieces, strip = _spm(meta, tokens, types, path)
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True))
    elif model == "gpt2":
        tok, pieces = _bpe(meta, tokens, types, path)
        strip = False
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) or meta.get("tokenizer.ggml.pre") in _FORCE_BOS
    else:
        raise LayoutError(f"{path}: tokenizer.ggml.model {model!r} is not supported (supported: 'llama', 'gpt2')")
    _add_special_tokens(tok, tokens, types, path)
    special = frozenset(i for i, t in enumerate(types) if t in (CONTROL, UNKNOWN))
    return GGUFVocab(tok, pieces, special, strip, add_bos, bool(meta.get("tokenizer.ggml.add_eos_token", False)))


def _vocab(tokens: list[str], path: Path) -> dict[str, int]:
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):  # llama.cpp refuses these too (id_to_token.size() == token_to_id.size())
        raise LayoutError(f"{path}: {len(tokens) - len(vocab)} duplicate token strings in tokenizer.ggml.tokens")
    return vocab


def _spm(meta: dict[str, Any], tokens: list[str], types: list[int], path: Path) -> tuple[Any, list[bytes], bool]:
    from tokenizers import Tokenizer, decoders, models, normalizers

    vocab = _vocab(tokens, path)
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    # SentencePiece merges only into normal pieces, best score first, ties by id (its training order)
    normal = {t: i for t, i in vocab.items() if types[i] in (NORMAL, 0)}
    merges = []
    for piece, i in normal.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in normal and right in normal:
                merges.append((-scores[i], i, normal[left], normal[right], left, right))
    merges.sort()
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if isinstance(unk_id, int) and 0 <= unk_id < len(tokens) else None
    bpe = models.BPE(vocab, [(m[4], m[5]) for m in merges], unk_token=unk, fuse_unk=True, byte_fallback=True)
    tok = Tokenizer(bpe)
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    steps = [normalizers.Replace(" ", "▁")]
    tok.normalizer = normalizers.Sequence(([normalizers.Prepend("▁")] if prefix else []) + steps)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    pieces = []
    for t, ty in zip(tokens, types, strict=True):
        m = BYTE_TOKEN.fullmatch(t) if ty == BYTE else None
        if m:
            pieces.append(bytes([int(m.group(1), 16)]))
        elif ty == UNUSED:
            pieces.append(b"")
        elif ty in (NORMAL, 0):
            pieces.append(t.replace("▁", " ").encode())
        else:  # control, unknown, user-defined: their text as is
            pieces.append(t.encode())
    return tok, pieces, prefix


def _bpe(meta: dict[str, Any], tokens: list[str], types: list[int], path: Path) -> tuple[Any, list[bytes]]:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    pre = meta.get("tokenizer.ggml.pre") or "default"
    key = _PRE_ALIASES.get(pre)
    if key is None:
        raise LayoutError(f"{path}: pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; "
                          f"supported: {', '.join(sorted(_PRE_ALIASES))}")
    merges = []
    for m in meta.get("tokenizer.ggml.merges") or []:
        k = m.find(" ", 1)  # llama.cpp splits at the first space after the first character
        if k < 0:
            raise LayoutError(f"{path}: malformed merge {m!r} in tokenizer.ggml.merges")
        merges.append((m[:k], m[k + 1:]))
    bpe = models.BPE(_vocab(tokens, path), merges, ignore_merges=pre in _IGNORE_MERGES)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZERS[key]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    pieces = []
    for t, ty in zip(tokens, types, strict=True):
        if ty == UNUSED:
            pieces.append(b"")
        elif ty in (NORMAL, 0, BYTE):
            pieces.append(byte_level_bytes(t))
        else:
            pieces.append(t.encode())
    return tok, pieces


def _add_special_tokens(tok: Any, tokens: list[str], types: list[int], path: Path) -> None:
    from tokenizers import AddedToken

    special = [(i, t) for i, (t, ty) in enumerate(zip(tokens, types, strict=True)) if ty in (CONTROL, UNKNOWN)]
    user = [(i, t) for i, (t, ty) in enumerate(zip(tokens, types, strict=True)) if ty == USER_DEFINED]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for _, t in special])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for _, t in user])
    for i, t in special + user:
        if tok.token_to_id(t) != i:  # an added token must keep its id, or encode would invent new ones
            raise LayoutError(f"{path}: token {i} ({t!r}) cannot be registered as an added token")


_BYTE_DECODER: dict[str, int] = {}


def byte_level_bytes(token: str) -> bytes:
    """GPT-2's byte-to-unicode spelling undone; a token with a character outside that alphabet is
    taken as UTF-8 text, as the `tokenizers` ByteLevel decoder does."""
    if not _BYTE_DECODER:
        bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
        cs = bs[:]
        n = 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        _BYTE_DECODER.update({chr(c): b for b, c in zip(bs, cs, strict=True)})
    try:
        return bytes(_BYTE_DECODER[c] for c in token)
    except KeyError:
        return token.encode()
