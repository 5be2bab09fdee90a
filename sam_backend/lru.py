"""One bounded least-recently-used map, for every cache and table the backend keeps in memory."""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Callable, Generic, Hashable, Iterator, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class BoundedLRU(Generic[K, V]):
    """At most `max_items` entries (and, with `max_bytes`, at most that many bytes by `size_of`); the least
    recently used go first. With `ttl` (seconds), an entry older than that since it was put is gone.

    Thread-safe: every method takes the map's own lock, so callers need none for single operations.
    """

    def __init__(self, max_items: int, ttl: float | None = None, max_bytes: int | None = None,
                 size_of: Callable[[V], int] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        if max_bytes is not None and size_of is None:
            raise ValueError("max_bytes needs size_of")
        self.max_items = max_items
        self.ttl = ttl
        self.max_bytes = max_bytes
        self._size_of = size_of
        self._clock = clock
        self._items: OrderedDict[K, tuple[float, V]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: K, default: V | None = None) -> V | None:
        """The value for `key`, marked as just used; `default` when absent or expired."""
        with self._lock:
            entry = self._items.get(key)
            if entry is None:
                return default
            if self._expired(entry[0]):
                self._drop(key)
                return default
            self._items.move_to_end(key)
            return entry[1]

    def put(self, key: K, value: V) -> None:
        """Store `value` as the most recently used entry, evicting what no longer fits."""
        with self._lock:
            if key in self._items:
                self._drop(key)
            self._items[key] = (self._clock(), value)
            self._bytes += self._size(value)
            self._evict()

    def pop(self, key: K, default: V | None = None) -> V | None:
        with self._lock:
            if key not in self._items:
                return default
            return self._drop(key)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            entry = self._items.get(key)  # type: ignore[call-overload]
            return entry is not None and not self._expired(entry[0])

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    @property
    def nbytes(self) -> int:
        """Bytes held, by `size_of` (0 without it)."""
        with self._lock:
            return self._bytes

    def values(self) -> Iterator[V]:
        """A snapshot of the values, least recently used first."""
        with self._lock:
            return iter([value for _, value in self._items.values()])

    def _size(self, value: V) -> int:
        return self._size_of(value) if self._size_of is not None else 0

    def _expired(self, stamp: float) -> bool:
        return self.ttl is not None and self._clock() - stamp > self.ttl

    def _drop(self, key: K) -> V:
        _, value = self._items.pop(key)
        self._bytes -= self._size(value)
        return value

    def _evict(self) -> None:
        while self._items and (len(self._items) > self.max_items
                               or (self.max_bytes is not None and self._bytes > self.max_bytes)):
            self._drop(next(iter(self._items)))
