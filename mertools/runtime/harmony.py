"""OpenAI's harmony chat format (gpt-oss): the assistant's output split into its channels.

A harmony reply is a sequence of messages such as
`<|channel|>analysis<|message|>thinking...<|end|><|start|>assistant<|channel|>final<|message|>answer<|return|>`
(tool calls and preambles use the `commentary` channel, e.g. `<|channel|>commentary to=functions.f
<|constrain|>json<|message|>{...}<|call|>`). `HarmonyParser` takes the decoded text in pieces of any size
(a control token may be split across pieces) and gives `(channel, text)` events with every control token and
message header removed: `channel` is the header's channel name ("analysis", "final", "commentary"), or ""
for text outside any message (a model that answers without a header: treat it as the answer).
"""

from __future__ import annotations

START, END, MESSAGE, CHANNEL = "<|start|>", "<|end|>", "<|message|>", "<|channel|>"
CONSTRAIN, RETURN, CALL = "<|constrain|>", "<|return|>", "<|call|>"
_ENDS = (END, RETURN, CALL, "<|endoftext|>")
MARKERS = (START, MESSAGE, CHANNEL, CONSTRAIN, *_ENDS)
_LONGEST = max(len(m) for m in MARKERS)

Event = tuple[str, str]


def is_harmony(chat_template: str | None) -> bool:
    """Whether a chat template writes harmony (gpt-oss's): it is the only common format with `<|channel|>`."""
    return bool(chat_template) and CHANNEL in chat_template  # type: ignore[operator]


class HarmonyParser:
    """Feed text pieces, get `(channel, text)` events (consecutive text of one channel merged)."""

    def __init__(self) -> None:
        self._buf = ""
        self._in_header = False  # between <|start|> / <|channel|> and <|message|>
        self._header = ""
        self._channel = ""  # of the message being read; "" outside a message

    def feed(self, text: str) -> list[Event]:
        self._buf += text
        return self._drain(final=False)

    def flush(self) -> list[Event]:
        """The text held back (a possible control token's beginning); an unfinished header is dropped."""
        out = self._drain(final=True)
        self._in_header, self._header = False, ""
        return out

    def _drain(self, final: bool) -> list[Event]:
        out: list[Event] = []
        while True:
            hits = [(i, m) for m in MARKERS if (i := self._buf.find(m)) >= 0]
            if not hits:
                break
            i, marker = min(hits)
            self._text(self._buf[:i], out)
            self._buf = self._buf[i + len(marker):]
            self._marker(marker)
        keep = 0 if final else self._partial()
        self._text(self._buf[:len(self._buf) - keep], out)
        self._buf = self._buf[len(self._buf) - keep:]
        return out

    def _partial(self) -> int:
        """Length of the longest tail of the buffer that may be the beginning of a control token."""
        for k in range(min(len(self._buf), _LONGEST - 1), 0, -1):
            tail = self._buf[-k:]
            if any(m.startswith(tail) for m in MARKERS):
                return k
        return 0

    def _text(self, text: str, out: list[Event]) -> None:
        if not text:
            return
        if self._in_header:
            self._header += text
        elif out and out[-1][0] == self._channel:
            out[-1] = (self._channel, out[-1][1] + text)
        else:
            out.append((self._channel, text))

    def _marker(self, marker: str) -> None:
        if marker == START:
            self._in_header, self._header, self._channel = True, "", ""
        elif marker == CHANNEL:
            if not self._in_header:
                self._in_header, self._header, self._channel = True, "", ""
            self._header += CHANNEL
        elif marker == CONSTRAIN:
            if self._in_header:
                self._header += " "
        elif marker == MESSAGE:
            if self._in_header:
                _, found, rest = self._header.rpartition(CHANNEL)
                words = rest.split() if found else []
                self._channel = words[0] if words else ""
                self._in_header, self._header = False, ""
        else:  # the message ends
            self._in_header, self._header, self._channel = False, "", ""


REASONING = "analysis"  # the channel that is the model's thinking; every other one is the reply


def split_reply(text: str) -> tuple[str, str | None]:
    """A whole harmony reply -> (content: every channel but analysis, reasoning: analysis or None)."""
    p = HarmonyParser()
    events = p.feed(text) + p.flush()
    reasoning = "".join(t for c, t in events if c == REASONING)
    return "".join(t for c, t in events if c != REASONING), reasoning or None
