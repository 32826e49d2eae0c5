"""The layout format: constants, manifest schema, atomic writer, validating reader. No numerics."""

from __future__ import annotations

from .config import ModelConfig
from .constants import ALIGNMENT, DTYPES, EXPERT_DTYPES, FORMAT_NAME, FORMAT_VERSION
from .manifest import ExpertEntry, FileEntry, Manifest, TensorEntry
from .reader import Layout
from .writer import EncodedTensor, LayoutWriter

__all__ = [
    "ALIGNMENT", "DTYPES", "EXPERT_DTYPES", "FORMAT_NAME", "FORMAT_VERSION", "EncodedTensor", "ExpertEntry",
    "FileEntry", "Layout", "LayoutWriter", "Manifest", "ModelConfig", "TensorEntry",
]
