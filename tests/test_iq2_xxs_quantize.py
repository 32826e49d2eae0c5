"""The IQ2_XXS quantizer (dtypes/_iq2_quant.py): ggml's quantize_iq2_xxs bit for bit.

numba == its numpy twin on data aimed at the C code's branches; both == SHA-256 of ggml's own output
(tests/data/ggml_quant_sha256.json, keys "<kind>/iq2_xxs" with all-ones importance and
"<kind>/iq2_xxs+imatrix" with det_importance, written by `python -m fixtures.ggml_oracle --write-sha`);
a live comparison with ggml when libggml is at hand (never in CI); the search tables against their
definition; round-trip error at ggml's level; importance; and the input checks.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants

from fixtures import ggml_oracle
from fixtures.ggml_oracle import det_data, det_importance
from mertools.dtypes import _iq2_quant as Q
from mertools.dtypes._iq2_quant_ref import KMAP_SIZE, search_tables
from mertools.dtypes._iq2grid import GRID_CODES
from mertools.errors import QuantizationError

F32 = np.float32
SHA = json.loads((Path(__file__).parent / "data" / "ggml_quant_sha256.json").read_text())
# measured on ggml's own bytes (libggml-base 0.3.36): sqrt(sum diff^2)/n on test-quantize-fns' cos data is
# 0.00739-0.00741 (its 2-bit limit is 0.0075); relative RMSE on N(0,1) rows is 0.344 with all-ones importance
GGML_COS_ERROR = 0.0075
GGML_GAUSS_REL_RMSE = 0.35


def both(x: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """Quantize with numba and with the numpy twin, check they agree: uint8 (n_blocks, 66)."""
    ours = Q.quantize(x, importance)
    np.testing.assert_array_equal(ours, Q.quantize_reference(x, importance))
    return ours.reshape(-1, 66)


def sha(b: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(b).tobytes()).hexdigest()


def dequant(raw: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return quants.dequantize(np.asarray(raw).reshape(-1), T.IQ2_XXS).reshape(shape)


def branch_blocks(seed: int = 3) -> np.ndarray:
    """float32 (n, 256): super-blocks aimed at the quantizer's branches."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal(256).astype(F32)
    rows = [np.zeros(256, F32), np.full(256, F32(-0.0)), g, -np.abs(g), np.abs(g)]
    for fill in (0.0, -0.0, 1e-16, 0.7):  # some 32-groups zero, below GROUP_MAX_EPS, or constant
        r = g.copy()
        r[32:96] = F32(fill)
        rows.append(r)
    r = np.zeros(256, F32)
    r[::37] = F32(2.5)  # a few non-zeros: most 8-weight groups empty
    rows.append(r)
    r = np.zeros(256, F32)
    r[5] = F32(-3.0)  # one negative: the parity flip lands on a zero
    rows.append(r)
    rows.append((rng.integers(-2, 3, 256) * F32(0.5)).astype(F32))  # few levels: ties in the searches
    rows.append(np.where(rng.random(256) < 0.03, F32(40.0), F32(0.1)) * np.sign(g))  # outliers
    for m in (1e-20, 1e-30, 1e-39, 1e-44, 1e6, 1e12):  # x*x underflows to 0 (then every weight is 0) .. large
        rows.append((g * m).astype(F32))
    rows.append(np.repeat(rng.standard_normal(32), 8).astype(F32))  # constant 8-weight groups
    return np.stack(rows).astype(F32)


def test_tables_are_ggmls_definition() -> None:
    t = search_tables()
    u = (GRID_CODES.astype(np.int64) << (2 * np.arange(8))).sum(axis=1)
    assert (t.kmap[u] == np.arange(256)).all() and (t.kmap >= 0).sum() == 256
    rng = np.random.default_rng(0)
    for v in rng.integers(0, 3, (300, 8)):  # off-grid points: every grid point at the two smallest distances
        k = t.kmap[(v << (2 * np.arange(8))).sum()]
        if k >= 0:
            continue
        n = t.neighbours[-k - 1]
        lst = t.neighbours[-k: -k + n].astype(np.int64)
        d2 = ((2 * GRID_CODES.astype(np.int64) + 1 - (2 * v + 1)) ** 2).sum(axis=1)
        levels = np.unique(d2)[:2]
        assert list(lst) == sorted(np.flatnonzero(d2 <= levels[-1]), key=lambda j: (d2[j], j))
    k3, loff, lcnt, lc, _ = Q.kernel_tables()  # the kernel's layout holds the same lists
    assert k3.size == 3**8 and KMAP_SIZE == 43692
    pow3 = 3 ** np.arange(8)
    for m in range(0, lcnt.size, 97):
        n, n16 = lcnt[m], (lcnt[m] + 15) & ~15
        blk = lc[9 * loff[m]: 9 * (loff[m] + n16)].reshape(9, n16)
        (point,) = np.flatnonzero(k3 == -(m + 1))
        v = (point // pow3) % 3
        assert list(blk[8, :n]) == list(t.neighbours[-t.kmap[(v << (2 * np.arange(8))).sum()]:][:n])
        assert (blk[:8, :n].T == GRID_CODES[blk[8, :n]]).all()


def test_branch_blocks_numba_matches_numpy() -> None:
    x = branch_blocks()
    rng = np.random.default_rng(1)
    for imp in (None, rng.exponential(1.0, 256).astype(F32), np.where(rng.random(256) < 0.2, 0, 1).astype(F32)):
        out = both(x, imp)
        assert not out[:2].any()  # zero blocks: d = 0 and every byte 0
    assert not both(x, np.zeros(256, F32)).any()  # all weights 0: every group is skipped


def test_random_numba_matches_numpy_and_shapes() -> None:
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((3, 256 * 13)) * np.exp(rng.uniform(-3, 3, (3, 1)))).astype(F32)  # 39 blocks: partial chunks
    imp = np.exp(rng.normal(0, 1.5, 256 * 13)).astype(F32)
    out = both(x, imp)
    assert out.shape == (39, 66)
    rows = [Q.quantize(x[r], imp) for r in range(3)]  # the same importance for every row
    np.testing.assert_array_equal(np.concatenate(rows), out.reshape(-1))
    np.testing.assert_array_equal(Q.quantize(x), Q.quantize(x, np.ones(x.shape[1], F32)))  # None: all ones
    assert Q.quantize(np.zeros((0, 512), F32)).shape == (0,)


