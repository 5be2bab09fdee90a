"""Image embeddings, computed once per image content and model, shared by every thread of a process.

The cache is a bounded LRU. A key being computed is computed once: other threads asking for it wait for the
same result instead of starting a second multi-second encoder run ("single flight"). A failed computation is
not cached; every waiter sees the error. At most `max_computing` different keys are computed at once: each
encoder run already uses every core, and each holds hundreds of MB of activations.

`RecentImages` remembers which content an image URL gave when it was last downloaded, so that the clicks after
the first on a task find their embedding without downloading the image again.

With a shared state store (`sam_backend.store`, STATE_STORE disk or redis) both also keep their entries there, so
that every worker finds what one computed: an embedding missing here is read from the store (namespace
`embedding`) before anyone computes it, and only the process holding the store's lease `embed:<key>` computes
it; the others wait for it to appear in the store (`wait_s` at most, then they compute themselves). The holder
renews its lease while it computes, so one that dies leaves a lease that expires within `lease_s` (10 s). The
in-process LRU stays in front of the store (embeddings are keyed by content, so a copy never goes stale). When the store is degraded every call falls back to this process.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Hashable

import numpy as np

from sam_backend.lru import BoundedLRU
from sam_backend.sam.types import Embedding
from sam_backend.store import StateStore, codec

EMBEDDINGS = "embedding"  # store namespaces
IMAGE_URLS = "image-url"

log = logging.getLogger(__name__)


class EmbeddingCache:
    """LRU of at most `max_items` embeddings, keyed by (model_version, image digest) or any hashable.

    compact: store features as float16 (half the memory; masks stay the same, see tests).
    max_computing: how many computations run at once; the others wait their turn.
    """

    def __init__(self, max_items: int = 32, compact: bool = False, prewarm_queue: int = 16,
                 max_computing: int = 1, store: StateStore | None = None, lease_s: float = 10.0,
                 wait_s: float = 120.0, poll_s: float = 0.02) -> None:
        self.max_items = max_items
        self.compact = compact
        self.store = store if store is not None and store.shared else None
        self.lease_s, self.wait_s, self.poll_s = lease_s, wait_s, poll_s
        self._computing = threading.BoundedSemaphore(max_computing)
        self._items: BoundedLRU[Hashable, Embedding] = BoundedLRU(max_items, size_of=lambda item: item.nbytes)
        self._pending: dict[Hashable, Future] = {}
        self._lock = threading.Lock()
        self._prewarm_queue = prewarm_queue
        self._prewarm_jobs: OrderedDict[Hashable, Callable[[], object]] = OrderedDict()
        self._prewarm_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prewarm")
        self.hits = 0
        self.misses = 0
        self.store_hits = 0  # found in the shared store (computed by another process, or before a restart)
        self.computed = 0  # encoder runs of this process

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    @property
    def nbytes(self) -> int:
        return self._items.nbytes

    @property
    def idle(self) -> bool:
        """No embedding being computed here and none waiting to be prewarmed (a speculative one may start)."""
        with self._lock:
            return not self._pending and not self._prewarm_jobs

    def get(self, key: Hashable) -> Embedding | None:
        """The embedding for `key` if it is cached (counted as a hit), else None; never computes."""
        with self._lock:
            embedding = self._items.get(key)
            if embedding is not None:
                self.hits += 1
                return embedding
        return self._from_store(key)

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
            embedding = self._from_store(key) or self._compute_once(key, compute)
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

    def _compute(self, compute: Callable[[], Embedding]) -> Embedding:
        with self._computing:
            embedding = self._store_form(compute())
        with self._lock:
            self.computed += 1
        return embedding

    def _compute_once(self, key: Hashable, compute: Callable[[], Embedding]) -> Embedding:
        """Compute under the store's lease, or wait for the process that holds it (see the module docstring)."""
        if self.store is None:
            return self._compute(compute)
        name, deadline = f"{EMBEDDINGS}:{_store_key(key)}", time.monotonic() + self.wait_s
        while True:
            token = self.store.acquire(name, self.lease_s)
            if token is not None or getattr(self.store, "degraded", False):
                beating = self._heartbeat(name, token) if token is not None else None
                try:
                    found = self._from_store(key) if token is not None else None  # put just before we asked
                    if found is not None:
                        return found
                    embedding = self._compute(compute)
                    self.store.put(EMBEDDINGS, _store_key(key), pack_embedding(embedding))
                    return embedding
                finally:
                    if token is not None:
                        beating.set()
                        self.store.release(name, token)
            while self.store.held(name) and time.monotonic() < deadline:
                time.sleep(self.poll_s)
            found = self._from_store(key)
            if found is not None:
                return found
            if time.monotonic() >= deadline:
                log.warning("waited %.0f s for another process to embed an image; embedding it here", self.wait_s)
                return self._compute(compute)
            # the holder released (or died) without storing: take the lease ourselves

    def _heartbeat(self, name: str, token: str) -> threading.Event:
        """Renew the lease `name` every third of `lease_s` until the returned event is set: a live holder keeps
        it however long its encoder takes, a dead one frees it within `lease_s`."""
        done = threading.Event()

        def beat() -> None:
            while not done.wait(self.lease_s / 3):
                # a refusal is a store fault (tried again next beat) or a lease that expired meanwhile: then
                # another process may compute the same image too, which costs time, never a wrong answer
                self.store.renew(name, token, self.lease_s)

        threading.Thread(target=beat, name="embed-lease", daemon=True).start()
        return done

    def _from_store(self, key: Hashable) -> Embedding | None:
        """The embedding from the shared store, kept in this process's LRU too; None when absent or corrupt."""
        if self.store is None:
            return None
        value = self.store.get(EMBEDDINGS, _store_key(key))
        if value is None:
            return None
        try:
            embedding = unpack_embedding(value)
        except codec.CorruptEntry as error:
            log.warning("dropping a corrupt embedding from the state store: %s", error)
            self.store.delete(EMBEDDINGS, _store_key(key))
            return None
        with self._lock:
            self._items.put(key, embedding)
            self.store_hits += 1
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

    def put(self, key: Hashable, embedding: Embedding) -> Embedding:
        """Keep an embedding computed elsewhere (a batch of a project job): here and in the shared store; the
        embedding in its cached form."""
        embedding = self._store_form(embedding)
        with self._lock:
            self._items.put(key, embedding)
            self.computed += 1
        if self.store is not None:
            self.store.put(EMBEDDINGS, _store_key(key), pack_embedding(embedding))
        return embedding

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

    def __init__(self, max_items: int = 4096, ttl: float = 600.0, clock: Callable[[], float] = time.monotonic,
                 store: StateStore | None = None) -> None:
        self.max_items = max_items
        self.ttl = ttl
        self.store = store if store is not None and store.shared else None
        self._keys: BoundedLRU[Hashable, Hashable] = BoundedLRU(max_items, ttl=ttl, clock=clock)

    def get(self, source: Hashable) -> Hashable | None:
        """The key `source` gave (as a tuple when it was one); the shared store's answer first, when there is one."""
        if self.store is not None:
            value = self.store.get(IMAGE_URLS, _store_key(source))
            if value is not None:
                try:
                    key = codec.unpack_json(value)
                    return tuple(key) if isinstance(key, list) else key
                except codec.CorruptEntry:
                    self.store.delete(IMAGE_URLS, _store_key(source))
        return self._keys.get(source)

    def put(self, source: Hashable, key: Hashable) -> None:
        if self.ttl <= 0:
            return
        self._keys.put(source, key)
        if self.store is not None:
            self.store.put(IMAGE_URLS, _store_key(source), codec.pack_json(list(key) if isinstance(key, tuple)
                                                                            else key), self.ttl)


