"""Calls to the registry's Redis: counted (for the registry's health), with Redis's failures as `Unavailable`
naming `redis_url`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from ..errors import Unavailable
from .reseed import StoreCounters

T = TypeVar("T")


class RedisCalls:
    """Runs calls on `client`, counting attempts and failures in `counters`."""

    def __init__(self, client: Any, url: str, counters: StoreCounters) -> None:
        self.client, self.url, self.counters = client, url, counters

    def call(self, fn: Callable[[], T]) -> T:
        import redis

        self.counters.attempts += 1
        try:
            return fn()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            self.counters.failures += 1
            raise Unavailable(f"Redis at {self.url} is unreachable: {exc}", field="redis_url") from exc
        except redis.RedisError as exc:  # e.g. OOM under maxmemory, WRONGTYPE on a registry key
            self.counters.failures += 1
            message = f"Redis at {self.url} refused the registry call ({type(exc).__name__}: {exc})"
            raise Unavailable(message, field="redis_url") from exc

    def transaction(self, body: Callable[[Any], None]) -> list[Any]:
        """`body` fills a MULTI/EXEC pipeline; returns what EXEC answered."""

        def run() -> list[Any]:
            pipe = self.client.pipeline(transaction=True)
            body(pipe)
            return list(pipe.execute())

        return self.call(run)
