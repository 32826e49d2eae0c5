"""matmul / get_rows / swiglu_expert (numba) against the numpy reference (dequantize, float64 products)."""

from __future__ import annotations

import itertools
import threading
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from cpu_target import HASWELL, run_for_cpu
from hypothesis import given, settings
from hypothesis import strategies as st

from mertools import dtypes as registry
from mertools.errors import QuantizationError
from mertools.kernels import common, dequantize, dispatch, gemm_kernels, quantize
from mertools.kernels import matmul as matmul_mod
from mertools.kernels import matmul_reference as ref
from mertools.kernels.matmul import get_rows, matmul, swiglu_expert

DTYPES = tuple(registry.DTYPES)
BLOCK = {d: t.block_size for d, t in registry.DTYPES.items()}
NS = (1, 2, 7, 17, 64)  # 1: the matvec; 2: a matvec per input; 7: the tiled kernel; 17, 64: the GEMM (16 inputs per vector)
# (rows, cols): the tiny fixture's matrices, then rows that are no multiple of the 4-row blocking or
# of the 16-row tile, and widths that leave a partial 512-column tile
SHAPES = [(512, 256), (256, 512), (256, 256), (128, 256), (37, 512), (131, 768), (3, 256), (21, 1280)]
SHAPES_32 = [(19, 352), (45, 1056)]  # types with blocks of at most 32 (not multiples of 256)
SHAPES_1 = [(13, 100), (29, 531)]  # float types only (not multiples of 16 or 32)
TOL = 1e-4  # |ours - reference| <= TOL * (|x| @ |W|.T), elementwise


