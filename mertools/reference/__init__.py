"""Reference implementations for cross-checks: a plain-numpy forward pass of every family (no runtime, no numba)."""

from __future__ import annotations

from .forward import ReferenceModel, dequantize

__all__ = ["ReferenceModel", "dequantize"]
