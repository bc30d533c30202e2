"""Store: a checkpoint split into a dense file and per-expert blobs, read through cache and disk tiers."""

from .cache import ByteCache, MemoryCache, RedisCache, open_cache
from .manifest import Manifest
from .reader import TIERS, Store, TierStats
from .shard import ShardResult, shard

__all__ = [
    "TIERS",
    "ByteCache",
    "Manifest",
    "MemoryCache",
    "RedisCache",
    "ShardResult",
    "Store",
    "TierStats",
    "open_cache",
    "shard",
]
