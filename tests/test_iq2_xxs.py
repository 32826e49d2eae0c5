"""IQ2_XXS (dtypes/iq2_xxs.py, dtypes/_k8iq2.py), a type layouts copy from unsloth-style GGUFs: its dequantizers are
gguf-py's bit for bit, its decoders the reference's, its 8-bit kernels their numpy twin bit for bit (which is ggml's
vec_dot_iq2_xxs_q8_K), and a GGUF with IQ2_XXS experts converts under --dtype auto byte for byte and runs. The
registry's parametrised tests (test_dtypes, test_dequantize, test_matmul) run it on random bytes too."""

from __future__ import annotations

import warnings
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from test_int8 import _bits, _inputs
from test_more_types_k import MT, PROMPT, ROLE, write_gguf

from mertools.convert.pipeline import ConvertOptions, convert
from mertools.dtypes import CONVERT_CHOICES, DTYPES, KIND, auto_dtype, iq2_xxs
from mertools.dtypes._iq2grid import GRID, KSIGNS
from mertools.dtypes._k8iq2 import signed_grid
from mertools.kernels import dequantize, int8
from mertools.kernels import int8_reference as ref
from mertools.kernels import matmul_reference as mref
from mertools.kernels.matmul import matmul
from mertools.layout import Layout
from mertools.reference.forward import ReferenceModel
from mertools.runtime.engine import Engine

BYTES = 66


def blocks(rows: int, nb: int, seed: int) -> np.ndarray:
    """uint8 (rows, nb * 66): random super-blocks (every grid index, sign index and scale is valid) with finite f16 d
    of either sign, and awkward ones (rows permitting): row 0 block 0 d = 0, row 1 block 0 d = -0, row 2 every scale
    15 and d the largest half, row 3 every sign index 127 (every coordinate negative), row 4 every grid index 255,
    row 5 every word 0 (grid point 0, no signs, scale 0)."""
    rng = np.random.default_rng(seed)
    b = rng.integers(0, 256, (rows, nb, BYTES), dtype=np.uint8)
    d = (rng.uniform(-1, 1, (rows, nb)) * 1e-2).astype("<f2")
    b[..., :2] = np.ascontiguousarray(d).view(np.uint8).reshape(rows, nb, 2)
    words = b[..., 2:].reshape(rows, nb, 8, 8)  # per group: aux0 (4 grid indices), then aux1 (sign indices, scale)
    b[0, 0, :2] = 0
    if rows > 1:
        b[1, 0, :2] = [0, 0x80]
    if rows > 2:
        words[2, ..., 7] |= 0xF0
        b[2, :, :2] = [0xFF, 0x7B]  # 65504
    if rows > 3:
        words[3, ..., 4:7] = 0xFF  # aux1's bits 0-27
        words[3, ..., 7] |= 0x0F
    if rows > 4:
        words[4, ..., :4] = 0xFF
    if rows > 5:
        words[5] = 0
    return b.reshape(rows, -1)


