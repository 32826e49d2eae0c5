"""One text path for every caller (`Engine.generate`, `mertools run`, the server): the prompt checks
and the token-to-text assembly with stop strings. No numba, no I/O."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np

from ..errors import MertoolsError


class PromptError(MertoolsError, ValueError):
    """Token ids the model cannot run. `rule` names the broken rule: "empty", "vocab", "context" or
    "max_tokens" (the server maps it to an OpenAI error code)."""

    def __init__(self, message: str, rule: str) -> None:
        super().__init__(message)
        self.rule = rule


def check_ids(ids: Sequence[int] | np.ndarray, vocab_size: int, context_length: int, *, position: int = 0,
              room: int = 0) -> np.ndarray:
    """`ids` as int64 (n,), after checking: at least one, each in 0..vocab_size-1, and that `position`
    tokens already in the sequence plus these plus `room` more fit the context."""
    try:
        arr = np.asarray(ids, dtype=np.int64)
    except (OverflowError, TypeError, ValueError):  # an id beyond int64, or not a number at all
        raise PromptError(f"token ids out of range: expected integers 0..{vocab_size - 1}", "vocab") from None
    if arr.ndim != 1:
        raise PromptError(f"token ids must be a flat list, got an array of shape {arr.shape}", "empty")
    if arr.size == 0:
        raise PromptError("the prompt is empty: expected at least one token id", "empty")
    bad = arr[(arr < 0) | (arr >= vocab_size)]
    if bad.size:
        raise PromptError(f"token ids out of range: expected 0..{vocab_size - 1}, got {int(bad[0])}", "vocab")
    total = position + arr.size
    if total + room > context_length:
        if room and not position:
            raise PromptError(f"This model's maximum context length is {context_length} tokens; the prompt has "
                              f"{arr.size} tokens, leaving no room to generate", "context")
        raise PromptError(f"{total + room} tokens exceed the model's context of {context_length}", "context")
    return arr


def check_prompt(ids: Sequence[int] | np.ndarray, vocab_size: int, context_length: int,
                 max_tokens: int) -> tuple[np.ndarray, int]:
    """A prompt to generate from: (its ids, max_tokens clamped to the room left in the context)."""
    arr = check_ids(ids, vocab_size, context_length, room=1)
    if max_tokens < 1:
        raise PromptError(f"max_tokens must be >= 1, got {max_tokens}", "max_tokens")
    return arr, min(max_tokens, context_length - arr.size)


class Decoder(Protocol):
    """A tokenizer's incremental decoder (mertools.runtime.tokenizer.StreamDecoder)."""

    def feed(self, token_id: int) -> str: ...

    def flush(self) -> str: ...


class TextAssembler:
    """Token ids in, text out, holding back only the longest tail that really is a proper prefix of a
    stop string, and cutting the text before the first stop string to be completed. Keeps only the
    text not yet handed out, so its memory is bounded by the longest stop string."""

    def __init__(self, decoder: Decoder, stops: Iterable[str]) -> None:
        self._dec = decoder
        self.stops = [s for s in stops if s]
        self.pending = ""  # decoded, not yet handed out; a stop string can only start in here

    def feed(self, token_id: int) -> tuple[str, bool]:
        """(text now safe to hand out, whether a stop string was reached)."""
        self.pending += self._dec.feed(token_id)
        return self._advance(final=False)

    def finish(self) -> tuple[str, bool]:
        """The rest of the text (a pending partial character becomes U+FFFD)."""
        self.pending += self._dec.flush()
        return self._advance(final=True)

    def _advance(self, final: bool) -> tuple[str, bool]:
        text = self.pending
        hits = [j for j in (text.find(s) for s in self.stops) if j >= 0]
        if hits:
            self.pending = ""
            return text[:min(hits)], True
        safe = len(text) if final else len(text) - self._partial(text)
        self.pending = text[safe:]
        return text[:safe], False

    def _partial(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best


class GenerationText:
    """One generation's sampled ids -> (new text, finish reason or None): it ends at an EOS id ("stop"),
    a completed stop string ("stop") or its `max_tokens`-th token ("length")."""

    def __init__(self, decoder: Decoder, stops: Iterable[str], eos_ids: Iterable[int], max_tokens: int) -> None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.text = TextAssembler(decoder, stops)
        self.eos_ids = frozenset(eos_ids)
        self.max_tokens = max_tokens
        self.generated = 0

    def push(self, token_id: int) -> tuple[str, str | None]:
        self.generated += 1
        if token_id in self.eos_ids:
            return self.text.finish()[0], "stop"
        piece, stopped = self.text.feed(token_id)
        if stopped:
            return piece, "stop"
        if self.generated >= self.max_tokens:
            rest, stopped = self.text.finish()
            return piece + rest, "stop" if stopped else "length"
        return piece, None
