"""kernels/kinds.py: a dispatch compiled for the type codes it is given runs each of them, and a kernel entered for
one type compiles no other type's code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cpu_target import run_for_cpu
from numba import njit

from mertools.kernels.kinds import codes_of, key, switch


@njit(inline="always")
def _body(kind, out):
    if kind == 2:
        out[0] = 20
    elif kind == 12:
        out[0] = 120
    else:
        out[0] = -1


_dispatch = switch(_body)


def _entry(kinds: str):  # a jitted closure holding kinds, as the kernels' `*_for` are
    @njit
    def run(kind, out):
        _dispatch(kinds, kind, out)
    return run


def _run(fn, kind: int) -> int:  # noqa: ANN001
    out = np.zeros(1, np.int64)
    fn(kind, out)
    return int(out[0])


def test_key_names_each_code_once_in_order() -> None:
    assert key(14, 12, 14) == "12,14" and codes_of(key(14, 12, 14)) == (12, 14)
    with pytest.raises(ValueError, match="at least one"):
        key()


def test_a_dispatch_runs_each_code_it_names() -> None:
    both = _entry(key(2, 12))
    assert (_run(both, 2), _run(both, 12)) == (20, 120)
    assert _run(_entry(key(12)), 12) == 120 and _run(_entry(key(2)), 2) == 20
    assert _run(_entry(key(2, 7, 12)), 7) == -1  # a code the body does not know takes its default branch


@njit
def _plain(kinds, kind, out):
    _dispatch(kinds, kind, out)


def test_without_literal_kinds_every_branch_is_kept() -> None:
    """kinds from Python is a plain string to numba: every branch compiled, the code chosen at run time."""
    plain = lambda kind, out: _plain("2", kind, out)  # noqa: E731
    assert (_run(plain, 2), _run(plain, 12), _run(plain, 5)) == (20, 120, -1)


def test_a_kernel_compiles_only_the_types_it_is_given(tmp_path: Path) -> None:
    """In a fresh process and cache, the exact and the 8-bit product of a Q4_0 weight compile Q4_0's decoders and
    none of Q6_K's (each type's functions are numba dispatchers: their signatures say what was compiled)."""
    code = (
        "import numpy as np\n"
        "from mertools.dtypes import _k8, _k8packed, q4_0, q6_k\n"
        "from mertools.kernels import int8, quantize\n"
        "from mertools.kernels.matmul import matmul\n"
        "w = quantize(np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32), 'q4_0')\n"
        "x = np.ones((1, 256), np.float32)\n"
        "matmul(x, w, 'q4_0', 64, 256)\n"
        "int8.matmul8(x, int8.prepare(w.copy(), 'q4_0'), 'q4_0', np.empty((1, 64), np.float32))\n"
        "print(len(q4_0.matvec_group.signatures), len(q6_k.matvec_group.signatures),\n"
        "      len(_k8packed.q6_k_packed_group.signatures), len(_k8.q6_k_group.signatures))\n"
    )
    used, *others = (int(v) for v in run_for_cpu(code, tmp_path / "cache", {}).split())
    assert used == 1 and others == [0, 0, 0]
