"""Layout tokenizers: agreement with sentencepiece and with llama.cpp's test vectors, incremental
decoding, special tokens, chat templates, and the errors an unusable tokenizer gives."""

from __future__ import annotations

import json
import lzma
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sentencepiece import SentencePieceProcessor
from tokenizers import Tokenizer as HFTokenizer

from mertools.errors import LayoutError
from mertools.layout import Layout
from mertools.runtime.chat import FALLBACK_TEMPLATE, encode_chat, render_chat
from mertools.runtime.tokenizer import Tokenizer, load_tokenizer
from mertools.runtime.tokenizer_gguf import build_gguf_vocab, read_gguf_metadata

ROOT = Path(__file__).resolve().parent.parent
FIXTURE_TOK = ROOT / "fixtures" / "tokenizer"
DATA = Path(__file__).resolve().parent / "data" / "tokenizer"
VECTORS = ("llama-spm", "phi-3", "gpt-2", "qwen2", "llama-bpe")
GGUF_SECTION = {"kind": "gguf", "files": ["tokenizer/vocab.gguf"]}
HYP = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SAMPLES = [
    "", " ", "  ", "   ", "\t", "\n", "\n\n", " \n \t x", "\r\n", "Hello world", " Hello world", "Hello world ",
    "  leading and trailing  ", "tabs\tand\nnewlines\n\n\tmixed", "a  b   c    d", "3 33 333 3333 12345.678 0x1F",
    "déjà vu — naïve façade, Ünïcödé", "日本語のテキストと中文", "emoji 🎉🦙 need byte fallback 😶\u200d🌫️",
    "Ελληνικά и кириллица", "<s>", "</s>", "x<s>y</s>z", "<unk> inside", "[INST] hi [/INST]", "\x00\x01\x7f",
    "e\u0301 combining", "'s 're 've", "a" * 300,
]


def _cases() -> list[str]:
    return FIXTURE_TOK.joinpath("corpus.txt").read_text(encoding="utf-8").splitlines() + SAMPLES


@pytest.fixture(scope="module")
def sp() -> SentencePieceProcessor:
    return SentencePieceProcessor(model_file=str(FIXTURE_TOK / "tokenizer.model"))


@pytest.fixture(scope="module")
def hf_ref() -> HFTokenizer:
    return HFTokenizer.from_file(str(FIXTURE_TOK / "tokenizer.json"))


@pytest.fixture(scope="module")
def layouts(tiny_layout: Callable[..., Path]) -> dict[str, Path]:
    return {"hf": tiny_layout("hf", "f16"), "gguf": tiny_layout("f16", "f16")}


@pytest.fixture(scope="module")
def toks(layouts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Tokenizer]:
    out = {}
    for kind, path in layouts.items():
        lay = Layout.open(path)
        out[kind] = load_tokenizer(lay.root, lay.manifest.tokenizer)
    # a HF layout with only tokenizer.model (the sentencepiece path)
    spm_root = tmp_path_factory.mktemp("spm-only")
    (spm_root / "tokenizer").mkdir()
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(FIXTURE_TOK / name, spm_root / "tokenizer" / name)
    out["spm"] = load_tokenizer(spm_root, {"kind": "hf", "files": [
        "tokenizer/tokenizer.model", "tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json"]})
    return out


@pytest.fixture(scope="module")
def vocab_roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """llama.cpp's vocabulary GGUFs, each as the tokenizer/ directory of a GGUF-kind layout."""
    out = {}
    for name in VECTORS:
        root = out[name] = tmp_path_factory.mktemp(f"vocab-{name}")
        (root / "tokenizer").mkdir()
        (root / "tokenizer" / "vocab.gguf").write_bytes(lzma.decompress((DATA / f"ggml-vocab-{name}.gguf.xz").read_bytes()))
    return out


@pytest.fixture(scope="module")
def vocabs(vocab_roots: dict[str, Path]) -> dict[str, Tokenizer]:
    return {name: load_tokenizer(root, GGUF_SECTION) for name, root in vocab_roots.items()}


def _streamed(tok: Tokenizer, ids: list[int], skip_special: bool = False) -> str:
    s = tok.stream(skip_special=skip_special)
    return "".join(s.feed(i) for i in ids) + s.flush()


# -- the fixture model: HF and GGUF layouts against sentencepiece ----------------------------------------


