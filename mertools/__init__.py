"""mertools: run Mixture-of-Experts language models larger than RAM on a CPU, streaming experts from disk."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Approx", "Engine", "__version__"]

if TYPE_CHECKING:
    from .runtime.approx import Approx
    from .runtime.engine import Engine


def __getattr__(name: str) -> Any:
    # lazy: `import mertools` stays cheap for the CLI's converter paths (no numba compile)
    if name == "Engine":
        from .runtime.engine import Engine

        return Engine
    if name == "Approx":  # approximate routing settings, for Engine.open(approx=...)
        from .runtime.approx import Approx

        return Approx
    raise AttributeError(f"module 'mertools' has no attribute {name!r}")
