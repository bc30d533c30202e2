"""Byte caches for expert blobs: Redis when a URL is configured, a bounded in-process cache otherwise."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Literal, Protocol

log = logging.getLogger(__name__)

CacheHealth = Literal["ok", "degraded"]


class ByteCache(Protocol):
    """A cache of expert blobs by key. Failures never raise: a broken cache is a cache that misses."""

    name: str
    trusted: bool  # values cannot change behind our back (in-process), so reads skip the checksum

    def get(self, key: str) -> bytes | None: ...

    def get_many(self, keys: list[str]) -> list[bytes | None]: ...

    def put(self, key: str, value: bytes) -> None: ...

    def delete(self, key: str) -> None: ...

    def health(self) -> CacheHealth: ...


class MemoryCache:
    """The embedded default: an in-process LRU byte cache bounded by `max_bytes`."""

    name = "memory"
    trusted = True  # it only holds bytes this process read and verified

    def __init__(self, max_bytes: int = 1 << 30) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def get_many(self, keys: list[str]) -> list[bytes | None]:
        return [self.get(key) for key in keys]

    def put(self, key: str, value: bytes) -> None:
        if len(value) > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= len(old)
            self._items[key] = value
            self._bytes += len(value)
            while self._bytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= len(evicted)

    def delete(self, key: str) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= len(old)

    def health(self) -> CacheHealth:
        return "ok"

    @property
    def size_bytes(self) -> int:
        return self._bytes


class RedisCache:
    """Expert blobs in Redis, one key per expert. When Redis is unreachable, it reports `degraded`, logs
    once, behaves as an always-missing cache, and tries to reconnect every `retry_s` seconds."""

    name = "redis"
    trusted = False  # shared and mutable: every value is checked against the manifest

    def __init__(self, url: str, *, timeout_s: float = 2.0, retry_s: float = 1.0, ttl_s: int = 7 * 86400) -> None:
        import redis

        self.url = url
        # A TTL marks the blobs as evictable under `maxmemory-policy volatile-lru`, which spares the
        # registry's profiles (no TTL) in the same Redis.
        self.ttl_s = ttl_s
        self.retry_s = retry_s
        self._errors = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
        self._client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._down_since: float | None = None
        self._next_try = 0.0
        self._lock = threading.Lock()

    def _available(self) -> bool:
        if self._down_since is None:
            return True
        return time.monotonic() >= self._next_try

    def _failed(self, exc: Exception) -> None:
        with self._lock:
            if self._down_since is None:
                log.warning("redis cache at %s unreachable (%s): serving experts from disk", self.url, exc)
                self._down_since = time.monotonic()
            self._next_try = time.monotonic() + self.retry_s

    def _succeeded(self) -> None:
        if self._down_since is not None:
            with self._lock:
                if self._down_since is not None:
                    log.warning("redis cache at %s is back after %.1fs", self.url, time.monotonic() - self._down_since)
                    self._down_since = None

    def get(self, key: str) -> bytes | None:
        if not self._available():
            return None
        try:
            value = self._client.get(key)
        except self._errors as exc:
            self._failed(exc)
            return None
        self._succeeded()
        return value  # type: ignore[return-value]

    def get_many(self, keys: list[str]) -> list[bytes | None]:
        """Several values in one round trip (one pipeline of GETs); all misses while Redis is down."""
        if not keys or not self._available():
            return [None] * len(keys)
        try:
            pipe = self._client.pipeline(transaction=False)
            for key in keys:
                pipe.get(key)
            values = pipe.execute()
        except self._errors as exc:
            self._failed(exc)
            return [None] * len(keys)
        self._succeeded()
        return list(values)

    def put(self, key: str, value: bytes) -> None:
        if not self._available():
            return
        try:
            self._client.set(key, value, ex=self.ttl_s)
        except self._errors as exc:
            self._failed(exc)
            return
        self._succeeded()

    def delete(self, key: str) -> None:
        if not self._available():
            return
        try:
            self._client.delete(key)
        except self._errors as exc:
            self._failed(exc)

    def health(self) -> CacheHealth:
        return "ok" if self._down_since is None else "degraded"

    @property
    def client(self):
        return self._client


def open_cache(redis_url: str | None, memory_bytes: int = 1 << 30) -> ByteCache:
    """Redis when a URL is given, else the in-process cache."""
    return RedisCache(redis_url) if redis_url else MemoryCache(memory_bytes)