def _store_key(key: Hashable) -> str:
    """A cache key (model version, content digest) or an image source as text for the store."""
    if isinstance(key, tuple) and all(isinstance(part, str) for part in key):
        return "/".join(key)
    return hashlib.sha256(json.dumps(list(key) if isinstance(key, tuple) else key, default=str).encode()).hexdigest()


def pack_embedding(embedding: Embedding) -> bytes:
    """An `Embedding` as bytes, generically: every array it has by name (`Embedding.arrays()`: SAM 2's
    high-resolution features too) and its sizes in the JSON header, so a family with more arrays needs no new
    format."""
    return codec.pack(embedding.arrays(), {"type": type(embedding).__name__,
                                           "original_size": list(embedding.original_size),
                                           "input_size": list(embedding.input_size)})


def unpack_embedding(value: bytes) -> Embedding:
    """The `Embedding` `pack_embedding` packed; raises codec.CorruptEntry for anything else."""
    arrays, meta = codec.unpack(value)
    try:
        if meta.get("type") != Embedding.__name__:
            raise codec.CorruptEntry(f"not an Embedding but {meta.get('type')!r}")
        features = arrays.pop("features")
        original_size = tuple(int(v) for v in meta["original_size"])
        input_size = tuple(int(v) for v in meta["input_size"])
        if len(original_size) != 2 or len(input_size) != 2:
            raise codec.CorruptEntry(f"not an Embedding: sizes {original_size}, {input_size}")
        return Embedding(features=features, original_size=original_size, input_size=input_size, extras=arrays)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise codec.CorruptEntry(f"not an Embedding: {error}") from None
