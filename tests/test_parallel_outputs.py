"""Per-study output work on a few threads (lumbar_ray/outputs/parallel.py): results in input
order, at most `workers` studies in flight, errors at their item's turn."""

from __future__ import annotations

import random
import threading
import time

import pytest

from lumbar_ray import cli
from lumbar_ray.outputs.parallel import DEFAULT_STUDY_WORKERS, map_in_order


def test_results_come_in_input_order_whatever_order_they_finish_in():
    rng = random.Random(3)
    delays = {i: rng.uniform(0, 0.01) for i in range(40)}

    def slow_square(i):
        time.sleep(delays[i])
        return i * i

    assert list(map_in_order(slow_square, range(40), workers=4)) == [i * i for i in range(40)]


def test_the_workers_run_at_once_and_never_more_than_asked():
    workers = 4
    # Each call waits until `workers` calls are inside it: run one at a time, this times out.
    barrier = threading.Barrier(workers, timeout=30)
    lock = threading.Lock()
    inside, most = 0, 0

    def meet(i):
        nonlocal inside, most
        with lock:
            inside += 1
            most = max(most, inside)
        barrier.wait()
        with lock:
            inside -= 1
        return i

    assert list(map_in_order(meet, range(3 * workers), workers=workers)) == list(range(3 * workers))
    assert most == workers


def test_items_are_taken_only_as_results_are_consumed():
    taken = []

    def source():
        for i in range(100):
            taken.append(i)
            yield i

    results = map_in_order(lambda i: i, source(), workers=3)
    assert next(results) == 0
    assert len(taken) <= 3  # a few studies ahead, not the whole archive
    results.close()
    assert len(taken) <= 3


def test_an_error_is_raised_at_its_items_turn_after_the_results_before_it():
    def fail_on_five(i):
        if i == 5:
            raise RuntimeError("study 5 is unreadable")
        return i

    got = []
    with pytest.raises(RuntimeError, match="study 5"):
        for value in map_in_order(fail_on_five, range(10), workers=3):
            got.append(value)
    assert got == [0, 1, 2, 3, 4]


def test_one_worker_runs_in_the_callers_thread_and_zero_is_refused():
    caller = threading.get_ident()
    assert set(map_in_order(lambda i: threading.get_ident(), range(5), workers=1)) == {caller}
    with pytest.raises(ValueError, match="at least 1"):
        list(map_in_order(lambda i: i, range(3), workers=0))


def test_the_cli_help_names_the_default_and_leaves_it_to_the_library():
    assert f"default {DEFAULT_STUDY_WORKERS})" in cli._STUDY_WORKERS_HELP
    assert cli._study_workers(None) == {} and cli._study_workers(2) == {"workers": 2}