@pytest.mark.parametrize("kind", ["hf", "gguf", "spm"])
def test_metadata_of_the_fixture_tokenizer(toks: dict[str, Tokenizer], kind: str) -> None:
    tok = toks[kind]
    cfg = json.loads((FIXTURE_TOK / "tokenizer_config.json").read_text())
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.add_bos, tok.add_eos) == (512, 1, 2, True, False)
    assert tok.eos_ids == {2} and (tok.bos_token, tok.eos_token) == ("<s>", "</s>")
    assert tok.chat_template == cfg["chat_template"]


@pytest.mark.parametrize("kind", ["hf", "gguf", "spm"])
def test_encode_agrees_with_sentencepiece_and_round_trips(toks: dict[str, Tokenizer], sp: SentencePieceProcessor,
                                                          hf_ref: HFTokenizer, kind: str) -> None:
    tok = toks[kind]
    for text in _cases():
        ids = tok.encode(text, special=False)
        assert ids == [1, *sp.encode(text)], text
        assert tok.encode(text, add_bos=False, special=False) == ids[1:]
        assert tok.decode(ids[1:]) == text
        assert tok.decode(ids, skip_special=True) == sp.decode(ids) == text
        assert tok.decode(ids) == hf_ref.decode(ids, skip_special_tokens=False)
        assert _streamed(tok, ids) == tok.decode(ids)


@pytest.mark.parametrize("kind", ["hf", "gguf", "spm"])
def test_special_tokens_in_text_are_parsed_like_transformers(toks: dict[str, Tokenizer], hf_ref: HFTokenizer,
                                                             kind: str) -> None:
    tok = toks[kind]
    for text in ("<s>[INST] hi [/INST] ok</s>", "x<s>y</s>z", "</s></s>", "<unk>", "a <s> b"):
        assert tok.encode(text, add_bos=False) == hf_ref.encode(text, add_special_tokens=False).ids, text
    assert tok.encode("x</s>", add_bos=False) == [*tok.encode("x", add_bos=False), 2]
    assert 2 not in tok.encode("x</s>", special=False)
    # the dummy prefix after a special token (llama.cpp and HF legacy do the same)
    assert tok.decode(tok.encode("a<s>b")) == "<s> a<s> b"  # as HF decodes [<s>, ▁a, <s>, ▁b]
    assert tok.decode(tok.encode("a<s>b"), skip_special=True) == "a b"


def test_every_single_token_decodes_like_tokenizers(toks: dict[str, Tokenizer], hf_ref: HFTokenizer) -> None:
    for kind in ("hf", "gguf", "spm"):
        for i in range(512):
            assert toks[kind].decode([i]) == hf_ref.decode([i], skip_special_tokens=False), (kind, i)
            assert toks[kind].decode([i], skip_special=True) == hf_ref.decode([i], skip_special_tokens=True), (kind, i)


@pytest.mark.parametrize("decoder", [
    {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False},
    {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Metaspace", "replacement": "\u2581",
                                                                  "prepend_scheme": "always"}, {"type": "Fuse"}]},
    {"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                                      {"type": "ByteFallback"}, {"type": "Fuse"}]},
])
def test_other_hf_decoders(toks: dict[str, Tokenizer], tmp_path: Path, decoder: dict) -> None:
    raw = json.loads((FIXTURE_TOK / "tokenizer.json").read_text(encoding="utf-8"))
    raw["decoder"] = decoder
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "tokenizer.json").write_text(json.dumps(raw), encoding="utf-8")
    tok = load_tokenizer(tmp_path, {"kind": "hf", "files": ["tokenizer/tokenizer.json"]})
    ref = HFTokenizer.from_file(str(tmp_path / "tokenizer" / "tokenizer.json"))
    for i in range(512):
        assert tok.decode([i]) == ref.decode([i], skip_special_tokens=False), i
    for text in _cases():
        ids = toks["hf"].encode(text, special=False)
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=False), text
        assert tok.decode(ids, skip_special=True) == ref.decode(ids), text
        assert _streamed(tok, ids) == tok.decode(ids)
        assert _streamed(tok, ids, True) == tok.decode(ids, skip_special=True)


