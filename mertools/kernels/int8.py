"""The 8-bit-activation kernels: activations quantized to 8 bits as ggml's q8_0 / q8_K, integer dot products.

ggml multiplies a quantized matrix by quantizing the activations too (quantize_row_q8_0: d = max|x| / 127,
q = roundf(x / d), d stored as f16, per block of 32; q8_K for the K types: one scale per 256, kernels/act8.py) and
summing weight quants times activation quants in integers, one float multiply per block. This module does the same
for the types in INT8_DTYPES:

    takes(dtype, rows, cols)      whether a weight runs here (else the exact kernels)
    prepare(w2, dtype)            its bytes as these kernels read them (packed in place, or as they are)
    matmul8(x2, w, dtype, out)    float32 (n, rows) = x2 @ W.T
    swiglu8(x2, gate, up)         silu(x2 @ G.T) * (x2 @ U.T)

Q4_0, Q8_0 and MXFP4 (an `Int8Pack`) are packed: rows go by groups of 16 (rows % 16 == 0), and for each block
the group's 16 scales come first (f16, or MXFP4's exponent bytes; lane 4r + j holds row 4j + r's), then for each
4 rows their 16-byte runs of quants (64 bytes): one load gives a vpdpbusd its 64 weight bytes, 4 rows' sums in its
quarters; `row_sums4` folds 4 such vectors into one sum per row, which meets its scale in one float multiply-add for
the 16 rows (4 rows per vector and a float multiply per block and lane were slower from memory; one row per lane,
as the packed Q4_K, was no faster for these types; the file's 17-, 18- or 34-byte blocks need 4 loads and 4 inserts
of each, slower than the exact kernels). MXFP4's
nibbles index its value table: one byte shuffle turns them into the table's values plus 16. Same size as the file's
bytes, so a cache slot is packed in place after its read. The K types' super-blocks hold 128 contiguous quant bytes
(Q2_K's and Q3_K's low bits 64): their kernels (dtypes/_k8.py: Q4_K, Q5_K, Q6_K; dtypes/_k8low.py: Q2_K, Q3_K; and
IQ2_XXS's grid points, dtypes/_k8iq2.py) read the file's blocks (a slot mapped from its file, or streamed without
packing), and from K_ROWS_MIN activation rows on (a prompt) run `_k_rows`, which decodes a weight row's block once for
8 rows. Q4_K and Q6_K are also packed by 16 rows where `prepare` runs (dtypes/_k8packed.py: one int32 lane per row, a
sub-block's scale applied once per 16 rows), their type codes then `Q4_KP`, `Q6_KP` (`prepared_kind`), with the file
kernels' bits.

What a packed row's result is (`int8_reference` computes it in numpy, and the tests hold every kernel to its
twin bit for bit): per block b, S = the integer sum of quant * activation quant over the block's 32 weights;
acc += float(S) * (d_w * d_x), in block order (d_w: the f16 scale, or MXFP4's 2^(e - 128)) — ggml's
vec_dot_q4_0_q8_0 arithmetic but for the order of its two multiplies. The K types' twins live in their modules.
Integer sums are exact, so the instruction set does not matter. The exact kernels (`matmul`) stay the definition of
the model; this path's difference from them is reported by `mertools verify --kernels int8`.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from mertools.dtypes import DTYPES, KIND, Int8Pack, _k8, _k8iq2, _k8low, _k8packed
from mertools.dtypes.base import SCALE_BYTES
from mertools.errors import QuantizationError
from mertools.kernels.act8 import PACKED_K, Q8_K_ACT, formats_of, quantize_act
from mertools.kernels.common import MATVEC_JIT, prefetch_lines
from mertools.kernels.matvec_kernels import silu_mul_scalar
from mertools.kernels.simd import half16, vadd, vmul, vsplat, vstore, vtof, vzero
from mertools.kernels.simd8 import bytes16x4, bytes64, dpbusd2, dpbusd_u8, hi4, ishl, ivload4x4, lo4, row_sums4, transpose4x4
from mertools.kernels.simd8x import byte_table, copy16, e8m0x16
from mertools.kernels.tasks import counters, next_task, threads

__all__ = ["GROUP", "INT8_DTYPES", "PACKED_KINDS", "groups_of", "is_packed", "matmul8", "matmul8_kind",
           "needs_packing", "pack", "packable", "prepare", "prepared_kind", "repacks", "swiglu8", "swiglu8_kind", "takes"]

GROUP = 16  # rows packed together, and the rows of a parallel task for every type
K_ROWS_MIN = 8  # activation rows from which the K types run `_k_rows` (the same bits as row by row)
K_ROW_BLOCK = 16  # weight rows per `_k_rows` task: their bytes stay in L2 while the activation rows pass
INT8_DTYPES = tuple(name for name, dt in DTYPES.items() if dt.int8_pack is not None or dt.int8_reference is not None)
Q4_0, Q8_0, MXFP4, Q4_K, Q5_K, Q6_K = (KIND[t] for t in ("q4_0", "q8_0", "mxfp4", "q4_k", "q5_k", "q6_k"))
Q2_K, Q3_K, IQ2_XXS = KIND["q2_k"], KIND["q3_k"], KIND["iq2_xxs"]
Q4_KP, Q6_KP = Q4_K + PACKED_K, Q6_K + PACKED_K  # packed by `prepare` (dtypes/_k8packed.py); file bytes keep Q4_K, Q6_K
_PACKED_K = {"q4_k": Q4_KP, "q6_k": Q6_KP}  # K types with a packed layout: their kernels take the file's bytes as well
_PACKED = {"q4_0", "q8_0", "mxfp4"}
_DISPATCHED = {*_PACKED, "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq2_xxs"}  # the branches below
if {d for d in INT8_DTYPES if DTYPES[d].int8_pack} != _PACKED or set(INT8_DTYPES) != _DISPATCHED:
    raise ValueError("kernels.int8: a type with an 8-bit kernel needs its branch in _group")
PACKED_KINDS = tuple(KIND[d] for d in sorted(_PACKED)) + tuple(_PACKED_K.values())  # codes of bytes packed by `prepare`


@njit(**MATVEC_JIT)
def is_packed(kind):
    """Whether type code `kind` takes its bytes packed by groups of GROUP rows (shape (rows / 16, 16 * row bytes))."""
    for k in PACKED_KINDS:
        if kind == k:
            return True
    return False


def _geometry(dtype: str) -> tuple[int, int, int, int]:
    """(16-byte runs of quants per block, log2 of the unsigned quants' offset, bytes of a scale, 1 if the nibbles
    index a table) of a packed type, from its Int8Pack."""
    dt = DTYPES[dtype]
    spec = dt.int8_pack
    return spec.parts, spec.offset.bit_length() - 1, SCALE_BYTES[dt.scale_format], int(spec.codes is not None)


# numba reads module globals as constants
Q4_0_GEOMETRY, Q8_0_GEOMETRY, MXFP4_GEOMETRY = _geometry("q4_0"), _geometry("q8_0"), _geometry("mxfp4")
_mxfp4_codes = byte_table(DTYPES["mxfp4"].int8_pack.codes)  # nibble -> K + 16
if MXFP4_GEOMETRY[2:] != (1, 1) or Q4_0_GEOMETRY[2:] != (2, 0) or Q8_0_GEOMETRY[2:] != (2, 0):
    raise ValueError("kernels.int8: _scales/_dot take f16 scales with plain quants, or E8M0 with mxfp4's table")


def packable(dtype: str, rows: int, cols: int) -> bool:
    """Whether a (rows, cols) weight of `dtype` is one these kernels take packed (and `pack` packs)."""
    whole = rows > 0 and cols > 0 and rows % GROUP == 0
    if dtype in _PACKED_K:
        return whole and cols % 256 == 0
    return DTYPES[dtype].int8_pack is not None and whole and cols % 32 == 0


def repacks(dtype: str) -> bool:
    """Whether `prepare` repacks weights of `dtype` (whole groups of rows): a slot mapped from its file cannot be."""
    return DTYPES[dtype].int8_pack is not None or dtype in _PACKED_K


def needs_packing(dtype: str) -> bool:
    """Whether these kernels take `dtype` only packed (Q4_0, Q8_0, MXFP4): a slot mapped from its file then runs
    the exact kernels, where a K type's kernels read the file's blocks."""
    return DTYPES[dtype].int8_pack is not None


def prepared_kind(dtype: str, rows: int, cols: int) -> int:
    """The type code the kernels take a (rows, cols) `dtype` weight by once `prepare` has run on it (a packed K type's
    own code)."""
    return _PACKED_K[dtype] if dtype in _PACKED_K and packable(dtype, rows, cols) else KIND[dtype]


def takes(dtype: str, rows: int, cols: int) -> bool:
    """Whether a (rows, cols) weight of `dtype` runs on these kernels: packed, or a type read from the file's blocks."""
    return packable(dtype, rows, cols) or (DTYPES[dtype].int8_reference is not None and rows > 0 and cols > 0)


