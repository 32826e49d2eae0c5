"""Guesses beyond the next layer (prefetch depth > 1) on a real layout: read while the disk is idle, never a change
to the results."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mertools.convert.pipeline import ConvertOptions, convert
from mertools.errors import RuntimeConfigError
from mertools.layout import Layout
from mertools.runtime.engine import Engine

TRAINED = Path(__file__).resolve().parent.parent / "fixtures" / "trained" / "tiny-shakespeare-moe"  # 4 layers
PROMPT = [1, 45, 300, 22, 17, 99, 250, 3]
DECODE = [7, 400, 12, 88, 5, 260, 31, 77, 1000, 64, 9, 530, 18, 2000, 41, 600]


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert(TRAINED, tmp_path_factory.mktemp("ahead") / "q4_0", ConvertOptions(dtype="q4_0", progress=False)).out


def _decode(layout: Path, depth: int, slots: int) -> tuple[np.ndarray, dict]:
    slot_mb = max(e.nbytes for e in Layout.open(layout).manifest.experts) / 2**20
    with Engine.open(layout, cache_mb=slots * slot_mb, prefetch_depth=depth, kv_dtype="f32") as eng:
        out = [eng.forward(PROMPT)]
        out += [eng.forward([t]) for t in DECODE]
        return np.concatenate(out), eng.stats()


def test_guesses_ahead_are_read_while_idle_and_change_no_result(layout: Path) -> None:
    want, near = _decode(layout, 1, 12)  # 12 of the 32 experts
    got, deep = _decode(layout, 3, 12)
    np.testing.assert_array_equal(got, want)
    assert near["prefetch_ahead"] == 0 and near["prefetch_depth"] == 1
    assert deep["prefetch_ahead"] > 0 and deep["prefetch_depth"] == 3
    assert deep["prefetch_ahead"] <= deep["prefetch_issued"]  # counted among the prefetches
    # a cache that holds every expert never looks ahead (nothing to evict, nothing to guess for)
    _, full = _decode(layout, 3, 32)
    assert full["prefetch_ahead"] == 0


def test_a_depth_below_one_is_refused(layout: Path) -> None:
    for prefetch in ("lookahead", "markov"):  # refused before anything loads, whichever prefetcher would use it
        with pytest.raises(RuntimeConfigError, match="prefetch depth must be at least 1, got 0"):
            Engine.open(layout, prefetch=prefetch, prefetch_depth=0)
