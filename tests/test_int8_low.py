"""The 8-bit kernels of Q2_K and Q3_K (dtypes/_k8low.py), which read the file's super-blocks as they are: bit for bit
their numpy twins on random and awkward blocks, within float32 rounding of the exact product, and a layout of either
type on them (tests/test_int8.py also runs both through its shapes, prompts and the portable path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_int8 import TRAINED, _bits, _inputs

from mertools.convert.pipeline import ConvertOptions, convert
from mertools.dtypes import DTYPES, KIND
from mertools.kernels import int8
from mertools.kernels import int8_reference as ref
from mertools.runtime.engine import Engine
from mertools.verify.numerics import KERNELS_KL_LIMIT, check_kernels

# per type: the bytes of its f16 scales, of its 4- or 6-bit scales, of its codes (Q3_K: hmask and qs)
_FIELDS = {"q2_k": ((80, 82), slice(0, 16), slice(16, 80)), "q3_k": ((108,), slice(96, 108), slice(0, 96))}


def _awkward(dtype: str, rows: int, nb: int, seed: int) -> np.ndarray:
    """uint8 (rows, nb * block bytes): random super-blocks with finite f16 scales of either sign, and awkward ones:
    row 0 block 0 every scale (and Q2_K min) 0 (Q3_K: -32), row 1 block 0 every one the largest (15; Q3_K: 31),
    row 2 every code 0 (Q3_K: -4), row 3 every code the largest (3), row 4 block 1 d = 0."""
    halves, scales, codes = _FIELDS[dtype]
    rng = np.random.default_rng(seed)
    b = rng.integers(0, 256, (rows, nb, DTYPES[dtype].type_size), dtype=np.uint8)
    for at in halves:
        d = (rng.uniform(-1, 1, (rows, nb)) * 1e-2).astype("<f2")
        b[..., at:at + 2] = np.ascontiguousarray(d).view(np.uint8).reshape(rows, nb, 2)
    b[0, 0, scales] = 0
    b[1, 0, scales] = 255
    b[2, :, codes] = 0
    b[3, :, codes] = 255
    b[4, 1, halves[0]:halves[0] + 2] = 0
    return b.reshape(rows, -1)


@pytest.mark.parametrize("dtype", ["q2_k", "q3_k"])
@pytest.mark.parametrize(("rows", "n"), [(5, 1), (13, 3), (13, 19), (36, 8)])
def test_awkward_blocks_bit_for_bit(dtype: str, rows: int, n: int) -> None:
    """Matvec (a group of 4 rows, the last short) and a prompt's rows (from 8 activation rows: `_k_rows`, the weight
    row's codes decoded once for 8) on 3 super-blocks a row: the twin's bits, and the product of the dequantized
    weights with the activations' q8_K up to float32 rounding."""
    cols = 768
    w = _awkward(dtype, rows, cols // 256, rows + n)
    x = _inputs(n, cols, n)
    x[0, 256:512] = 1.0  # every activation quant 127 against the awkward blocks' codes
    if n > 1:
        x[1, ::2], x[1, 1::2] = -1.0, 1.0  # -127 and 127 in turn
    got = int8.matmul8(x, int8.prepare(w.copy(), dtype), dtype, np.empty((n, rows), np.float32))
    assert np.array_equal(_bits(got), _bits(ref.matmul8(x, w, dtype)))
    wd = DTYPES[dtype].dequantize(w.reshape(-1)).reshape(rows, cols).astype(np.float64)
    kq, kd, _ = ref.quantize_k(x)
    xd = (kq * kd[..., None].astype(np.float64)).reshape(n, cols)
    assert (np.abs(got - xd @ wd.T) <= 1e-5 * (np.abs(xd) @ np.abs(wd).T) + 1e-30).all()


@pytest.mark.parametrize("dtype", ["q2_k", "q3_k"])
def test_the_twin_is_ggmls_dot_product(dtype: str) -> None:
    """The twin against ggml's vec_dot_q2_K_q8_K / vec_dot_q3_K_q8_K (generic) transcribed loop for loop: the same
    integers; Q2_K's float steps in ggml's order, Q3_K's one product per super-block where ggml sums 8 float lanes."""
    rows, cols = 3, 512
    w = _awkward(dtype, 5, cols // 256, 7)[:rows]
    kq, kd, ks = ref.quantize_k(_inputs(1, cols, 4))
    want = np.zeros(rows, np.float32)
    for r in range(rows):
        for blk, b in enumerate(w[r].reshape(-1, DTYPES[dtype].type_size).astype(np.int64)):
            q8, dk = kq[0, blk], kd[0, blk]
            if dtype == "q2_k":
                summs = sum(int(ks[0, 16 * blk + j]) * (b[j] >> 4) for j in range(16))
                isum = 0
                for k in range(16):  # group k: weights 16k + i, at byte 16 + 32h + l of qs, shift 2s
                    at, shift = 16 + 32 * (k // 8) + 16 * (k % 2), 2 * ((k % 8) // 2)
                    isum += (b[k] & 15) * sum(int(q8[16 * k + i]) * ((b[at + i] >> shift) & 3) for i in range(16))
                dall = dk * np.array(b[80:82], np.uint8).view("<f2").astype(np.float32)[0]
                dmin = dk * np.array(b[82:84], np.uint8).view("<f2").astype(np.float32)[0]
                want[r] = want[r] + (dall * np.float32(isum) - dmin * np.float32(summs))
            else:
                t = 0
                for k in range(16):
                    sc = (((b[96 + k % 8] >> (4 * (k // 8))) & 15) | (((b[104 + k % 4] >> (2 * (k // 4))) & 3) << 4)) - 32
                    for i in range(16):
                        j = 16 * k + i  # weight 128h + 32s + l
                        h, s, lo = j // 128, (j % 128) // 32, j % 32
                        q = ((b[32 + 32 * h + lo] >> (2 * s)) & 3) - (0 if (b[lo] >> (4 * h + s)) & 1 else 4)
                        t += sc * q * int(q8[j])
                d = np.array(b[108:110], np.uint8).view("<f2").astype(np.float32)[0]
                want[r] = want[r] + np.float32(t) * (d * dk)
    assert np.array_equal(_bits(ref.matmul8(_inputs(1, cols, 4), w, dtype)[0]), _bits(want))


@pytest.mark.parametrize("dtype", ["q2_k", "q3_k"])
def test_a_layout_of_the_type_runs_the_8bit_kernels(tmp_path: Path, dtype: str) -> None:
    """The trained fixture as Q2_K (low-bit stand-ins, llama.cpp's Q2_K preset) or Q3_K (its Q3_K_* presets): experts
    mapped from the file run the 8-bit kernels on its blocks, decode steps in one compiled call with the bits of the
    steps piece by piece, within verify's limit of the exact kernels."""
    lay = convert(TRAINED / "tiny-shakespeare-moe", tmp_path / dtype, ConvertOptions(dtype=dtype, progress=False)).out
    logits = {}
    for compiled in (True, False):
        with Engine.open(lay, kernels="int8", io="mmap", compiled_step=compiled, prefetch="none") as eng:
            assert eng.store.mapped and all(all(f) for f in eng.model.moe.full.int8.values())
            kinds = {int(k) for g in eng.model.moe.full.geometry.values() for k in g[:, 1]}
            assert KIND[dtype] in kinds and kinds <= {KIND["q2_k"], KIND["q3_k"]}  # q2_k's mix has q3_k tensors
            logits[compiled] = np.concatenate([eng.forward([1, 5, 9, 2])] + [eng.forward([i]) for i in range(3, 9)])
            assert (eng.stats()["compiled_steps"] > 0) == compiled  # once every expert it needs is mapped
    assert np.array_equal(_bits(logits[True]), _bits(logits[False]))
    rep = check_kernels(lay, "int8", text=(TRAINED / "held-out-julius-caesar.txt").read_text(), max_tokens=32)
    assert rep.ok and 0 < rep.kl_mean <= KERNELS_KL_LIMIT and rep.top1_agreement >= 0.9
