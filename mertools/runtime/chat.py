"""Chat prompts: the model's Jinja chat template, rendered the way transformers renders it.

Same environment as transformers' `apply_chat_template`: jinja2's ImmutableSandboxedEnvironment with
trim_blocks and lstrip_blocks, the loopcontrols extension, a no-op `{% generation %}` block,
`raise_exception`, `strftime_now`, and a `tojson` that keeps non-ASCII text. The variables are
`messages`, `add_generation_prompt`, `bos_token`/`eos_token` (when the model has them) and any extra
keyword (`tools`, `documents`, ...).

A model without a template gets ChatML (`FALLBACK_TEMPLATE`), as llama.cpp falls back to: it needs no
special tokens to be meaningful text, and many instruction-tuned models understand it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

from ..errors import LayoutError
from .tokenizer import Tokenizer

FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def render_chat(tokenizer: Tokenizer, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                *, template: str | None = None, **extra: Any) -> str:
    """The prompt text for `messages` ([{"role": ..., "content": ...}, ...])."""
    import jinja2

    source = "the given template" if template else f"{tokenizer.source or 'the model'}: chat template"
    if template is None:
        template = tokenizer.chat_template or FALLBACK_TEMPLATE
        if tokenizer.chat_template is None:
            source = "the fallback (ChatML) template"
    specials = {k: v for k, v in (("bos_token", tokenizer.bos_token), ("eos_token", tokenizer.eos_token)) if v}
    try:
        compiled = _compile(template)
        return compiled.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                               **{**specials, **extra})
    except jinja2.TemplateError as e:  # syntax errors and raise_exception() alike
        raise LayoutError(f"{source}: {type(e).__name__}: {e}") from None


def encode_chat(tokenizer: Tokenizer, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                **extra: Any) -> list[int]:
    """Token ids of the rendered prompt, special tokens parsed; BOS is added only if the template did not write it."""
    text = render_chat(tokenizer, messages, add_generation_prompt, **extra)
    has_bos = tokenizer.bos_token is not None and text.startswith(tokenizer.bos_token)
    return tokenizer.encode(text, add_bos=False if has_bos else None, special=True)


@lru_cache(maxsize=16)
def _compile(template: str) -> Any:
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        # transformers marks assistant text with {% generation %}...{% endgeneration %} for masks
        tags = {"generation"}

        def parse(self, parser: Any) -> list[nodes.Node]:
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)
