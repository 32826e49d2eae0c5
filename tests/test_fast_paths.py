"""The decode step's shortcuts around per-call Python (checked-once weights, cached rotary angles, a one-token
prefetch guess, the layout's own RMS norm) give exactly the bits of the general paths they skip."""

from __future__ import annotations

import numpy as np
import pytest

from mertools import dtypes as registry
from mertools.errors import QuantizationError
from mertools.families import pieces
from mertools.kernels import quantize
from mertools.kernels.matmul import layout_weight, matmul, swiglu_expert, swiglu_weights, weight
from mertools.layout.config import ModelConfig
from mertools.runtime.ops import rms_norm
from mertools.runtime.prefetch import LookaheadPrefetcher

DTYPES = [d for d, t in registry.DTYPES.items() if t.quantize is not None and 256 % t.block_size == 0]


def _w(dtype: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng([seed, rows, cols])
    return quantize((rng.standard_normal((rows, cols)) * 0.05).astype(np.float32), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_checked_weights_give_matmuls_bits(dtype: str) -> None:
    rows, cols = 40, 256
    raw = _w(dtype, rows, cols)
    for n in (1, 2, 4, 7, 17):
        x = np.random.default_rng(n).standard_normal((n, cols)).astype(np.float32)
        want = matmul(x, raw, dtype, rows, cols)
        np.testing.assert_array_equal(weight(raw, dtype, rows, cols)(x), want)
        np.testing.assert_array_equal(layout_weight(raw.reshape(-1), dtype, rows, cols)(x), want)
    w = weight(raw, dtype, rows, cols)
    np.testing.assert_array_equal(w(x[:1].astype(np.float64)), matmul(x[:1], raw, dtype, rows, cols))  # converted
    with pytest.raises(QuantizationError, match=r"x must be \(n, 256\)"):  # anything odd gets matmul's checks
        w(np.zeros((1, 128), np.float32))
    with pytest.raises(QuantizationError, match="needs"):
        weight(raw[:-1], dtype, rows, cols)


@pytest.mark.parametrize("dtype", ["q4_0", "q4_k", "q8_0", "f16"])
@pytest.mark.parametrize("n", [1, 3])
def test_checked_swiglu_gives_swiglu_experts_bits(dtype: str, n: int) -> None:
    d_model, d_ff = 256, 512
    g, u, d = _w(dtype, d_ff, d_model, 1), _w(dtype, d_ff, d_model, 2), _w(dtype, d_model, d_ff, 3)
    x = np.random.default_rng(4).standard_normal((n, d_model)).astype(np.float32)
    want = swiglu_expert(x, g, u, d, dtype, dtype, dtype, d_ff, d_model)
    got = swiglu_weights(x, weight(g, dtype, d_ff, d_model), weight(u, dtype, d_ff, d_model), weight(d, dtype, d_model, d_ff))
    np.testing.assert_array_equal(got, want)


def test_rms_norm_is_numpys_mean_bit_for_bit() -> None:
    rng = np.random.default_rng(5)
    for shape in ((1, 256), (7, 4096), (3, 2, 64)):
        x = (rng.standard_normal(shape) * rng.uniform(1e-3, 1e3)).astype(np.float32)
        w = rng.standard_normal(shape[-1]).astype(np.float32)
        var = np.mean(x * x, axis=-1, keepdims=True, dtype=np.float32)
        np.testing.assert_array_equal(rms_norm(x, w, 1e-5), (x / np.sqrt(var + np.float32(1e-5))) * w)


def _rotary_uncached(cfg: ModelConfig, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
    rd, half = cfg.rotary_dim, cfg.rotary_dim // 2
    ang = pos[:, None].astype(np.float64) * pieces._inv_freq(cfg.rope_theta, rd, None)[None, :]
    cos, sin = np.cos(ang).astype(x.dtype)[:, None, :], np.sin(ang).astype(x.dtype)[:, None, :]
    x1, x2 = x[..., :half], x[..., half:rd]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., rd:]], axis=-1)


def test_cached_rotary_angles_are_the_same_numbers() -> None:
    cfg = ModelConfig(arch="mixtral", vocab_size=64, d_model=64, d_ff=64, n_layers=1, n_heads=2, n_kv_heads=1,
                      head_dim=32, n_experts=2, n_experts_used=1, context_length=512, rope_dim=16)
    rng = np.random.default_rng(6)
    for dtype in (np.float32, np.float64):  # the runtime's and the reference's, cached apart
        for pos in (np.array([0]), np.array([7]), np.arange(5, 12), np.array([7])):
            x = rng.standard_normal((len(pos), 2, 32)).astype(dtype)
            got = pieces.rotary(cfg, x, pos)
            assert got.dtype == dtype
            np.testing.assert_array_equal(got, _rotary_uncached(cfg, x, pos))


def test_one_tokens_guess_is_the_unions() -> None:
    """The lookahead guess of one token (its top choices, best first) is what the batch rule (each token's top
    choices, ordered by summed probability) gives for one row, ties and zeros included."""
    rng = np.random.default_rng(7)
    for trial in range(200):
        probs = rng.dirichlet(np.ones(16), 1)
        if trial % 3 == 0:
            probs[0, rng.integers(0, 16, 4)] = 0.0  # experts a sigmoid router rules out
        if trial % 5 == 0:
            probs[0, :4] = probs[0, 4]  # exact ties: the lower index first
        pf = LookaheadPrefetcher(lambda layer, h, p=probs: p, n_layers=4, extra=trial % 3)
        got = pf.guess(0, np.zeros((1, 2), np.int64), np.zeros((1, 8), np.float32), 2)
        want_n = 2 + trial % 3
        order = np.argsort(-probs, axis=1, kind="stable")[:, :want_n]
        score = np.zeros(16)
        np.add.at(score, order.ravel(), np.take_along_axis(probs, order, axis=1).ravel())
        assert got == [int(e) for e in np.argsort(-score, kind="stable") if score[e] > 0]
