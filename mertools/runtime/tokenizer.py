"""A layout's tokenizer: encode, decode, and incremental decoding for streamed generation.

Encoding is done by HF `tokenizers` (a `tokenizer.json`; for a GGUF layout, a pipeline rebuilt from
its `tokenizer.*` keys by `tokenizer_gguf`), or by `sentencepiece` for a HF layout that only has
`tokenizer.model`. Decoding is ours: every id maps to the exact bytes it stands for (byte-fallback
tokens `<0xE2>` to one byte, "▁" to a space, GPT-2's byte alphabet undone, special tokens to their
text), the bytes are concatenated and decoded as UTF-8 with U+FFFD for invalid sequences, and for
SentencePiece-style vocabularies one leading space is dropped (the dummy prefix). Because decoding is
a function of the byte stream, the incremental `StreamDecoder` (an incremental UTF-8 decoder over the
same bytes) yields exactly `decode(all ids)`, never splitting a character; that is what llama.cpp's
token-by-token `token_to_piece` output amounts to, and what HF's incremental decoding approximates.

Special tokens (control/unknown; for HF the added tokens marked special) written in the input text are
parsed as those tokens by default (`special=True`), as transformers and llama.cpp's `parse_special`
do for chat prompts. User-defined (non-special added) tokens are always matched whole. With
`special=False` the text is tokenized as plain text, which is what `sentencepiece` does.
Known asymmetry, shared with llama.cpp and HF's legacy Llama tokenizers: SentencePiece vocabularies
put a dummy "▁" before the text that follows a special token, so `decode(encode("a<s>b", add_bos=False))`
is "a<s> b". `decode` never applies HF's `clean_up_tokenization_spaces`: it returns the text verbatim.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..errors import LayoutError
from .tokenizer_gguf import BYTE_TOKEN, build_gguf_vocab, byte_level_bytes, read_gguf_metadata

# Tokens that end a turn, matched by text as llama.cpp does for its end-of-generation set (GGUF
# metadata rarely lists them): in a GGUF any token with this text, in a HF tokenizer an added token.
EOG_TOKENS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>", "<|endoftext|>",
    "<|eom_id|>", "<EOT>", "<|end_of_text|>", "<\uff5cend\u2581of\u2581sentence\uff5c>",
})


class _Backend(Protocol):
    def encode(self, text: str, special: bool) -> list[int]: ...


class StreamDecoder:
    """Token ids in, text out as soon as it is complete; the concatenation equals `decode(ids)`."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool) -> None:
        self._tok = tokenizer
        self._skip = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._first = True  # no token kept yet
        self._strip = tokenizer.strip_leading_space  # until the first non-empty piece

    def feed(self, token_id: int) -> str:
        b = self._tok.piece(token_id, self._skip, first=self._first)
        if self._first and not (self._skip and token_id in self._tok.special_ids):
            self._first = False
        if self._strip and b:
            self._strip = False
            if b[:1] == b" ":
                b = b[1:]
        return self._utf8.decode(b)

    def flush(self) -> str:
        """Whatever is pending (an incomplete UTF-8 sequence becomes U+FFFD); the decoder is reset."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        self._first, self._strip = True, self._tok.strip_leading_space
        return text


class Tokenizer:
    def __init__(self, *, backend: _Backend, pieces: list[bytes], special_ids: frozenset[int],
                 strip_leading_space: bool, bos_id: int | None, eos_id: int | None, add_bos: bool,
                 add_eos: bool = False, eos_ids: frozenset[int] = frozenset(), chat_template: str | None = None,
                 bos_token: str | None = None, eos_token: str | None = None, source: str = "",
                 first_pieces: dict[int, bytes] | None = None) -> None:
        self._backend = backend
        self._pieces = pieces
        # how a token reads when it is the first one kept (tokenizers' Metaspace decoder drops its "▁")
        self._first_pieces = first_pieces or {}
        self.vocab_size = len(pieces)
        self.special_ids = special_ids
        # drop one leading space of the output (SentencePiece's dummy prefix; tokenizers' Strip decoder)
        self.strip_leading_space = strip_leading_space
        self.bos_id, self.eos_id, self.add_bos, self.add_eos = bos_id, eos_id, add_bos, add_eos
        self.eos_ids = frozenset(eos_ids | ({eos_id} if eos_id is not None else set()))
        self.chat_template = chat_template
        self.bos_token, self.eos_token = bos_token, eos_token
        self.source = source  # the file holding the chat template (else the vocabulary), for messages

    def encode(self, text: str, add_bos: bool | None = None, add_eos: bool | None = None, *,
               special: bool = True) -> list[int]:
        """Token ids of `text`; `add_bos`/`add_eos` None means the model's default."""
        ids = self._backend.encode(text, special)
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        if (self.add_eos if add_eos is None else add_eos) and self.eos_id is not None:
            ids = [*ids, self.eos_id]
        return ids

    def piece(self, token_id: int, skip_special: bool = False, first: bool = False) -> bytes:
        """The bytes one token stands for (before the leading-space rule)."""
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})")
        if skip_special and token_id in self.special_ids:
            return b""
        return self._first_pieces.get(token_id, self._pieces[token_id]) if first else self._pieces[token_id]

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        kept = [int(i) for i in ids if not (skip_special and i in self.special_ids)]
        data = b"".join(self.piece(i, first=k == 0) for k, i in enumerate(kept))
        if self.strip_leading_space and data[:1] == b" ":
            data = data[1:]
        return data.decode("utf-8", "replace")

    def stream(self, *, skip_special: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special)


