"""torch's OpenMP threads bound to cores (TORCH_BIND_THREADS=true), so that a click after a rest gets every core.

A decode of MobileSAM on torch (2 cores of an AMD EPYC, 1920x1080) takes 42 ms right after another, and 60 ms
when no decode ran for 0.1 s or more before it: about one core's speed. OpenMP splits each operation evenly
between its threads; binding its worker thread and the calling thread to a core each brings the decode after a
rest to 44-47 ms, binding either alone does not (so the likely cause, inferred, is the two sharing one core
while the woken worker is placed beside its waker). Only a decode after a rest is pinned (`advanced_sam`):
pinning every one, 4 and 8 users clicking at once over HTTP waited longer (p95 183 -> 248 ms, 328 -> 537 ms), a
pinned thread being unable to move away from the other threads on its core.

Off by default: through the server (`python -m tools.bench --modes torch`, same machine, 2026-12-07) a click
after a rest took 52 instead of 68 ms, but one user clicking without pauses 67 instead of 51 ms, 4 users at once
p95 230 instead of 183 ms, and 8 annotators at work (`tools.bench.mixed`) waited 7.6 s for a first click on a new
image instead of 5.2-6.2 (bound, the embedding's workers cannot leave a core another thread wants; README, "Speed
and memory").

`openmp_bound_to_cores` wraps the import of torch: OpenMP (libgomp) reads `OMP_PROC_BIND` / `OMP_PLACES` once,
as torch loads it, and then binds its worker threads, one core each. It also binds the thread that loads it, and
every thread that first starts an OpenMP team, to one core for good, and threads they create inherit that: so
the importing thread gets its CPUs back right after the import, and `pinned` keeps a caller on its team's core
only while its block runs. A user's own OpenMP affinity settings are left as they are (and `pinned` does nothing
then), as on one CPU, where there is nothing to bind, and off Linux.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from sam_backend.settings import parse_bool

log = logging.getLogger(__name__)

#: the server's setting that asks for the binding (off by default: see the module docstring)
SETTING = "TORCH_BIND_THREADS"
#: the settings that choose OpenMP's thread placement; any of them set by the user: theirs is kept
USER_SETTINGS = ("OMP_PROC_BIND", "OMP_PLACES", "GOMP_CPU_AFFINITY", "KMP_AFFINITY")
#: what `openmp_bound_to_cores` sets while torch loads OpenMP: threads of a team on consecutive cores
BINDING = {"OMP_PROC_BIND": "close", "OMP_PLACES": "cores"}


class _State(threading.local):
    """Per thread: the CPUs OpenMP bound it to (None until known), and how many `pinned` blocks it is in."""

    core: frozenset[int] | None = None
    depth = 0


_cpus: frozenset[int] | None = None  # the process's CPUs when OpenMP was loaded with BINDING; None: not bound
_threads = _State()


def can_bind() -> bool:
    """Whether binding was asked for (TORCH_BIND_THREADS=true), may help and is ours to set: Linux, at least 2
    CPUs, no OpenMP placement set by the user, and torch not loaded yet (OpenMP reads the settings once)."""
    try:
        wanted = parse_bool(SETTING, os.environ.get(SETTING, "false"))
    except ValueError:  # Settings.from_env says so at start-up
        wanted = False
    return (wanted and hasattr(os, "sched_setaffinity") and "torch" not in sys.modules
            and not any(name in os.environ for name in USER_SETTINGS) and len(os.sched_getaffinity(0)) > 1)


@contextmanager
def openmp_bound_to_cores() -> Iterator[None]:
    """Import torch inside this block (first import in the process) to have its OpenMP threads bound to cores.

    The settings are in the environment only during the block (child processes do not inherit them: a torch
    process of ours binds again, and anything else would have its first thread stuck on one core); the calling
    thread gets its CPUs back after it. Does nothing when `can_bind` says no."""
    global _cpus
    if not can_bind():
        yield
        return
    cpus = frozenset(os.sched_getaffinity(0))
    os.environ.update(BINDING)
    try:
        yield
    finally:
        for name in BINDING:
            os.environ.pop(name, None)
        if "torch" in sys.modules:
            _cpus = cpus
            bound_here = frozenset(os.sched_getaffinity(0))
            if bound_here != cpus:  # OpenMP bound the loading thread as it loaded
                _threads.core = bound_here
        os.sched_setaffinity(0, cpus)
        log.debug("torch's OpenMP threads bound to cores: %s", _cpus is not None)


def is_bound() -> bool:
    """Whether torch's OpenMP threads were bound by `openmp_bound_to_cores` in this process."""
    return _cpus is not None


@contextmanager
def pinned(threads: int, pin: bool = True) -> Iterator[None]:
    """Run the block, which computes with torch on `threads` OpenMP threads, with the calling thread on the core
    OpenMP gave it (`pin`), beside its team's workers; afterwards the thread may run on every CPU of the process
    again (also with `pin` False: OpenMP would leave it on one core for good). Nothing changes for one thread,
    inside another `pinned` block, or when the threads are not bound.

    OpenMP binds a thread as it first starts a team, and only then: the block in which that happens is not
    pinned, and the core is remembered for the thread's later blocks (also when torch ran on the thread outside
    a block and OpenMP bound it then)."""
    state = _threads
    if threads < 2 or _cpus is None or state.depth:
        yield
        return
    cpus = _cpus
    before = frozenset(os.sched_getaffinity(0))
    core = state.core or (before if before != cpus else None)
    if core != before:
        os.sched_setaffinity(0, core if pin and core is not None else cpus)
    state.depth += 1
    try:
        yield
    finally:
        state.depth -= 1
        now = frozenset(os.sched_getaffinity(0))
        if core is None and now != cpus:
            core = now
        state.core = core
        if now != cpus:
            os.sched_setaffinity(0, cpus)