@pytest.mark.parametrize("decoder", [
    {"type": "Sequence", "decoders": [{"type": "Fuse"}, {"type": "Metaspace", "replacement": "\u2581"}]},
    {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
    {"type": "WordPiece", "prefix": "##", "cleanup": True},
])
def test_decoders_that_cannot_be_decoded_exactly_are_refused(tmp_path: Path, decoder: dict) -> None:
    raw = json.loads((FIXTURE_TOK / "tokenizer.json").read_text(encoding="utf-8"))
    raw["decoder"] = decoder
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "tokenizer.json").write_text(json.dumps(raw), encoding="utf-8")
    with pytest.raises(LayoutError, match="tokenizer.json: decoder .* is not supported"):
        load_tokenizer(tmp_path, {"kind": "hf", "files": ["tokenizer/tokenizer.json"]})


_PIECES = st.sampled_from([" ", "  ", "\n", "\t", "<s>", "</s>", "é", "日本", "🦙", "😶\u200d🌫️", "0", "12", "'s"])
TEXT = st.lists(st.one_of(st.text(st.characters(blacklist_characters="\u2581", blacklist_categories=("Cs",)),
                                  max_size=12), _PIECES), max_size=12).map("".join)


@HYP
@given(text=TEXT)
def test_random_text_agrees_with_sentencepiece(toks: dict[str, Tokenizer], sp: SentencePieceProcessor, text: str) -> None:
    ref = sp.encode(text)
    for kind in ("hf", "gguf", "spm"):
        ids = toks[kind].encode(text, add_bos=False, special=False)
        assert ids == ref, kind
        assert toks[kind].decode(ids) == text
        assert _streamed(toks[kind], ids) == text


@HYP
@given(ids=st.lists(st.one_of(st.integers(0, 511), st.integers(3, 258)), max_size=40), skip=st.booleans())
def test_stream_output_equals_decode_for_any_ids(toks: dict[str, Tokenizer], ids: list[int], skip: bool) -> None:
    # ids 3..258 are the byte-fallback tokens: random runs of them are mostly invalid UTF-8
    for kind in ("hf", "gguf", "spm"):
        assert _streamed(toks[kind], ids, skip) == toks[kind].decode(ids, skip_special=skip)


def test_stream_waits_for_complete_characters_and_drops_the_dummy_prefix(toks: dict[str, Tokenizer]) -> None:
    tok = toks["gguf"]
    euro = [3 + b for b in "€".encode()]  # <0xE2> <0x82> <0xAC>
    s = tok.stream()
    assert [s.feed(i) for i in euro] == ["", "", "€"] and s.flush() == ""
    s = tok.stream()
    assert [s.feed(i) for i in euro[:2]] == ["", ""] and s.flush() == "\ufffd"
    ids = tok.encode("Hello world", add_bos=False)
    s = tok.stream()
    assert "|".join(s.feed(i) for i in ids).replace("|", "") == "Hello world"
    assert s.feed(tok.encode(" again", add_bos=False)[0]).startswith(" ")  # only the very first space goes
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([512])


# -- llama.cpp's vocabularies and test vectors ------------------------------------------------------------


