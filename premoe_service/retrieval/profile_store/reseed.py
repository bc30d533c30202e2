"""Re-seeding a Redis registry from the profile folder: the folder's deletions first, then the tasks Redis lacks,
each one atomic (a Lua script) against replicas that register or delete at the same time."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from ...errors import DataCorruption, FailedPrecondition, InvalidArgument, NotFound
from ...profiler.profile import Profile
from .local import LocalProfileStore

log = logging.getLogger(__name__)

Call = Callable[[Callable[[], Any]], Any]

# KEYS: profiles, sha256, deleted, version.
# Import one profile unless Redis holds the task or has seen it deleted.
_IMPORT = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 or redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('INCR', KEYS[4])
return 1
"""
# Apply a deletion the folder knows of: drop the task if Redis holds exactly the profile that was deleted (a
# snapshot from before the deletion), and record the tombstone, unless Redis holds another profile of that name
# (registered again since).
_BURY = """
local held = redis.call('HGET', KEYS[2], ARGV[1])
if held and held ~= ARGV[3] then
  return 0
end
if held then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('INCR', KEYS[4])
end
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
return 1
"""


class Seeder:
    """Copies a profile folder into a Redis registry without overwriting anything Redis decided since.

    Args:
        client: The redis-py client.
        keys: The registry's profiles, sha256, deleted and version keys.
        routing_key: The routing record's key: the folder's record is copied there unless Redis holds one.
    """

    def __init__(self, client: Any, keys: list[str], routing_key: str | None = None) -> None:
        self.keys = keys
        self.routing_key = routing_key
        self._import = client.register_script(_IMPORT)
        self._bury = client.register_script(_BURY)
        self._client = client

    def apply(self, record: LocalProfileStore, call: Call) -> int:
        """Apply the folder's tombstones, then import its readable profiles; returns how many were imported.

        A damaged profile file is logged as an error and skipped, never copied. `call` runs each Redis call
        (mapping Redis errors to Unavailable, which stops the seeding: the next access tries again).
        """
        for name, digest in sorted(record.tombstones().items()):
            call(partial(self._bury, keys=self.keys, args=[name, time.time(), digest]))
        routing = record.routing() if self.routing_key is not None else None
        if routing is not None:
            call(partial(self._client.set, self.routing_key, routing, nx=True))
        deleted = {bytes(n).decode() for n in call(partial(self._client.hkeys, self.keys[2]))}
        imported = 0
        for name in sorted(record.revisions()):
            if name in deleted:
                continue  # deleted by a replica whose folder this is not: it stays deleted
            try:
                data = record.read_bytes(name)
                _check(Profile.from_bytes(data, source=str(record.path(name))), name, record)
            except NotFound:
                continue  # deleted since it was listed
            except (DataCorruption, FailedPrecondition, InvalidArgument) as exc:
                log.error("not importing task %s into Redis: %s", name, exc)
                continue
            digest = hashlib.sha256(data).hexdigest()
            imported += int(call(partial(self._import, keys=self.keys, args=[name, data, digest])))
        return imported


def _check(profile: Profile, name: str, record: LocalProfileStore) -> None:
    if profile.name != name:
        path = str(record.path(name))
        raise DataCorruption(f"{path} holds the profile of task {profile.name!r}", field=path)


def version_count(version: Any) -> int:
    """The registry's version counter as a number (0 when missing or unreadable)."""
    try:
        return int(version) if version is not None else 0
    except (TypeError, ValueError):
        return 0


@dataclass
class StoreCounters:
    """Round trips to Redis (attempted and failed), and re-seedings from the record."""

    attempts: int = 0
    failures: int = 0
    reseeds: int = 0


def log_reseed(namespace: str, url: str, record: LocalProfileStore | None, *, lost: bool, imported: int) -> None:
    """Say what a re-seeding found: lost data (an error when there is no record to re-seed from), or imports."""
    if lost and record is None:
        log.error(
            "registry %s in Redis at %s lost data (restarted without persistence or from an older snapshot, or "
            "flushed) and there is no profile folder to re-seed it from: give Redis AOF persistence or the "
            "server a profile folder",
            namespace,
            url,
        )
    elif lost and record is not None:
        log.warning(
            "registry %s in Redis at %s lost data (restarted without persistence or from an older snapshot, or "
            "flushed): re-seeded %d task(s) from %s",
            namespace,
            url,
            imported,
            record.directory,
        )
    elif imported and record is not None:
        log.info("imported %d task(s) from %s into the registry in Redis", imported, record.directory)
