"""The state store: where a worker keeps what another worker (or machine) needs to answer the same call the same way.

One interface (`StateStore`: bytes under (namespace, key), with expiry, plus leases), three backends chosen by
STATE_STORE (`open_store`):

* `memory` -- `MemoryStore`, in this process only (today's behaviour; right for one worker);
* `disk:<folder>` -- `DiskStore`, one SQLite file in WAL mode shared by every worker of one machine, bounded in
  bytes, least recently used evicted first, surviving restarts;
* `redis://host:port/db` -- `RedisStore`, one Redis for many machines (bounded by Redis's own maxmemory with an
  LRU policy).

Backends raise `StoreError` for any fault of the store itself (gone, full, timed out). `GuardedStore` wraps one so
that callers never see those: a failed operation reads as a miss (or a write not done), the store is reported
degraded (`status()`), the fault is logged once, and the store is tried again after `retry_after` seconds.
The values are opaque bytes; `codec` packs named numpy arrays with sizes into them and detects corrupt ones.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger(__name__)


class StoreError(Exception):
    """The store failed (unreachable, full, timed out, refused); the message says which store and why."""


class StateStore(Protocol):
    """Bytes under (namespace, key). Thread-safe; safe across processes where the backend is shared."""

    #: "memory", "disk" or "redis"
    kind: str
    #: whether other processes see what this one writes
    shared: bool

    def get(self, namespace: str, key: str) -> bytes | None:
        """The value, marked as just used; None when absent or expired."""
        ...

    def put(self, namespace: str, key: str, value: bytes, ttl: float | None = None) -> None:
        """Store `value`; with `ttl` it expires that many seconds after this put."""
        ...

    def delete(self, namespace: str, key: str) -> None: ...

    def acquire(self, name: str, ttl: float) -> str | None:
        """Take the lease `name` for `ttl` seconds: a token to release it with, or None when another holds it."""
        ...

    def release(self, name: str, token: str) -> None:
        """Give the lease back if `token` still holds it."""
        ...

    def held(self, name: str) -> bool:
        """Whether anyone holds the lease `name` now (an expired lease is not held)."""
        ...

    def renew(self, name: str, token: str, ttl: float) -> bool:
        """Extend the lease `name` to `ttl` seconds from now if `token` still holds it; whether it did."""
        ...

    def describe(self) -> str:
        """Where the store is, without credentials, for logs and /health."""
        ...

    def close(self) -> None: ...


class GuardedStore:
    """A `StateStore` whose faults never reach the caller.

    A `StoreError` turns a read into a miss, a write or a lease call into nothing done (`acquire` then answers
    None, `held` False: the caller computes locally); the store is marked degraded and not asked again for
    `retry_after` seconds, so an outage costs one timeout per `retry_after`, not one per call. The first fault of
    an outage is logged as a warning and the recovery as info, once each.
    """

    def __init__(self, store: StateStore, retry_after: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.kind = store.kind
        self.shared = store.shared
        self.retry_after = retry_after
        self._clock = clock
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._retry_at = 0.0
        self._last_error = ""
        self.faults = 0

    # ---- status ------------------------------------------------------------------------------------------
    @property
    def degraded(self) -> bool:
        with self._lock:
            return self._down_since is not None

    def status(self) -> dict:
        """For /health: backend, where, "ok" or "degraded" (with the last error and since when)."""
        with self._lock:
            down, error = self._down_since, self._last_error
        status = {"backend": self.kind, "location": self.store.describe(), "status": "ok" if down is None
                  else "degraded", "faults": self.faults}
        if down is not None:
            status.update(error=error, degraded_seconds=round(self._clock() - down, 1))
        return status

    def _available(self) -> bool:
        with self._lock:
            return self._down_since is None or self._clock() >= self._retry_at

    def _failed(self, error: StoreError) -> None:
        with self._lock:
            first = self._down_since is None
            if first:
                self._down_since = self._clock()
            self._retry_at = self._clock() + self.retry_after
            self._last_error = str(error)[:300]
            self.faults += 1
        if first:
            log.warning("state store %s is degraded (%s); computing locally until it is back",
                        self.store.describe(), error)

    def _worked(self) -> None:
        with self._lock:
            if self._down_since is None:
                return
            seconds = self._clock() - self._down_since
            self._down_since = None
        log.info("state store %s is back after %.1f s", self.store.describe(), seconds)

    def _call(self, default, method: str, *args):
        if not self._available():
            return default
        try:
            result = getattr(self.store, method)(*args)
        except StoreError as error:
            self._failed(error)
            return default
        self._worked()
        return result

    # ---- the StateStore interface ------------------------------------------------------------------------
    def get(self, namespace: str, key: str) -> bytes | None:
        return self._call(None, "get", namespace, key)

    def put(self, namespace: str, key: str, value: bytes, ttl: float | None = None) -> None:
        self._call(None, "put", namespace, key, value, ttl)

    def delete(self, namespace: str, key: str) -> None:
        self._call(None, "delete", namespace, key)

    def acquire(self, name: str, ttl: float) -> str | None:
        return self._call(None, "acquire", name, ttl)

    def release(self, name: str, token: str) -> None:
        self._call(None, "release", name, token)

    def held(self, name: str) -> bool:
        return bool(self._call(False, "held", name))

    def renew(self, name: str, token: str, ttl: float) -> bool:
        return bool(self._call(False, "renew", name, token, ttl))

    def describe(self) -> str:
        return self.store.describe()

    def close(self) -> None:
        try:
            self.store.close()
        except StoreError as error:
            log.debug("closing the state store: %s", error)


def open_store(spec: str, max_bytes: int = 2 << 30) -> StateStore:
    """The backend `spec` names: `memory`, `disk:<folder>` or `redis://host:port/db` (also `rediss://`,
    `unix://`). `max_bytes` bounds the memory and disk stores. Raises ValueError for a spec it cannot use."""
    spec = spec.strip()
    if spec == "memory":
        from sam_backend.store.memory import MemoryStore

        return MemoryStore(max_bytes=max_bytes)
    if spec.startswith("disk:"):
        from sam_backend.store.disk import DiskStore

        folder = spec[len("disk:"):]
        if not folder:
            raise ValueError("STATE_STORE=disk: needs a folder, e.g. disk:/var/cache/sam-backend")
        return DiskStore(folder, max_bytes=max_bytes)
    if spec.startswith(("redis://", "rediss://", "unix://")):
        from sam_backend.store.redis_store import RedisStore

        return RedisStore(spec)
    raise ValueError(f"STATE_STORE={spec!r}: use memory, disk:<folder> or redis://host:port/db")


__all__ = ["GuardedStore", "StateStore", "StoreError", "open_store"]
