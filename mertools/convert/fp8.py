"""FP8 checkpoints (DeepSeek-V3 / R1's and Kimi K2's HF releases): float8 e4m3 weights (safetensors F8_E4M3)
with a float32 `<name>_scale_inv` per block of `weight_block_size` (128 x 128) beside each, the weight being
e4m3 value x its block's scale (transformers' _dequantize_fp8_weight). Layouts do not hold FP8: a weight is
dequantized to float32 on reading and converted to the `--dtype` asked for."""

from __future__ import annotations

import numpy as np


def _e4m3_table() -> np.ndarray:
    """The 256 e4m3fn values as float32: sign, 4 exponent bits (bias 7), 3 mantissa bits; exponent 0 is
    subnormal (m / 8 x 2^-6); 0x7f / 0xff are NaN, and there is no infinity."""
    b = np.arange(256)
    exp, man = (b >> 3) & 15, b & 7
    mag = np.where(exp == 0, man / 8 * 2.0 ** -6, (1 + man / 8) * 2.0 ** (exp - 7))
    out = np.where(b & 0x80, -mag, mag).astype(np.float32)
    out[(exp == 15) & (man == 7)] = np.nan
    out.flags.writeable = False
    return out


E4M3 = _e4m3_table()


def dequantize_fp8(q: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int], where: str) -> np.ndarray:
    """e4m3 bytes (rows, cols) and per-block scales (ceil(rows / bn), ceil(cols / bk)) -> float32 (rows, cols)."""
    rows, cols = q.shape
    bn, bk = block
    want = (-(-rows // bn), -(-cols // bk))
    if scale_inv.shape != want:
        raise ValueError(f"{where}: scales of shape {list(scale_inv.shape)} for a [{rows}, {cols}] FP8 weight in "
                         f"{bn}x{bk} blocks, expected {list(want)}")
    scale = np.repeat(np.repeat(scale_inv.astype(np.float32), bn, axis=0)[:rows], bk, axis=1)[:, :cols]
    return E4M3[q] * scale
