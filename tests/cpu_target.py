"""Run code compiled by numba for another CPU than the host's, in a fresh process (the kernels' intrinsics pick
their instructions when compiled: NUMBA_CPU_NAME alone gives the portable IR, NUMBA_CPU_FEATURES names the features
they may use, simd._host_has). Each call compiles into `cache_dir`, never into the host's cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HASWELL = {"NUMBA_CPU_NAME": "haswell"}  # no features named: the portable paths
HASWELL_AVX2 = {**HASWELL, "NUMBA_CPU_FEATURES": "+avx,+avx2,+fma,+f16c"}  # the AVX2 paths


def run_for_cpu(code: str, cache_dir: Path, cpu: dict[str, str], timeout: float = 600) -> str:
    """`python -c code` with the repository and tests/ importable, compiled for `cpu` ({} = the host): its stdout."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache_dir), "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", **cpu}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout
