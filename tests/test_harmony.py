"""The harmony (gpt-oss) reply parser on real strings, and /v1/chat/completions splitting a harmony reply into
`content` and `reasoning_content` through the real app (an engine that writes a scripted harmony reply)."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from mertools.runtime.harmony import HarmonyParser, is_harmony, split_reply
from mertools.server.app import ServerConfig, create_app

REPLY = ("<|channel|>analysis<|message|>User asks 2+2. Simple: 4.<|end|>"
         "<|start|>assistant<|channel|>final<|message|>2 + 2 = **4**.<|return|>")


def parse(pieces: list[str]) -> list[tuple[str, str]]:
    p = HarmonyParser()
    events = [e for piece in pieces for e in p.feed(piece)] + p.flush()
    merged: list[tuple[str, str]] = []
    for c, t in events:
        merged = merged[:-1] + [(c, merged[-1][1] + t)] if merged and merged[-1][0] == c else merged + [(c, t)]
    return merged


def test_whole_reply() -> None:
    assert parse([REPLY]) == [("analysis", "User asks 2+2. Simple: 4."), ("final", "2 + 2 = **4**.")]
    assert split_reply(REPLY) == ("2 + 2 = **4**.", "User asks 2+2. Simple: 4.")


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 11])
def test_any_split_gives_the_same_events_and_never_shows_a_control_token(size: int) -> None:
    pieces = [REPLY[i:i + size] for i in range(0, len(REPLY), size)]
    p = HarmonyParser()
    for piece in pieces:
        for _, text in p.feed(piece):
            assert "<|" not in text and "|>" not in text
    assert parse(pieces) == parse([REPLY])


def test_token_by_token_as_the_server_decodes() -> None:
    tokens = ["<|channel|>", "analysis", "<|message|>", "Think", "ing", "<|end|>", "<|start|>", "assistant",
              "<|channel|>", "final", "<|message|>", "Hi", "!", "<|return|>"]
    p = HarmonyParser()
    assert [p.feed(t) for t in tokens[:5]] == [[], [], [], [("analysis", "Think")], [("analysis", "ing")]]
    assert [e for t in tokens[5:] for e in p.feed(t)] == [("final", "Hi"), ("final", "!")]
    assert p.flush() == []


def test_commentary_headers_constrain_and_call() -> None:
    text = ("<|channel|>analysis<|message|>Need weather.<|end|>"
            "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
            '{"city":"Paris"}<|call|>')
    assert parse([text]) == [("analysis", "Need weather."), ("commentary", '{"city":"Paris"}')]
    # the recipient may come before the channel
    assert parse(["<|start|>assistant to=functions.f<|channel|>commentary json<|message|>{}<|call|>"]) == [
        ("commentary", "{}")]


def test_text_without_headers_is_unlabelled_and_kept() -> None:
    assert parse(["plain answer, no harmony"]) == [("", "plain answer, no harmony")]
    assert split_reply("plain answer") == ("plain answer", None)
    assert split_reply("<|channel|>final<|message|>only final") == ("only final", None)
    # a '<' that begins no control token is text; a tail that might is held until flush
    p = HarmonyParser()
    assert p.feed("a < b <|") == [("", "a < b ")]
    assert p.flush() == [("", "<|")]


def test_cut_off_replies() -> None:
    # max_tokens mid-header: the header is dropped; mid-analysis: reasoning only
    assert split_reply("<|channel|>analysis<|message|>Let me") == ("", "Let me")
    assert split_reply("<|channel|>analysis<|message|>x<|end|><|start|>assistant<|channel|>fin") == ("", "x")
    assert split_reply("") == ("", None)


def test_detection() -> None:
    assert is_harmony("{{ '<|start|>assistant<|channel|>final<|message|>' }}")
    assert not is_harmony("{{ '<|im_start|>assistant\n' }}") and not is_harmony(None) and not is_harmony("")


# ---------------------------------------------------------------------- through the app
HARMONY_TEMPLATE = ("{% for m in messages %}<|start|>{{ m['role'] }}"
                    "{% if m['role'] == 'assistant' %}<|channel|>final{% endif %}"
                    "<|message|>{{ m['content'] }}<|end|>{% endfor %}"
                    "{% if add_generation_prompt %}<|start|>assistant{% endif %}")
CHATML = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
PIECES = ["<prompt>", "<|channel|>", "analysis", "<|message|>", "Two plus", " two.", "<|end|>", "<|start|>",
          "assistant", "<|channel|>", "final", "<|message|>", "It is", " 4.", "<|return|>"]
SPECIAL = frozenset(i for i, p in enumerate(PIECES) if p.startswith("<|"))
EOS = len(PIECES) - 1


class ScriptedTokenizer:
    """Every prompt is token 0; the engine then writes PIECES 1, 2, ... (the last, <|return|>, is EOS)."""

    eos_ids = frozenset({EOS})
    bos_token = eos_token = None
    source = "scripted"

    def __init__(self, template: str) -> None:
        self.chat_template = template

    def encode(self, text: str, add_bos: bool | None = None, add_eos: bool | None = None, *,
               special: bool = True) -> list[int]:
        return [0]

    def stream(self, skip_special: bool = True) -> Any:
        return SimpleNamespace(feed=lambda i: "" if skip_special and i in SPECIAL else PIECES[i], flush=lambda: "")


class ScriptedEngine:
    def __init__(self, template: str) -> None:
        self.config = SimpleNamespace(context_length=64, vocab_size=len(PIECES))
        self.tokenizer = ScriptedTokenizer(template)

    def new_sequence(self, context: int | None = None) -> Any:
        return SimpleNamespace()

    def step(self, items: list) -> list[np.ndarray]:
        out = []
        for _, ids in items:
            lg = np.zeros(len(PIECES), np.float32)
            lg[min(ids[-1] + 1, EOS)] = 1
            out.append(lg)
        return out

    def close(self) -> None:
        pass


def served(template: str) -> TestClient:
    app = create_app(ServerConfig("/nonexistent/oss", model_name="oss"), load=lambda: ScriptedEngine(template))
    client = TestClient(app)
    client.__enter__()
    deadline = time.monotonic() + 10
    while client.get("/health").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return client


def chat(client: TestClient, **extra: Any) -> Any:
    body = {"model": "oss", "messages": [{"role": "user", "content": "2+2?"}], "temperature": 0, **extra}
    if not extra.get("stream"):
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        lines = [ln.removeprefix("data: ") for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(ln) for ln in lines[:-1]]


def test_server_splits_a_harmony_reply() -> None:
    client = served(HARMONY_TEMPLATE)
    try:
        body = chat(client)
        msg = body["choices"][0]["message"]
        assert msg == {"role": "assistant", "content": "It is 4.", "reasoning_content": "Two plus two."}
        assert body["choices"][0]["finish_reason"] == "stop" and body["usage"]["completion_tokens"] == EOS

        chunks = chat(client, stream=True)
        deltas = [c["choices"][0]["delta"] for c in chunks]
        assert deltas[0] == {"role": "assistant", "content": ""} and deltas[-1] == {}
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        assert [d for d in deltas[1:-1]] == [{"reasoning_content": "Two plus"}, {"reasoning_content": " two."},
                                             {"content": "It is"}, {"content": " 4."}]

        # cut off while thinking: no content yet
        msg = chat(client, max_tokens=4)["choices"][0]["message"]
        assert msg == {"role": "assistant", "content": "", "reasoning_content": "Two plus"}
        # skip_special_tokens=false: the raw text, as before
        raw = chat(client, skip_special_tokens=False)["choices"][0]["message"]
        assert raw == {"role": "assistant", "content": "".join(PIECES[1:EOS])}
    finally:
        client.__exit__(None, None, None)


def test_server_leaves_other_chat_formats_alone() -> None:
    client = served(CHATML)
    try:
        msg = chat(client)["choices"][0]["message"]
        want = "".join(p for i, p in enumerate(PIECES[1:EOS], 1) if i not in SPECIAL)
        assert msg == {"role": "assistant", "content": want}
        deltas = [c["choices"][0]["delta"] for c in chat(client, stream=True)]
        assert all("reasoning_content" not in d for d in deltas)
        assert "".join(d.get("content", "") for d in deltas) == want
    finally:
        client.__exit__(None, None, None)
