"""Byte caches for expert blobs: Redis when a URL is configured, a bounded in-process cache otherwise."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal, Protocol

log = logging.getLogger(__name__)

CacheHealth = Literal["ok", "degraded"]


class ByteCache(Protocol):
    """A cache of expert blobs by key. Failures never raise: a broken cache is a cache that misses."""

    name: str
    trusted: bool  # values cannot change behind our back (in-process), so reads skip the checksum

    def get(self, key: str) -> bytes | None: ...

    def get_many(self, keys: list[str]) -> list[bytes | None]: ...

    def get_ranges(self, key: str, ranges: list[tuple[int, int]]) -> list[bytes] | None:
        """Byte ranges `(start, length)` of one value in one round trip; None when the key is missing. A range past
        the value's end comes back short (the caller checks lengths)."""
        ...

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

    def get_ranges(self, key: str, ranges: list[tuple[int, int]]) -> list[bytes] | None:
        value = self.get(key)
        if value is None:
            return None
        view = memoryview(value)
        return [bytes(view[start : start + length]) for start, length in ranges]

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


@dataclass
class CacheCounters:
    """What a Redis cache did: calls sent, calls that failed, and calls skipped while its breaker was open."""

    attempts: int = 0
    failures: int = 0
    skipped: int = 0


class _Breaker:
    """One circuit breaker: closed until a failure, then open for `retry_s`; after that one caller (never
    several at once) probes Redis again, and a success closes it."""

    def __init__(self, retry_s: float) -> None:
        self.retry_s = retry_s
        self.open_since: float | None = None
        self.error = ""
        self._next_try = 0.0
        self._lock = threading.Lock()

    def allow(self) -> bool:
        if self.open_since is None:
            return True
        with self._lock:
            now = time.monotonic()
            if self.open_since is None or now >= self._next_try:
                # This caller probes; the others skip until the probe's outcome, or the next window.
                self._next_try = now + self.retry_s
                return True
            return False

    def fail(self, error: str) -> bool:
        """Open (or keep open) the breaker; returns whether it was closed before."""
        with self._lock:
            was_closed = self.open_since is None
            if was_closed:
                self.open_since = time.monotonic()
            self.error = error
            self._next_try = time.monotonic() + self.retry_s
            return was_closed

    def succeed(self) -> float | None:
        """Close the breaker; returns how long it was open, None when it was closed."""
        if self.open_since is None:
            return None
        with self._lock:
            since, self.open_since = self.open_since, None
            return None if since is None else time.monotonic() - since


