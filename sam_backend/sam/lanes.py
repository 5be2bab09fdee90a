"""Clicks before embeddings: the encoder runs in a lane of threads of lower CPU priority, and a click's decode
uses every core only when it runs alone (`Decodes`).

An embedding keeps every core busy for about a second; a click's decode needs tens of milliseconds. When both want
the CPU, the kernel's scheduler should give it to the click. Each predictor runs its encoder on an `EncoderLane`:
threads whose nice value is raised (Linux applies nice per thread), so that the encoder's own worker threads,
which torch's OpenMP and ONNX Runtime create from the thread that first runs (or opens) the encoder, inherit it.
At nice 10 a busy encoder thread gets about a tenth of a core that a decode wants; alone, it gets all of it, so
embedding throughput on an idle server is unchanged.

Raising a nice value is allowed to any process; lowering it back is not, hence threads of their own. Where the
platform has no per-thread priority (not Linux) the lane still serialises the encoder, at normal priority.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


def lower_priority(nice: int) -> None:
    """Raise the calling thread's nice value by `nice` (0: leave it); threads it creates later inherit it."""
    if nice <= 0 or not sys.platform.startswith("linux"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + nice)
    except OSError as error:  # e.g. a seccomp profile that forbids setpriority: keep serving, at normal priority
        log.warning("cannot lower the encoder thread's CPU priority (%s); clicks may wait behind embeddings", error)


class EncoderLane:
    """`workers` threads at `nice` for the encoder's work. Thread-safe; `run` blocks until its call is done."""

    def __init__(self, nice: int = 10, workers: int = 1, name: str = "encoder") -> None:
        self.nice = nice
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix=name,
                                        initializer=lower_priority, initargs=(nice,))

    def run(self, function: Callable[..., T], *args, **kwargs) -> T:
        """`function(*args, **kwargs)` on a lane thread; its result, or its exception raised here."""
        return self._pool.submit(function, *args, **kwargs).result()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class Decodes:
    """Counts the decodes in flight, so that a click that runs alone may use every core and overlapping clicks
    one core each (more threads than cores only make them wait on each other). Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active = 0
        self._last_end = float("-inf")

    @contextmanager
    def running(self) -> Iterator[bool]:
        """Count one decode while the block runs; yields True when no other decode was running as it began."""
        with self.running_after_rest(0.0) as (alone, _):
            yield alone

    @contextmanager
    def running_after_rest(self, seconds: float) -> Iterator[tuple[bool, bool]]:
        """`running`, yielding (alone, rested): rested when, besides, no decode ended in the last `seconds` (a
        server at rest). Both are read at once: two clicks that arrive together after a rest are not both
        rested."""
        with self._lock:
            alone = self._active == 0
            rested = alone and time.monotonic() - self._last_end >= seconds
            self._active += 1
        try:
            yield alone, rested
        finally:
            with self._lock:
                self._active -= 1
                self._last_end = time.monotonic()
