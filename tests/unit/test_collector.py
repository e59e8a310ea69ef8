"""`steady_collector`: the startup heap leaves the collector's view while a worker runs, and comes back after."""

from __future__ import annotations

import gc

from streams.collector import steady_collector


def test_the_heap_is_frozen_while_running_and_the_collector_restored_after_the_last_worker():
    before_threshold, before_frozen = gc.get_threshold(), gc.get_freeze_count()
    startup = [object() for _ in range(10)], {"startup": [1, 2]}
    with steady_collector(12_345):
        frozen = gc.get_freeze_count()
        assert frozen > before_frozen
        assert gc.get_threshold()[0] == 12_345
        with steady_collector(12_345):  # a second worker in the same process
            assert gc.get_freeze_count() == frozen
        assert gc.get_freeze_count() == frozen, "the first worker still runs: nothing thawed"
    assert gc.get_threshold() == before_threshold
    assert gc.get_freeze_count() == before_frozen
    assert startup


def test_a_threshold_below_the_current_one_never_makes_collections_more_frequent():
    before = gc.get_threshold()
    gc.set_threshold(5_000, *before[1:])
    try:
        with steady_collector(1_000):
            assert gc.get_threshold()[0] == 5_000
    finally:
        gc.set_threshold(*before)


def test_a_threshold_of_zero_leaves_the_collector_as_it_is():
    before_threshold, before_frozen = gc.get_threshold(), gc.get_freeze_count()
    with steady_collector(0):
        assert (gc.get_threshold(), gc.get_freeze_count()) == (before_threshold, before_frozen)
