"""The error hierarchy: every error a user can cause is a MertoolsError, exit status 2."""

from __future__ import annotations


class MertoolsError(Exception):
    """Base of every error caused by input (files, flags); the CLI prints one line and exits 2."""

    exit_code = 2


class SourceError(MertoolsError):
    """A source checkpoint (HF directory, GGUF file) is missing, corrupt or unsupported."""


class LayoutError(MertoolsError):
    """A layout directory or its manifest is invalid, incomplete or hostile."""


class QuantizationError(MertoolsError, ValueError):
    """A tensor cannot be quantized: bad shape for the block size, NaN or Inf values."""


class ConversionError(MertoolsError):
    """A conversion cannot proceed (existing output, inconsistent shapes, ...)."""


class ExpertReadError(MertoolsError):
    """An expert file could not be read (I/O error, short read) after the bounded retries."""


class ChecksumError(MertoolsError):
    """An expert's bytes do not match the manifest's xxh3: never compute with them."""


class RuntimeConfigError(MertoolsError):
    """A runtime option does not fit the layout or the machine (cache too small, prompt too long...)."""
