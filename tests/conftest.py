from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# packed copies (runtime/packed.py) would be written into the session's shared layouts, which tests treat as read-only,
# and change what later tests' runs read; tests of the copies turn them on for layouts of their own
os.environ.setdefault("MERTOOLS_PACKED_COPIES", "0")
# under pytest-xdist (`make test`: two workers) each worker's numba threads sleep when idle instead of spinning: two
# workers' spinning teams on two cores made a parallel region wait for a descheduled thread (a subset of the suite
# took 157 s on two workers against 94 s on one; 74 s with this). Read when numba's OpenMP pool starts.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the fixtures/ generators live at the repo root

# Modules whose tests run long (a server soak, conversions killed at many points, a checkpoint many
# times its cache): all their tests are marked `slow`, so `make test-fast` (-m "not slow") leaves them out.
SLOW_MODULES = frozenset({"test_soak", "test_interrupt", "test_memory"})


# How `make test` hands tests to its two workers (`--dist loadgroup --no-loadscope-reorder`: in collection order, a
# scope at a time, each test its own scope but for the groups `_scope` names). First two lanes, one per worker, of the
# tests that compile most of the suite's kernels from an empty cache (`make test` from a fresh clone, stop 51: the
# exact kernels 67 s; `mertools run`'s 8-bit kernels 137 s, then the families' 8-bit step 38 s): handed out one by
# one, both workers compiled the same kernels at once (test_approx's first two tests took 128 s and 130 s side by side).
# Then the rest in file order, and the slow modules last (their `mertools run` / `serve` processes compiled the 8-bit
# kernels beside the lane compiling them when they came right after the lanes; each of their tests is under 40 s).
COMPILE_LANES = (
    ("tests/test_approx.py::test_exact_settings_give_identical_logits",
     "tests/test_approx.py::test_batched_and_prefill_steps_with_approximation"),
    # the 8-bit kernels of `mertools run` first, alone (the families' tests compare them with the exact kernels, which
    # the other lane compiles meanwhile), then the families' 8-bit step, then deepseek2's latent attention
    ("tests/test_preload.py::test_the_preloaded_kernels_are_the_runs_and_compute_the_same",
     "tests/test_families.py::test_int8_kernels_close_to_exact[olmoe]",
     "tests/test_deepseek2.py::test_int8_kernels_with_latent_attention[v2]"),
)
# Modules whose tests share a machine-wide resource run on one pytest-xdist worker, at the end of the lane named: Ray's
# tests (a cluster per test, and Ray's defaults, ports and /tmp/ray, are one per machine; ~4 minutes), after the lane
# that compiles the 8-bit layer loop their shards run (started beside it, a 4-shard test compiled the same kernels at
# the same time: 120 s against 10 s warm)
ONE_WORKER_MODULES = {"test_shards": 1}
_LANE_OF = {nodeid: (lane, i) for lane, tests in enumerate(COMPILE_LANES) for i, nodeid in enumerate(tests)}


def _module(nodeid: str) -> str:
    return nodeid.split("::", 1)[0].rsplit("/", 1)[-1].removesuffix(".py")


def _scope(nodeid: str) -> str:
    """The unit of work a worker takes `nodeid` in: its lane (a lane's test or a module of ONE_WORKER_MODULES), or
    itself."""
    lane = _LANE_OF[nodeid][0] if nodeid in _LANE_OF else ONE_WORKER_MODULES.get(_module(nodeid))
    return nodeid if lane is None else f"compile-lane-{lane}"


def _rank(item: pytest.Item) -> tuple[int, int]:
    """Where `item` goes in the run (sorted, stable: file order within a rank): a lane's tests in the lane's order,
    then its one-worker modules, then the rest, then the slow modules."""
    if item.nodeid in _LANE_OF:
        return _LANE_OF[item.nodeid]
    name = _module(item.nodeid)
    if name in ONE_WORKER_MODULES:
        return ONE_WORKER_MODULES[name], len(COMPILE_LANES[ONE_WORKER_MODULES[name]])
    return len(COMPILE_LANES) + (1 if name in SLOW_MODULES else 0), 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _module(item.nodeid) in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=_rank)  # stable: file order within a rank


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """`--dist loadgroup` with the groups of `_scope` (pytest 9.2 derives node ids from a structure xdist 3.8's
    `xdist_group` marker does not reach: its groups were never formed)."""
    if config.getoption("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class Lanes(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _scope(nodeid)

    return Lanes(config, log)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny Mixtral as a HF directory and as GGUFs (merged f16/q4_0/q8_0, per-expert f16)."""
    from fixtures.tiny_mixtral import build_all

    return build_all(tmp_path_factory.mktemp("tiny"), seed=0)


TinyLayout = Callable[..., Path]
# the HF q4_0 layout's directory name is the model id `mertools serve` gives it, which the server tests ask for
_DIR_NAMES = {("hf", "q4_0"): "tiny-q4"}


@pytest.fixture(scope="session")
def tiny_layout(tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> TinyLayout:
    """`tiny_layout(source="hf", dtype="auto") -> Path`: the `tiny` source ("hf", "f16", "f16_per_expert",
    "q4_0", "q8_0") converted with `ConvertOptions(dtype=dtype)`, once per session for each pair.

    Shared by every module that asks for the same pair: treat it as read-only, and copy it
    (`shutil.copytree(tiny_layout(...), tmp_path / "lay")`) before truncating, corrupting or rewriting anything.
    """
    from mertools.convert.pipeline import ConvertOptions, convert

    built: dict[tuple[str, str], Path] = {}
    root = tmp_path_factory.mktemp("tiny-layouts")

    def get(source: str = "hf", dtype: str = "auto") -> Path:
        if source not in tiny:
            raise KeyError(f"no tiny source {source!r}; known: {sorted(tiny)}")
        if (source, dtype) not in built:
            out = root / _DIR_NAMES.get((source, dtype), f"{source}-{dtype}")
            built[(source, dtype)] = convert(tiny[source], out, ConvertOptions(dtype=dtype, progress=False)).out
        return built[(source, dtype)]

    return get


@pytest.fixture(scope="session")
def tiny_q4_0(tiny_layout: TinyLayout) -> Path:
    """The HF directory converted to q4_0, in a directory named `tiny-q4` (so served as model "tiny-q4"): the
    layout most runtime, server and fault tests use (read-only)."""
    return tiny_layout("hf", "q4_0")


@pytest.fixture(scope="session")
def tiny_dtypes(tiny_layout: TinyLayout) -> dict[str, Path]:
    """dtype -> the HF directory converted to it, for f16, q8_0, q4_0 and q4_k (read-only)."""
    return {dtype: tiny_layout("hf", dtype) for dtype in ("f16", "q8_0", "q4_0", "q4_k")}
