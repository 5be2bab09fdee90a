"""sam.cpu_binding's checks, in this process (the binding itself: tests/model/test_cpu_binding.py, fresh processes;
this file's name differs from that one's: pytest imports test files by their base name)."""
from __future__ import annotations

import os
import sys

import pytest

from sam_backend.sam import cpu_binding

linux = pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="CPU affinity is Linux's")


@linux
def test_cores_count_the_hyperthreads_of_one_core_once():
    cpus = os.sched_getaffinity(0)
    siblings = set()
    for cpu in cpus:
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list") as listing:
                siblings.add(listing.read().strip())
        except OSError:
            pytest.skip("the kernel does not say which CPUs share a core here")
    assert cpu_binding.physical_cores(cpus) == len(siblings) <= len(cpus)
    assert cpu_binding.physical_cores([*cpus, 100_000]) == len(cpus) + 1  # the kernel does not say: CPUs


@linux
def test_the_binding_asked_for_says_why_it_cannot_be(monkeypatch):
    monkeypatch.setenv(cpu_binding.SETTING, "true")
    monkeypatch.delitem(sys.modules, "torch", raising=False)  # as before torch loads
    for name in cpu_binding.USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KMP_AFFINITY", "compact")
    assert "KMP_AFFINITY" in cpu_binding.obstacle() and not cpu_binding.can_bind()
    monkeypatch.delenv("KMP_AFFINITY")
    monkeypatch.setattr(cpu_binding, "physical_cores", lambda cpus: 1)
    assert cpu_binding.obstacle() == "fewer than 2 cores"
    monkeypatch.setenv(cpu_binding.SETTING, "no")
    assert not cpu_binding.wanted() and not cpu_binding.can_bind()


@linux
def test_unbound_blocks_leave_the_thread_alone():
    if cpu_binding.is_bound():
        pytest.skip("this test process was started with TORCH_BIND_THREADS=true")
    before = os.sched_getaffinity(0)
    with cpu_binding.pinned(2), cpu_binding.pinned(1, pin=False):
        assert os.sched_getaffinity(0) == before
    assert os.sched_getaffinity(0) == before
