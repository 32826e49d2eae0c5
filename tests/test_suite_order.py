"""The order `make test` hands tests to its two workers (tests/conftest.py): the lanes name tests that exist, and
the units of work are what the lanes and ONE_WORKER_MODULES say."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import conftest

ROOT = Path(__file__).resolve().parent.parent


def test_the_compile_lanes_name_tests_that_exist() -> None:
    """A renamed test or parameter would silently leave its lane: both workers would compile its kernels at once
    again. The lanes' ids are checked against pytest's own collection of their modules."""
    ids = [nodeid for lane in conftest.COMPILE_LANES for nodeid in lane]
    files = sorted({nodeid.split("::")[0] for nodeid in ids})
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *files],
                         cwd=ROOT, capture_output=True, text=True, timeout=300).stdout
    collected = set(out.split())
    assert len(collected) > len(ids)  # the modules' tests were listed
    assert [nodeid for nodeid in ids if nodeid not in collected] == []


def test_the_units_of_work_are_the_lanes_the_one_worker_modules_and_single_tests() -> None:
    (a, b), (c, d) = conftest.COMPILE_LANES
    assert conftest._scope(a) == conftest._scope(b) != conftest._scope(c) == conftest._scope(d)
    shards = ["tests/test_shards.py::test_plans", "tests/test_shards.py::test_plan_file"]
    assert {conftest._scope(s) for s in shards} == {"test_shards"}
    other = "tests/test_engine.py::test_anything[x]"
    assert conftest._scope(other) == other