@pytest.mark.parametrize("kind", ["uniform", "heavy"])
def test_matches_ggml_digests(kind: str) -> None:
    x = det_data(1 << 16, kind).reshape(16, -1)
    for suffix, imp in (("", None), ("+imatrix", det_importance(x.shape[1]))):
        out = Q.quantize(x, imp)
        assert sha(out) == SHA[f"{kind}/iq2_xxs{suffix}"]
        np.testing.assert_array_equal(Q.quantize_reference(x[:1], imp), out[: 16 * 66])


def test_overflow_raises_where_ggml_aborts() -> None:
    # det_data "blockscale" reaches 2^120: x*x overflows and ggml aborts ("point not on grid"); so do we
    x = det_data(1 << 16, "blockscale").reshape(-1, 256)
    for f in (Q.quantize, Q.quantize_reference):
        with pytest.raises(QuantizationError, match="overflows float32"):
            f(x[4:8].reshape(-1))


@pytest.mark.skipif(not ggml_oracle.available(), reason="no libggml-base (a development machine only)")
def test_live_ggml() -> None:
    rng = np.random.default_rng()
    x = rng.standard_normal((24, 2048)) * np.exp(rng.uniform(-5, 5, (24, 1)))
    x[8:16] *= np.where(rng.random((8, 2048)) < 0.02, 100.0, 1.0)  # outliers
    x = x.reshape(24, -1, 256)
    x[16:, ::3] = 0.0  # all-zero super-blocks
    x = x.reshape(24, 2048).astype(F32)
    for imp in (np.ones(2048, F32), np.exp(rng.normal(0, 2, 2048)).astype(F32)):
        np.testing.assert_array_equal(Q.quantize(x, imp), ggml_oracle.quantize(x, int(T.IQ2_XXS), imp).reshape(-1))


def test_round_trip_error_at_ggmls_level() -> None:
    for offset in (0.0, 0.5, 7.5):  # tests/test-quantize-fns.cpp's data
        x = (0.1 + 2 * np.cos(np.arange(4096, dtype=np.float64) + offset)).astype(F32)
        y = dequant(Q.quantize(x), x.shape)
        assert np.sqrt(np.sum((y.astype(np.float64) - x) ** 2)) / x.size < GGML_COS_ERROR
    x = np.random.default_rng(0).standard_normal((16, 4096)).astype(F32)
    e = dequant(Q.quantize(x), x.shape).astype(np.float64) - x
    rel = np.sqrt(np.mean(e**2) / np.mean(x.astype(np.float64) ** 2))
    assert 0.3 < rel < GGML_GAUSS_REL_RMSE, rel


def test_importance_favours_its_columns() -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((32, 1024)).astype(F32)
    heavy = np.arange(1024) % 8 == 3
    imp = np.where(heavy, F32(100.0), F32(1.0)).astype(F32)
    err_plain = (dequant(Q.quantize(x), x.shape) - x) ** 2
    err_imp = (dequant(Q.quantize(x, imp), x.shape) - x) ** 2
    # the weighted columns reconstruct much better, the others pay for it
    assert err_imp[:, heavy].mean() < 0.6 * err_plain[:, heavy].mean()
    assert err_imp[:, ~heavy].mean() > err_plain[:, ~heavy].mean()
    # a power-of-two scale of the importance scales every product exactly: the same bytes
    np.testing.assert_array_equal(Q.quantize(x, imp * F32(4.0)), Q.quantize(x, imp))


@pytest.mark.parametrize(
    ("x", "imp", "match"),
    [
        (np.zeros(300, F32), None, r"multiple of 256, got 300"),
        (np.zeros((2, 100), F32), None, r"multiple of 256, got 100"),
        (np.zeros((2, 2, 256), F32), None, r"shape \(rows, cols\) or \(n,\), got shape \(2, 2, 256\)"),
        (np.zeros(256, np.int32), None, r"float32 weights, got dtype int32"),
        (np.array([0.0] * 255 + [np.nan], F32), None, r"finite weights, got nan at flat index 255"),
        (np.array([np.inf] + [0.0] * 255, F32), None, r"finite weights, got inf at flat index 0"),
        (np.zeros((2, 256), F32), np.ones(512, F32), r"importance of shape \(256,\) \(one per column\), got \(512,\)"),
        (np.zeros((2, 256), F32), np.ones((2, 256), F32), r"importance of shape \(256,\).*got \(2, 256\)"),
        (np.zeros(256, F32), -np.ones(256, F32), r"finite importance >= 0, got -1.0 at column 0"),
        (np.zeros(256, F32), np.r_[np.ones(9), np.nan, np.ones(246)].astype(F32), r"got nan at column 9"),
        (np.zeros(256, F32), np.array(["a"] * 256), r"float32 importance vector, got dtype <U1"),
    ],
)
def test_bad_input(x: np.ndarray, imp: np.ndarray | None, match: str) -> None:
    for f in (Q.quantize, Q.quantize_reference):
        with pytest.raises(ValueError, match=match):
            f(x, imp)
