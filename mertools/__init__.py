"""mertools: run Mixture-of-Experts language models larger than RAM on a CPU, streaming experts from disk."""

from __future__ import annotations

__version__ = "0.1.0"