def _gguf(raw: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return gguf.quants.dequantize(raw, T.IQ2_XXS).reshape(-1)


def test_dequantizers_are_gguf_bit_for_bit() -> None:
    """numpy and numba dequantizers on random and awkward blocks, and on non-finite d (inf, -inf, NaN payloads)."""
    b = blocks(6, 5, 0)
    b[0, 1 * BYTES:1 * BYTES + 2] = [0x00, 0x7C]  # inf
    b[1, 2 * BYTES:2 * BYTES + 2] = [0x00, 0xFC]  # -inf
    b[2, 3 * BYTES:3 * BYTES + 2] = [0x01, 0x7C]  # a signalling NaN
    b[3, 4 * BYTES:4 * BYTES + 2] = [0x00, 0xFE]  # a negative quiet NaN
    raw = b.reshape(-1)
    want = _bits(_gguf(b.reshape(-1, BYTES)))
    with np.errstate(invalid="ignore"):
        assert np.array_equal(_bits(iq2_xxs.dequantize_reference(raw)), want)
    assert np.array_equal(_bits(iq2_xxs.dequantize(raw)), want)
    b = blocks(6, 1, 1)
    w = iq2_xxs.dequantize_reference(b.reshape(-1)).reshape(6, 256)
    neg = signed_grid(b.reshape(6, BYTES)).reshape(6, 256) < 0
    assert not w[:2].any() and (np.signbit(w[0]) == neg[0]).all() and (np.signbit(w[1]) != neg[1]).all()  # d = +-0
    assert (w[3] < 0).all() and np.isfinite(w[2]).all() and np.abs(w[2]).max() > 1e7


def test_the_tables_are_ggmls() -> None:
    """The grid's coordinates and the sign patterns as ggml defines them (spot values of iq2xxs_grid, and ksigns:
    the 7 bits plus their parity as bit 7)."""
    assert int.from_bytes(bytes(GRID[0].tolist()), "little") == 0x0808080808080808  # ggml's iq2xxs_grid[0]
    assert int.from_bytes(bytes(GRID[255].tolist()), "little") == 0x2B2B2B1908081908  # and its last
    assert set(np.unique(GRID).tolist()) == {8, 25, 43}
    k = np.arange(128)
    parity = np.array([bin(i).count("1") & 1 for i in k])
    assert np.array_equal(KSIGNS, k | (parity << 7))


def test_the_tables_file_is_gguf_pys() -> None:
    """_iq2grid.bin holds exactly gguf-py's IQ2_XXS tables (grid_hex: each grid word's coordinates as 2-bit level
    indices, 4 to a byte, written as hex; ksigns), decoded here the way gguf-py packs them."""
    from gguf.quants import IQ2_XXS as G

    hexed = np.frombuffer(G.grid_hex, dtype=np.uint8).reshape(-1, 2)
    nibbles = np.where(hexed > 0x40, hexed + 9, hexed) & 0x0F
    packed = (nibbles[:, 0] << 4) | nibbles[:, 1]
    codes = ((packed.reshape(-1, 1) >> np.array([0, 2, 4, 6], dtype=np.uint8)) & 3).reshape(G.grid_shape)
    assert np.array_equal(GRID, np.asarray(G.grid_map, dtype=np.uint8)[codes])
    assert np.array_equal(KSIGNS, np.frombuffer(G.ksigns, dtype=np.uint8))


@pytest.mark.parametrize("n", [1, 3, 7, 17])
def test_matmul_on_awkward_blocks_is_the_reference(n: int) -> None:
    """The matvec (n 1, 3), the tiled kernel (7) and the GEMM (17) against float64 products of `dequantize`."""
    rows, cols = 13, 1024
    w = blocks(rows, cols // 256, 2)
    x = _inputs(n, cols, 3)
    got = matmul(x, w, "iq2_xxs", rows, cols)
    bound = 1e-4 * mref.abs_matmul(x, w, "iq2_xxs", rows, cols)
    assert (np.abs(got - mref.matmul(x, w, "iq2_xxs", rows, cols)) <= bound).all()


@pytest.mark.parametrize(("rows", "n"), [(5, 1), (13, 3), (13, 19), (36, 8)])
def test_8bit_kernels_are_the_twin_bit_for_bit(rows: int, n: int) -> None:
    """Matvec (groups of 4 rows, the last short) and a prompt's rows (from 8 activation rows: `_k_rows`, a weight row
    decoded once for 8), 3 super-blocks a row: the twin's bits, and the float product of the dequantized weights with
    the activations' q8_K up to float32 rounding."""
    cols = 768
    w = blocks(rows, cols // 256, rows + n)
    x = _inputs(n, cols, n)
    x[0, 256:512] = 1.0  # every activation quant 127 against the awkward blocks
    if n > 1:
        x[1, ::2], x[1, 1::2] = -1.0, 1.0  # -127 and 127 in turn
    assert int8.takes("iq2_xxs", rows, cols) and not int8.repacks("iq2_xxs")
    got = int8.matmul8(x, int8.prepare(w, "iq2_xxs"), "iq2_xxs", np.empty((n, rows), np.float32))
    assert np.array_equal(_bits(got), _bits(ref.matmul8(x, w, "iq2_xxs")))
    wd = dequantize(w, "iq2_xxs", (rows, cols)).astype(np.float64)
    kq, kd, _ = ref.quantize_k(x)
    xd = (kq * kd[..., None].astype(np.float64)).reshape(n, cols)
    assert (np.abs(got - xd @ wd.T) <= 1e-5 * (np.abs(xd) @ np.abs(wd).T) + 1e-30).all()
    h = int8.swiglu8(x / np.float32(1e3), (w, "iq2_xxs"), (w, "iq2_xxs"), rows)
    one = np.concatenate([int8.swiglu8(x[i:i + 1] / np.float32(1e3), (w, "iq2_xxs"), (w, "iq2_xxs"), rows)
                          for i in range(n)])
    assert np.array_equal(_bits(h), _bits(one))  # a row's result never depends on its neighbours


def test_the_twin_is_ggmls_dot_product() -> None:
    """The twin against ggml_vec_dot_iq2_xxs_q8_K_generic transcribed loop for loop: the same integers per
    super-block, sumf += d * bsum in block order, 0.125 * sumf."""
    rows, cols = 3, 512
    w = blocks(6, cols // 256, 7)[[1, 2, 3]]
    x = _inputs(1, cols, 4)
    kq, kd, _ = ref.quantize_k(x)
    want = np.zeros(rows, np.float32)
    for r in range(rows):
        sumf = np.float32(0.0)
        for blk, b in enumerate(w[r].reshape(-1, BYTES)):
            d = np.array(b[:2], np.uint8).view("<f2").astype(np.float32)[0] * kd[0, blk]
            q8 = kq[0, blk]
            bsum = 0
            for ib32 in range(8):
                aux = np.array(b[2 + 8 * ib32:10 + 8 * ib32], np.uint8).view("<u4").astype(np.int64)
                ls = 2 * (int(aux[1]) >> 28) + 1
                sumi = 0
                for lane in range(4):
                    grid = GRID[b[2 + 8 * ib32 + lane]]
                    signs = int(KSIGNS[(int(aux[1]) >> (7 * lane)) & 127])
                    for j in range(8):
                        sumi += int(grid[j]) * int(q8[32 * ib32 + 8 * lane + j]) * (-1 if signs & (1 << j) else 1)
                bsum += sumi * ls
            sumf = sumf + d * np.float32(bsum)
        want[r] = np.float32(0.125) * sumf
    assert np.array_equal(_bits(ref.matmul8(x, w, "iq2_xxs")[0]), _bits(want))


def test_iq2_xxs_is_kept_under_auto_and_a_conversion_target() -> None:
    t = DTYPES["iq2_xxs"]
    assert auto_dtype("iq2_xxs") == "iq2_xxs" and t.expert and KIND["iq2_xxs"] == 16
    assert t.quantize is not None and "iq2_xxs" in CONVERT_CHOICES
    assert t.bits_per_weight == 2.0625 and t.verify is not None


@pytest.fixture(scope="module")
def iq2_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Mixtral as a GGUF whose experts are IQ2_XXS (layer 1's down projection Q2_K: two 8-bit kernels in one
    layer), its attention matrices Q4_K (v and the output Q6_K: every matrix of a decode step on the 8-bit kernels)."""
    types = {(layer, mt): T.IQ2_XXS for layer in range(2) for mt in ROLE}
    attn = {(layer, mt): T.Q4_K for layer in range(2) for mt in (MT.ATTN_Q, MT.ATTN_K, MT.ATTN_OUT)}
    return write_gguf(tmp_path_factory.mktemp("iq2"), {**types, **attn, (1, MT.FFN_DOWN_EXP): T.Q2_K})


def test_a_gguf_of_iq2_xxs_experts_converts_byte_for_byte_and_runs(iq2_gguf: Path, tmp_path: Path) -> None:
    """--dtype auto copies every IQ2_XXS expert tensor; the engine's exact kernels match the float64 reference of the
    GGUF (gguf-py's dequantization); experts mapped from the file run the 8-bit kernels on its blocks, decode steps in
    one compiled call with the bits of the steps piece by piece, near the exact kernels (this random model's logits
    at most positions)."""
    lay = convert(iq2_gguf, tmp_path / "lay", ConvertOptions(progress=False)).out
    src = {t.name: t for t in gguf.GGUFReader(iq2_gguf).tensors}
    layout = Layout.open(lay)
    for entry in layout.manifest.experts:
        for mt, role in ROLE.items():
            gg = src[gguf.TENSOR_NAMES[mt].format(bid=entry.layer) + ".weight"]
            assert entry.tensors[role].dtype == gg.tensor_type.name.lower()
            assert layout.read_expert(entry.layer, entry.expert, role).tobytes() == np.asarray(gg.data[entry.expert]).tobytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        want = ReferenceModel.from_source(iq2_gguf).forward(PROMPT)
    with Engine.open(lay, kernels="exact", kv_dtype="f32") as eng:
        exact = np.concatenate([eng.forward(PROMPT[:8]), eng.forward(PROMPT[8:9]), eng.forward(PROMPT[9:])])
    assert np.abs(exact - want).max() < 2e-4 * max(1.0, np.abs(want).max())
    logits = {}
    for compiled in (True, False):
        with Engine.open(lay, kernels="int8", io="mmap", compiled_step=compiled, prefetch="none", kv_dtype="f32") as eng:
            assert eng.store.mapped and all(all(f) for f in eng.model.moe.full.int8.values())
            kinds = {int(k) for g in eng.model.moe.full.geometry.values() for k in g[:, 1]}
            assert kinds == {KIND["iq2_xxs"], KIND["q2_k"]}
            logits[compiled] = np.concatenate([eng.forward(PROMPT[:8])] + [eng.forward([t]) for t in PROMPT[8:14]])
            assert (eng.stats()["compiled_steps"] > 0) == compiled
    assert np.array_equal(_bits(logits[True]), _bits(logits[False]))
    near = exact[:14]  # the 8-bit activations may flip a random model's routing at a position: most stay close
    assert (logits[True].argmax(-1) == near.argmax(-1)).mean() >= 0.7
    assert np.median(np.abs(logits[True] - near).max(-1) / np.abs(near).max(-1)) < 0.03