def load_tokenizer(layout_root: Path, section: dict[str, Any]) -> Tokenizer:
    """The tokenizer of a layout, from its manifest's `tokenizer` section."""
    root = Path(layout_root)
    files = {Path(f).name: root / f for f in section.get("files", []) if isinstance(f, str)}
    kind = section.get("kind")
    if kind not in ("gguf", "hf"):
        raise LayoutError(f"{root}: tokenizer kind {kind!r} is not supported (expected 'hf' or 'gguf')")
    try:
        return _load_gguf(files, section, root) if kind == "gguf" else _load_hf(files, section, root)
    except LayoutError:
        raise
    except BaseException as e:  # tokenizer files are untrusted input: any failure is a bad file
        # tokenizers' Rust panics arrive as pyo3's PanicException, a BaseException; nothing else that is not
        # an Exception (KeyboardInterrupt, SystemExit) is ours to turn into an error
        if not isinstance(e, Exception) and type(e).__name__ != "PanicException":
            raise
        main = files.get("vocab.gguf") or files.get("tokenizer.json") or files.get("tokenizer.model") or root
        raise LayoutError(f"{main}: not a usable tokenizer ({type(e).__name__}: {e})") from None


# --- GGUF ---
def _load_gguf(files: dict[str, Path], section: dict[str, Any], root: Path) -> Tokenizer:
    path = _need(files, "vocab.gguf", root)
    meta = read_gguf_metadata(path)
    v = build_gguf_vocab(meta, path)
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    ids = {}
    for key in ("bos", "eos", "eot", "eom"):
        i = meta.get(f"tokenizer.ggml.{key}_token_id", section.get(f"{key}_token_id"))
        ids[key] = i if isinstance(i, int) and 0 <= i < len(tokens) else None
    eog = {i for i in (ids["eos"], ids["eot"], ids["eom"]) if i is not None}
    eog |= {i for i, t in enumerate(tokens) if t in EOG_TOKENS}
    if {"<|return|>", "<|call|>"} <= {tokens[i] for i in eog}:  # llama.cpp: gpt-oss's <|end|> ends a message only
        eog = {i for i in eog if tokens[i] != "<|end|>"}
    template = meta.get("tokenizer.chat_template")
    return Tokenizer(
        backend=_TokenizersBackend(v.tokenizer, str(path)), pieces=v.pieces, special_ids=v.special_ids,
        strip_leading_space=v.strip_leading_space, bos_id=ids["bos"], eos_id=ids["eos"], add_bos=v.add_bos,
        add_eos=v.add_eos, eos_ids=frozenset(eog), chat_template=template if isinstance(template, str) else None,
        bos_token=tokens[ids["bos"]] if ids["bos"] is not None else None,
        eos_token=tokens[ids["eos"]] if ids["eos"] is not None else None, source=str(path),
    )


