"""OpenAI-compatible request validation and response shapes (no HTTP, no engine).

Requests are validated strictly (a string where a number belongs is an error, not coerced) and every
failure becomes one clear message naming the field. Fields OpenAI defines but this server does not
implement (logprobs, penalties, tools...) are refused when set to anything but their neutral value,
rather than silently ignored; unknown fields are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_STOPS = 16
MAX_N = 16

# field -> values that mean "off" (accepted and ignored)
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
    "suffix": (None, ""), "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "logit_bias": (None, {}),
    "tools": (None, []), "functions": (None, []), "response_format": (None, {"type": "text"}),
}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool | None = None


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = Field(None, validate_default=True)
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _text_only(cls, v: Any) -> str:
        """A string, or a list of text parts (joined); images and audio are not supported."""
        if v is None or isinstance(v, str):
            return v or ""
        if isinstance(v, list):
            parts = []
            for p in v:
                if not (isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)):
                    raise ValueError('content parts must be {"type": "text", "text": "..."}; only text is supported')
                parts.append(p["text"])
            return "".join(parts)
        raise ValueError("content must be a string or a list of text parts")


class _Sampling(_Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # -1 or 0: off
    seed: int | None = None
    stop: Any = Field(None, validate_default=True)  # always a tuple after validation
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=MAX_N)
    user: str | None = None
    skip_special_tokens: bool | None = None  # vLLM's extension; default True

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: Any) -> tuple[str, ...]:
        if v is None:
            return ()
        if isinstance(v, str):
            return (v,) if v else ()
        if isinstance(v, list) and all(isinstance(s, str) for s in v):
            if len(v) > MAX_STOPS:
                raise ValueError(f"at most {MAX_STOPS} stop strings")
            return tuple(s for s in v if s)
        raise ValueError("stop must be a string or a list of strings")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, ge=1)

    @field_validator("messages")
    @classmethod
    def _not_empty(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        if not v:
            raise ValueError("must not be empty")
        return v

    @property
    def max_new(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Sampling):
    prompt: Any

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v: Any) -> list[str | list[int]]:
        """One prompt or several: a string, token ids, or a list of either; always a list here."""
        def ids(x: Any) -> bool:
            return isinstance(x, list) and bool(x) and all(isinstance(i, int) and not isinstance(i, bool) for i in x)

        if isinstance(v, str) or ids(v):
            return [v]
        if isinstance(v, list) and v and all(isinstance(p, str) or ids(p) for p in v):
            return list(v)
        if v == [] or v == [[]]:
            raise ValueError("must not be empty")
        raise ValueError("prompt must be a string, a list of token ids, or a list of strings or of token-id lists")

    @property
    def max_new(self) -> int | None:
        return self.max_tokens


class RequestError(Exception):
    """A request this server refuses: becomes an OpenAI-shaped error response."""

    def __init__(self, message: str, status: int = 400, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.type, self.code, self.param = message, status, type, code, param
        self.headers = headers or {}


def parse_request(body: bytes, kind: Literal["chat", "completion"]) -> ChatRequest | CompletionRequest:
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise RequestError("the request body must be a JSON object", code="invalid_json")
    for name, neutral in UNSUPPORTED.items():
        if name in obj and not _neutral(obj[name], neutral):
            raise RequestError(f"{name} is not supported by this server", code="unsupported_parameter", param=name)
    model = ChatRequest if kind == "chat" else CompletionRequest
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        raise RequestError(*_describe(e)) from None


def _neutral(value: Any, neutral: tuple[Any, ...]) -> bool:
    if value is None:
        return True
    if isinstance(value, bool):  # False == 0 in Python: compare booleans with booleans only
        return any(isinstance(v, bool) and v == value for v in neutral)
    return any(not isinstance(v, bool) and v is not None and v == value for v in neutral)


def _describe(e: ValidationError) -> tuple[str, int, str, str, str]:
    errs = e.errors(include_url=False)
    first = errs[0]
    loc = ".".join(str(x) for x in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] not in ("missing", "value_error") and "input" in first:
        shown = json.dumps(first["input"], default=str)
        msg += f" (got {shown[:60] + '...' if len(shown) > 60 else shown})"
    more = f" (and {len(errs) - 1} more problems)" if len(errs) > 1 else ""
    return f"{loc}: {msg}{more}" if loc else msg + more, 400, "invalid_request_error", "invalid_value", loc or None


# ---------------------------------------------------------------------- responses
def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex


def now() -> int:
    return int(time.time())


def error_body(message: str, type: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def model_card(name: str, created: int, context_length: int | None) -> dict[str, Any]:
    card: dict[str, Any] = {"id": name, "object": "model", "created": created, "owned_by": "mertools"}
    if context_length is not None:
        card["max_model_len"] = context_length
    return card


def response(kind: str, rid: str, model: str, created: int, choices: list[tuple[str, str]],
             use: dict[str, int], reasoning: list[str | None] | None = None) -> dict[str, Any]:
    """A whole (non-streamed) completion; choices are (text, finish_reason). `reasoning` (chat only, one per
    choice) adds `message.reasoning_content`, as vLLM and llama.cpp's server write a model's thinking."""
    if kind == "chat":
        out = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None, "finish_reason": f}
               for i, (t, f) in enumerate(choices)]
        for c, r in zip(out, reasoning or (), strict=False):
            c["message"]["reasoning_content"] = r  # type: ignore[index]
        obj = "chat.completion"
    else:
        out = [{"index": i, "text": t, "logprobs": None, "finish_reason": f} for i, (t, f) in enumerate(choices)]
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": out, "usage": use}


def chunk(kind: str, rid: str, model: str, created: int, index: int, text: str | None,
          finish_reason: str | None, with_usage: bool, role: bool = False,
          reasoning: str | None = None) -> dict[str, Any]:
    """One streamed piece. For chat, `role` makes the opening delta and text None an empty delta;
    `reasoning` is a piece of the model's thinking (`delta.reasoning_content`)."""
    if kind == "chat":
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
        if text is not None and not role:
            delta["content"] = text
        if reasoning is not None and not role:
            delta["reasoning_content"] = reasoning
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        obj = "text_completion"
    out = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
    if with_usage:
        out["usage"] = None  # OpenAI: null on every chunk but the last when include_usage is set
    return out


def usage_chunk(kind: str, rid: str, model: str, created: int, use: dict[str, int]) -> dict[str, Any]:
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": use}


def sse(obj: dict[str, Any] | str) -> str:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"
