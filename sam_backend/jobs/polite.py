"""Calls to Label Studio that are bounded and polite: at most `concurrency` at once, at most `rate` per second,
retried with exponential backoff and jitter when the server is busy or failing (429, 5xx, timeouts, refused
connections), never retried when the request itself is wrong (any other 4xx).
"""
from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


class CallFailed(Exception):
    """A call to Label Studio failed for good: `status` is its HTTP status (None: no answer), the message why."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class Polite:
    """concurrency: calls in flight at most; rate: calls started per second at most (0: unbounded);
    retries: further tries after a retryable failure; backoff: seconds before the first retry, doubled each
    time up to max_backoff, with up to 50 % jitter; retryable(error) -> (retry?, status); describe(error) -> what the
    messages say of it."""

    def __init__(self, retryable: Callable[[BaseException], tuple[bool, int | None]], concurrency: int = 4,
                 rate: float = 20.0, retries: int = 5, backoff: float = 0.5, max_backoff: float = 30.0,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
                 describe: Callable[[BaseException], str] | None = None) -> None:
        if concurrency < 1 or rate < 0 or retries < 0 or backoff < 0:
            raise ValueError("concurrency >= 1, rate >= 0, retries >= 0 and backoff >= 0 are needed")
        self.retryable = retryable
        self.describe = describe or _describe
        self.retries, self.backoff, self.max_backoff = retries, backoff, max_backoff
        self._slots = threading.BoundedSemaphore(concurrency)
        self._interval = 1.0 / rate if rate else 0.0
        self._next = 0.0
        self._lock = threading.Lock()
        self._sleep, self._clock = sleep, clock
        self.retried = 0  # retries made, for the report

    def _wait_turn(self) -> None:
        if not self._interval:
            return
        with self._lock:
            now = self._clock()
            start = max(now, self._next)
            self._next = start + self._interval
        if start > now:
            self._sleep(start - now)

    def call(self, what: str, function: Callable[[], T]) -> T:
        """`function()`, politely; CallFailed naming `what` when it fails for good."""
        attempt = 0
        while True:
            self._wait_turn()
            try:
                with self._slots:
                    return function()
            except Exception as error:  # classified below: only the retryable ones are tried again
                retry, status = self.retryable(error)
                if not retry or attempt >= self.retries:
                    tries = f" after {attempt + 1} tries" if retry else ""
                    raise CallFailed(f"{what}: {self.describe(error)}{tries}", status) from error
                reason = self.describe(error)
            delay = min(self.max_backoff, self.backoff * 2 ** attempt) * (1 + random.random() / 2)
            attempt += 1
            with self._lock:
                self.retried += 1
            log.info("%s failed (%s); retry %d of %d in %.1f s", what, reason, attempt, self.retries,
                     delay)
            self._sleep(delay)


def _describe(error: BaseException) -> str:
    text = str(error).strip().replace("\n", " ")
    return f"{type(error).__name__}: {text[:300]}" if text else type(error).__name__
