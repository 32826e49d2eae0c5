"""Type dispatch that compiles only the types a call can meet.

A kernel serves every type with one body, the type arriving as a code (`kind`) and an if-chain picking the type's
function. numba types and compiles every branch of such a chain, so a kernel's first compile paid for all types
(~45 s for the 8-bit product alone, ~3 min of compiling before a machine's first token). A dispatch made by
`switch(body)` takes one more argument, `kinds`: a string naming the codes the call can meet (`key(*codes)`). When
numba sees it as a literal, the dispatch is `body(K, ...)` for each code K in it, and numba's dead-branch pruning
drops the other types' branches before typing them, since the code is then a constant.

Kernels take `kinds` and pass it down; they are entered through a small jitted closure per set of codes (each
module's `*_for`, lru-cached) that calls the kernel with the string it captured: numba types a captured string as a
literal, so every callee down to the dispatches receives it as one, and each set of codes is its own compiled
kernel, cached on disk (numba keys a closure's cache entries by the values it captured). A Python call with a literal
argument would cost ~6 ms in numba's dispatcher; the closure is an ordinary call. The entries are written out per
kernel rather than made by one helper: a closure that captured the kernel would never load from the cache (numba
hashes a captured dispatcher with an id drawn per process), and one that names it as a global of its module keeps
that module's cache key.

    key(12, 14)                    '12,14'
    dispatch = switch(body)        dispatch(kinds, kind, *args) == body(kind, *args)

Inside a body the code is a constant, so the functions it calls with it are compiled for that code too (a literal
argument), and their own dispatches pass it as `kinds`. A kernel called with a code outside `kinds` computes as the
last code named: callers build `kinds` from the very codes they pass. Kernels compiled without a literal `kinds` keep
every branch, the behaviour before this module.
"""

from __future__ import annotations

import inspect
from functools import lru_cache
from typing import Any

from numba import types
from numba.extending import overload

__all__ = ["codes_of", "key", "switch"]


@lru_cache(maxsize=256)
def key(*codes: int) -> str:
    """The `kinds` argument for calls that meet the type codes `codes` (sorted, without repeats)."""
    out = ",".join(str(c) for c in sorted({int(c) for c in codes}))
    if not out:
        raise ValueError("kernels.kinds.key: a call meets at least one type code")
    return out


def codes_of(kinds: str) -> tuple[int, ...]:
    """The type codes a `kinds` string names."""
    return tuple(int(c) for c in kinds.split(","))


def _source(name: str, params: list[str], codes: tuple[int, ...] | None) -> str:
    """The dispatch's source: for `codes`, one branch per code calling body with it as a constant (the last takes
    what is left); for None (kinds not a literal), body with the runtime code, every type's branch."""
    args = ", ".join(params)
    lines = [f"def {name}(kinds, kind, {args}):"]
    if codes is None:
        lines.append(f"    return body(kind, {args})")
    else:
        lines += [f"    if kind == {c}:\n        return body({c}, {args})" for c in codes[:-1]]
        lines.append(f"    return body({codes[-1]}, {args})")
    return "\n".join(lines) + "\n"


def _codes(kinds: Any, kind: Any) -> tuple[int, ...] | None:
    """The codes a call can meet, from its argument types: a literal kind's own, else the literal `kinds`' (a string
    of codes, or one code: a function compiled for one type passes its kind as both)."""
    for t in (kind, kinds):
        if isinstance(t, types.IntegerLiteral):
            return (t.literal_value,)
    if isinstance(kinds, types.StringLiteral):
        return codes_of(kinds.literal_value)
    return None


def switch(body: Any, inline: bool = False) -> Any:
    """A function `f(kinds, kind, *args)` returning `body(kind, *args)` (body: an njit(inline="always") function whose
    first parameter is the type code), compiled for only the codes in `kinds` when it is a literal string, or for
    kind alone when it is a literal. inline: numba inlines the dispatch into its callers (a hot loop's per-call
    costs), else it is a call."""
    py = body.py_func
    params = list(inspect.signature(py).parameters)[1:]
    stub_ns: dict[str, Any] = {"__name__": py.__module__}
    exec(f"def {py.__name__}(kinds, kind, {', '.join(params)}):\n    raise NotImplementedError\n", stub_ns)  # noqa: S102
    stub = stub_ns[py.__name__]
    stub.__doc__ = f"`{py.__qualname__}` for the type codes in `kinds` (kernels.kinds.switch); compiled code only."
    # the body is inlined into the dispatch: the dispatch compiles with the body's options (fastmath and all)
    options = {k: v for k, v in body.targetoptions.items() if k in ("fastmath", "nogil", "error_model", "boundscheck")}

    @overload(stub, prefer_literal=True, strict=False, inline="always" if inline else "never", jit_options=options)
    def _typer(kinds: Any, kind: Any, *args: Any) -> Any:
        scope: dict[str, Any] = {"body": body, "__name__": py.__module__}  # numba names it by its module
        exec(_source(py.__name__, params, _codes(kinds, kind)), scope)  # noqa: S102 - the chain for these codes
        return scope[py.__name__]

    return stub
