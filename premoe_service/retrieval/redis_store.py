"""Profiles in Redis, so that replicas share one registry: bytes, checksums and a version counter."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

from ..errors import AlreadyExists, DataCorruption, InvalidArgument, NotFound, Unavailable
from ..names import check_task_name
from ..profiler.profile import Profile

T = TypeVar("T")


class RedisProfileStore:
    """Profile files as values of a Redis hash, with a SHA-256 per task and a global version counter.

    Keys (under `namespace`):
      - `<ns>:registry:profiles`: hash task -> profile bytes (the safetensors profile file);
      - `<ns>:registry:sha256`: hash task -> hex digest of those bytes, the task's revision;
      - `<ns>:registry:version`: counter incremented by every registration and deletion.

    A write sets the bytes and the digest and bumps the version in one MULTI/EXEC transaction, under
    WATCH of the profile hash so that "register unless it exists" cannot race another replica: Redis
    holds the old task or the new one, never a mix. Readers poll the version with one GET and list
    the digests only when it moved. A digest that does not match the bytes read is DataCorruption.

    Args:
        url: Redis URL, e.g. "redis://127.0.0.1:6379/0".
        namespace: Key prefix, so several registries (one per model) share one Redis.
        timeout: Socket timeout in seconds; a registry keeps serving from memory when Redis is away,
            so a short timeout bounds what a request waits for the version check.
    """

    def __init__(self, url: str, namespace: str = "premoe", *, timeout: float = 1.0) -> None:
        import redis

        if not namespace or any(c.isspace() for c in namespace):
            raise InvalidArgument(f"namespace must be non-empty without spaces, got {namespace!r}", field="namespace")
        try:
            self._client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        except ValueError as exc:
            raise InvalidArgument(f"not a Redis URL: {url!r} ({exc})", field="redis_url") from exc
        self.url = url
        self.namespace = namespace
        self._profiles = f"{namespace}:registry:profiles"
        self._digests = f"{namespace}:registry:sha256"
        self._version = f"{namespace}:registry:version"

    def version(self) -> Hashable:
        version: Hashable = self._call(lambda: self._client.get(self._version))
        return version

    def revisions(self) -> dict[str, Hashable]:
        digests: dict[Any, Any] = self._call(lambda: self._client.hgetall(self._digests))
        return {bytes(name).decode(): bytes(digest).decode() for name, digest in digests.items()}

    def read(self, name: str) -> tuple[Profile, Hashable]:
        check_task_name(name)

        def fetch(pipe: Any) -> None:
            pipe.hget(self._profiles, name)
            pipe.hget(self._digests, name)

        # One transaction: the bytes and their digest come from the same write.
        data, digest = self._transaction(fetch)
        source = f"redis {self._profiles}[{name}]"
        if data is None:
            raise NotFound(f"no task named {name!r} in {self._profiles}", field="name")
        if digest is None or hashlib.sha256(data).hexdigest() != digest.decode():
            raise DataCorruption(f"{source} does not match its SHA-256 in {self._digests}", field=source)
        profile = Profile.from_bytes(data, source=source)
        if profile.name != name:
            raise DataCorruption(f"{source} holds the profile of task {profile.name!r}", field=source)
        return profile, digest.decode()

    def write(self, profile: Profile, *, replace: bool) -> Hashable:
        data = profile.to_bytes()
        digest = hashlib.sha256(data).hexdigest()

        def write(pipe: Any) -> None:
            if not replace and pipe.hexists(self._profiles, profile.name):
                raise AlreadyExists(f"task {profile.name!r} exists; pass replace to overwrite it", field="name")
            pipe.multi()
            pipe.hset(self._profiles, profile.name, data)
            pipe.hset(self._digests, profile.name, digest)
            pipe.incr(self._version)

        self._call(lambda: self._client.transaction(write, self._profiles))
        return digest

    def delete(self, name: str) -> None:
        check_task_name(name)

        def delete(pipe: Any) -> None:
            if not pipe.hexists(self._profiles, name):
                raise NotFound(f"no task named {name!r} in {self._profiles}", field="name")
            pipe.multi()
            pipe.hdel(self._profiles, name)
            pipe.hdel(self._digests, name)
            pipe.incr(self._version)

        self._call(lambda: self._client.transaction(delete, self._profiles))

    def close(self) -> None:
        self._client.close()

    def _transaction(self, body: Callable[[Any], None]) -> list[Any]:
        def run() -> list[Any]:
            pipe = self._client.pipeline(transaction=True)
            body(pipe)
            return list(pipe.execute())

        return self._call(run)

    def _call(self, fn: Callable[[], T]) -> T:
        import redis

        try:
            return fn()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise Unavailable(f"Redis at {self.url} is unreachable: {exc}", field="redis_url") from exc
        except redis.RedisError as exc:
            raise Unavailable(f"Redis at {self.url} failed: {exc}", field="redis_url") from exc
