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
then), as on one core, where there is nothing to bind, and off Linux; asked for there, a warning says why not.
SAM 2's predictor (`sam2_predictor`) gives its threads their CPUs back but pins no click: with it the binding
only costs.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

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


def wanted() -> bool:
    """Whether the binding is asked for (TORCH_BIND_THREADS=true)."""
    try:
        return parse_bool(SETTING, os.environ.get(SETTING, "false"))
    except ValueError:  # Settings.from_env says so at start-up
        return False


def obstacle() -> str | None:
    """Why torch's threads cannot be bound here (None: they can): Linux only, at least 2 cores (two hyperthreads of
    one core are one OpenMP place), no OpenMP placement set by the user, and torch not loaded yet (OpenMP reads
    the settings once)."""
    if not hasattr(os, "sched_setaffinity"):
        return "not on Linux"
    if "torch" in sys.modules:
        return "torch was loaded before"
    theirs = [name for name in USER_SETTINGS if name in os.environ]
    if theirs:
        return f"{', '.join(theirs)} set in the environment (kept as given)"
    if physical_cores(os.sched_getaffinity(0)) < 2:
        return "fewer than 2 cores"
    return None


def can_bind() -> bool:
    """Whether binding was asked for and may help (`wanted`, no `obstacle`)."""
    return wanted() and obstacle() is None


def physical_cores(cpus: Iterable[int]) -> int:
    """How many cores the CPUs `cpus` span, the hyperthreads of one core counting once (as OpenMP's "cores"
    places do); the number of CPUs where the kernel does not say."""
    cpus = list(cpus)
    cores = set()
    for cpu in cpus:
        try:
            cores.add(Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip())
        except OSError:
            return len(cpus)
    return len(cores)


@contextmanager
def openmp_bound_to_cores() -> Iterator[None]:
    """Import torch inside this block (first import in the process) to have its OpenMP threads bound to cores.

    The settings are in the environment only during the block (child processes do not inherit them: a torch
    process of ours binds again, and anything else would have its first thread stuck on one core); the calling
    thread gets its CPUs back after it. Does nothing when `can_bind` says no."""
    global _cpus
    if not wanted() or is_bound():  # not asked for, or done by an earlier import
        yield
        return
    reason = obstacle()
    if reason is not None:
        log.warning("%s=true, but torch's threads are left unbound: %s", SETTING, reason)
        yield
        return
    cpus = frozenset(os.sched_getaffinity(0))
    os.environ.update(BINDING)
    try:
        yield
    finally:
        for name in BINDING:
            os.environ.pop(name, None)
        bound_here = frozenset(os.sched_getaffinity(0))
        if "torch" not in sys.modules:
            pass  # the import failed, and says why
        elif bound_here != cpus:  # OpenMP bound the loading thread as it loaded
            _cpus, _threads.core = cpus, bound_here
            os.sched_setaffinity(0, cpus)
            log.info("torch's OpenMP threads bound to cores (%s=true)", SETTING)
        else:  # another OpenMP runtime, or OpenMP loaded before torch: nothing was bound
            log.warning("%s=true, but loading torch bound no thread: left unbound", SETTING)


def is_bound() -> bool:
    """Whether torch's OpenMP threads were bound by `openmp_bound_to_cores` in this process."""
    return _cpus is not None


@contextmanager
def pinned(threads: int, pin: bool = True) -> Iterator[None]:
    """Run the block, which computes with torch on `threads` OpenMP threads, with the calling thread on the core
    OpenMP gave it (`pin`, for 2 threads or more), beside its team's workers; afterwards the thread may run on
    every CPU of the process again (also with `pin` False: OpenMP would leave it on one core for good). Nothing
    changes inside another `pinned` block, or when the threads are not bound.

    OpenMP binds a thread as it first starts a team, and only then: the block in which that happens runs pinned
    from that moment on whatever `pin` says, and the core is remembered for the thread's later blocks (also when
    torch ran on the thread outside a block and OpenMP bound it then). "Every CPU of the process" is the set it
    had when torch was loaded."""
    state = _threads
    if _cpus is None or state.depth:
        yield
        return
    cpus = _cpus
    before = frozenset(os.sched_getaffinity(0))
    core = state.core or (before if before != cpus else None)
    target = core if pin and threads >= 2 and core is not None else cpus
    if target != before:
        os.sched_setaffinity(0, target)
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