# --- HF ---
class _TokenizersBackend:
    def __init__(self, tok: Any, source: str) -> None:
        self._tok = tok
        self._source = source  # the file it came from, for messages
        self._plain: Any = None  # a copy with special-token parsing off, made on first use

    def encode(self, text: str, special: bool) -> list[int]:
        tok = self._tok
        if not special:
            if self._plain is None:
                from tokenizers import Tokenizer as HFTokenizer

                self._plain = HFTokenizer.from_str(tok.to_str())
                self._plain.encode_special_tokens = True
            tok = self._plain
        try:
            return tok.encode(text, add_special_tokens=False).ids
        except Exception as e:  # a broken file can load and fail only on some text (an unk token not in the vocab)
            raise LayoutError(f"{self._source}: the tokenizer cannot encode this text ({e})") from None


class _SentencePieceBackend:
    """`sentencepiece` does not parse control tokens in text; split on them first, like llama.cpp."""

    def __init__(self, sp: Any, specials: dict[str, int]) -> None:
        self._sp = sp
        self._specials = specials
        alts = "|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True))
        self._pattern = re.compile(alts) if alts else None

    def encode(self, text: str, special: bool) -> list[int]:
        if not special or self._pattern is None:
            return list(self._sp.encode(text))
        out: list[int] = []
        pos = 0
        for m in self._pattern.finditer(text):
            out += self._sp.encode(text[pos:m.start()]) if m.start() > pos else []
            out.append(self._specials[m.group()])
            pos = m.end()
        return out + (list(self._sp.encode(text[pos:])) if pos < len(text) else [])


@dataclass
class _HFParts:
    backend: _Backend
    pieces: list[bytes]
    first_pieces: dict[int, bytes]
    special: frozenset[int]
    strip: bool
    to_id: Callable[[str], int | None]
    added: dict[str, int]  # added/control token text -> id
    default_add: list[int] | None  # what the post-processor puts around an empty text; None: no post-processor


def _load_hf(files: dict[str, Path], section: dict[str, Any], root: Path) -> Tokenizer:
    cfg = _json_object(files.get("tokenizer_config.json"))
    stmap = _json_object(files.get("special_tokens_map.json"))
    gen = _json_object(files.get("generation_config.json"))
    bos_token = _token_text(cfg.get("bos_token", stmap.get("bos_token")))
    eos_token = _token_text(cfg.get("eos_token", stmap.get("eos_token")))
    if "tokenizer.json" in files:
        parts = _hf_tokenizers(files["tokenizer.json"])
    elif "tokenizer.model" in files:
        parts = _hf_sentencepiece(files["tokenizer.model"], cfg)
    else:
        raise LayoutError(f"{root / 'tokenizer'}: neither tokenizer.json nor tokenizer.model in the layout")
    pieces, default_add = parts.pieces, parts.default_add
    bos_id = parts.to_id(bos_token) if bos_token else None
    eos_id = parts.to_id(eos_token) if eos_token else None
    bos_id = bos_id if bos_id is not None else _first_id(section.get("bos_token_id"), gen.get("bos_token_id"))
    eos_id = eos_id if eos_id is not None else _first_id(section.get("eos_token_id"), gen.get("eos_token_id"))
    n = len(pieces)
    if bos_token is None and bos_id is not None and 0 <= bos_id < n:
        bos_token = pieces[bos_id].decode("utf-8", "replace")
    if eos_token is None and eos_id is not None and 0 <= eos_id < n:
        eos_token = pieces[eos_id].decode("utf-8", "replace")
    # transformers 5: an explicit add_bos_token/add_eos_token replaces the post-processor's choice
    if "add_bos_token" in cfg or "add_eos_token" in cfg or default_add is None:
        add_bos, add_eos = bool(cfg.get("add_bos_token", False)), bool(cfg.get("add_eos_token", False))
    else:
        add_bos = bool(default_add) and bos_id is not None and default_add[0] == bos_id
        add_eos = bool(default_add) and eos_id is not None and default_add[-1] == eos_id
    eog = set(_all_ids(section.get("eos_token_id"))) | set(_all_ids(gen.get("eos_token_id")))
    eog |= {i for t, i in parts.added.items() if t in EOG_TOKENS}
    template, template_file = _hf_chat_template(files, cfg)
    return Tokenizer(
        backend=parts.backend, pieces=pieces, special_ids=parts.special, strip_leading_space=parts.strip, bos_id=bos_id,
        eos_id=eos_id, add_bos=add_bos, add_eos=add_eos, eos_ids=frozenset(i for i in eog if 0 <= i < n),
        chat_template=template, bos_token=bos_token, eos_token=eos_token, first_pieces=parts.first_pieces,
        source=template_file or str(files.get("tokenizer.json") or files.get("tokenizer.model")),
    )


