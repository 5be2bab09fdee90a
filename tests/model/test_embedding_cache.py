"""The embedding cache: bounded, single-flight, thread-safe, and compact without changing masks."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from sam_backend.cache import EmbeddingCache, RecentImages
from sam_backend.sam.types import Embedding, Prompt
from tools.harness.scenes import all_scenes, interior_point, iou


def fake_embedding(value: float) -> Embedding:
    return Embedding(np.full((1, 256, 64, 64), value, np.float32), (10, 10), (1024, 1024))


def test_lru_keeps_the_most_recently_used():
    cache = EmbeddingCache(max_items=2)
    for key in "abc":
        cache.get_or_compute(key, lambda key=key: fake_embedding(ord(key)))
    assert "a" not in cache and "b" in cache and "c" in cache
    cache.get_or_compute("b", lambda: pytest.fail("b is cached"))
    cache.get_or_compute("d", lambda: fake_embedding(1))
    assert "b" in cache and "c" not in cache
    assert (cache.hits, cache.misses) == (1, 4)


def test_one_computation_for_many_threads_asking_at_once():
    cache = EmbeddingCache(max_items=4)
    calls = []
    gate = threading.Event()

    def slow():
        calls.append(1)
        gate.wait(5)
        return fake_embedding(3.0)

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(cache.get_or_compute, "k", slow) for _ in range(8)]
        time.sleep(0.2)
        gate.set()
        results = [f.result() for f in futures]
    assert len(calls) == 1
    assert all(r is results[0] for r in results)


def test_a_failure_is_not_cached_and_reaches_every_waiter():
    cache = EmbeddingCache(max_items=4)
    with pytest.raises(ValueError):
        cache.get_or_compute("k", lambda: (_ for _ in ()).throw(ValueError("broken image")))
    assert "k" not in cache
    assert cache.get_or_compute("k", lambda: fake_embedding(1.0)).features[0, 0, 0, 0] == 1.0


def test_prewarm_runs_newest_first_and_drops_the_oldest():
    cache = EmbeddingCache(max_items=8, prewarm_queue=2)
    order = []
    gate = threading.Event()
    cache.prewarm("blocker", lambda: gate.wait(5))
    time.sleep(0.1)
    for key in ("old", "middle", "new"):
        cache.prewarm(key, lambda key=key: order.append(key))
    gate.set()
    deadline = time.monotonic() + 5
    while len(order) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    assert order == ["new", "middle"]
    cache.close()


def test_float16_cache_keeps_masks(torch_predictor):
    """Float16 embeddings halve the cache and give the same masks (IoU >= 0.99) on every scene."""
    compact = EmbeddingCache(max_items=8, compact=True)
    for scene in all_scenes():
        full = torch_predictor.embed(scene.image)
        half = compact.get_or_compute(scene.name, lambda full=full: full)
        assert half.features.dtype == np.float16 and half.nbytes == full.nbytes // 2
        prompt = Prompt(np.array([interior_point(scene.mask)], np.float32), np.array([1], np.int32))
        assert iou(torch_predictor.decode(full, prompt).mask, torch_predictor.decode(half, prompt).mask) >= 0.99


# ---- RecentImages -----------------------------------------------------------------------------------------------
def test_recent_images_remember_a_source_for_ttl_seconds():
    now = [1000.0]
    recent = RecentImages(max_items=2, ttl=60, clock=lambda: now[0])
    assert recent.get("a") is None
    recent.put("a", "key-a")
    now[0] += 59
    assert recent.get("a") == "key-a"
    now[0] += 2  # 61 s after the download: downloaded again next time
    assert recent.get("a") is None


def test_recent_images_are_bounded_and_can_be_off():
    recent = RecentImages(max_items=2, ttl=60)
    for source in "abc":
        recent.put(source, f"key-{source}")
    assert [recent.get(s) for s in "abc"] == [None, "key-b", "key-c"]
    off = RecentImages(ttl=0)
    off.put("a", "key-a")
    assert off.get("a") is None


def test_different_keys_are_computed_one_at_a_time():
    """max_computing=1: the encoder runs once at a time, whatever the number of threads (memory stays bounded)."""
    cache = EmbeddingCache(max_items=8, max_computing=1)
    running, most = [0], [0]
    lock = threading.Lock()

    def slow(value):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return fake_embedding(value)

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda i: cache.get_or_compute(i, lambda: slow(float(i))), range(6)))
    assert most[0] == 1
    assert [r.features[0, 0, 0, 0] for r in results] == [float(i) for i in range(6)]
    two = EmbeddingCache(max_items=8, max_computing=2)
    most[0] = 0
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda i: two.get_or_compute(i, lambda: slow(float(i))), range(6)))
    assert most[0] == 2


def test_idle_only_while_nothing_is_computed_or_waits_to_be_prewarmed():
    """`idle` gates zoom-in's speculative crop embedding (model.py): none while another embedding runs."""
    cache = EmbeddingCache(max_items=4)
    release, started = threading.Event(), threading.Event()

    def slow() -> Embedding:
        started.set()
        release.wait(10)
        return fake_embedding(1.0)

    try:
        assert cache.idle
        worker = threading.Thread(target=cache.get_or_compute, args=("a", slow))
        worker.start()
        assert started.wait(10) and not cache.idle
        release.set()
        worker.join(10)
        assert cache.idle and cache.get("a") is not None
    finally:
        release.set()
        cache.close()