def _spec(dtype: str, rows: int, cols: int) -> Int8Pack | None:
    if not packable(dtype, rows, cols):
        raise QuantizationError(f"int8: a {dtype} weight ({rows}, {cols}) is not packed for the 8-bit kernels "
                                f"(types {', '.join(d for d in INT8_DTYPES if repacks(d))}, rows a multiple of {GROUP})")
    return DTYPES[dtype].int8_pack


# ---------------------------------------------------------------- packing


@njit(**MATVEC_JIT)  # serial: it runs in the store's loader threads, where a parallel region would start a second
def _pack(w2, out, parts, flip, sb):  # OpenMP team spinning beside the kernels' (all products 5-10x slower, measured)
    """out (rows/16, 16 * row_bytes) = the packed groups of w2 (rows, row_bytes; blocks of an sb-byte scale and
    16 * parts quant bytes); out may be w2's own bytes."""
    rb = w2.shape[1]
    bsz = sb + 16 * parts
    tmp = np.empty(GROUP * rb, np.uint8)
    for g in range(out.shape[0]):
        for r in range(GROUP):  # the group's rows first: out may be w2's own bytes
            row = w2[GROUP * g + r]
            for k in range(0, rb - 15, 16):
                copy16(tmp, r * rb + k, row, k, 0)
            for k in range(rb - rb % 16, rb):
                tmp[r * rb + k] = row[k]
        og = out[g]
        og16, tmp16 = og.view(np.uint16), tmp.view(np.uint16)  # f16 scales moved whole: rb and bsz are even then
        for b in range(rb // bsz):
            o, po = b * bsz, b * GROUP * bsz
            # lane 4r + j holds row 4j + r's scale (`row_sums4`'s order); sb's two cases spelled out: a loop over sb
            # bytes took most of the pack's time (docs/BENCHMARKS.md, "A second run right after a first")
            if sb == 2:
                for lane in range(GROUP):
                    og16[po // 2 + lane] = tmp16[((4 * (lane % 4) + lane // 4) * rb + o) // 2]
            else:
                for lane in range(GROUP):
                    og[po + lane] = tmp[(4 * (lane % 4) + lane // 4) * rb + o]
            for r in range(GROUP):
                for p in range(parts):  # 16-byte runs copied as vectors (byte loops ran at 1.4 GB/s)
                    q = po + sb * GROUP + 64 * (parts * (r // 4) + p) + 16 * (r % 4)
                    copy16(og, q, tmp, r * rb + o + sb + 16 * p, flip)


def pack(w2: np.ndarray, dtype: str, out: np.ndarray | None = None) -> np.ndarray:
    """The packed bytes of w2 (uint8 (rows, row_bytes), a (rows, 32 * row_bytes / type_size) `dtype` weight), shaped
    (rows / 16, 16 * row_bytes); into `out` if given (w2 itself packs in place: a cache slot after its load)."""
    rows, rb = w2.shape
    dt = DTYPES[dtype]
    spec = _spec(dtype, rows, rb // dt.type_size * dt.block_size)
    target = np.empty((rows // GROUP, GROUP * rb), np.uint8) if out is None else out.reshape(rows // GROUP, GROUP * rb)
    if dtype == "q4_k":
        _k8packed.pack_q4_k(w2, target)
    elif dtype == "q6_k":
        _k8packed.pack_q6_k(w2, target)
    else:
        _pack(w2, target, spec.parts, spec.flip, SCALE_BYTES[dt.scale_format])
    return target


def prepare(w2: np.ndarray, dtype: str, packed: bool = False) -> np.ndarray:
    """w2 (rows, row_bytes) as these kernels read it (`prepared_kind` says how): packed in place, or w2 itself for a
    type read as it is. `packed`: w2 holds packed bytes already (an earlier process's, runtime/packed.py), only
    shaped as `pack` shapes them."""
    rows, rb = w2.shape
    dt = DTYPES[dtype]
    if dt.int8_pack is not None or packable(dtype, rows, rb // dt.type_size * dt.block_size):
        if packed:
            _spec(dtype, rows, rb // dt.type_size * dt.block_size)
            return w2.reshape(rows // GROUP, GROUP * rb)
        return pack(w2, dtype, out=w2)
    return w2


# ---------------------------------------------------------------- products


@njit(inline="always", **MATVEC_JIT)
def _scales(wr, o, sb, dxs):
    """The group's 16 block scales at byte o (f16, or E8M0 bytes when sb == 1) times d_x, in `row_sums4`'s order."""
    return vmul(e8m0x16(wr, o) if sb == 1 else half16(wr, o), dxs)


@njit(inline="always", **MATVEC_JIT)
def _dot(acc, wr, o, parts, coded, xl, xh):
    """acc + the integer sums of 4 rows' quants at byte o (a block's 16-byte runs of the 4 rows; nibbles through
    MXFP4's table when coded) with the activation block's halves xl, xh: each row's in its quarter."""
    if parts == 1:
        q = bytes64(wr, o)
        lo, hi = lo4(q), hi4(q)
        if coded:
            lo, hi = _mxfp4_codes(lo), _mxfp4_codes(hi)
        return dpbusd2(acc, lo, xl, hi, xh)  # nibbles, or MXFP4's codes (K + 16 < 64)
    return dpbusd_u8(dpbusd_u8(acc, bytes64(wr, o), xl), bytes64(wr, o + 64), xh)  # Q8_0's int8 + 128


@njit(**MATVEC_JIT)
def _packed_group(xq, dx, nsum, i, wp, g, geo, out, io):
    """out[io, 16g:16g+16] = the packed group g of wp (geometry `geo`, `_geometry`'s) times the quantized row i of
    (xq, dx, nsum): per block, each row's integer sum (4 rows a vpdpbusd, `row_sums4` across them), then one float
    multiply-add for the 16 rows. Activations and results by row index: a row view per call cost its reference
    counts."""
    parts, shift, sb, coded = geo
    wr = wp[g]
    bb = GROUP * (sb + 16 * parts)  # a block's bytes for the group
    run = 64 * parts  # 4 rows' quants of a block
    ahead = (g + 1) * wp.shape[1]
    xo, so = xq.shape[1] * i, nsum.shape[1] * i
    acc = vzero()
    for b in range(dx.shape[1]):
        o = bb * b
        prefetch_lines(wp, ahead + o, bb)
        bias = ishl(ivload4x4(nsum, so + 4 * b), shift)  # - offset * sum(x): the unsigned quants' bias
        xl, xh = bytes16x4(xq, xo + 32 * b), bytes16x4(xq, xo + 32 * b + 16)
        q = o + GROUP * sb
        s = row_sums4(_dot(bias, wr, q, parts, coded, xl, xh), _dot(bias, wr, q + run, parts, coded, xl, xh),
                      _dot(bias, wr, q + 2 * run, parts, coded, xl, xh), _dot(bias, wr, q + 3 * run, parts, coded, xl, xh))
        acc = vadd(acc, vmul(vtof(s), _scales(wr, o, sb, vsplat(dx[i, b]))))
    vstore(out, out.shape[1] * io + GROUP * g, transpose4x4(acc))


@njit(inline="always", **MATVEC_JIT)  # inlined, and arrays not a tuple: per-call costs were a fifth of a small product
def _group(kind, xq, dx, nsum, kq, kd, ks, i, w, g, out, io):
    """out[io, 16g:16g+16] (fewer past the end) = rows 16g.. of W (type code `kind`, as `prepare` left it) times row
    i of the activations (an `act8.Act8`'s arrays; the type's format filled in). Regions unpack their Act8 before
    their loop and pass its arrays here."""
    if kind == Q4_0:
        _packed_group(xq, dx, nsum, i, w, g, Q4_0_GEOMETRY, out, io)
    elif kind == Q8_0:
        _packed_group(xq, dx, nsum, i, w, g, Q8_0_GEOMETRY, out, io)
    elif kind == MXFP4:
        _packed_group(xq, dx, nsum, i, w, g, MXFP4_GEOMETRY, out, io)
    elif kind == Q4_KP:
        _k8packed.q4_k_packed_group(kq, kd, ks, i, w, g, out, io)
    elif kind == Q6_KP:
        _k8packed.q6_k_packed_group(kq, kd, ks, i, w, g, out, io)
    else:
        for r0 in range(GROUP * g, min(GROUP * g + GROUP, out.shape[1]), 4):
            if kind == Q6_K:
                _k8.q6_k_group(kq, kd, i, w, r0, out, io)
            elif kind == Q2_K or kind == Q3_K:
                _k8low.low_k_group(kq, kd, ks, i, w, r0, out, io, kind == Q3_K)
            elif kind == IQ2_XXS:
                _k8iq2.iq2_xxs_group(kq, kd, i, w, r0, out, io)
            else:
                _k8.k4_group(kq, kd, ks, i, w, r0, out, io, kind == Q5_K)


@njit(inline="always", **MATVEC_JIT)
def groups_of(rows):
    """The groups (of GROUP rows; the last maybe short, for a type read as it is) of a weight with `rows` rows."""
    return (rows + GROUP - 1) // GROUP


@njit(parallel=True, **MATVEC_JIT)
def _matmul8(kind, a, w, out):
    xq, dx, nsum, kq, kd, ks = a
    n, nt = groups_of(out.shape[1]), threads()
    ctr = counters(nt)
    for me in prange(nt):  # the groups claimed as the threads go (`tasks`)
        while True:
            g = next_task(ctr, me, nt, n)
            if g < 0:
                break
            for i in range(out.shape[0]):
                _group(kind, xq, dx, nsum, kq, kd, ks, i, w, g, out, i)


@njit(parallel=True, **MATVEC_JIT)
def _swiglu8(a, kg, wg, ku, wu, h, u):
    xq, dx, nsum, kq, kd, ks = a
    n, nt = groups_of(h.shape[1]), threads()
    ctr = counters(nt)
    for me in prange(nt):
        while True:
            g = next_task(ctr, me, nt, n)
            if g < 0:
                break
            for i in range(h.shape[0]):
                for r in range(2):  # gate, then up: one call site, so one inlined copy of `_group`'s code (every type's)
                    _group(kg if r == 0 else ku, xq, dx, nsum, kq, kd, ks, i, wg if r == 0 else wu, g, h if r == 0 else u, i)
                for r in range(GROUP * g, min(GROUP * g + GROUP, h.shape[1])):
                    h[i, r] = silu_mul_scalar(h[i, r], u[i, r])


@njit(parallel=True, **MATVEC_JIT)
def _k_rows(kind, kq, kd, ks, w, out):
    """out (n, rows) = x @ W.T for a K type's weight and many q8_K rows: each task K_ROW_BLOCK weight rows, each row
    against 8 activation rows at a time (`_k8.k4_rows`: the row's codes decoded once for the 8); the bits of
    `_matmul8`'s rows."""
    n, rows = out.shape
    n_tasks, nt = (rows + K_ROW_BLOCK - 1) // K_ROW_BLOCK, threads()
    ctr = counters(nt)
    for me in prange(nt):
        while True:
            t = next_task(ctr, me, nt, n_tasks)
            if t < 0:
                break
            for i0 in range(0, n, 8):
                for r in range(K_ROW_BLOCK * t, min(K_ROW_BLOCK * t + K_ROW_BLOCK, rows)):
                    if kind == Q6_K:
                        _k8.q6_k_rows(kq, kd, i0, w, r, out)
                    elif kind == Q2_K or kind == Q3_K:
                        _k8low.low_k_rows(kq, kd, ks, i0, w, r, out, kind == Q3_K)
                    elif kind == IQ2_XXS:
                        _k8iq2.iq2_xxs_rows(kq, kd, i0, w, r, out)
                    else:
                        _k8.k4_rows(kq, kd, ks, i0, w, r, out, kind == Q5_K)


@njit(parallel=True, **MATVEC_JIT)
def _kp_rows(kind, kq, kd, ks, w, out):
    """`_k_rows` for a packed K weight: each task a group of 16 rows against 4 activation rows at a time (Q4_K:
    `_k8packed.q4_k_packed_rows4`, the group's codes decoded once for the 4; Q6_K by 2, `q6_k_packed_rows2`)."""
    n = out.shape[0]
    n_tasks, nt = groups_of(out.shape[1]), threads()
    ctr = counters(nt)
    for me in prange(nt):
        while True:
            g = next_task(ctr, me, nt, n_tasks)
            if g < 0:
                break
            for i0 in range(0, n, 4):
                if kind == Q4_KP:
                    _k8packed.q4_k_packed_rows4(kq, kd, ks, i0, w, g, out)
                else:
                    _k8packed.q6_k_packed_rows2(kq, kd, ks, i0, w, g, out)
                    if i0 + 2 < n:
                        _k8packed.q6_k_packed_rows2(kq, kd, ks, i0 + 2, w, g, out)


# compiled callers of the regions: the activations never cross into Python (boxing 7 arrays and back cost ~10 us,
# a fifth of a small expert's product)
@njit(**MATVEC_JIT)
def _rows_kernel(kind):
    """Whether a prompt's rows of a weight of type code `kind` go to `_k_rows` / `_kp_rows` (a K type)."""
    return formats_of(kind) == Q8_K_ACT


@njit(**MATVEC_JIT)
def _prompt(kind, kq, kd, ks, w, out):
    if kind < PACKED_K:
        _k_rows(kind, kq, kd, ks, w, out)
    else:
        _kp_rows(kind, kq, kd, ks, w, out)


@njit(**MATVEC_JIT)
def _quantized_matmul8(kind, x2, w, out):
    a = quantize_act(x2, formats_of(kind))
    if x2.shape[0] >= K_ROWS_MIN and _rows_kernel(kind):
        _prompt(kind, a.kq, a.kd, a.ks, w, out)
    else:
        _matmul8(kind, a, w, out)


@njit(**MATVEC_JIT)
def _quantized_swiglu8(x2, kg, wg, ku, wu, h, u):
    a = quantize_act(x2, formats_of(kg) | formats_of(ku))
    if x2.shape[0] >= K_ROWS_MIN and _rows_kernel(kg) and _rows_kernel(ku):
        _prompt(kg, a.kq, a.kd, a.ks, wg, h)
        _prompt(ku, a.kq, a.kd, a.ks, wu, u)
        for i in range(h.shape[0]):
            for r in range(h.shape[1]):
                h[i, r] = silu_mul_scalar(h[i, r], u[i, r])
    else:
        _swiglu8(a, kg, wg, ku, wu, h, u)


def matmul8_kind(x2: np.ndarray, w: np.ndarray, kind: int, out: np.ndarray) -> np.ndarray:
    """out (n, rows) = x2 @ W.T, x2 float32 C (n, cols), w W's bytes as taken by type code `kind` (`prepared_kind`
    after `prepare`, or a K type's file bytes by its own code); each row of x2 computed alone (the same bits whatever
    n)."""
    _quantized_matmul8(kind, x2, w, out)
    return out


def matmul8(x2: np.ndarray, w: np.ndarray, dtype: str, out: np.ndarray) -> np.ndarray:
    """`matmul8_kind` for w as `prepare` left it."""
    return matmul8_kind(x2, w, prepared_kind(dtype, out.shape[1], x2.shape[1]), out)


def swiglu8_kind(x2: np.ndarray, wg: np.ndarray, kg: int, wu: np.ndarray, ku: int, d_ff: int) -> np.ndarray:
    """silu(x2 @ G.T) * (x2 @ U.T), float32 (n, d_ff), for gate and up bytes taken by type codes kg, ku (as in
    `matmul8_kind`) sharing x2's quants."""
    n = x2.shape[0]
    h, u = np.empty((n, d_ff), np.float32), np.empty((n, d_ff), np.float32)
    _quantized_swiglu8(x2, kg, wg, ku, wu, h, u)
    return h


def swiglu8(x2: np.ndarray, gate: tuple[np.ndarray, str], up: tuple[np.ndarray, str], d_ff: int) -> np.ndarray:
    """`swiglu8_kind` for gate and up (bytes as `prepare` left them, dtype)."""
    (wg, dg), (wu, du) = gate, up
    cols = x2.shape[1]
    return swiglu8_kind(x2, wg, prepared_kind(dg, d_ff, cols), wu, prepared_kind(du, d_ff, cols), d_ff)