def _hf_tokenizers(path: Path) -> _HFParts:
    from tokenizers import Tokenizer as HFTokenizer

    raw = _json_object(path)
    try:
        tok = HFTokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on bad files
        raise LayoutError(f"{path}: not a usable tokenizer.json ({e})") from None
    steps, strip = _decoder_steps(raw.get("decoder"), path)
    # ids, not counts: a vocabulary with holes still has pieces up to its largest id
    n = 1 + max([*tok.get_vocab(with_added_tokens=True).values(), *(t["id"] for t in raw.get("added_tokens", []))],
                default=-1)
    tokens = [tok.id_to_token(i) for i in range(n)]
    pieces = [_apply_steps(t, steps, first=False) for t in tokens]
    first = {}
    if any(kind == "metaspace" for kind, _ in steps):
        first = {i: p for i, t in enumerate(tokens) if (p := _apply_steps(t, steps, first=True)) != pieces[i]}
    special = frozenset(t["id"] for t in raw.get("added_tokens", []) if t.get("special"))
    added = {t["content"]: t["id"] for t in raw.get("added_tokens", [])}
    # which special tokens the file's post-processor adds around a text (None: no post-processor)
    default_add = tok.encode("", add_special_tokens=True).ids if raw.get("post_processor") else None
    return _HFParts(_TokenizersBackend(tok, str(path)), pieces, first, special, strip, tok.token_to_id, added, default_add)


def _decoder_steps(dec: Any, path: Path) -> tuple[list[tuple[str, Any]], bool]:
    """A tokenizer.json decoder as per-token transforms, and whether it strips one leading space.

    tokenizers' decoders act on each token until a Fuse joins them into one string; only the
    arrangements that real tokenizers use are accepted, so that decoding stays exact."""
    flat = dec.get("decoders", []) if dec and dec.get("type") == "Sequence" else [dec] if dec else []
    steps: list[tuple[str, Any]] = []
    fused = strip = False
    for d in flat:
        kind = d.get("type") if isinstance(d, dict) else None
        if kind == "Fuse":
            fused = True
        elif kind == "Replace" and "String" in d.get("pattern", {}) and len(d["pattern"]["String"]) == 1:
            steps.append(("replace", (d["pattern"]["String"], d["content"])))  # one character: same fused or not
        elif kind == "Strip" and fused and d.get("content") == " " and d.get("start", 0) <= 1 and not d.get("stop"):
            strip = strip or d.get("start", 0) == 1
        elif kind in ("ByteLevel", "ByteFallback") and not fused:
            steps.append((kind, None))
        elif kind == "Metaspace" and not fused:
            prepend = d.get("prepend_scheme", "always" if d.get("add_prefix_space", True) else "never")
            steps.append(("metaspace", (d.get("replacement", "\u2581"), prepend != "never")))
        else:
            raise LayoutError(f"{path}: decoder {json.dumps(d)[:120]} is not supported here")
    return steps, strip


