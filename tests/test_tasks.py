"""kernels/tasks.py: parallel loops whose threads claim tasks as they go — every task once, and a slow thread's
share taken over by the others."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from numba import njit, prange

from mertools.kernels.tasks import counters, fetch_add, next_task, threads


@njit(parallel=True)
def _run(n_tasks, heavy, ran_by, seen, chase, order=np.zeros(1, np.int64)):  # noqa: B008 - never written
    """Each task records the thread that ran it, counts its runs and, with `order` (n_tasks + 1,), the rank of its
    claim; task 0 first follows `heavy` links of the permutation `chase` (a dependent chain of loads LLVM cannot
    fold: time spent on one thread)."""
    nt = threads()
    ctr = counters(nt)
    for me in prange(nt):
        while True:
            t = next_task(ctr, me, nt, n_tasks)
            if t < 0:
                break
            if order.size > n_tasks:
                order[t] = fetch_add(order, n_tasks)
            if t == 0:
                j = 0
                for _ in range(heavy):
                    j = chase[j]
                seen[n_tasks] = j  # keeps the loop
            ran_by[t] = me
            fetch_add(seen, t)


@pytest.fixture
def two_threads():
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba has one thread here")
    before = numba.get_num_threads()
    numba.set_num_threads(2)
    yield
    numba.set_num_threads(before)


@pytest.mark.parametrize("n_tasks", [0, 1, 2, 3, 7, 64, 1001])
@pytest.mark.parametrize("nt", [1, 2])
def test_every_task_runs_once(n_tasks: int, nt: int) -> None:
    if nt > numba.config.NUMBA_NUM_THREADS:
        pytest.skip("numba has fewer threads here")
    before = numba.get_num_threads()
    numba.set_num_threads(nt)
    try:
        ran_by, seen = np.full(n_tasks, -1, np.int64), np.zeros(n_tasks + 1, np.int64)
        _run(n_tasks, 0, ran_by, seen, np.zeros(1, np.int64))
        assert (seen[:n_tasks] == 1).all()
        assert ((ran_by >= 0) & (ran_by < nt)).all()
    finally:
        numba.set_num_threads(before)


def test_threads_is_numbas_thread_count(two_threads: None) -> None:
    @njit
    def count():
        return threads()

    assert count() == 2
    numba.set_num_threads(1)
    assert count() == 1


@njit
def _claims(script, nt, n_tasks):
    """next_task for the threads named by `script` one claim after another, serially: the tasks they get (-1: none)."""
    ctr = counters(nt)
    out = np.empty(script.size, np.int64)
    for i in range(script.size):
        out[i] = next_task(ctr, script[i], nt, n_tasks)
    return out


def test_each_thread_claims_its_share_front_to_back_then_the_others() -> None:
    """10 tasks on 2 threads (shares 0..4 and 5..9): each thread's claims walk its own share in order (one weight
    stream, as the static split's), then the other's where its owner has not got to; then -1 for both."""
    got = _claims(np.array([0, 1, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1]), 2, 10)
    assert got.tolist() == [0, 5, 1, 6, 7, 8, 9, 2, 3, 4, -1, -1]
    # 4 tasks on 3 threads: shares of 2, the last one past the end (empty): thread 2 only ever takes the others'
    assert _claims(np.array([2, 0, 1, 2, 2]), 3, 4).tolist() == [0, 1, 2, 3, -1]


def test_a_slow_threads_share_is_taken_over(two_threads: None) -> None:
    """Task 0 takes ~0.2 s (8M cache-missing loads): every task claimed after it goes to the other thread, whichever
    thread took it (with numba's static split its thread would go on with its own share after it)."""
    n = 64
    chase = np.random.default_rng(0).permutation(1 << 22).astype(np.int64)  # 32 MiB: most links miss the caches
    ran_by, seen, order = np.full(n, -1, np.int64), np.zeros(n + 1, np.int64), np.zeros(n + 1, np.int64)
    _run(n, 0, ran_by, seen, chase, order)  # compiled before the timed case
    ran_by[:], seen[:], order[:] = -1, 0, 0
    _run(n, 8_000_000, ran_by, seen, chase, order)
    assert (seen[:n] == 1).all() and sorted(order[:n]) == list(range(n))
    later = order[:n] > order[0]
    assert later.any() or order[0] == n - 1
    assert (ran_by[later] != ran_by[0]).all()
