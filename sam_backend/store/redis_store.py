"""`RedisStore`: the state store in one Redis, shared by every worker of every machine (STATE_STORE=redis://...).

Keys are `sam:<namespace>:<key>`; expiry is Redis's own (PX). The bound in bytes and the eviction order are
Redis's: run it with `maxmemory <bytes>` and `maxmemory-policy allkeys-lru` (docker-compose.redis.yml does).
A lease is `SET sam:lease:<name> <token> NX PX <ttl>`, released by a script that deletes it only while it still
holds the caller's token. Every Redis error or timeout (SOCKET_TIMEOUT seconds) is a `StoreError`.
"""
from __future__ import annotations

import secrets
from urllib.parse import urlsplit, urlunsplit

import redis

from sam_backend.store import StoreError

SOCKET_TIMEOUT = 1.0  # seconds for connecting and for each command: a gone Redis costs at most this per retry
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"
_RENEW = ("if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) "
          "else return 0 end")


class RedisStore:
    kind = "redis"
    shared = True

    def __init__(self, url: str, prefix: str = "sam") -> None:
        self.url = url
        self.prefix = prefix
        try:
            self._redis = redis.Redis.from_url(url, socket_timeout=SOCKET_TIMEOUT,
                                               socket_connect_timeout=SOCKET_TIMEOUT, health_check_interval=0)
        except ValueError as error:
            raise ValueError(f"STATE_STORE={self.describe()}: {error}") from None
        self._release = self._redis.register_script(_RELEASE)
        self._renew = self._redis.register_script(_RENEW)

    def _key(self, namespace: str, key: str) -> str:
        return f"{self.prefix}:{namespace}:{key}"

    def _run(self, what: str, call, *args, **kwargs):
        try:
            return call(*args, **kwargs)
        except (redis.RedisError, OSError) as error:
            raise StoreError(f"redis {self.describe()}: {what}: {type(error).__name__}: {error}") from None

    def get(self, namespace: str, key: str) -> bytes | None:
        return self._run("GET", self._redis.get, self._key(namespace, key))

    def put(self, namespace: str, key: str, value: bytes, ttl: float | None = None) -> None:
        px = None if ttl is None else max(1, int(ttl * 1000))
        self._run("SET", self._redis.set, self._key(namespace, key), value, px=px)

    def delete(self, namespace: str, key: str) -> None:
        self._run("DEL", self._redis.delete, self._key(namespace, key))

    def acquire(self, name: str, ttl: float) -> str | None:
        token = secrets.token_hex(16)
        taken = self._run("SET NX", self._redis.set, self._key("lease", name), token, nx=True,
                          px=max(1, int(ttl * 1000)))
        return token if taken else None

    def release(self, name: str, token: str) -> None:
        self._run("release", self._release, keys=[self._key("lease", name)], args=[token])

    def renew(self, name: str, token: str, ttl: float) -> bool:
        return bool(self._run("renew", self._renew, keys=[self._key("lease", name)],
                              args=[token, max(1, int(ttl * 1000))]))

    def held(self, name: str) -> bool:
        return bool(self._run("EXISTS", self._redis.exists, self._key("lease", name)))

    def describe(self) -> str:
        """The URL without its password."""
        parts = urlsplit(self.url)
        netloc = parts.hostname or ""
        if parts.port:
            netloc += f":{parts.port}"
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))

    def close(self) -> None:
        self._redis.close()
