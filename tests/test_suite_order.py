"""The order `make test` hands tests to its two workers (tests/conftest.py): the lanes name tests that exist, and
the scheduler groups what the lanes and ONE_WORKER_MODULES say."""

from __future__ import annotations

from pathlib import Path

import conftest

ROOT = Path(__file__).resolve().parent.parent


def test_the_compile_lanes_name_tests_that_exist() -> None:
    """A renamed test would silently leave its lane: both workers would compile its kernels at once again."""
    for lane in conftest.COMPILE_LANES:
        for nodeid in lane:
            path, name = nodeid.split("::")
            assert f"def {name.split('[')[0]}(" in (ROOT / path).read_text(), nodeid


def test_the_units_of_work_are_the_lanes_the_one_worker_modules_and_single_tests() -> None:
    (a, b), (c, d) = conftest.COMPILE_LANES
    assert conftest._scope(a) == conftest._scope(b) != conftest._scope(c) == conftest._scope(d)
    shards = ["tests/test_shards.py::test_plans", "tests/test_shards.py::test_plan_file"]
    assert {conftest._scope(s) for s in shards} == {"test_shards"}
    other = "tests/test_engine.py::test_anything[x]"
    assert conftest._scope(other) == other
