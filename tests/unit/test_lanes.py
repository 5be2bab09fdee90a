"""sam.lanes: the encoder's threads run at a lower CPU priority, and so do the threads they start."""
from __future__ import annotations

import os
import sys
import threading

import pytest

from sam_backend.sam.lanes import EncoderLane




def own_nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")


@linux_only
def test_lane_threads_and_the_threads_they_start_run_at_the_lowered_priority():
    base = own_nice()
    lane = EncoderLane(nice=5, workers=2)
    try:
        assert lane.run(own_nice) == min(base + 5, 19)
        started: list[int] = []

        def spawn() -> None:  # as OpenMP and ONNX Runtime start their pools from the thread that first needs them
            child = threading.Thread(target=lambda: started.append(own_nice()))
            child.start()
            child.join()

        lane.run(spawn)
        assert started == [min(base + 5, 19)]
    finally:
        lane.close()
    assert own_nice() == base  # the caller's own priority is untouched


def test_a_lane_at_nice_0_keeps_the_priority_and_passes_results_and_errors_back():
    lane = EncoderLane(nice=0)
    try:
        assert lane.run(own_nice) == own_nice()
        assert lane.run(lambda a, b=0: a + b, 2, b=3) == 5
        with pytest.raises(ZeroDivisionError):
            lane.run(lambda: 1 / 0)
        assert lane.run(lambda: "still serving") == "still serving"
    finally:
        lane.close()


def test_decodes_say_whether_a_decode_began_alone():
    from sam_backend.sam.lanes import Decodes

    decodes = Decodes()
    inside, release = threading.Event(), threading.Event()
    seen: list[bool] = []

    def first() -> None:
        with decodes.running() as alone:
            seen.append(alone)
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=first)
    thread.start()
    assert inside.wait(10)
    with decodes.running() as alone:  # overlaps the first
        seen.append(alone)
    release.set()
    thread.join()
    with decodes.running() as alone:  # alone again
        seen.append(alone)
    assert seen == [True, False, True]


def test_decodes_say_when_the_server_has_rested():
    import time

    from sam_backend.sam.lanes import Decodes

    decodes = Decodes()
    with decodes.running_after_rest(3600) as (alone, rested):
        assert alone and rested  # none yet
        with decodes.running_after_rest(0.0) as (alone, rested):
            assert not alone and not rested  # one is running
    with decodes.running_after_rest(3600) as (alone, rested):
        assert alone and not rested  # one ended less than an hour ago
    time.sleep(0.02)
    with decodes.running_after_rest(0.01) as (alone, rested):
        assert alone and rested
