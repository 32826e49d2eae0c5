"""The tables of ggml's iq2_xxs: its grid of 256 points with 8 coordinates and its sign patterns.

Taken from gguf-py (a core dependency) rather than copied: `gguf.quants.IQ2_XXS` holds ggml's iq2xxs_grid
packed two bits a byte (0x08, 0x19, 0x2b) and ksigns_iq2xs. Everything here is numpy built once at import.

GRID: uint8 (256, 8), grid point g's coordinate j (each one of 8, 25, 43).
GRID_U64: uint64 (256,), the 8 coordinates of point g as one little-endian word (ggml's iq2xxs_grid[g]).
LEVELS: the three coordinate values, GRID_CODES: uint8 (256, 8), each coordinate's level index 0..2.
KSIGNS: uint8 (128,), 7 sign bits -> 8 sign bits with an even number set (bit 7 = parity of the 7).
"""

from __future__ import annotations

import numpy as np
from gguf.quants import IQ2_XXS as _GGUF

LEVELS: tuple[int, int, int] = tuple(int(v) for v in _GGUF.grid_map)  # type: ignore[assignment]


def _grid_codes() -> np.ndarray:
    hexed = np.frombuffer(_GGUF.grid_hex, dtype=np.uint8).reshape(-1, 2)
    nibbles = np.where(hexed > 0x40, hexed + 9, hexed) & 0x0F
    packed = (nibbles[:, 0] << 4) | nibbles[:, 1]  # one byte: 4 coordinates, 2 bits each, lowest first
    codes = (packed.reshape(-1, 1) >> np.array([0, 2, 4, 6], dtype=np.uint8)) & 3
    return codes.reshape(_GGUF.grid_shape).astype(np.uint8)


GRID_CODES: np.ndarray = _grid_codes()
GRID: np.ndarray = np.array(LEVELS, dtype=np.uint8)[GRID_CODES]
GRID_U64: np.ndarray = np.ascontiguousarray(GRID).view("<u8").reshape(256).copy()
KSIGNS: np.ndarray = np.frombuffer(_GGUF.ksigns, dtype=np.uint8).copy()

if GRID.shape != (256, 8) or KSIGNS.shape != (128,) or not (GRID_CODES < 3).all():
    raise ValueError(f"gguf-py's iq2_xxs tables have an unexpected shape: grid {GRID.shape}, signs {KSIGNS.shape}")
for _grid in (GRID, GRID_CODES, GRID_U64, KSIGNS):
    _grid.setflags(write=False)
