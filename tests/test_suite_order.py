"""The order `make test` hands tests to its two workers (tests/conftest.py): the lanes name tests that exist, and
the units of work are what the lanes and ONE_WORKER_MODULES say."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import conftest

ROOT = Path(__file__).resolve().parent.parent


def test_the_compile_lanes_name_tests_that_exist_and_start_the_run() -> None:
    """A renamed test or parameter would silently leave its lane: both workers would compile its kernels at once
    again. The lanes' ids are checked against pytest's own collection of their modules, the one-worker modules' and
    the slow ones' (and one other's), and that collection sorted by `_rank`, as the hook sorts it under xdist: the
    lanes in their order, each one-worker module at its lane's end, then the rest, then the slow modules."""
    ids = [nodeid for lane in conftest.COMPILE_LANES for nodeid in lane]
    modules = {*(nodeid.split("::")[0] for nodeid in ids), *(f"tests/{m}.py" for m in conftest.ONE_WORKER_MODULES),
               *(f"tests/{m}.py" for m in conftest.SLOW_MODULES), "tests/test_cache.py"}
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          *sorted(modules)], cwd=ROOT, capture_output=True, text=True, timeout=300).stdout
    collected = [line for line in out.split() if "::" in line]
    assert len(collected) > len(ids)  # the modules' tests were listed
    assert [nodeid for nodeid in ids if nodeid not in collected] == []

    class Item:
        def __init__(self, nodeid: str) -> None:
            self.nodeid = nodeid

    order = [i.nodeid for i in sorted(map(Item, collected), key=conftest._rank)]
    of = {m: [i for i in collected if conftest._module(i) == m] for m in {conftest._module(i) for i in collected}}
    want = []
    for lane, tests in enumerate(conftest.COMPILE_LANES):
        want += list(tests) + [i for m, n in conftest.ONE_WORKER_MODULES.items() if n == lane for i in of[m]]
    slow = [i for i in collected if conftest._module(i) in conftest.SLOW_MODULES]
    assert all(len(of[m]) > 1 for m in conftest.ONE_WORKER_MODULES) and slow
    assert order == want + [i for i in collected if i not in set(want) and i not in set(slow)] + slow


def test_the_units_of_work_are_the_lanes_the_one_worker_modules_and_single_tests() -> None:
    first, second = ({conftest._scope(nodeid) for nodeid in lane} for lane in conftest.COMPILE_LANES)
    assert len(first) == len(second) == 1 and first != second
    shards = ["tests/test_shards.py::test_plans", "tests/test_shards.py::test_plan_file"]
    assert {conftest._scope(s) for s in shards} == second  # Ray's tests: the 8-bit lane's end
    other = "tests/test_engine.py::test_anything[x]"
    assert conftest._scope(other) == other

