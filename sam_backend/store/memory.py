"""`MemoryStore`: the state store in this process's memory (STATE_STORE=memory, and the tests' reference)."""
from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable

from sam_backend.lru import BoundedLRU


class MemoryStore:
    """At most `max_bytes` of values (and `max_items` entries), least recently used dropped first. Thread-safe;
    nothing is shared with other processes."""

    kind = "memory"
    shared = False

    def __init__(self, max_bytes: int = 2 << 30, max_items: int = 1 << 20,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        # value: (expires at, or None; bytes)
        self._items: BoundedLRU[tuple[str, str], tuple[float | None, bytes]] = BoundedLRU(
            max_items, max_bytes=max_bytes, size_of=lambda entry: len(entry[1]))
        self._leases: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def get(self, namespace: str, key: str) -> bytes | None:
        entry = self._items.get((namespace, key))
        if entry is None:
            return None
        expires, value = entry
        if expires is not None and self._clock() >= expires:
            self._items.pop((namespace, key))
            return None
        return value

    def put(self, namespace: str, key: str, value: bytes, ttl: float | None = None) -> None:
        self._items.put((namespace, key), (None if ttl is None else self._clock() + ttl, bytes(value)))

    def delete(self, namespace: str, key: str) -> None:
        self._items.pop((namespace, key))

    def acquire(self, name: str, ttl: float) -> str | None:
        with self._lock:
            held = self._leases.get(name)
            if held is not None and held[1] > self._clock():
                return None
            token = secrets.token_hex(16)
            self._leases[name] = (token, self._clock() + ttl)
            return token

    def release(self, name: str, token: str) -> None:
        with self._lock:
            if self._leases.get(name, ("", 0.0))[0] == token:
                del self._leases[name]

    def renew(self, name: str, token: str, ttl: float) -> bool:
        with self._lock:
            held = self._leases.get(name)
            if held is None or held[0] != token or held[1] <= self._clock():
                return False
            self._leases[name] = (token, self._clock() + ttl)
            return True

    def held(self, name: str) -> bool:
        with self._lock:
            held = self._leases.get(name)
            return held is not None and held[1] > self._clock()

    def describe(self) -> str:
        return "memory"

    def close(self) -> None:
        pass