class RedisCache:
    """Expert blobs in Redis, one key per expert: a cache that may fail, never one that fails a request.

    Every Redis error is a miss (reads) or a skipped put (writes), logged once per outage, counted, and reported
    as `degraded` health: an unreachable or frozen server, a reply error such as WRONGTYPE on one key, or OOM
    under `maxmemory`. Two circuit breakers bound the cost: after a failure, reads (or writes) skip Redis for
    `retry_s` seconds, then one caller probes it again; an unreachable server opens both. A frozen Redis thus
    costs one `timeout_s` per `retry_s`, whatever the request rate. Health returns to `ok` after the next call
    that succeeds.

    Args:
        url: Redis URL.
        timeout_s: Socket (and connect) timeout of each call.
        retry_s: How long the breaker stays open after a failure.
        ttl_s: Expiry of cached blobs.
    """

    name = "redis"
    trusted = False  # shared and mutable: every value is checked against the manifest

    def __init__(self, url: str, *, timeout_s: float = 0.5, retry_s: float = 5.0, ttl_s: int = 7 * 86400) -> None:
        import redis

        self.url = url
        # A TTL marks the blobs as evictable under `maxmemory-policy volatile-lru`, which spares the
        # registry's profiles (no TTL) in the same Redis.
        self.ttl_s = ttl_s
        self.retry_s = retry_s
        self.counters = CacheCounters()
        self._errors: tuple[type[BaseException], ...] = (redis.exceptions.RedisError, OSError)
        self._unreachable: tuple[type[BaseException], ...] = (
            redis.exceptions.ConnectionError,
            redis.exceptions.TimeoutError,
            OSError,
        )
        self._client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._reads = _Breaker(retry_s)
        self._writes = _Breaker(retry_s)
        self._count = threading.Lock()

    def _allow(self, breaker: _Breaker) -> bool:
        allowed = breaker.allow()
        with self._count:
            if allowed:
                self.counters.attempts += 1
            else:
                self.counters.skipped += 1
        return allowed

    def _failed(self, breaker: _Breaker, exc: BaseException, doing: str) -> None:
        with self._count:
            self.counters.failures += 1
        breakers = (self._reads, self._writes) if isinstance(exc, self._unreachable) else (breaker,)
        opened = [b.fail(f"{doing}: {exc}") for b in breakers]
        if any(opened):
            what = "reads and writes" if len(breakers) == 2 else "reads" if breaker is self._reads else "writes"
            log.warning(
                "redis cache at %s failed to %s (%s: %s): %s skip it for %.1fs at a time, experts come from disk",
                self.url,
                doing,
                type(exc).__name__,
                exc,
                what,
                self.retry_s,
            )

    def _succeeded(self, breaker: _Breaker) -> None:
        down = breaker.succeed()
        if down is not None:
            log.warning("redis cache at %s answers again after %.1fs", self.url, down)

    def get(self, key: str) -> bytes | None:
        if not self._allow(self._reads):
            return None
        try:
            value = self._client.get(key)
        except self._errors as exc:
            self._failed(self._reads, exc, "read")
            return None
        self._succeeded(self._reads)
        return value if isinstance(value, bytes) else None

    def get_many(self, keys: list[str]) -> list[bytes | None]:
        """Several values in one round trip (one pipeline of GETs); a key whose reply is an error is a miss,
        and all are misses while Redis is away."""
        if not keys or not self._allow(self._reads):
            return [None] * len(keys)
        try:
            pipe = self._client.pipeline(transaction=False)
            for key in keys:
                pipe.get(key)
            replies = pipe.execute(raise_on_error=False)
        except self._errors as exc:
            self._failed(self._reads, exc, "read")
            return [None] * len(keys)
        values: list[bytes | None] = []
        failed: BaseException | None = None
        for reply in replies:
            if isinstance(reply, BaseException):  # e.g. WRONGTYPE on one key: that key misses
                failed = reply
                values.append(None)
            else:
                values.append(reply if isinstance(reply, bytes) else None)
        if failed is not None:
            self._failed(self._reads, failed, "read")
        else:
            self._succeeded(self._reads)
        return values

    def get_ranges(self, key: str, ranges: list[tuple[int, int]]) -> list[bytes] | None:
        """One pipeline of GETRANGEs (a channel-major expert's runs of kept channels): Redis returns an empty string
        for a missing key, so replies that are all empty are a miss; errors are misses as in `get`."""
        if not ranges or not self._allow(self._reads):
            return None
        try:
            pipe = self._client.pipeline(transaction=False)
            for start, length in ranges:
                pipe.getrange(key, start, start + length - 1)
            replies = pipe.execute()
        except self._errors as exc:  # WRONGTYPE included: the key holds something else, a miss to repair
            self._failed(self._reads, exc, "read")
            return None
        self._succeeded(self._reads)
        values = [reply if isinstance(reply, bytes) else b"" for reply in replies]
        return None if not any(values) else values

    def put(self, key: str, value: bytes) -> None:
        if not self._allow(self._writes):
            return
        try:
            self._client.set(key, value, ex=self.ttl_s)
        except self._errors as exc:  # e.g. OOM under maxmemory with noeviction: the write is skipped
            self._failed(self._writes, exc, "write")
            return
        self._succeeded(self._writes)

    def delete(self, key: str) -> None:
        if not self._allow(self._writes):
            return
        try:
            self._client.delete(key)
        except self._errors as exc:
            self._failed(self._writes, exc, "delete")
            return
        self._succeeded(self._writes)

    def health(self) -> CacheHealth:
        return "ok" if self._reads.open_since is None and self._writes.open_since is None else "degraded"

    @property
    def last_error(self) -> str:
        """What the last failure was, while health is degraded; empty otherwise."""
        return next((b.error for b in (self._reads, self._writes) if b.open_since is not None), "")

    @property
    def client(self):
        return self._client


def open_cache(redis_url: str | None, memory_bytes: int = 1 << 30) -> ByteCache:
    """Redis when a URL is given, else the in-process cache."""
    return RedisCache(redis_url) if redis_url else MemoryCache(memory_bytes)