def _vectors(name: str) -> list[tuple[str, list[int]]]:
    inputs = (DATA / f"ggml-vocab-{name}.gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    if inputs[-1] == "":
        inputs.pop()
    outputs = [[int(x) for x in line.split()] for line in (DATA / f"ggml-vocab-{name}.gguf.out").read_text().splitlines()]
    assert len(inputs) == len(outputs) == 46
    return list(zip(inputs, outputs, strict=True))


@pytest.mark.parametrize("name", VECTORS)
def test_llama_cpp_test_vectors(vocabs: dict[str, Tokenizer], name: str) -> None:
    tok = vocabs[name]
    for text, want in _vectors(name):
        ids = tok.encode(text, add_bos=False, special=False)
        assert ids == want, text
        assert tok.decode(ids) == text
        assert _streamed(tok, ids) == text


@pytest.mark.parametrize("name", VECTORS)
def test_gguf_special_tokens_and_eos(vocabs: dict[str, Tokenizer], name: str) -> None:
    tok = vocabs[name]
    want = {  # bos, eos, add_bos, eos_ids (llama.cpp's end-of-generation set)
        "llama-spm": (1, 2, True, {2}),
        "phi-3": (1, 32000, True, {32000, 32007}),  # <|endoftext|>, <|end|>
        "gpt-2": (50256, 50256, False, {50256}),
        "qwen2": (151643, 151643, False, {151643, 151645}),  # <|endoftext|>, <|im_end|>
        "llama-bpe": (128000, 128001, True, {128001, 128009}),  # <|end_of_text|>, <|eot_id|>
    }[name]
    assert (tok.bos_id, tok.eos_id, tok.add_bos, set(tok.eos_ids)) == want
    for i in tok.eos_ids:  # every end-of-generation token is parsed whole from its text
        assert tok.encode(tok.decode([i]), add_bos=False) == [i]
    if tok.bos_id is not None and tok.add_bos:
        assert tok.encode("hi")[0] == tok.bos_id


def test_gguf_byte_level_special_tokens(vocabs: dict[str, Tokenizer]) -> None:
    tok = vocabs["qwen2"]
    assert tok.encode("<|im_start|>user\nhi<|im_end|>") == [151644, 872, 198, 6023, 151645]
    assert 151644 not in tok.encode("<|im_start|>", special=False)
    assert tok.decode([151644, 872], skip_special=True) == "user"
    phi = vocabs["phi-3"]
    user = phi.encode("<|user|>", add_bos=False)
    assert len(user) == 1 and phi.decode(user) == "<|user|>"


@HYP
@given(text=TEXT, name=st.sampled_from(["gpt-2", "qwen2", "llama-bpe"]))
def test_byte_level_round_trips_any_text(vocabs: dict[str, Tokenizer], text: str, name: str) -> None:
    ids = vocabs[name].encode(text, add_bos=False, special=False)
    assert vocabs[name].decode(ids) == text
    assert _streamed(vocabs[name], ids) == text


@HYP
@given(data=st.data(), name=st.sampled_from(VECTORS), skip=st.booleans())
def test_stream_equals_decode_for_random_ids_of_real_vocabularies(vocabs: dict[str, Tokenizer], data: st.DataObject,
                                                                   name: str, skip: bool) -> None:
    tok = vocabs[name]
    ids = data.draw(st.lists(st.one_of(st.integers(0, tok.vocab_size - 1), st.integers(0, 300)), max_size=30))
    assert _streamed(tok, ids, skip) == tok.decode(ids, skip_special=skip)


# -- a HF tokenizer.json with a byte-level decoder and generation_config.json ----------------------------


def test_hf_byte_level_layout(vocab_roots: dict[str, Path], tmp_path: Path) -> None:
    path = vocab_roots["gpt-2"] / "tokenizer" / "vocab.gguf"
    src = build_gguf_vocab(read_gguf_metadata(path), path).tokenizer  # saved as a tokenizer.json below
    tdir = tmp_path / "tokenizer"
    tdir.mkdir()
    src.save(str(tdir / "tokenizer.json"))
    (tdir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}))
    (tdir / "generation_config.json").write_text(json.dumps({"eos_token_id": [50256, 13]}))
    files = [f"tokenizer/{n}" for n in ("tokenizer.json", "tokenizer_config.json", "generation_config.json")]
    tok = load_tokenizer(tmp_path, {"kind": "hf", "files": files, "eos_token_id": 50256})
    ref = HFTokenizer.from_file(str(tdir / "tokenizer.json"))
    assert (tok.bos_id, tok.eos_id, tok.add_bos, set(tok.eos_ids)) == (50256, 50256, False, {50256, 13})
    for text, want in _vectors("gpt-2"):
        assert tok.encode(text) == want
        assert tok.decode(want) == ref.decode(want) == text
    for i in range(0, tok.vocab_size, 97):
        assert tok.decode([i]) == ref.decode([i], skip_special_tokens=False), i


# -- chat templates --------------------------------------------------------------------------------------

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi — ça va? 🦙"},
        {"role": "assistant", "content": "Oui."}, {"role": "user", "content": "More"}]