def _apply_steps(token: str | None, steps: list[tuple[str, Any]], first: bool) -> bytes:
    if token is None:  # a hole in the id space
        return b""
    out: str | bytes = token
    for kind, arg in steps:
        if isinstance(out, bytes):
            break
        if kind == "replace":
            out = out.replace(*arg)
        elif kind == "metaspace":  # the first token loses its "▁" (all of them, as tokenizers does)
            out = out.replace(arg[0], "" if first and arg[1] else " ")
        elif kind == "ByteFallback" and (m := BYTE_TOKEN.fullmatch(out)):
            out = bytes([int(m.group(1), 16)])
        elif kind == "ByteLevel":
            out = byte_level_bytes(out)
    return out if isinstance(out, bytes) else out.encode()


def _hf_sentencepiece(path: Path, cfg: dict[str, Any]) -> _HFParts:
    try:
        import sentencepiece
    except ImportError:
        raise LayoutError(f"{path}: a tokenizer.model without tokenizer.json needs the sentencepiece package") from None
    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as e:
        raise LayoutError(f"{path}: not a usable SentencePiece model ({e})") from None
    pieces, specials = [], {}
    for i in range(sp.get_piece_size()):
        p = sp.id_to_piece(i)
        if sp.is_byte(i) and (m := BYTE_TOKEN.fullmatch(p)):
            pieces.append(bytes([int(m.group(1), 16)]))
        elif sp.is_control(i) or sp.is_unknown(i):
            pieces.append(p.encode())
            specials[p] = i
        else:
            pieces.append(b"" if sp.is_unused(i) else p.replace("\u2581", " ").encode())
    for k, t in (cfg.get("added_tokens_decoder") or {}).items():  # tokens transformers adds on top
        if isinstance(t, dict) and t.get("special") and str(k).isdigit() and int(k) < len(pieces):
            specials[t.get("content", "")] = int(k)
    specials.pop("", None)
    strip = sp.encode("a", out_type=str)[0].startswith("\u2581")  # the model adds a dummy prefix

    def to_id(text: str) -> int | None:
        i = sp.piece_to_id(text)
        return i if sp.id_to_piece(i) == text else None  # unknown pieces map to unk_id

    return _HFParts(_SentencePieceBackend(sp, specials), pieces, {}, frozenset(specials.values()), strip, to_id,
                    dict(specials), None)


def _hf_chat_template(files: dict[str, Path], cfg: dict[str, Any]) -> tuple[str | None, str]:
    """(template, the file it is in); transformers prefers chat_template.jinja, then .json, then the config."""
    if "chat_template.jinja" in files:
        return _read_text(files["chat_template.jinja"]), str(files["chat_template.jinja"])
    tmpl, where = _json_object(files.get("chat_template.json")).get("chat_template"), files.get("chat_template.json")
    if not tmpl:
        tmpl, where = cfg.get("chat_template"), files.get("tokenizer_config.json")
    if isinstance(tmpl, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in tmpl if isinstance(t, dict)}
        tmpl = named.get("default") or next(iter(named.values()), None)
    return (tmpl, str(where)) if isinstance(tmpl, str) else (None, "")


# --- small helpers ---
def _need(files: dict[str, Path], name: str, root: Path) -> Path:
    if name not in files:
        raise LayoutError(f"{root}: the manifest's tokenizer section lists no {name}")
    return files[name]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LayoutError(f"{path}: cannot read ({e})") from None


def _json_object(path: Path | None) -> dict[str, Any]:
    """A JSON object from a file ({} when the layout has no such file)."""
    if path is None:
        return {}
    try:
        obj = json.loads(_read_text(path))
    except ValueError as e:
        raise LayoutError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise LayoutError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _token_text(v: Any) -> str | None:
    """tokenizer_config/special_tokens_map spell a token as a string or an AddedToken dict."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) and v else None


def _all_ids(v: Any) -> list[int]:
    vals = v if isinstance(v, list) else [v]
    return [x for x in vals if isinstance(x, int) and not isinstance(x, bool)]


def _first_id(*vals: Any) -> int | None:
    for v in vals:
        ids = _all_ids(v)
        if ids:
            return ids[0]
    return None
