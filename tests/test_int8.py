"""The 8-bit-activation kernels (kernels/int8.py): bit for bit their numpy twin (kernels/int8_reference.py), packing
in place, the engine's int8 mode beside the exact one on the trained fixture, and the flags that choose it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from cpu_target import HASWELL, HASWELL_AVX2, run_for_cpu

from mertools.cli import main
from mertools.convert.pipeline import ConvertOptions, convert
from mertools.dtypes import DTYPES, KIND, q8_0
from mertools.errors import QuantizationError, RuntimeConfigError
from mertools.kernels import act8, int8
from mertools.kernels import int8_reference as ref
from mertools.kernels.matmul import silu_mul, swiglu_weights, weight
from mertools.runtime.engine import Engine
from mertools.verify.numerics import KERNELS_KL_LIMIT, check_kernels

TRAINED = Path(__file__).resolve().parent.parent / "fixtures" / "trained"
ROOT = Path(__file__).resolve().parent.parent
INT8 = ("q4_0", "q8_0", "mxfp4", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k")
PACKED = ("q4_0", "q8_0", "mxfp4")  # packed, on q8_0 activations
REPACKED = (*PACKED, "q4_k", "q6_k")  # every type `prepare` packs (whole groups of 16 rows)


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


def _weights(dtype: str, rows: int, cols: int, seed: int, extremes: bool = True) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32) * np.float32(rng.uniform(0.01, 3))
    if extremes:
        w[0, :32] = 0.0  # a block of zeros: d = 0
        w[-1, -32:] *= 1e4  # a block far larger than the rest
    return DTYPES[dtype].quantize(w.reshape(-1)).reshape(rows, -1)


def _inputs(n: int, cols: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, cols)).astype(np.float32)
    x[0, 32:64] = 0.0  # an activation block of zeros
    x[-1, :32] *= 1e3
    return x


def test_activations_are_ggml_q8_0() -> None:
    x = _inputs(3, 256, 0)
    xq, dx, nsum, kq, kd, ks = act8.quantize_act(x, act8.Q8_0_ACT)
    assert kq.shape == (3, 0) and kd.shape == (3, 0) and ks.shape == (3, 0)  # not asked for
    raw = q8_0.quantize_reference(x).reshape(3, 8, q8_0.BYTES)
    assert np.array_equal(xq.reshape(3, 8, 32), raw[:, :, 2:])
    assert np.array_equal(_bits(dx), _bits(np.ascontiguousarray(raw[:, :, :2]).view("<f2").astype(np.float32)[..., 0]))
    q = xq.view(np.int8).astype(np.int64).reshape(3, 8, 2, 4, 4)
    assert np.array_equal(nsum.reshape(3, 8, 4), -q.sum(axis=(2, 4)))
    rq, rd = ref.quantize_act(x)
    assert np.array_equal(rq.reshape(3, 256), xq.view(np.int8)) and np.array_equal(_bits(rd), _bits(dx))


def _q8_k_ggml(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """quantize_row_q8_K_ref transcribed loop for loop (quants int8 (nb, 256), d float32 (nb,)), for finite x."""
    x = x.reshape(-1, 256)
    q, d = np.zeros(x.shape, np.int8), np.zeros(len(x), np.float32)
    for i, blk in enumerate(x):
        amax = mx = np.float32(0.0)
        for v in blk:
            if abs(v) > amax:
                amax, mx = abs(v), v
        if amax == 0:
            continue
        iscale = np.float32(-127.0) / mx
        for j, v in enumerate(blk):
            f = np.float32(iscale * v) + np.float32(12582912.0)  # nearest_int's bit trick
            q[i, j] = min(127, (int(np.array(f, np.float32).view(np.int32)) & 0x7FFFFF) - 0x400000)
        d[i] = np.float32(1.0) / iscale
    return q, d


def test_activations_of_the_k_types_are_ggml_q8_k() -> None:
    x = _inputs(3, 512, 1)
    x[1, 256:] = 0.0  # a block of zeros: d = 0
    x[2, 300] = -x[2, 256:512].__abs__().max() * 2  # its largest value negative
    x[2, 301] = -x[2, 300]  # and reached twice: the first one counts
    x[0, 5:9] = np.float32(0.5) * np.float32(-127.0) / x[0].__abs__().max() * -1  # products near ties
    xq, dx, nsum, kq, kd, ks = act8.quantize_act(x, act8.Q8_K_ACT)
    assert xq.shape == (3, 0) and kq.shape == (3, 512) and kd.shape == (3, 2) and ks.shape == (3, 32)
    want_q, want_d = _q8_k_ggml(x)
    assert np.array_equal(kq.view(np.int8).reshape(-1, 256), want_q)
    assert np.array_equal(_bits(kd.reshape(-1)), _bits(want_d))
    assert ks.dtype == np.int32 and np.array_equal(ks, want_q.astype(np.int64).reshape(3, 32, 16).sum(-1))
    rq, rd, rs = ref.quantize_k(x)
    assert np.array_equal(rq.reshape(-1, 256), want_q) and np.array_equal(_bits(rd), _bits(kd))
    assert np.array_equal(rs, ks)
    both = act8.quantize_act(x, act8.Q8_0_ACT | act8.Q8_K_ACT)
    assert np.array_equal(both.kq, kq) and np.array_equal(both.xq, act8.quantize_act(x, act8.Q8_0_ACT).xq)
    assert act8.quantize_act(np.ascontiguousarray(x[:, :96]), act8.Q8_K_ACT).kq.shape == (3, 0)  # no K row is 96 wide


def test_q8_k_rounding_is_nearest_int_for_every_float_it_meets() -> None:
    """The vector rounding is ggml's nearest_int (ties to even) within +-127 for every float32 a quant can be
    (|v| <= 127.5, both signs: every 61st bit pattern and every pattern within 64 of each half-integer and integer);
    NaN gives 0 and infinities +-127, as the twin defines."""
    from numba import njit

    from mertools.dtypes._blocks256 import nearest_int_reference
    from mertools.kernels.q8act import q8k_round32

    @njit
    def rounded(bits):
        q = np.empty(bits.size, np.uint8)
        for s in range(0, bits.size, 32):
            q8k_round32(bits[s:s + 32].view(np.float32), 0, np.float32(1.0), q, s)
        return q.view(np.int8)

    top = int(np.array(127.5, np.float32).view(np.uint32))
    near = np.array([k / 2 for k in range(256)], np.float32).view(np.uint32).astype(np.int64)
    near = (near[:, None] + np.arange(-64, 65)).ravel()
    pos = np.concatenate([np.arange(0, top + 1, 61), near[(near >= 0) & (near <= top)]]).astype(np.uint32)
    bits = np.concatenate([pos, pos | np.uint32(0x80000000)])
    bits = np.concatenate([bits, np.zeros((-bits.size) % 32, np.uint32)])
    want = np.clip(nearest_int_reference(bits.view(np.float32)), -127, 127)
    assert np.array_equal(rounded(bits).astype(np.int64), want)
    special = np.array([np.nan, np.inf, -np.inf, -0.0] + [0.0] * 28, np.float32).view(np.uint32)
    assert rounded(special)[:4].tolist() == [0, 127, -127, 0]


def test_activation_rounding_is_roundf_for_every_float_it_meets() -> None:
    """The vector rounding (trunc(|v| + 0.49999997) with v's sign) is C's roundf then the int8 cast for every float32
    a quant can be (|v| <= 128.5, both signs: every 61st bit pattern, and every pattern within 64 of each half-integer
    and integer), and NaN gives 0, as the scalar definition `_roundf_low_byte`."""
    from numba import njit

    from mertools.dtypes.q8_0 import _roundf_low_byte
    from mertools.kernels.q8act import q8_round32

    @njit
    def mismatches(bits):
        x, q, bad = np.empty(32, np.float32), np.empty(32, np.uint8), 0
        for s in range(0, bits.size - bits.size % 32, 32):
            x[:] = bits[s:s + 32].view(np.float32)
            q8_round32(x, 0, np.float32(1.0), q, 0)
            for j in range(32):
                bad += q[j] != _roundf_low_byte(x[j])
        return bad

    top = int(np.array(128.5, np.float32).view(np.uint32))
    near = np.array([k / 2 for k in range(258)], np.float32).view(np.uint32).astype(np.int64)
    near = (near[:, None] + np.arange(-64, 65)).ravel()
    pos = np.concatenate([np.arange(0, top + 1, 61), near[(near >= 0) & (near <= top)]]).astype(np.uint32)
    special = np.array([np.nan, np.inf, 0.0], np.float32).view(np.uint32)
    bits = np.concatenate([pos, pos | np.uint32(0x80000000), special, special | np.uint32(0x80000000)])
    bits = np.concatenate([bits, np.zeros((-bits.size) % 32, np.uint32)])
    assert mismatches(bits) == 0


SHAPES = [(4, 256, 1), (12, 512, 2), (64, 256, 5), (256, 1024, 1), (8, 4096, 3), (4, 32, 1), (12, 96, 2), (7, 256, 2),
          (20, 512, 19),  # 19 rows: a prompt (the K types' `_k_rows`, 8 activation rows at a time, a partial last pass)
          (16, 256, 1), (32, 512, 2), (16, 4096, 3), (16, 32, 1), (48, 96, 2), (32, 512, 19)]  # packed: groups of 16 rows


@pytest.mark.parametrize(("dtype", "rows", "cols", "n"), [(d, *s) for d in INT8 for s in SHAPES
                                                          if s[1] % DTYPES[d].block_size == 0 and int8.takes(d, *s[:2])])
def test_kernel_is_its_numpy_twin_bit_for_bit(dtype: str, rows: int, cols: int, n: int) -> None:
    w = _weights(dtype, rows, cols, rows + cols)
    x = _inputs(n, cols, n)
    got = int8.matmul8(x, int8.prepare(w.copy(), dtype), dtype, np.empty((n, rows), np.float32))
    want = ref.matmul8(x, w, dtype)
    assert np.array_equal(_bits(got), _bits(want))
    # and the twin is the product of the weights with ggml's q8_0 of x (q8_K for the K types), up to float32 rounding
    wd = DTYPES[dtype].dequantize(w.reshape(-1)).reshape(rows, cols).astype(np.float64)
    if dtype in PACKED:
        xd = q8_0.dequantize_reference(q8_0.quantize_reference(x)).reshape(n, cols).astype(np.float64)
    else:
        kq, kd, _ = ref.quantize_k(x)
        xd = (kq * kd[..., None].astype(np.float64)).reshape(n, cols)
    assert (np.abs(got - xd @ wd.T) <= 1e-5 * (np.abs(xd) @ np.abs(wd).T) + 1e-30).all()


@pytest.mark.parametrize("dtype", INT8)
def test_packing_in_place_and_each_row_alone(dtype: str) -> None:
    w = _weights(dtype, 32, 256, 3)
    if dtype in REPACKED:
        packed = int8.pack(w, dtype)
        assert packed.nbytes == w.nbytes and packed.shape == (2, 16 * w.shape[1])
        same = w.copy()
        int8.pack(same, dtype, out=same)
        assert np.array_equal(same.reshape(-1), packed.reshape(-1))
    wt = weight(w.copy().reshape(-1), dtype, 32, 256, int8=True)
    assert wt.int8 and wt.packed == (dtype in REPACKED)
    x = _inputs(4, 256, 9)
    both = wt(x)
    for i in range(4):  # a row's result never depends on its neighbours
        assert np.array_equal(_bits(wt(x[i:i + 1])[0]), _bits(both[i]))
    block = wt.row_block(16, 16)
    assert np.array_equal(_bits(block(x)), _bits(both[:, 16:32]))
    if wt.packed:
        with pytest.raises(QuantizationError, match="whole groups"):
            wt.row_block(8, 16)


@pytest.mark.parametrize(("dtype", "rows"), [("q2_k", 36), ("q3_k", 36), ("q4_k", 36), ("q5_k", 36), ("q6_k", 36),
                                             ("q4_k", 48), ("q6_k", 48)])
def test_a_prompt_of_a_k_type_is_its_rows_decoded_one_by_one(dtype: str, rows: int) -> None:
    """From K_ROWS_MIN rows the K types run `_k_rows` (a weight row's codes decoded once for 8 activation rows), or
    packed (whole groups of 16 rows) `_kp_rows` (a group's codes decoded once for 4): every row the bits of that row
    alone, in products and in the SwiGLU of a gate and an up."""
    cols, n = 512, 2 * int8.K_ROWS_MIN + 3
    w, w2 = _weights(dtype, rows, cols, 11, extremes=False), _weights(dtype, rows, cols, 12, extremes=False)
    if int8.packable(dtype, rows, cols):
        w, w2 = int8.prepare(w, dtype), int8.prepare(w2, dtype)
    x = _inputs(n, cols, 13) / np.float32(1e3)
    many = int8.matmul8(x, w, dtype, np.empty((n, rows), np.float32))
    alone = np.concatenate([int8.matmul8(x[i:i + 1], w, dtype, np.empty((1, rows), np.float32)) for i in range(n)])
    assert np.array_equal(_bits(many), _bits(alone))
    h = int8.swiglu8(x, (w, dtype), (w2, dtype), rows)
    h1 = np.concatenate([int8.swiglu8(x[i:i + 1], (w, dtype), (w2, dtype), rows) for i in range(n)])
    assert np.array_equal(_bits(h), _bits(h1))


def test_a_prompt_runs_the_8bit_kernels_at_any_row_count() -> None:
    """Every type the 8-bit kernels take runs them for a prompt's rows too (the K types' `_k_rows` beat the float GEMM
    from 4 to 128 rows, docs/BENCHMARKS.md "Decode: notes"), also in a SwiGLU whose gate and up differ in type."""
    from mertools.kernels.gemm_kernels import GEMM_MIN_N

    w = _weights("q4_k", 64, 512, 5, extremes=False)
    wt = weight(w.copy(), "q4_k", 64, 512, int8=True)
    many = _inputs(GEMM_MIN_N, 512, 6)
    assert wt.int8 and np.array_equal(_bits(wt(many)), _bits(ref.matmul8(many, w, "q4_k")))
    packed = weight(_weights("q4_0", 64, 512, 5).copy(), "q4_0", 64, 512, int8=True)
    assert np.array_equal(_bits(packed(many)), _bits(ref.matmul8(many, _weights("q4_0", 64, 512, 5), "q4_0")))
    # an expert whose gate is read as it is and whose up is packed: both formats of the activations in one call
    up, down = _weights("q8_0", 64, 512, 7, extremes=False), _weights("q4_0", 512, 64, 8, extremes=False)
    mild = many / np.float32(1e3)
    got = swiglu_weights(mild, wt, weight(up.copy(), "q8_0", 64, 512, int8=True), weight(down.copy(), "q4_0", 512, 64,
                                                                                             int8=True))
    h = silu_mul(ref.matmul8(mild, w, "q4_k"), ref.matmul8(mild, up, "q8_0"))
    assert np.array_equal(_bits(got), _bits(ref.matmul8(h, down, "q4_0")))
    assert not weight(w.copy(), "q4_k", 64, 512).int8  # the exact kernels unless asked


def test_swiglu_of_packed_weights_is_the_twin_composed() -> None:
    d_model, d_ff = 256, 512
    g, u, dn = (_weights(dt, r, c, seed, extremes=False)
                for dt, r, c, seed in (("q4_k", d_ff, d_model, 1), ("q8_0", d_ff, d_model, 2), ("q4_0", d_model, d_ff, 3)))
    x = _inputs(3, d_model, 4) / np.float32(1e3)
    ws = [weight(a.copy(), dt, r, c, int8=True) for a, dt, r, c in
          ((g, "q4_k", d_ff, d_model), (u, "q8_0", d_ff, d_model), (dn, "q4_0", d_model, d_ff))]
    got = swiglu_weights(x, *ws)
    h = silu_mul(ref.matmul8(x, g, "q4_k"), ref.matmul8(x, u, "q8_0"))
    assert np.array_equal(_bits(got), _bits(ref.matmul8(h, dn, "q4_0")))


def test_what_the_kernels_do_not_take_stays_exact() -> None:
    assert int8.takes("q4_k", 6, 256) and not int8.packable("q4_k", 8, 256)  # read from the file's blocks
    assert int8.packable("q4_k", 16, 256) and int8.packable("q6_k", 16, 256)  # whole groups: packed
    assert not int8.packable("q5_k", 16, 256)  # read as it is
    assert not int8.takes("iq4_xs", 8, 256) and not int8.takes("q4_0", 8, 64)
    w = _weights("q4_0", 8, 64, 0)
    assert not weight(w.copy(), "q4_0", 8, 64, int8=True).int8  # 8 rows: not whole groups of 16
    with pytest.raises(QuantizationError, match="not packed for the 8-bit kernels"):
        int8.pack(w, "q4_0")


def test_portable_path_without_vnni_is_the_same(tmp_path: Path) -> None:
    """The same products compiled for a CPU named Haswell with no features named (so the portable IR: simd8's dpbusd
    as widening multiplies and adds; the AVX2 path is the host's on AVX2-only CPUs, its dpbusd checked below): every
    type's group kernel (`int8._group`, all types inlined) in a serial loop, as `_matmul8` runs it per task. Not
    through `matmul8`, whose compile also takes the parallel wrapper and the prompt's rows kernels, which 2 rows never
    run: 163 s against 71 s here, from an empty cache."""
    code = (
        "import numpy as np; from numba import njit; from test_int8 import _weights, _inputs\n"
        "from mertools.kernels import int8, int8_reference as ref, simd8\n"
        "from mertools.kernels.act8 import formats_of, quantize_act\n"
        "assert not simd8.VNNI\n"
        "@njit\n"
        "def products(kind, x2, w, out):\n"
        "    xq, dx, nsum, kq, kd, ks = quantize_act(x2, formats_of(kind))\n"
        "    for g in range(int8.groups_of(out.shape[1])):\n"
        "        for i in range(out.shape[0]):\n"
        "            int8._group(kind, xq, dx, nsum, kq, kd, ks, i, w, g, out, i)\n"
        "def check(x, w, prepared, dt):\n"
        "    out = np.empty((x.shape[0], w.shape[0]), np.float32)\n"
        "    products(int8.prepared_kind(dt, w.shape[0], x.shape[1]), x, prepared, out)\n"
        "    assert np.array_equal(out.view(np.uint32), ref.matmul8(x, w, dt).view(np.uint32)), dt\n"
        "for dt in ('q4_0', 'q8_0', 'mxfp4', 'q2_k', 'q3_k', 'q4_k', 'q5_k', 'q6_k'):\n"
        "    w, x = _weights(dt, 32, 512, 1), _inputs(2, 512, 2)\n"
        "    check(x, w, int8.prepare(w.copy(), dt), dt)\n"
        "from test_iq2_xxs import blocks\n"  # random blocks: every grid index and sign pattern
        "w = blocks(32, 2, 1)\n"
        "check(_inputs(2, 512, 2), w, w, 'iq2_xxs')\n"
        "print('ok')\n"
    )
    assert run_for_cpu(code, tmp_path, HASWELL).strip() == "ok"


_DPBUSD_CHECK = """
import numpy as np
from numba import njit
from mertools.kernels import simd, simd8
from mertools.kernels.simd import vstore, vtof
from mertools.kernels.simd8 import bytes64, dpbusd, dpbusd2, dpbusd_u8, izero
assert not simd8.VNNI and simd.AVX2 == (PATH == "avx2"), (simd.AVX2, PATH)

@njit
def two_dots(u, s, out, full):  # acc = u[:64].s[:64] then + u[64:].s[64:], lane i summing bytes 4i..4i+3
    if full:
        a = dpbusd_u8(izero(), bytes64(u, 0), bytes64(s, 0))
        vstore(out, 0, vtof(dpbusd_u8(a, bytes64(u, 64), bytes64(s, 64))))
    else:
        a = dpbusd(izero(), bytes64(u, 0), bytes64(s, 0))
        vstore(out, 0, vtof(dpbusd(a, bytes64(u, 64), bytes64(s, 64))))

rng = np.random.default_rng(0)
for full, top in ((True, 256), (False, 128)):  # dpbusd takes bytes below 128, dpbusd_u8 any
    cases = [rng.integers(0, top, 128), np.full(128, top - 1), np.full(128, top - 1), rng.integers(0, 16, 128)]
    signs = [rng.integers(-128, 128, 128), np.full(128, -128), np.full(128, 127), rng.integers(-128, 128, 128)]
    for u, s in zip(cases, signs):
        out = np.empty(16, np.float32)
        two_dots(u.astype(np.uint8), s.astype(np.int8).view(np.uint8), out, full)  # bytes64 loads uint8 arrays
        want = (u.reshape(2, 16, 4).astype(np.int64) * s.reshape(2, 16, 4)).sum(axis=(0, 2))
        assert np.array_equal(out, want.astype(np.float32)), (full, out, want)  # |want| < 2^24: exact in float32

@njit
def pair_dot(u, s, out):  # dpbusd2: u[:64].s[:64] + u[64:].s[64:] in one step (bytes below 64)
    vstore(out, 0, vtof(dpbusd2(izero(), bytes64(u, 0), bytes64(s, 0), bytes64(u, 64), bytes64(s, 64))))

for u, s in ((rng.integers(0, 64, 128), rng.integers(-128, 128, 128)), (np.full(128, 63), np.full(128, -128)),
             (np.full(128, 63), np.full(128, 127)), (rng.integers(0, 16, 128), np.full(128, -128))):
    out = np.empty(16, np.float32)  # 63 x -128 four times a lane: -32256, the int16 sum's extreme
    pair_dot(u.astype(np.uint8), s.astype(np.int8).view(np.uint8), out)
    want = (u.reshape(2, 16, 4).astype(np.int64) * s.reshape(2, 16, 4)).sum(axis=(0, 2))
    assert np.array_equal(out, want.astype(np.float32)), (out, want)
print("ok")
"""


@pytest.mark.parametrize("path", ["avx2", "portable"])
def test_dpbusd_without_vnni_gives_vnnis_sums(path: str, tmp_path: Path) -> None:
    """simd8.dpbusd, dpbusd_u8 and dpbusd2 compiled for a CPU without AVX-512 VNNI, with AVX2 (vpmaddubsw for bytes
    below 128, int16 vpmaddwd for any, two vpmaddubsw added in int16 for bytes below 64) or none (widening
    multiplies): the integer sums vpdpbusd gives, extreme bytes included (255 x -128: pairs beyond int16; 127 x -128,
    the largest pairs vpmaddubsw takes; 63 x -128 in all four products of dpbusd2's int16 sum)."""
    code = f"PATH = {path!r}\n" + _DPBUSD_CHECK
    assert run_for_cpu(code, tmp_path, HASWELL_AVX2 if path == "avx2" else HASWELL).strip() == "ok"


# ---------------------------------------------------------------------- the engine


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert(TRAINED / "tiny-shakespeare-moe", tmp_path_factory.mktemp("int8") / "q4_0",
                   ConvertOptions(dtype="q4_0", progress=False)).out


def test_trained_fixture_within_the_limit(trained: Path) -> None:
    text = (TRAINED / "held-out-julius-caesar.txt").read_text()
    rep = check_kernels(trained, "int8", text=text, max_tokens=256)
    assert rep.ok and rep.kl_mean <= KERNELS_KL_LIMIT
    assert 0 < rep.kl_mean  # the kernels really differ: activations are rounded
    assert rep.top1_agreement >= 0.97 and abs(rep.ppl_ratio - 1) < 0.01


def test_engine_packs_dense_weights_and_experts(trained: Path) -> None:
    """Dense matrices are packed at open; experts of a packed type as they load when the cache holds every expert, and
    not when it streams (each load's packing would take the kernels' cores: they stay on the exact kernels)."""
    ids = list(range(1, 30))
    out = {}
    for cache_mb in (1, None):
        with Engine.open(trained, kernels="int8", cache_mb=cache_mb) as eng:
            w = eng.model.layers[0]
            assert w.attn_q.checked.packed and not eng.model.weights.embed.checked.packed  # rows looked up: never packed
            assert (eng.store.prepare is not None) == (cache_mb is None) and eng.stats()["kernels"] == "int8"
            assert all(all(f) == (cache_mb is None) for f in eng.model.moe.full.int8.values())  # q4_0 experts
            out[cache_mb] = eng.forward(ids)
            assert (eng.cache.stats.misses > eng.config.n_experts) == (cache_mb == 1)  # streaming: read again
    with Engine.open(trained, kernels="exact") as eng:
        exact = eng.forward(ids)
    for got in out.values():
        assert not np.array_equal(got, exact) and (got.argmax(-1) == exact.argmax(-1)).mean() >= 0.9
    assert not np.array_equal(out[1], out[None])  # the streaming run's experts are exact, its dense matrices not


@pytest.mark.parametrize("dtype", ["q4_0", "q2_k", "q4_k"])
def test_resident_experts_run_together_with_the_same_bits(trained: Path, tmp_path: Path, dtype: str) -> None:
    """A decode step whose experts are all resident runs them in one call (experts8): the logits are those of computing
    each expert apart, as a step does whose experts are still loading (a fresh engine without prefetch: a step that
    reads an expert computes its experts one at a time), with the same packed slots (the cache holds every expert).
    The prompt first: 6 rows choose 12 (row, expert) pairs of 4 experts, so experts take several rows, which
    experts8 runs together on each group of its weight rows."""
    lay = trained if dtype == "q4_0" else convert(TRAINED / "tiny-shakespeare-moe", tmp_path / dtype,
                                                  ConvertOptions(dtype=dtype, progress=False)).out
    ids = list(range(1, 12))
    out = {}
    for preload in (False, True):
        with Engine.open(lay, kernels="int8", compiled_step=False, prefetch="none") as eng:
            assert all(all(f) for f in eng.model.moe.full.int8.values())
            if preload:  # every expert resident before the first step
                keys = [(la, e) for la in range(eng.config.n_layers) for e in range(eng.config.n_experts)]
                for key, _ in eng.cache.acquire(keys):
                    eng.cache.release(key)
            before = eng.cache.stats.misses
            out[preload] = np.concatenate([eng.forward(ids[:6])] + [eng.forward([i]) for i in ids[6:]])
            misses = eng.cache.stats.misses - before
        assert (misses > 0) != preload
    assert np.array_equal(_bits(out[False]), _bits(out[True]))


def test_packed_experts_are_read_into_the_cache_not_mapped(trained: Path, tmp_path: Path) -> None:
    with pytest.raises(RuntimeConfigError, match="kernels must be one of"):
        Engine.open(trained, kernels="fast")
    ids = list(range(1, 20))
    with Engine.open(trained, kernels="int8", io="auto", long_lived=True) as eng:  # a server packs q4_0: read, not mapped
        assert not eng.store.mapped and eng.store.prepare is not None
        want = eng.forward(ids)
    with Engine.open(trained, kernels="int8", io="mmap") as eng:  # mapped: the q4_0 experts stay exact
        assert eng.store.mapped and eng.store.prepare is None and not any(any(f) for f in eng.model.moe.full.int8.values())
        assert (eng.forward(ids).argmax(-1) == want.argmax(-1)).mean() >= 0.9
    for dtype in ("q4_k", "q6_k"):
        lay = convert(TRAINED / "tiny-shakespeare-moe", tmp_path / dtype, ConvertOptions(dtype=dtype, progress=False)).out
        with Engine.open(lay, kernels="int8", io="mmap") as eng:  # mapped: the 8-bit kernels on the file's blocks
            assert eng.store.mapped and all(all(f) for f in eng.model.moe.full.int8.values())
            assert {int(k) for g in eng.model.moe.full.geometry.values() for k in g[:, 1]} == {KIND[dtype]}
            mapped = eng.forward(ids)
        with Engine.open(lay, kernels="int8", io="auto", long_lived=True) as eng:  # packed K types: the same bits
            assert not eng.store.mapped and eng.store.prepare is not None
            assert {int(k) for g in eng.model.moe.full.geometry.values() for k in g[:, 1]} == {KIND[dtype] + act8.PACKED_K}
            assert np.array_equal(_bits(eng.forward(ids)), _bits(mapped))


def test_greedy_speculation_unchanged_with_int8(trained: Path) -> None:
    prompt = "ROMEO: To be, or not to be. ROMEO: To be, or not to be. ROMEO:"
    with Engine.open(trained, kernels="int8") as eng:
        plain = [t.id for t in eng.generate(prompt, max_tokens=32)]
        spec = [t.id for t in eng.generate(prompt, max_tokens=32, draft=eng.open_drafter("ngram"))]
        assert eng.spec.drafted > 0  # verification steps of several rows happened
    assert plain == spec


def test_cli_kernels_flags(trained: Path, tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["run", str(trained), "-p", "ROMEO:", "-n", "4", "--kernels", "exact",
                                  "--json", str(tmp_path / "s.json")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "s.json").read_text())["kernels"] == "exact"
    r = CliRunner().invoke(main, ["run", str(trained), "-p", "ROMEO:", "-n", "4", "--json", str(tmp_path / "d.json")])
    assert r.exit_code == 0 and json.loads((tmp_path / "d.json").read_text())["kernels"] == "int8"  # the default
    r = CliRunner().invoke(main, ["verify", str(trained), "--kernels", "int8", "--quiet", "--json", str(tmp_path / "v.json")])
    assert r.exit_code == 0, r.output
    assert "kernels: int8 vs exact" in r.output and json.loads((tmp_path / "v.json").read_text())["kernels"]["ok"]


def test_importing_the_kernels_starts_numbas_thread_pool() -> None:
    """A cached compiled caller of a parallel region (`_quantized_matmul8`) segfaulted when loaded in a process whose
    pool had not started (`mertools run` after `make test`); importing the kernels starts it."""
    code = ("import numba.np.ufunc.parallel as p; assert not p._is_initialized; "
            "import mertools.kernels.int8; assert p._is_initialized")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)