@pytest.mark.parametrize("kind", ["hf", "gguf"])
def test_fixture_chat_template(toks: dict[str, Tokenizer], kind: str) -> None:
    # the expected strings and ids are what transformers 5's apply_chat_template gives for this template
    tok = toks[kind]
    text = render_chat(tok, CHAT)
    assert text == "<s>[INST] Be brief.\n\nHi — ça va? 🦙 [/INST] Oui.</s>[INST] More [/INST]"
    ids = encode_chat(tok, CHAT)
    assert ids[0] == 1 and ids[1] != 1 and ids.count(2) == 1  # BOS written by the template, not doubled
    assert ids == tok.encode(text, add_bos=False)
    with pytest.raises(LayoutError, match="roles must alternate"):
        render_chat(tok, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_gguf_carried_chat_template(vocabs: dict[str, Tokenizer]) -> None:
    tok = vocabs["qwen2"]
    assert render_chat(tok, CHAT[1:2]) == (
        "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\nHi — ça va? 🦙<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert encode_chat(tok, CHAT[1:2])[:3] == [151644, 8948, 198]  # <|im_start|> "system" "\n"
    phi = vocabs["phi-3"]
    assert render_chat(phi, CHAT[1:3], add_generation_prompt=False) == (
        "<s><|user|>\nHi — ça va? 🦙<|end|>\n<|assistant|>\nOui.<|end|>\n")
    assert encode_chat(phi, CHAT[1:2])[:2] == [1, 32010]  # one BOS, then <|user|>


def test_fallback_chat_template_when_the_model_has_none(vocabs: dict[str, Tokenizer]) -> None:
    tok = vocabs["llama-bpe"]
    assert tok.chat_template is None
    assert render_chat(tok, CHAT[:2]) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi — ça va? 🦙<|im_end|>\n<|im_start|>assistant\n")
    assert render_chat(tok, CHAT[:2], template=FALLBACK_TEMPLATE) == render_chat(tok, CHAT[:2])
    assert encode_chat(tok, CHAT[:1], add_generation_prompt=False)[0] == 128000  # BOS added: the template has none


def test_chat_template_sandbox_and_helpers(toks: dict[str, Tokenizer]) -> None:
    tok = toks["hf"]
    assert render_chat(tok, CHAT[:1], template="{{ messages | tojson }}") == json.dumps(CHAT[:1], ensure_ascii=False)
    assert render_chat(tok, [], template="{% generation %}x{% endgeneration %}{{ bos_token }}{{ eos_token }}") == "x<s></s>"
    with pytest.raises(LayoutError, match="SecurityError|unsafe"):
        render_chat(tok, [], template="{{ bos_token.__class__.__mro__ }}{% set x = [] %}{{ x.append(1) }}")
    with pytest.raises(LayoutError, match="TemplateSyntaxError"):
        render_chat(tok, [], template="{% for %}")


# -- errors ------------------------------------------------------------------------------------------------


def test_unusable_tokenizers_are_layout_errors(tmp_path: Path) -> None:
    (tmp_path / "tokenizer").mkdir()
    vocab = tmp_path / "tokenizer" / "vocab.gguf"
    with pytest.raises(LayoutError, match="vocab.gguf"):
        load_tokenizer(tmp_path, {"kind": "gguf", "files": []})
    with pytest.raises(LayoutError, match="vocab.gguf: cannot read"):
        load_tokenizer(tmp_path, GGUF_SECTION)
    vocab.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 8 + b"\x05" + b"\x00" * 7)
    with pytest.raises(LayoutError, match="vocab.gguf: not a readable GGUF"):
        load_tokenizer(tmp_path, GGUF_SECTION)
    with pytest.raises(LayoutError, match="neither tokenizer.json nor tokenizer.model"):
        load_tokenizer(tmp_path, {"kind": "hf", "files": []})
    (tmp_path / "tokenizer" / "tokenizer.json").write_text("{not json")
    with pytest.raises(LayoutError, match="tokenizer.json: not valid JSON"):
        load_tokenizer(tmp_path, {"kind": "hf", "files": ["tokenizer/tokenizer.json"]})
    shutil.copy(FIXTURE_TOK / "tokenizer.json", tmp_path / "tokenizer" / "tokenizer.json")
    (tmp_path / "tokenizer" / "tokenizer_config.json").write_text("[]")
    with pytest.raises(LayoutError, match="tokenizer_config.json: expected a JSON object"):
        load_tokenizer(tmp_path, {"kind": "hf", "files": ["tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"]})
    with pytest.raises(LayoutError, match="kind"):
        load_tokenizer(tmp_path, {"kind": "tiktoken", "files": []})


@pytest.mark.parametrize(("model", "pre", "match"), [("bert", None, "'bert' is not supported"),
                                                      ("gpt2", "no-such-pre", "pre-tokenizer 'no-such-pre'")])
def test_unsupported_gguf_vocabularies(tmp_path: Path, model: str, pre: str | None, match: str) -> None:
    import gguf

    (tmp_path / "tokenizer").mkdir()
    w = gguf.GGUFWriter(tmp_path / "tokenizer" / "vocab.gguf", "llama")
    w.add_tokenizer_model(model)
    if pre:
        w.add_tokenizer_pre(pre)
    w.add_token_list(["a", "b", "ab"])
    w.add_token_merges(["a b"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    with pytest.raises(LayoutError, match=match):
        load_tokenizer(tmp_path, GGUF_SECTION)
