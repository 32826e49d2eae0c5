"""Generation: prefill a prompt, then sample token by token, plainly or with speculative drafts.

`Engine.generate` is the public entry; these loops only use the engine's forward steps, its tokenizer and
its counters, so the engine module stays about opening and stepping a model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import RuntimeConfigError
from .batch import PREFILL_CHUNK
from .compile_clock import compile_seconds
from .sampling import Sampler, SamplingParams
from .speculative import AdaptiveK, Draft, Drafter, settle
from .text import GenerationText, PromptError, check_prompt

if TYPE_CHECKING:
    from .engine import Engine

T = TypeVar("T")


def checked(check: Callable[..., T], *args: Any, **kw: Any) -> T:
    """A text.py check, its PromptError raised as the RuntimeConfigError the engine's callers catch."""
    try:
        return check(*args, **kw)
    except PromptError as e:
        raise RuntimeConfigError(str(e)) from None


@dataclass(frozen=True)
class GeneratedToken:
    id: int
    text: str  # text that became complete with this token (may be empty mid-character)
    finish_reason: str | None = None  # "stop" (EOS or a stop string) or "length" on the last token


def _since(t0: float, c0: float) -> tuple[float, float]:
    """(seconds since t0 less numba's compiling on this thread since c0, that compiling): a first run's compiles go
    to the warm-up figure, never to prefill or decode (compile_clock.py)."""
    compiled = compile_seconds() - c0
    return time.perf_counter() - t0 - compiled, compiled


def generate(eng: Engine, prompt: str | Sequence[int], max_tokens: int, params: SamplingParams, stop: Sequence[str],
             add_bos: bool | None, draft: Drafter | None, draft_tokens: int) -> Iterator[GeneratedToken]:
    """Reset, prefill the prompt, then yield tokens as they are sampled (Engine.generate)."""
    tok, cfg, t = eng.tokenizer, eng.config, eng.times
    ids = tok.encode(prompt, add_bos=add_bos) if isinstance(prompt, str) else list(prompt)
    ids, max_tokens = checked(check_prompt, ids, cfg.vocab_size, cfg.context_length, max_tokens)
    if draft_tokens < 1:
        raise RuntimeConfigError(f"draft_tokens must be >= 1, got {draft_tokens}")
    sampler = Sampler(params)
    out = GenerationText(tok.stream(), stop, tok.eos_ids, max_tokens)
    eng.reset()
    eng.model.kv.reserve(len(ids) + max_tokens + (draft_tokens if draft else 0))  # allocated once
    t0, c0 = time.perf_counter(), compile_seconds()
    for i in range(0, len(ids), PREFILL_CHUNK):  # a long prompt in chunks: attention scores stay chunk x context
        chunk = ids[i:i + PREFILL_CHUNK]
        logits = eng.forward(chunk, all_logits=False)[-1]
        if draft is not None:
            draft.observe(i, chunk, eng.model.last_x)
    took, compiled = _since(t0, c0)
    t.prefill_s += took
    t.warmup_s += compiled
    t.prompt_tokens += len(ids)
    first = sampler(logits)
    steps = _plain(eng, first, sampler) if draft is None else _speculative(eng, ids, first, sampler, draft, draft_tokens,
                                                                           max_tokens)
    for next_id in steps:
        t.generated_tokens += 1
        if t.ttft_s is None:
            t.ttft_s = _since(t0, c0)[0]
        text, reason = out.push(next_id)
        yield GeneratedToken(next_id, text, reason)
        if reason is not None:
            return


def _plain(eng: Engine, first: int, sampler: Sampler) -> Iterator[int]:
    """One forward step per token."""
    next_id = first
    while True:
        yield next_id
        t1, c1 = time.perf_counter(), compile_seconds()
        logits = eng.forward([next_id], all_logits=False)[-1]
        took, compiled = _since(t1, c1)
        eng.times.decode_s += took
        eng.times.warmup_s += compiled
        next_id = sampler(logits)


def _speculative(eng: Engine, ids: list[int], first: int, sampler: Sampler, draft: Drafter, k: int,
                 max_tokens: int) -> Iterator[int]:
    """Draft (up to k tokens, fewer while drafts fail: AdaptiveK), verify in one step with rows apart (each row's
    logits those of a decode step), accept by the rule, roll the KV cache back past the rejected rows. The
    caller stops pulling at EOS, a stop string or the limit."""
    context, cur, kv, st, adapt = list(ids), first, eng.model.kv, eng.spec, AdaptiveK(k)
    yield cur
    produced = 1
    while produced < max_tokens:
        t1, c1 = time.perf_counter(), compile_seconds()
        base = kv.length  # cur's position
        context.append(cur)
        room = min(adapt.next(), max_tokens - produced - 1, eng.config.context_length - len(context))
        d = draft.propose(context, room, sampler) if room > 0 else Draft([])
        j, nxt = settle(eng.verify([cur, *d.tokens]), d, sampler, kv, adapt, st)
        draft.observe(base, [cur, *d.tokens[:j]], eng.model.last_x[:j + 1])  # the rows the target kept
        took, compiled = _since(t1, c1)
        eng.times.decode_s += took
        eng.times.warmup_s += compiled
        for t_id in d.tokens[:j]:
            context.append(t_id)
            produced += 1
            yield t_id
        produced += 1
        cur = nxt
        yield cur