@lru_cache(maxsize=256)
def weight(dtype: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Raw bytes uint8 (rows, row_bytes) of random weights whose rows have different scales."""
    rng = np.random.default_rng([seed, rows, cols, DTYPES.index(dtype)])
    if registry.DTYPES[dtype].quantize is None:  # a type layouts only copy: random blocks, scales by row
        return random_blocks(dtype, rows, cols, rng, np.exp(rng.uniform(-3, 0, (rows, 1))))
    w = rng.standard_normal((rows, cols)).astype(np.float32) * np.exp(rng.uniform(-3, 0, (rows, 1))).astype(np.float32)
    return quantize(w, dtype)


def random_blocks(dtype: str, rows: int, cols: int, rng: np.random.Generator, row_scale: np.ndarray) -> np.ndarray:
    """uint8 (rows, row_bytes) of random bytes whose f16 scales are ordinary: ~1e-3 * row_scale (rows, 1)."""
    t = registry.DTYPES[dtype]
    nb = cols // t.block_size
    raw = rng.integers(0, 256, (rows, nb, t.type_size), dtype=np.uint8)
    for o in t.scale_offsets:
        if t.scale_format == "e8m0":  # an exponent byte: weights up to 12 * 2^(e-128), ~1e-3 * row_scale
            raw[:, :, o] = np.clip(np.round(np.log2(1e-4 * row_scale)) + 128 + rng.integers(-2, 1, (rows, nb)), 1, 250)
            continue
        d = (rng.uniform(-1e-3, 1e-3, (rows, nb)) * row_scale).astype("<f2")
        raw[:, :, o : o + 2] = d.view(np.uint8).reshape(rows, nb, 2)
    return raw.reshape(rows, nb * t.type_size)


def inputs(n: int, cols: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng([seed, n, cols]).standard_normal((n, cols)).astype(np.float32)


def check(x: np.ndarray, w: np.ndarray, dtype: str, rows: int, cols: int, y: np.ndarray) -> None:
    assert y.shape == (x.shape[0], rows) and y.dtype == np.float32
    expected = ref.matmul(x, w, dtype, rows, cols)
    bound = TOL * ref.abs_matmul(x, w, dtype, rows, cols)
    excess = np.abs(y - expected) - bound
    assert (excess <= 0).all(), f"{dtype} ({rows}, {cols}) n={x.shape[0]}: worst excess {excess.max():.3g}"


def cases() -> list[tuple[str, int, int]]:
    out = [(d, r, c) for d in DTYPES for r, c in SHAPES]
    out += [(d, r, c) for d in DTYPES if 32 % BLOCK[d] == 0 for r, c in SHAPES_32]
    out += [(d, r, c) for d in DTYPES if BLOCK[d] == 1 for r, c in SHAPES_1]
    return out


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize(("dtype", "rows", "cols"), cases())
def test_matmul_matches_reference(dtype: str, rows: int, cols: int, n: int) -> None:
    w = weight(dtype, rows, cols)
    x = inputs(n, cols)
    check(x, w, dtype, rows, cols, matmul(x, w, dtype, rows, cols))


@pytest.mark.parametrize("n", [1, 3, 16, 70])
@pytest.mark.parametrize("dtype", DTYPES)
def test_mixtral_widths(dtype: str, n: int) -> None:
    """Long rows (4096 and 14336 columns) accumulate many blocks."""
    for rows, cols in ((40, 4096), (9, 14336)):
        w = weight(dtype, rows, cols)
        x = inputs(n, cols)
        check(x, w, dtype, rows, cols, matmul(x, w, dtype, rows, cols))


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(DTYPES), st.integers(1, 40), st.integers(1, 5), st.integers(1, 9), st.integers(0, 2**32 - 1))
def test_property_random_shapes(dtype: str, rows: int, blocks: int, n: int, seed: int) -> None:
    cols = blocks * (BLOCK[dtype] if BLOCK[dtype] > 1 else 37)
    w = weight(dtype, rows, cols, seed)
    x = inputs(n, cols, seed)
    check(x, w, dtype, rows, cols, matmul(x, w, dtype, rows, cols))


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_inputs_and_zero_blocks(dtype: str) -> None:
    rows, cols = 24, 768
    w = weight(dtype, rows, cols)
    for n in (1, 5):
        assert not matmul(np.zeros((n, cols), np.float32), w, dtype, rows, cols).any()
    # zero weights (all-zero blocks, d = 0) give exactly zero; a few zero blocks in real rows are fine
    copied = registry.DTYPES[dtype].quantize is None  # a type layouts only copy: zero bytes are zero blocks
    w0 = np.zeros_like(w) if copied else quantize(np.zeros((rows, cols), np.float32), dtype)
    for n in (1, 5):
        assert not matmul(inputs(n, cols), w0, dtype, rows, cols).any()
    if copied:
        wz = w.copy()
        wz[::3, : registry.DTYPES[dtype].row_bytes(256)] = 0
    else:
        dense = dequantize(w, dtype, (rows, cols))
        dense[::3, :256] = 0.0
        wz = quantize(dense, dtype)
    for n in (1, 5):
        x = inputs(n, cols)
        check(x, wz, dtype, rows, cols, matmul(x, wz, dtype, rows, cols))


KIND = registry.KIND
BYTES = {d: t.type_size for d, t in registry.DTYPES.items()}


def same_floats(a: np.ndarray, b: np.ndarray) -> None:
    """Bit-equal, except that a NaN may differ in payload (x86 quiets signalling NaNs)."""
    nan = np.isnan(a)
    np.testing.assert_array_equal(nan, np.isnan(b))
    np.testing.assert_array_equal(a[~nan].view(np.uint32), b[~nan].view(np.uint32))


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_tile_is_dequantize_on_random_bytes(dtype: str) -> None:
    """The prefill tile is the reference weight bit for bit, scales of every kind (inf, NaN) included."""
    rows, cols = 20, 1280  # 2 tiles of rows (the second partial), 3 of columns (the last partial)
    raw = np.random.default_rng(DTYPES.index(dtype)).integers(0, 256, (rows, cols // BLOCK[dtype] * BYTES[dtype]))
    raw = raw.astype(np.uint8)
    if dtype == "f32":  # random bytes are mostly ordinary floats; plant inf and NaN
        raw.view(np.float32)[:2, :3] = [[np.inf, -np.inf, np.nan], [0.0, -0.0, 1e-45]]
    full = dequantize(raw, dtype, (rows, cols))
    buf = np.full((common.RB, common.KC), np.nan, np.float32)
    for r0 in range(0, rows, common.RB):
        rb = min(common.RB, rows - r0)
        for k0 in range(0, cols, common.KC):
            kc = min(common.KC, cols - k0)
            dispatch.decode_tile(KIND[dtype], raw, r0, rb, k0, kc, buf)
            same_floats(buf[:rb, :kc], full[r0 : r0 + rb, k0 : k0 + kc])


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_weights_propagate(dtype: str, n: int) -> None:
    """fastmath here keeps inf/NaN semantics: a row with an inf or NaN weight gives what numpy gives."""
    rows, cols = 6, 512
    w = weight(dtype, rows, cols).copy()
    half = {"inf": 0x7C00, "-inf": 0xFC00, "nan": 0x7E00}
    t = registry.DTYPES[dtype]
    if t.float_dtype:
        vals = t.floats(w).reshape(rows, cols)
        vals[0, 5], vals[1, 7], vals[2, 9], vals[2, 10] = np.inf, np.nan, np.inf, -np.inf
        w = np.asarray(t.quantize(vals.reshape(-1))).reshape(rows, -1)  # a float type's quantize keeps inf/NaN
    elif t.scale_format == "e8m0":  # no exponent byte is NaN: 2^126 times table values >= 8 overflow to inf
        for r in range(3):
            w[r, BYTES[dtype] + t.scale_offsets[0]] = 254
            w[r, BYTES[dtype] + 1 : BYTES[dtype] + 17] |= 0x77  # every weight of the block is 12 or -12
    else:  # the (first) scale of the second block of rows 0-2
        o = BYTES[dtype] + registry.DTYPES[dtype].scale_offsets[0]
        for r, h in enumerate(half.values()):
            w[r, o : o + 2] = [h & 0xFF, h >> 8]
    x = inputs(n, cols)
    got = matmul(x, w, dtype, rows, cols)
    with np.errstate(invalid="ignore"):  # inf - inf
        expected = ref.matmul(x, w, dtype, rows, cols)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    np.testing.assert_array_equal(np.isposinf(got), np.isposinf(expected))
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(expected))
    assert not np.isfinite(expected[:, :3]).any() and np.isfinite(expected[:, 3:]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_out_and_input_forms(dtype: str) -> None:
    rows, cols = 37, 512
    w = weight(dtype, rows, cols)
    x = inputs(7, cols)
    expected = matmul(x, w, dtype, rows, cols)
    out = np.full((7, rows), np.nan, np.float32)
    assert matmul(x, w, dtype, rows, cols, out=out) is out
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(matmul(x, w.reshape(-1), dtype, rows, cols), expected)  # flat bytes
    # float64 and non-contiguous x are converted
    np.testing.assert_array_equal(matmul(x.astype(np.float64), w, dtype, rows, cols), expected)
    wide = np.zeros((7, 2 * cols), np.float32)
    wide[:, ::2] = x
    np.testing.assert_array_equal(matmul(wide[:, ::2], w, dtype, rows, cols), expected)
    # every single row of x agrees with the n == 1 path (the matvec) within the tolerance
    for i in (0, 6):
        check(x[i : i + 1], w, dtype, rows, cols, matmul(x[i : i + 1], w, dtype, rows, cols))
    assert matmul(np.zeros((0, cols), np.float32), w, dtype, rows, cols).shape == (0, rows)


def test_errors_name_dtype_and_shapes() -> None:
    w = weight("q4_0", 8, 256)
    x = inputs(2, 256)
    with pytest.raises(QuantizationError, match=r"q4_0 weight \(9, 256\) needs 1296 bytes"):
        matmul(x, w, "q4_0", 9, 256)
    with pytest.raises(QuantizationError, match=r"q4_k weight \(8, 288\) needs cols to be a multiple of 256"):
        matmul(inputs(2, 288), np.zeros((8, 162), np.uint8), "q4_k", 8, 288)
    with pytest.raises(QuantizationError, match=r"x must be \(n, 256\).*q4_0 weight \(8, 256\), got \(2, 255\)"):
        matmul(inputs(2, 255), w, "q4_0", 8, 256)
    with pytest.raises(QuantizationError, match=r"x must be"):
        matmul(x[0], w, "q4_0", 8, 256)  # 1-D x
    with pytest.raises(QuantizationError, match="unknown dtype 'iq2_xs'"):
        matmul(x, w, "iq2_xs", 8, 256)
    with pytest.raises(QuantizationError, match="must be uint8"):
        matmul(x, w.view(np.int8), "q4_0", 8, 256)
    with pytest.raises(QuantizationError, match=r"out must be float32 C-contiguous \(2, 8\)"):
        matmul(x, w, "q4_0", 8, 256, out=np.empty((2, 9), np.float32))
    with pytest.raises(QuantizationError, match="out must be"):
        matmul(x, w, "q4_0", 8, 256, out=np.empty((2, 8), np.float64))
    mem = np.zeros(2 * 256 + 8, np.float32)
    with pytest.raises(QuantizationError, match="must not overlap x"):
        matmul(mem[:512].reshape(2, 256), w, "q4_0", 8, 256, out=mem[504:520].reshape(2, 8))
    with pytest.raises(QuantizationError, match=r"get_rows: .* not whole q4_0 rows of 256"):
        get_rows(w.reshape(-1)[:-1], "q4_0", np.array([0]), 256)
    with pytest.raises(QuantizationError, match="get_rows: ids must be integers"):
        get_rows(w, "q4_0", np.array([0.5]), 256)


def test_worker_thread_and_concurrent_calls() -> None:
    rows, cols = 300, 1024
    cases_ = [(d, weight(d, rows, cols), inputs(n, cols)) for d in DTYPES for n in (1, 9)]
    expected = [matmul(x, w, d, rows, cols) for d, w, x in cases_]
    results: dict[int, list[np.ndarray]] = {}
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            results[k] = [matmul(x, w, d, rows, cols) for _ in range(3) for d, w, x in cases_]
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for k in range(3):
        for j, y in enumerate(results[k]):
            np.testing.assert_array_equal(y, expected[j % len(cases_)])


def test_kernels_are_nogil_and_parallel() -> None:
    from mertools.kernels import matmul as api

    kernels = [api._mv.matvec, api._mv.matvec_rows, api._mv.matvec_swiglu, api._k.matmul_tiled, api._g.matmul_gemm]
    for k in kernels:
        assert k.targetoptions["nogil"] and k.targetoptions["parallel"], k


def test_prefill_releases_the_gil() -> None:
    """While one long kernel call runs in a worker, the main thread keeps executing Python."""
    rows, cols, n = 4096, 4096, 512
    w = weight("q8_0", rows, cols)
    x = inputs(n, cols)
    matmul(x[:2], w, "q8_0", rows, cols)  # compiled / loaded from cache before timing
    span: list[float] = []
    done = threading.Event()

    def work() -> None:
        t0 = time.perf_counter()
        matmul(x, w, "q8_0", rows, cols)
        span.extend((t0, time.perf_counter()))
        done.set()

    ticks: list[float] = []
    worker = threading.Thread(target=work)
    worker.start()
    while not done.is_set():
        ticks.append(time.perf_counter())
    worker.join()
    t0, t1 = span
    lo, hi = t0 + 0.25 * (t1 - t0), t0 + 0.75 * (t1 - t0)
    # a kernel holding the GIL would leave the main thread no tick in the middle of its run
    assert any(lo < t < hi for t in ticks), f"no Python ran during a {1e3 * (t1 - t0):.0f} ms kernel call"


@pytest.mark.parametrize("dtype", DTYPES)
def test_get_rows_is_dequantize(dtype: str) -> None:
    rows, cols = 50, 512
    w = weight(dtype, rows, cols)
    ids = np.array([0, 49, 7, 7, 23], dtype=np.int64)
    got = get_rows(w, dtype, ids, cols)
    full = dequantize(w, dtype, (rows, cols))
    assert got.shape == (5, cols) and got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32), full[ids].view(np.uint32))
    np.testing.assert_array_equal(got, ref.get_rows(w, dtype, ids, cols))
    assert get_rows(w.reshape(-1), dtype, np.zeros(0, np.int64), cols).shape == (0, cols)
    for bad in (-1, 50):
        with pytest.raises(QuantizationError, match=f"id {bad} out of range.*{dtype} weight \\(50, {cols}\\)"):
            get_rows(w, dtype, np.array([1, bad]), cols)


def swiglu_cases() -> list[tuple[str, str, str, int]]:
    """n = 1 (gate and up fused in one pass) for every combination of types; n = 7 (three separate
    products) for each type alone and two cycles of mixed types."""
    k = len(DTYPES)
    mixed = [(DTYPES[i], DTYPES[i - 1], DTYPES[i - j]) for j in (2, 3) for i in range(k)]
    return [(*t, 1) for t in itertools.product(DTYPES, repeat=3)] + [(d, d, d, 7) for d in DTYPES] + [(*t, 7) for t in mixed]


@pytest.mark.parametrize(("dg", "du", "dd", "n"), swiglu_cases())
def test_swiglu_expert(dg: str, du: str, dd: str, n: int) -> None:
    d_model, d_ff = 256, 512  # the tiny fixture's expert
    gate, up, down = weight(dg, d_ff, d_model), weight(du, d_ff, d_model, 1), weight(dd, d_model, d_ff, 2)
    x = inputs(n, d_model)
    got = swiglu_expert(x, gate, up, down, dg, du, dd, d_ff, d_model)
    assert got.shape == (n, d_model) and got.dtype == np.float32
    expected = ref.swiglu_expert(x, gate, up, down, dg, du, dd, d_ff, d_model)
    g = ref.matmul(x, gate, dg, d_ff, d_model)
    h = np.abs(g / (1.0 + np.exp(-g)) * ref.matmul(x, up, du, d_ff, d_model))
    # the products' own rounding plus what the hidden layer's error (relative 1e-4 at most) carries
    bound = 3 * TOL * (h @ np.abs(ref.weight(down, dd, d_model, d_ff)).T)
    assert (np.abs(got - expected) <= bound).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemm_rows_do_not_depend_on_n(dtype: str) -> None:
    """Past GEMM_MIN_N inputs each input's sums run in a fixed order over its own row of x: an input
    gives the same bits whatever else is in the call (the tiled kernel for fewer inputs may not)."""
    rows, cols = 45, 768 if 768 % BLOCK[dtype] == 0 else 1024
    w = weight(dtype, rows, cols)
    x = inputs(150, cols)
    full = matmul(x, w, dtype, rows, cols)
    for lo, hi in ((0, gemm_kernels.GEMM_MIN_N), (3, 80), (64, 150), (100, 117)):
        np.testing.assert_array_equal(matmul(x[lo:hi], w, dtype, rows, cols), full[lo:hi])
    check(x, w, dtype, rows, cols, full)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_few_inputs_are_decode_rows(dtype: str) -> None:
    """Up to MATVEC_ROWS_MAX inputs each get exactly the bits of a one-input (decode) call: a short prompt's
    rows are the rows decoding would give; one more input is the tiled kernel's."""
    rows, cols = 45, 768 if 768 % BLOCK[dtype] == 0 else 1024
    w = weight(dtype, rows, cols)
    x = inputs(matmul_mod.MATVEC_ROWS_MAX + 1, cols)
    for n in range(2, matmul_mod.MATVEC_ROWS_MAX + 1):
        got = matmul(x[:n], w, dtype, rows, cols)
        for i in range(n):
            np.testing.assert_array_equal(got[i], matmul(x[i:i + 1], w, dtype, rows, cols)[0])
        check(x[:n], w, dtype, rows, cols, got)
    check(x, w, dtype, rows, cols, matmul(x, w, dtype, rows, cols))


@pytest.mark.parametrize("dtype", ["q4_0", "q4_k", "q8_0", "mxfp4", "f16"])
def test_a_few_inputs_through_an_expert_are_decode_rows(dtype: str) -> None:
    """An expert's SwiGLU on up to MATVEC_ROWS_MAX inputs gives each row the bits of running it alone (the fused
    decode kernel, whose SiLU is numba's, per row); more inputs take the general path."""
    d_model, d_ff = 256, 512
    g, u, d = weight(dtype, d_ff, d_model, 1), weight(dtype, d_ff, d_model, 2), weight(dtype, d_model, d_ff, 3)
    x = inputs(matmul_mod.MATVEC_ROWS_MAX, d_model)
    alone = [swiglu_expert(x[i:i + 1], g, u, d, dtype, dtype, dtype, d_ff, d_model)[0] for i in range(len(x))]
    for n in range(2, matmul_mod.MATVEC_ROWS_MAX + 1):
        got = swiglu_expert(x[:n], g, u, d, dtype, dtype, dtype, d_ff, d_model)
        for i in range(n):
            np.testing.assert_array_equal(got[i], alone[i])


@pytest.mark.parametrize("dtype", DTYPES)
def test_matvec_is_deterministic_across_threads(dtype: str) -> None:
    """Each row's sum is the same sequence of operations whichever thread computes it."""
    import numba

    rows, cols = 203, 1024
    w = weight(dtype, rows, cols)
    x = inputs(1, cols)
    got = matmul(x, w, dtype, rows, cols)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        np.testing.assert_array_equal(matmul(x, w, dtype, rows, cols), got)
    finally:
        numba.set_num_threads(before)


@pytest.mark.parametrize("dtype", registry.EXPERT_DTYPES)
def test_swiglu_decode_at_mixtral_shape(dtype: str) -> None:
    """n = 1 takes the fused gate/up/SwiGLU pass, then the down matvec; rows 14336 wide included."""
    d_model, d_ff = 256, 1536  # down rows are d_ff = 1536 wide; gate/up have 1536 rows (not a multiple of 64)
    gate, up, down = weight(dtype, d_ff, d_model), weight(dtype, d_ff, d_model, 1), weight(dtype, d_model, d_ff, 2)
    x = inputs(1, d_model)
    got = swiglu_expert(x, gate, up, down, dtype, dtype, dtype, d_ff, d_model)
    expected = ref.swiglu_expert(x, gate, up, down, dtype, dtype, dtype, d_ff, d_model)
    g = ref.matmul(x, gate, dtype, d_ff, d_model)
    h = np.abs(g / (1.0 + np.exp(-g)) * ref.matmul(x, up, dtype, d_ff, d_model))
    bound = 3 * TOL * (h @ np.abs(ref.weight(down, dtype, d_model, d_ff)).T)
    assert (np.abs(got - expected) <= bound).all()


@pytest.mark.parametrize("path", ["avx512", "avx2", "generic"])
def test_simd_table_lookup_paths(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """vlut16 (the nibble -> weight table) gives table[idx & 15] on every code path the host may take."""
    from numba import njit

    from mertools.kernels import simd

    if path == "avx512" and not simd.AVX512 or path == "avx2" and not (simd.AVX2 or simd.AVX512):
        pytest.skip(f"host has no {path}")
    monkeypatch.setattr(simd, "AVX512", path == "avx512")
    monkeypatch.setattr(simd, "AVX2", path == "avx2")

    @njit(cache=False)
    def lookup(table, idx, out):  # out[:16] = table[idx & 15] through vlut16
        simd.vstore(out, 0, simd.vlut16(simd.vload(table, 0), simd.nib16(idx, 0)))

    table = np.arange(16, dtype=np.float32) * np.float32(-1.5) + np.float32(0.25)
    for seed in range(3):
        idx = np.random.default_rng(seed).integers(0, 256, 16).astype(np.uint8)
        out = np.zeros(16, np.float32)
        lookup(table, idx, out)
        np.testing.assert_array_equal(out, table[idx & 15])


_Q4_0_GROUPS = """
import numpy as np, sys
from numba import njit
from mertools.dtypes import q4_0
from mertools.kernels import quantize

@njit(cache=False)
def rows(x, w, out):  # q4_0's decode kernel alone (matvec's dispatch would compile every type)
    for r0 in range(0, w.shape[0], 4):
        q4_0.matvec_group(x, w, r0, out)

rng = np.random.default_rng(0)
w = quantize(rng.standard_normal((64, 512)).astype(np.float32) * np.float32(3), "q4_0")
w[5, :2] = (0x00, 0x7C)  # d = inf: inf and NaN weights propagate alike
x = rng.standard_normal(512).astype(np.float32)
out = np.empty(64, np.float32)
rows(x, w, out)
sys.stdout.write(out.view(np.uint32).tobytes().hex())
"""


def test_q4_0_decode_without_avx512_gives_the_tables_bits(tmp_path) -> None:
    """Without AVX-512, Q4_0's matvec converts q - 8 instead of looking up its table of (k - 8) * d: the same products.
    Compiled for the host and for a CPU with no features named (the conversion, on any host), the bits agree."""
    outs = [np.frombuffer(bytes.fromhex(run_for_cpu(_Q4_0_GROUPS, tmp_path, cpu)), np.uint32) for cpu in ({}, HASWELL)]
    assert outs[0].size == 64 and np.isnan(outs[0].view(np.float32)[5]) and np.array_equal(outs[0], outs[1])


@pytest.mark.parametrize("sinks", [False, True])
@pytest.mark.parametrize("window", [0, 5])
def test_decode_attention_kernel_matches_the_numpy_path(window: int, sinks: bool) -> None:
    """The n = 1 attention kernel (kernels.attention.attend_one) against its numpy definition, with and
    without attention sinks (gpt-oss: one more logit per head in the denominator)."""
    from mertools.kernels.attention import attend_numpy, attend_one

    rng = np.random.default_rng(window)
    keys, vals = rng.standard_normal((2, 40, 2, 128)).astype(np.float32)
    q = rng.standard_normal((2, 8, 128)).astype(np.float32)
    sk = (3 * rng.standard_normal(8)).astype(np.float32) if sinks else None
    one = np.empty((8, 128), np.float32)
    kernel_sinks = sk if sinks else np.full(8, -np.inf, np.float32)
    attend_one(np.ascontiguousarray(q[1]), keys, vals, 0, 39, window, kernel_sinks, float(np.sqrt(128)), one)  # the kernel
    two = attend_numpy(q, keys, vals, np.array([38, 39]), window, sk)  # numpy, for positions 38 and 39
    np.testing.assert_allclose(one.reshape(1, -1), two[1:], rtol=0, atol=1e-6)
    if sinks:  # the sinks take probability mass away: the output is not what plain attention gives
        plain = attend_numpy(q, keys, vals, np.array([38, 39]), window)
        assert np.abs(plain - two).max() > 1e-2


_ATTEND_BITS = """
import numpy as np, xxhash
from mertools.kernels.attention import attend_group, attend_one
rng = np.random.default_rng(1)
q = rng.standard_normal((8, 100)).astype(np.float32)  # heads of 100: two fma chains, a block of 16, a tail of 4
keys, vals = rng.standard_normal((2, 30, 2, 100)).astype(np.float16).view(np.uint16)
sinks, div = np.full(8, -np.inf, np.float32), np.float32(10.0)
one, alone = np.empty((8, 100), np.float32), np.empty((8, 100), np.float32)
attend_one(q, keys, vals, 0, 29, 0, sinks, div, one)
for g in range(2):
    attend_group(q, keys, vals, 0, 29, 0, sinks, div, alone, g)
print(xxhash.xxh3_64(one.tobytes()).hexdigest(), xxhash.xxh3_64(alone.tobytes()).hexdigest())
"""


def test_decode_attention_has_the_same_bits_compiled_and_loaded_from_numbas_cache(tmp_path: Path) -> None:
    """attend_one compiled in one process and loaded from numba's cache in the next computes the same bits, which are
    attend_group's called head by head. With fastmath (reassociated sums) the loaded kernel's own copy of attend_group
    summed in another order than the copy a compiling process called: a first run and the runs after it differed."""
    compiled = run_for_cpu(_ATTEND_BITS, tmp_path / "cache", {}).split()
    loaded = run_for_cpu(_ATTEND_BITS, tmp_path / "cache", {}).split()
    assert compiled == loaded and loaded[0] == loaded[1]


def test_latent_attention_kernel_reads_values_inside_the_keys() -> None:
    """Latent attention (DeepSeek's MLA, absorbed): one kv head of rope + rank dims whose last `rank` dims are the
    values, a softmax divisor other than sqrt(head width); the kernel (n = 1) against numpy on an explicit copy."""
    from mertools.kernels.attention import attend, attend_numpy

    rng = np.random.default_rng(7)
    rope, rank, nh, total = 16, 64, 4, 33
    keys = rng.standard_normal((total, 1, rope + rank)).astype(np.float32)
    q = rng.standard_normal((2, nh, rope + rank)).astype(np.float32)
    pos, div = np.array([total - 2, total - 1]), 5.3
    want = attend_numpy(q, keys, np.ascontiguousarray(keys[..., rope:]), pos, 0, None, div)  # (2, nh * rank)
    one = attend(q[1:], keys, keys, pos[1:], 0, None, div, voff=rope)  # the kernel, values inside the keys
    both = attend(q, keys, keys, pos, 0, None, div, voff=rope)  # the numpy path
    assert one.shape == (1, nh * rank)
    np.testing.assert_allclose(one, want[1:], rtol=0, atol=2e-6)
    np.testing.assert_array_equal(both, want)
    # the divisor and the value offset both matter
    assert np.abs(attend(q[1:], keys, keys, pos[1:], 0, None, None, voff=rope) - want[1:]).max() > 1e-3
    assert np.abs(attend(q[1:], keys, keys[..., :rank].copy(), pos[1:], 0, None, div) - want[1:]).max() > 1e-3


@pytest.mark.parametrize("latent", [False, True])
def test_attention_reads_q8_0_keys_and_values(latent: bool) -> None:
    """A q8_0 KV cache (ggml's blocks: f16 scale + 32 int8, rows of bytes): the decode kernel and the numpy path
    decode it alike, and agree with attention over the dequantized float32 values."""
    from mertools.kernels import quantize
    from mertools.kernels.attention import _float32, attend, attend_numpy

    rng = np.random.default_rng(3)
    total, nh, nkv, hd = 21, 8, 1 if latent else 2, 96 if latent else 64
    k = rng.standard_normal((total, nkv, hd)).astype(np.float32)
    v = k if latent else rng.standard_normal((total, nkv, hd)).astype(np.float32)
    kq = quantize(k.reshape(-1, hd), "q8_0").reshape(total, nkv, -1)
    vq = kq if latent else quantize(v.reshape(-1, hd), "q8_0").reshape(total, nkv, -1)
    voff = 34 if latent else 0  # latent: values from the second block of each key row on
    q = rng.standard_normal((2, nh, hd)).astype(np.float32)
    pos = np.array([total - 2, total - 1])
    kf, vf = _float32(kq), _float32(vq)[..., 32 if latent else 0:]
    np.testing.assert_allclose(kf, k, atol=0.02)  # q8_0's rounding, no more
    want = attend_numpy(q, kf, np.ascontiguousarray(vf), pos, 0, None, 7.0)
    one = attend(q[1:], kq, vq, pos[1:], 0, None, 7.0, voff=voff)  # the kernel
    both = attend(q, kq, vq, pos, 0, None, 7.0, voff=voff)  # numpy
    np.testing.assert_allclose(one, want[1:], rtol=0, atol=3e-6)
    np.testing.assert_allclose(both, want, rtol=0, atol=1e-6)
