"""benchmarks/routing.py's replay ceilings: with every token's routing known, `routing_known` is Belady's rule, and
knowing more tokens ahead never reads more than knowing fewer on these traces."""

from __future__ import annotations

import pytest

from benchmarks.routing import belady, best_online, routing_known, synthetic_trace


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("slots", [5, 12, 30])
def test_routing_known_of_the_whole_trace_is_belady(seed: int, slots: int) -> None:
    trace = synthetic_trace(40, 6, 8, 2, seed=seed, concentration=4, stickiness=0.3)
    assert routing_known(trace, 8, slots, len(trace)) == belady(trace, slots)


def test_knowing_the_next_token_beats_the_statistics_alone() -> None:
    """The gap the exact mode's notes (docs/BENCHMARKS.md, full size) report: one token known adds little to
    `best_online`, the next token's routing most of the way to Belady."""
    trace = synthetic_trace(60, 8, 8, 2, seed=3, concentration=20, stickiness=0.3)
    slots = 12  # fewer than a token's 16 choices, as the 1/4 cache at full size
    online, one, two, opt = (best_online(trace, 8, slots), routing_known(trace, 8, slots, 1),
                             routing_known(trace, 8, slots, 2), belady(trace, slots))
    assert online < two <= opt
    assert one < two
