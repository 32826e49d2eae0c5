"""The tables of ggml's iq2_xxs: its grid of 256 points with 8 coordinates and its sign patterns.

Read from `_iq2grid.bin` beside this file: ggml's iq2xxs_grid (256 little-endian uint64 words, a coordinate
a byte) then ksigns_iq2xs (128 bytes), 2,176 bytes written from gguf-py's `gguf.quants.IQ2_XXS` tables. A
file, not gguf-py at import: importing gguf costs every process ~50 ms, and the runtime needs nothing else
from it; tests/test_iq2_xxs.py holds the file equal to gguf-py's tables.

GRID: uint8 (256, 8), grid point g's coordinate j (each one of 8, 25, 43).
GRID_U64: uint64 (256,), the 8 coordinates of point g as one little-endian word (ggml's iq2xxs_grid[g]).
LEVELS: the three coordinate values, GRID_CODES: uint8 (256, 8), each coordinate's level index 0..2.
KSIGNS: uint8 (128,), 7 sign bits -> 8 sign bits with an even number set (bit 7 = parity of the 7).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

TABLES = Path(__file__).with_name("_iq2grid.bin")
LEVELS: tuple[int, int, int] = (8, 25, 43)


def _read() -> tuple[np.ndarray, np.ndarray]:
    raw = np.fromfile(TABLES, dtype=np.uint8)
    if raw.size != 256 * 8 + 128:
        raise ValueError(f"{TABLES}: iq2_xxs tables: expected {256 * 8 + 128} bytes, found {raw.size}")
    return raw[: 256 * 8].reshape(256, 8).copy(), raw[256 * 8 :].copy()


GRID, KSIGNS = _read()
GRID_U64: np.ndarray = GRID.view("<u8").reshape(256).copy()
GRID_CODES: np.ndarray = np.searchsorted(np.array(LEVELS, dtype=np.uint8), GRID).astype(np.uint8)

if not np.isin(GRID, LEVELS).all() or (np.unpackbits(KSIGNS).reshape(-1, 8).sum(axis=1) % 2 == 1).any():
    raise ValueError(f"{TABLES}: iq2_xxs tables: a coordinate not in {LEVELS} or a sign pattern of odd parity")
for _grid in (GRID, GRID_CODES, GRID_U64, KSIGNS):
    _grid.setflags(write=False)
