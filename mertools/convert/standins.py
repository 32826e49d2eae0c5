"""Low-bit stand-ins: a second, smaller copy of every expert, added to a finished layout.

`convert --standins q2_k` (or `add_standins(layout, "q2_k")`) requantizes each expert tensor from the
layout's own bytes (dequantized to float32, quantized with ggml's reference quantizer of the stand-in type)
and writes one file per (layer, expert) under `standins/<dtype>/`, checksummed like the experts. A tensor
already as small as the stand-in type is copied byte for byte; biases are copied. The runtime computes
with a stand-in when an expert misses and carries little of the token's mixture (runtime/approx.py,
`standin_share`), so a miss reads a fraction of the bytes.

Atomic like the writer: the files go to `standins/<dtype>.partial/`, are renamed into place, and only
then does the manifest (replaced in one rename) name them; an interruption leaves the layout as it was.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial as partial_call
from pathlib import Path

import numpy as np

from ..dtypes import CONVERT_CHOICES, DTYPES, EXPERT_DTYPES
from ..errors import ConversionError
from ..layout.constants import STANDINS_DIR
from ..layout.manifest import ExpertEntry
from ..layout.reader import Layout
from ..layout.writer import AlignedFile, EncodedTensor, standin_path, write_manifest

# block types with a quantizer; floats would not be smaller than the experts they stand in for
STANDIN_CHOICES: tuple[str, ...] = tuple(d for d in CONVERT_CHOICES if d != "auto" and DTYPES[d].block_size > 1)
# with an encoder of its own the caller may write any block type a layout's experts may have
ENCODED_CHOICES: tuple[str, ...] = tuple(d for d in EXPERT_DTYPES if DTYPES[d].block_size > 1)


@dataclass(frozen=True)
class StandinSummary:
    layout: Path
    dtype: str
    files: int
    bytes_out: int
    expert_bytes: int  # the full experts' bytes, for the ratio
    requantized: int  # tensors requantized (the others copied: already as small)
    seconds: float

    @property
    def ratio(self) -> float:
        return self.bytes_out / self.expert_bytes if self.expert_bytes else 0.0


def standin_tensor(raw: np.ndarray, dtype: str, shape: tuple[int, ...], target: str, where: str,
                   encode: Callable[[], np.ndarray] | None = None) -> EncodedTensor:
    """One expert tensor's stand-in: requantized to `target` (or made by `encode`), or its own bytes when already as
    small."""
    src, dst = DTYPES[dtype], DTYPES[target]
    if len(shape) < 2 or src.bits_per_weight <= dst.bits_per_weight:
        return EncodedTensor(raw, dtype, shape)
    if shape[-1] % dst.block_size:
        raise ConversionError(f"{where}: rows of {shape[-1]} weights are not a multiple of {target}'s block of "
                              f"{dst.block_size}; choose a stand-in type with 32-weight blocks (q4_0)")
    if encode is not None:
        return EncodedTensor(encode(), target, shape)
    if src.dequantize is None or dst.quantize is None:
        raise ConversionError(f"{where}: cannot requantize {dtype} to {target}")
    x = src.dequantize(raw).astype(np.float32, copy=False)
    return EncodedTensor(dst.quantize(x), target, shape)


# (an expert tensor's bytes, its dtype, its shape, the stand-in dtype) -> the stand-in's bytes
Encoder = Callable[[np.ndarray, str, tuple[int, ...], str], np.ndarray]


def add_standins(layout_dir: str | Path, dtype: str, *, progress: bool = False, encode: Encoder | None = None
                 ) -> StandinSummary:
    """Write `dtype` stand-ins of every expert of the layout and add them to its manifest (replacing stand-ins
    of another type, whose files are then removed). `encode` makes each requantized tensor's bytes instead of ggml's
    quantizer (benchmarks: a faster, rougher one for checkpoints of tens of GB)."""
    choices = STANDIN_CHOICES if encode is None else ENCODED_CHOICES
    if dtype not in choices:
        raise ValueError(f"stand-in dtype must be one of {', '.join(choices)}, got {dtype!r}")
    t0 = time.perf_counter()
    layout = Layout.open(layout_dir)
    root, m = layout.root, layout.manifest
    old_dirs = {Path(s.file).parts[1] for s in m.standins}  # standins/<dtype>/...
    if dtype in old_dirs:
        raise ConversionError(f"{root}: already carries {dtype} stand-ins")
    final = root / STANDINS_DIR / dtype
    partial = final.with_name(dtype + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # a leftover of an interrupted run: never named by a manifest
    entries: list[ExpertEntry] = []
    requantized = 0
    bar = _bar(len(m.experts), progress)
    try:
        for e in m.experts:
            rel = standin_path(dtype, e.layer, e.expert)
            f = AlignedFile(partial / Path(rel).relative_to(f"{STANDINS_DIR}/{dtype}"))
            try:
                tensors = {}
                for role, t in e.tensors.items():
                    where = f"{root / e.file}: layer {e.layer} expert {e.expert} {role}"
                    raw = layout.read_tensor(e.file, t)
                    made = None if encode is None else partial_call(encode, raw, t.dtype, t.shape, dtype)
                    enc = standin_tensor(raw, t.dtype, t.shape, dtype, where, made)
                    requantized += enc.dtype != t.dtype
                    tensors[role] = f.add(enc)
            finally:
                fe = f.close()
            entries.append(ExpertEntry(e.layer, e.expert, rel, fe.nbytes, fe.xxh3, tensors))
            bar.update(1)
        if final.exists():  # not in the manifest (checked above): a leftover of a run killed before its commit
            shutil.rmtree(final)
        os.replace(partial, final)
        write_manifest(root, replace(m, standins=entries))
    except OSError as e:
        shutil.rmtree(partial, ignore_errors=True)
        raise ConversionError(f"{e.filename or partial}: cannot write stand-ins ({e.strerror or e}); "
                              f"{root} is unchanged") from None
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        bar.close()
    for d in old_dirs - {dtype}:
        shutil.rmtree(root / STANDINS_DIR / d, ignore_errors=True)
    return StandinSummary(root, dtype, len(entries), sum(s.nbytes for s in entries), sum(e.nbytes for e in m.experts),
                          requantized, time.perf_counter() - t0)


def _bar(total: int, show: bool):  # noqa: ANN202 - a tqdm bar
    from tqdm import tqdm

    return tqdm(total=total, unit="expert", desc="stand-ins", disable=not show, leave=False)
