"""Image embeddings, computed once per image content and model, shared by every thread of a process.

The cache is a bounded LRU. A key being computed is computed once: other threads asking for it wait for the
same result instead of starting a second multi-second encoder run ("single flight"). A failed computation is
not cached; every waiter sees the error. At most `max_computing` different keys are computed at once: each
encoder run already uses every core, and each holds hundreds of MB of activations.

`RecentImages` remembers which content an image URL gave when it was last downloaded, so that the clicks after
the first on a task find their embedding without downloading the image again.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Hashable

import numpy as np

from sam_backend.lru import BoundedLRU
from sam_backend.sam.types import Embedding

log = logging.getLogger(__name__)


class EmbeddingCache:
    """LRU of at most `max_items` embeddings, keyed by (model_version, image digest) or any hashable.

    compact: store features as float16 (half the memory; masks stay the same, see tests).
    max_computing: how many computations run at once; the others wait their turn.
    """

    def __init__(self, max_items: int = 32, compact: bool = False, prewarm_queue: int = 16,
                 max_computing: int = 1) -> None:
        self.max_items = max_items
        self.compact = compact
        self._computing = threading.BoundedSemaphore(max_computing)
        self._items: BoundedLRU[Hashable, Embedding] = BoundedLRU(max_items, size_of=lambda item: item.nbytes)
        self._pending: dict[Hashable, Future] = {}
        self._lock = threading.Lock()
        self._prewarm_queue = prewarm_queue
        self._prewarm_jobs: OrderedDict[Hashable, Callable[[], object]] = OrderedDict()
        self._prewarm_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prewarm")
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    @property
    def nbytes(self) -> int:
        return self._items.nbytes

    def get(self, key: Hashable) -> Embedding | None:
        """The embedding for `key` if it is cached (counted as a hit), else None; never computes."""
        with self._lock:
            embedding = self._items.get(key)
            if embedding is not None:
                self.hits += 1
            return embedding

    def get_or_compute(self, key: Hashable, compute: Callable[[], Embedding]) -> Embedding:
        """The embedding for `key`, calling `compute()` only if no thread has it or is computing it."""
        with self._lock:
            embedding = self._items.get(key)
            if embedding is not None:
                self.hits += 1
                return embedding
            future = self._pending.get(key)
            owner = future is None
            if owner:
                future = Future()
                self._pending[key] = future
                self.misses += 1
        if not owner:
            return future.result()
        try:
            with self._computing:
                embedding = self._store_form(compute())
        except BaseException as error:
            with self._lock:
                del self._pending[key]
            future.set_exception(error)
            raise
        with self._lock:
            self._items.put(key, embedding)
            del self._pending[key]
        future.set_result(embedding)
        return embedding

    def prewarm(self, key: Hashable, job: Callable[[], object]) -> None:
        """Run `job` (which fills this cache) in the background, newest first; `key` names it for
        de-duplication, and the oldest waiting jobs are dropped when more than `prewarm_queue` wait."""
        with self._lock:
            self._prewarm_jobs[key] = job
            self._prewarm_jobs.move_to_end(key)
            while len(self._prewarm_jobs) > self._prewarm_queue:
                self._prewarm_jobs.popitem(last=False)
        self._prewarm_pool.submit(self._prewarm_next)

    def _prewarm_next(self) -> None:
        with self._lock:
            if not self._prewarm_jobs:
                return
            _, job = self._prewarm_jobs.popitem(last=True)  # most recent first
        try:
            job()
        except Exception as error:  # a background job has no caller to tell; the next click will retry
            log.warning("prewarming an embedding failed: %s", error)

    def _store_form(self, embedding: Embedding) -> Embedding:
        # every named array of the embedding (SAM 2's high-resolution features too), see Embedding.astype
        return embedding.astype(np.float16) if self.compact else embedding

    def close(self) -> None:
        self._prewarm_pool.shutdown(wait=False, cancel_futures=True)


class RecentImages:
    """Which cache key (model and content digest) each image source gave when it was last downloaded.

    A source is what names an image: its URL and the Label Studio it is resolved against. Label Studio's upload
    and presign URLs name content that does not change, so for `ttl` seconds after a download the source is
    taken to hold the same image and is not downloaded again; after that, the next use downloads and checks it.
    At most `max_items` sources, least recently downloaded dropped first. `ttl` 0 turns it off. Thread-safe.
    """

    def __init__(self, max_items: int = 4096, ttl: float = 600.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_items = max_items
        self.ttl = ttl
        self._keys: BoundedLRU[Hashable, Hashable] = BoundedLRU(max_items, ttl=ttl, clock=clock)

    def get(self, source: Hashable) -> Hashable | None:
        return self._keys.get(source)

    def put(self, source: Hashable, key: Hashable) -> None:
        if self.ttl <= 0:
            return
        self._keys.put(source, key)
