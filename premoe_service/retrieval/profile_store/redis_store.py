"""Profiles in Redis, so that replicas share one registry: bytes, checksums, tombstones and a version counter,
re-seeded from the profile folder (the record) whenever Redis comes back without them."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

from ...errors import AlreadyExists, DataCorruption, InvalidArgument, NotFound, Unavailable
from ...names import check_task_name
from ...profiler.profile import Profile
from .local import LocalProfileStore
from .reseed import Seeder, StoreCounters, log_reseed, version_count

log = logging.getLogger(__name__)


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


class RedisProfileStore:
    """Profile files as values of a Redis hash, with a SHA-256 per task, tombstones and a global version counter.

    Keys (under `namespace`):
      - `<ns>:registry:profiles`: hash task -> profile bytes (the safetensors profile file);
      - `<ns>:registry:sha256`: hash task -> hex digest of those bytes, the task's revision;
      - `<ns>:registry:deleted`: hash task -> deletion time, for deleted tasks not registered again;
      - `<ns>:registry:version`: counter incremented by every registration and deletion;
      - `<ns>:registry:routing`: the routing record (`routing_record`: the none-class and the calibrated leads);
      - `<ns>:registry:epoch`: a random id set when the namespace was (re-)seeded. It is missing when Redis lost
        its data (restarted without persistence, flushed), and changes when another replica re-seeded it.

    A write sets the bytes and the digest and bumps the version in one MULTI/EXEC transaction, under
    WATCH of the profile hash so that "register unless it exists" cannot race another replica: Redis
    holds the old task or the new one, never a mix. Readers poll the version and the epoch with one MGET
    and list the digests only when they moved. A digest that does not match the bytes read is DataCorruption.

    With a `record` (the profile folder), the folder is the source of truth and Redis its shared copy: a
    registration writes the file's bytes to a synced temp file, then Redis, then renames the file into place
    (a failure on either side leaves neither); a deletion writes the folder's tombstone, then Redis's, then
    removes the file. Whenever the epoch is missing or not the one this store last saw (checked on every
    version poll, listing and write), the store imports every profile of the folder that Redis neither holds
    nor has as deleted, and every tombstone of the folder, before it adopts the epoch. Replicas that share
    Redis and the folder thus bring every task back after a Redis restart, and no deleted one.

    Args:
        url: Redis URL, e.g. "redis://127.0.0.1:6379/0".
        namespace: Key prefix, so several registries (one per model) share one Redis.
        timeout: Socket timeout in seconds; a registry keeps serving from memory when Redis is away,
            so a short timeout bounds what a request waits for the version check.
        record: The profile folder that Redis copies, or None when Redis is the only record.
        retry_s: After a failed re-seeding (Redis refusing writes), how long readers wait before the next try.
    """

    def __init__(
        self,
        url: str,
        namespace: str = "premoe",
        *,
        timeout: float = 0.5,
        record: LocalProfileStore | None = None,
        retry_s: float = 5.0,
    ) -> None:
        import redis

        if not namespace or any(c.isspace() for c in namespace):
            raise InvalidArgument(f"namespace must be non-empty without spaces, got {namespace!r}", field="namespace")
        try:
            self._client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        except ValueError as exc:
            raise InvalidArgument(f"not a Redis URL: {url!r} ({exc})", field="redis_url") from exc
        self.url = url
        self.namespace = namespace
        self.record = record
        self.retry_s = retry_s
        self.counters = StoreCounters()
        calls = RedisCalls(self._client, url, self.counters)
        self._call, self._transaction = calls.call, calls.transaction
        self._profiles = f"{namespace}:registry:profiles"
        self._digests = f"{namespace}:registry:sha256"
        self._deleted = f"{namespace}:registry:deleted"
        self._version = f"{namespace}:registry:version"
        self._epoch_key = f"{namespace}:registry:epoch"
        self._routing = f"{namespace}:registry:routing"
        self._epoch: bytes | None = None  # the epoch this store last seeded or adopted
        self._high = 0  # the highest version seen in that epoch
        self._seed_lock = threading.Lock()
        self._next_seed_try = 0.0
        self._seeder = Seeder(
            self._client, [self._profiles, self._digests, self._deleted, self._version], routing_key=self._routing
        )

    def version(self) -> Hashable:
        version, epoch = self._call(lambda: self._client.mget(self._version, self._epoch_key))
        if self._stale(epoch, version) and self._reseed_quietly():
            version, epoch = self._call(lambda: self._client.mget(self._version, self._epoch_key))
        self._saw(epoch, version)
        return (epoch, version)  # the epoch too: a re-seeded counter may repeat an old value

    def revisions(self) -> dict[str, Hashable]:
        def fetch(pipe: Any) -> None:
            pipe.get(self._epoch_key)
            pipe.get(self._version)
            pipe.hgetall(self._digests)

        epoch, version, digests = self._transaction(fetch)
        if self._stale(epoch, version) and self._reseed_quietly():
            epoch, version, digests = self._transaction(fetch)
        self._saw(epoch, version)
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
        """Register a profile in the folder (when there is one) and in Redis, or in neither.

        Raises:
            AlreadyExists: Redis holds the task and `replace` is False.
            Unavailable: Redis cannot be reached or refuses the write (e.g. OOM), or the folder is not writable.
            ResourceExhausted: The folder's disk is full.
        """
        self._ensure_seeded()
        data = profile.to_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if self.record is None:
            self._write_redis(profile.name, data, digest, replace)
            return digest
        previous: tuple[bytes | None, bytes | None] | None = None
        try:
            # Redis decides whether the task exists (it holds every replica's tasks); the folder follows.
            with self.record.writing(profile.name, data, replace=True):
                previous = self._write_redis(profile.name, data, digest, replace)
        except BaseException:
            if previous is not None:  # Redis took it but the file could not be renamed into place
                self._undo_write(profile.name, previous)
            raise
        return digest

    def delete(self, name: str) -> None:
        """Delete a task from Redis and the folder, leaving a tombstone in both.

        Raises:
            NotFound: Neither Redis nor the folder holds the task.
            Unavailable: Redis cannot be reached, or the folder is not writable.
            ResourceExhausted: The folder's disk is full (the tombstone cannot be written).
        """
        check_task_name(name)
        self._ensure_seeded()
        if self.record is None:
            self._delete_redis(name, must_exist=True)
            return
        in_folder = self.record.exists(name)
        if in_folder:
            digest = hashlib.sha256(self.record.read_bytes(name)).hexdigest()
        else:
            held: Any = self._call(lambda: self._client.hget(self._digests, name))
            digest = bytes(held).decode() if held is not None else ""
        # First: once Redis forgets the task, only the tombstone remembers it (with the digest of what it deleted).
        buried = self.record.bury(name, digest)
        try:
            self._delete_redis(name, must_exist=not in_folder)
        except BaseException:
            if buried:
                self.record.unbury(name)
            raise
        self.record.remove_profile(name)

    def routing(self) -> bytes | None:
        """The routing record in Redis; the folder's when Redis has none (it was seeded before the folder had one)."""
        held: Any = self._call(lambda: self._client.get(self._routing))
        if held is not None:
            return bytes(held)
        return self.record.routing() if self.record is not None else None

    def write_routing(self, data: bytes) -> None:
        """Write the routing record to the folder (when there is one), then to Redis, bumping the version."""
        self._ensure_seeded()
        if self.record is not None:
            self.record.write_routing(data)

        def write(pipe: Any) -> None:
            pipe.set(self._routing, data)
            pipe.incr(self._version)

        results: Any = self._transaction(write)
        self._high = max(self._high, version_count(results[-1]))

    def tombstones(self) -> set[str]:
        """Tasks Redis has seen deleted (and not registered again since)."""
        names: list[Any] = self._call(lambda: self._client.hkeys(self._deleted))
        return {bytes(name).decode() for name in names}

    def close(self) -> None:
        self._client.close()

    # --- Redis writes ----------------------------------------------------------------------------------

    def _write_redis(self, name: str, data: bytes, digest: str, replace: bool) -> tuple[bytes | None, bytes | None]:
        """Set the task's bytes and digest, clear its tombstone, bump the version; returns what it replaced."""
        previous: list[bytes | None] = [None, None]

        def write(pipe: Any) -> None:
            previous[:] = [pipe.hget(self._profiles, name), pipe.hget(self._digests, name)]
            if not replace and previous[0] is not None:
                raise AlreadyExists(f"task {name!r} exists; pass replace to overwrite it", field="name")
            pipe.multi()
            pipe.hset(self._profiles, name, data)
            pipe.hset(self._digests, name, digest)
            pipe.hdel(self._deleted, name)
            pipe.incr(self._version)

        results: Any = self._call(lambda: self._client.transaction(write, self._profiles))
        self._high = max(self._high, version_count(results[-1]))  # the INCR: our own writes count as seen
        return previous[0], previous[1]

    def _undo_write(self, name: str, previous: tuple[bytes | None, bytes | None]) -> None:
        """Put back what a write replaced in Redis (best effort: it runs after another failure)."""
        data, digest = previous
        try:
            pipe = self._client.pipeline(transaction=True)
            if data is None or digest is None:
                pipe.hdel(self._profiles, name)
                pipe.hdel(self._digests, name)
            else:
                pipe.hset(self._profiles, name, data)
                pipe.hset(self._digests, name, digest)
            pipe.incr(self._version)
            pipe.execute()
        except Exception as exc:  # the caller's error is the one to report; this one is logged
            log.error("could not undo the Redis write of task %s after the profile file failed: %s", name, exc)

    def _delete_redis(self, name: str, *, must_exist: bool) -> None:
        def delete(pipe: Any) -> None:
            if must_exist and not pipe.hexists(self._profiles, name):
                raise NotFound(f"no task named {name!r} in {self._profiles}", field="name")
            pipe.multi()
            pipe.hdel(self._profiles, name)
            pipe.hdel(self._digests, name)
            pipe.hset(self._deleted, name, str(time.time()))
            pipe.incr(self._version)

        results: Any = self._call(lambda: self._client.transaction(delete, self._profiles))
        self._high = max(self._high, version_count(results[-1]))

    # --- re-seeding ------------------------------------------------------------------------------------

    def _reseed_quietly(self) -> bool:
        """Re-seed for a reader; when Redis refuses the writes (e.g. OOM), readers go on with what Redis holds
        and the next attempt waits `retry_s`. Returns whether it re-seeded."""
        if time.monotonic() < self._next_seed_try:
            return False
        try:
            self._reseed()
        except Unavailable as exc:
            self._next_seed_try = time.monotonic() + self.retry_s
            log.warning("cannot re-seed registry %s in Redis, retrying in %.0fs: %s", self.namespace, self.retry_s, exc)
            return False
        return True

    def _ensure_seeded(self) -> None:
        version, epoch = self._call(lambda: self._client.mget(self._version, self._epoch_key))
        if self._stale(epoch, version):
            self._reseed()
        else:
            self._saw(epoch, version)

    def _stale(self, epoch: Any, version: Any) -> bool:
        """Whether Redis's registry is not the one this store last saw: its data lost (no epoch), re-seeded by
        another replica (another epoch), or rolled back (a lower version: an RDB snapshot, the last second of
        an `appendfsync everysec` AOF)."""
        return epoch is None or epoch != self._epoch or version_count(version) < self._high

    def _saw(self, epoch: Any, version: Any) -> None:
        if epoch is not None and epoch == self._epoch:
            self._high = max(self._high, version_count(version))

    def _reseed(self) -> None:
        """Bring the record into Redis (its deletions, then the tasks Redis lacks), then adopt the epoch."""
        with self._seed_lock:
            version: Any
            epoch: Any
            version, epoch = self._call(lambda: self._client.mget(self._version, self._epoch_key))
            if not self._stale(epoch, version):
                return  # another thread of this process did it
            lost = self._epoch is not None and (epoch is None or version_count(version) < self._high)
            imported = self._seeder.apply(self.record, self._call) if self.record is not None else 0
            fresh = uuid.uuid4().hex.encode()
            if self._call(lambda: self._client.set(self._epoch_key, fresh, nx=True)):
                epoch = fresh
            else:  # another replica seeded it first, or the epoch survived a roll-back
                epoch = self._call(lambda: self._client.get(self._epoch_key))
            self._epoch = bytes(epoch) if epoch is not None else None
            self._high = version_count(self._call(lambda: self._client.get(self._version)))
            self.counters.reseeds += 1
        log_reseed(self.namespace, self.url, self.record, lost=lost, imported=imported)
