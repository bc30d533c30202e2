"""The registry's profile stores (not the expert store of `premoe_service.store`): the profile folder (the record),
Redis over it for replicas, one in memory, and the factory that picks one for a deployment."""

from __future__ import annotations

from pathlib import Path

from .local import LocalProfileStore, MemoryProfileStore, ProfileStore
from .redis_store import RedisProfileStore

__all__ = ["LocalProfileStore", "MemoryProfileStore", "ProfileStore", "RedisProfileStore", "open_profile_store"]


def open_profile_store(profiles: str | Path | None, redis_url: str | None, fingerprint: str) -> ProfileStore | None:
    """The registry's store for a deployment: Redis (shared by replicas) over the profile folder when both are
    given, so a Redis that lost its data is re-seeded from the files; the folder alone; Redis alone (then Redis
    is the only record: give it AOF persistence); or None for a registry in memory.

    Args:
        profiles: The profile folder (the record), or None.
        redis_url: Redis URL, or None.
        fingerprint: The model's store fingerprint; it namespaces the registry in Redis.
    """
    local = LocalProfileStore(profiles) if profiles is not None else None
    if redis_url:
        return RedisProfileStore(redis_url, namespace=f"premoe-registry:{fingerprint}", record=local)
    return local
