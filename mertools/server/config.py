"""`mertools serve`'s settings: one frozen ServerConfig, from the defaults, a TOML file (`--config`) and the command
line, which wins. A reload (SIGHUP, or the file changed under `--watch-config`) builds a new one from the same command
line and the file as it is now; `RELOADABLE` are the keys a running server takes, the others wait for a restart.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..runtime.approx import Approx
from ..runtime.prefetch import PREFETCH_DEPTH, PREFETCH_MODES

LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class ServerConfig:
    layout: str
    model_name: str | None = None  # default: the layout directory's name
    api_key: str | None = None  # --api-key / $MERTOOLS_API_KEY
    api_keys: tuple[str, ...] = ()  # the settings file's keys; any of them (or api_key) is accepted
    max_concurrency: int = 8  # sequences in the running batch
    max_queue: int = 64  # sequences waiting for a slot; beyond that, 429
    cache_mb: float | None = None
    prefetch: str = "lookahead"
    prefetch_depth: int = PREFETCH_DEPTH  # layers the lookahead guesses ahead (runtime/prefetch.py)
    threads: int | None = None
    prefill_chunk: int = 64
    completion_default_max_tokens: int = 16  # OpenAI's default for /v1/completions
    kv_dtype: str = "f16"  # what each sequence's KV cache holds
    io: str = "auto"  # expert reads: "direct", "mmap", "buffered" (pages kept) or "auto" (mmap when the layout fits)
    approx: Approx | None = None  # approximate routing (runtime/approx.py); None: exact
    draft: str | None = None  # speculative decoding: "ngram" (prompt lookup), a draft layout's path, or None
    draft_tokens: int = 4  # tokens drafted per verification step
    history: str | None = None  # the learning cache's routing history file, written when the server stops
    kernels: str = "exact"  # Engine.open's kernels: "exact" or "int8" (the CLI's default)
    shards: int | None = None  # the experts on this many Ray actors (runtime/shards.py)
    shard_plan: str | None = None  # a placement plan file instead of round-robin
    ray_address: str | None = None  # the Ray cluster (None: this machine's)
    # defaults for requests that leave these out (None: OpenAI's: temperature 1, top_p 1, no top-k; max_tokens: chat
    # to the end of the context, completions completion_default_max_tokens)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    log_level: str = "info"
    ui: bool = True  # the web page at / (server/ui)
    host: str = "127.0.0.1"
    port: int = 8000
    config_file: str | None = None  # --config: the TOML file reloads read
    watch_config: float = 0.0  # seconds between looks at the file's content (0: reload on SIGHUP only)
    pinned: frozenset[str] = frozenset()  # fields given on the command line: the file cannot change them

    @property
    def name(self) -> str:
        return self.model_name or Path(self.layout).resolve().name

    @property
    def keys(self) -> tuple[str, ...]:
        """Every accepted API key (none: no authentication)."""
        return self.api_keys + ((self.api_key,) if self.api_key else ())


def _num(lo: float | None = None, hi: float | None = None, integer: bool = False) -> Callable[[Any], Any]:
    def check(v: Any) -> Any:  # noqa: ANN401
        kinds = (int,) if integer else (int, float)
        if isinstance(v, bool) or not isinstance(v, kinds):
            raise ValueError(f"must be {'an integer' if integer else 'a number'}, not {v!r}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise ValueError(f"must lie in [{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}], "
                             f"not {v!r}")
        return v if integer else float(v)
    return check


def _text(choices: tuple[str, ...] | None = None) -> Callable[[Any], Any]:
    def check(v: Any) -> Any:  # noqa: ANN401
        if not isinstance(v, str) or not v:
            raise ValueError(f"must be a non-empty string, not {v!r}")
        if choices is not None and v not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, not {v!r}")
        return v
    return check


def _keys(v: Any) -> tuple[str, ...]:  # noqa: ANN401
    if not isinstance(v, list) or not all(isinstance(k, str) and k.strip() == k and k for k in v):
        raise ValueError("must be a list of non-empty strings without surrounding spaces")
    return tuple(v)


def _bool(v: Any) -> bool:  # noqa: ANN401
    if not isinstance(v, bool):
        raise ValueError(f"must be true or false, not {v!r}")
    return v


def _positive_mb(v: Any) -> float:  # noqa: ANN401
    mb = _num(0)(v)
    if mb <= 0:
        raise ValueError(f"must be above 0, not {v!r}")
    return mb


# the file's keys (named like the command-line options) -> (ServerConfig field, check)
FILE_KEYS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "layout": ("layout", _text()),
    "model_name": ("model_name", _text()),
    "api_keys": ("api_keys", _keys),
    "cache_mb": ("cache_mb", _positive_mb),
    "max_concurrency": ("max_concurrency", _num(1, integer=True)),
    "max_queue": ("max_queue", _num(0, integer=True)),
    "prefetch": ("prefetch", _text(PREFETCH_MODES)),
    "prefetch_depth": ("prefetch_depth", _num(1, integer=True)),
    "prefill_chunk": ("prefill_chunk", _num(1, integer=True)),
    "temperature": ("temperature", _num(0, 2)),
    "top_p": ("top_p", _num(0, 1)),
    "top_k": ("top_k", _num(0, integer=True)),
    "max_tokens": ("max_tokens", _num(1, integer=True)),
    "log_level": ("log_level", _text(LOG_LEVELS)),
    "host": ("host", _text()),
    "port": ("port", _num(0, 65535, integer=True)),
    "threads": ("threads", _num(1, integer=True)),
    "kv_type": ("kv_dtype", _text(("f16", "f32", "q8_0"))),
    "io": ("io", _text(("auto", "direct", "mmap", "buffered"))),
    "kernels": ("kernels", _text(("int8", "exact"))),
    "draft": ("draft", _text()),
    "draft_tokens": ("draft_tokens", _num(1, 64, integer=True)),
    "history": ("history", _text()),
    "ui": ("ui", _bool),
}
RELOADABLE = frozenset({"layout", "model_name", "api_keys", "cache_mb", "max_concurrency", "max_queue", "prefetch",
                        "prefill_chunk", "temperature", "top_p", "top_k", "max_tokens", "log_level"})
# the command line's options for the file's keys, where the names differ
OPTION_OF = {"kv_dtype": "kv_type", "io": "io_mode"}


def read_settings(path: str | Path) -> dict[str, Any]:
    """The file's settings as ServerConfig fields, every value checked. Raises ValueError naming the file and the
    key. Relative paths (layout, draft, history) are taken from the file's directory."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML: {e}") from None
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in FILE_KEYS:
            raise ValueError(f"{path}: unknown key {key!r} (known: {', '.join(sorted(FILE_KEYS))})")
        field, check = FILE_KEYS[key]
        try:
            value = check(value)
        except ValueError as e:
            raise ValueError(f"{path}: {key}: {e}") from None
        if key in ("layout", "history") or (key == "draft" and value not in ("ngram", "mtp")):
            value = str((path.parent / value).resolve()) if not Path(value).is_absolute() else value
        out[field] = value
    return out


def with_file(base: ServerConfig, settings: dict[str, Any]) -> ServerConfig:
    """`base` (the command line and the defaults) with the file's settings, except fields the command line gave."""
    known = {f.name for f in fields(ServerConfig)}
    values = {f.name: getattr(base, f.name) for f in fields(ServerConfig)}
    values.update({k: v for k, v in settings.items() if k in known and k not in base.pinned})
    return ServerConfig(**values)
