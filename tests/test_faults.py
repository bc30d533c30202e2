"""Faults survived, with a real Redis and real disk faults: the registry re-seeded from its profile folder after
Redis loses its data, deletions that stay deleted, Redis reply errors and a frozen Redis as cache misses of
bounded cost, shards damaged after their first read, killed writes, full and unwritable disks."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
import torch

from premoe_service.errors import DataCorruption, NotFound, ResourceExhausted, Unavailable
from premoe_service.families.tiny import save_tiny_checkpoint
from premoe_service.fsutil import is_temp_name
from premoe_service.profiler.profile import Profile
from premoe_service.retrieval import Embedder, LocalProfileStore, RedisProfileStore, Registry, open_profile_store
from premoe_service.serving import GenerationResult, SamplingParams, ServiceConfig, ServingCore
from premoe_service.store import RedisCache, Store, shard

FINGERPRINT = "test"  # the fingerprint of the conftest's demo profiles


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("faults")
    save_tiny_checkpoint(root / "ckpt", "qwen3_moe")
    shard(root / "ckpt", root / "store", progress=False)
    return root / "store"


def shared_registry(folder: Path, url: str, embedder: Embedder, **kwargs: float) -> Registry:
    """A registry as a server opens it: Redis over the profile folder (the record)."""
    store = open_profile_store(folder, url, FINGERPRINT)
    assert isinstance(store, RedisProfileStore) and store.record is not None
    return Registry(store, embedder=embedder, **kwargs)  # type: ignore[arg-type]


def redis_tasks(url: str) -> list[str]:
    client = redis.Redis.from_url(url)
    return sorted(k.decode() for k in client.hkeys(f"premoe-registry:{FINGERPRINT}:registry:profiles"))


def temp_files(*folders: Path) -> list[str]:
    return [p.name for folder in folders if folder.is_dir() for p in folder.iterdir() if is_temp_name(p.name)]


def generate(service: ServingCore, prompt: str = "def add(a, b):") -> GenerationResult:
    *_, result = service.generate(prompt, SamplingParams(max_new_tokens=3))
    assert isinstance(result, GenerationResult)
    return result


@contextmanager
def frozen(process: subprocess.Popen[bytes] | None) -> Iterator[None]:
    """A Redis that accepts connections and never answers (SIGSTOP), thawed whatever happens."""
    assert process is not None
    os.kill(process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(process.pid, signal.SIGCONT)


# --- the registry survives its cache -----------------------------------------------------------------


def test_a_flushed_redis_is_reseeded_from_the_profile_folder_without_a_restart(
    tmp_path: Path, redis_server, embedder: Embedder, demo_profiles: dict[str, Profile]
) -> None:
    redis_server.flush()
    registry = shared_registry(tmp_path, redis_server.url, embedder)
    for name in ("cooking", "football", "astronomy"):
        registry.register(demo_profiles[name])
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [
        "astronomy.safetensors",
        "cooking.safetensors",
        "football.safetensors",
    ]

    redis_server.flush()  # FLUSHALL, as an operator (or a cache eviction gone wrong) would
    assert registry.names() == ["astronomy", "cooking", "football"]
    assert redis_tasks(redis_server.url) == ["astronomy", "cooking", "football"]
    assert registry.route("What is a pulsar?").task == "astronomy"
    # A replica with no folder of its own sees the re-seeded tasks.
    replica = Registry(RedisProfileStore(redis_server.url, f"premoe-registry:{FINGERPRINT}"), embedder=embedder)
    assert replica.names() == ["astronomy", "cooking", "football"]


def test_a_redis_restarted_empty_brings_the_tasks_back_and_health_returns(
    tmp_path: Path, own_redis, store_dir: Path, embedder: Embedder, demo_profiles: dict[str, Profile]
) -> None:
    registry = shared_registry(tmp_path / "profiles", own_redis.url, embedder, retry_after=0.0)
    registry.register(demo_profiles["cooking"])
    registry.register(demo_profiles["football"])
    cache = RedisCache(own_redis.url, timeout_s=0.5, retry_s=0.0)
    experts = Store(store_dir, cache)
    assert experts.read_blob(1, 0)[1] == "disk" and experts.read_blob(1, 0)[1] == "cache"

    own_redis.stop()
    assert registry.route("How do I make a tomato sauce?").task == "cooking"  # served from memory
    assert registry.health() == "degraded"
    data, tier = experts.read_blob(1, 1)
    assert tier == "disk" and experts.health() == "degraded"
    with pytest.raises(Unavailable) as info:  # a registration needs Redis: refused, and nothing half written
        registry.register(demo_profiles["astronomy"])
    assert info.value.field == "redis_url"
    assert not (tmp_path / "profiles" / "astronomy.safetensors").exists()
    assert temp_files(tmp_path / "profiles") == []

    own_redis.start()  # no persistence: an empty Redis
    assert registry.names() == ["cooking", "football"]
    assert registry.health() == "ok"
    assert redis_tasks(own_redis.url) == ["cooking", "football"]
    assert experts.read_blob(1, 1) == (data, "disk") and experts.read_blob(1, 1) == (data, "cache")
    assert experts.health() == "ok"


def test_a_deleted_task_stays_deleted_after_reseeding(
    tmp_path: Path, redis_server, embedder: Embedder, demo_profiles: dict[str, Profile]
) -> None:
    redis_server.flush()
    a = shared_registry(tmp_path, redis_server.url, embedder)  # two servers, one Redis, one profiles volume
    b = shared_registry(tmp_path, redis_server.url, embedder)
    for name in ("cooking", "football", "astronomy"):
        a.register(demo_profiles[name])
    assert b.names() == ["astronomy", "cooking", "football"]
    cooking = (tmp_path / "cooking.safetensors").read_bytes()

    b.delete("cooking")
    assert (tmp_path / "cooking.deleted").exists() and not (tmp_path / "cooking.safetensors").exists()
    client = redis.Redis.from_url(redis_server.url)
    assert client.hkeys(f"premoe-registry:{FINGERPRINT}:registry:deleted") == [b"cooking"]

    # A server whose own folder still holds the task starts: Redis's tombstone keeps it out.
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "cooking.safetensors").write_bytes(cooking)
    assert shared_registry(stale, redis_server.url, embedder).names() == ["astronomy", "football"]

    # A copy of the deleted file comes back into the shared folder (a backup restored) and Redis loses its data.
    (tmp_path / "cooking.safetensors").write_bytes(cooking)
    redis_server.flush()
    assert a.names() == b.names() == ["astronomy", "football"]
    assert Registry(LocalProfileStore(tmp_path), embedder=embedder).names() == ["astronomy", "football"]
    assert redis_tasks(redis_server.url) == ["astronomy", "football"]
    assert client.hkeys(f"premoe-registry:{FINGERPRINT}:registry:deleted") == [b"cooking"]  # re-recorded
    with pytest.raises(NotFound):
        a.delete("cooking")

    # Registering the name again ends the deletion, for the next re-seeding too.
    a.register(demo_profiles["cooking"], replace=True)
    assert not (tmp_path / "cooking.deleted").exists()
    redis_server.flush()
    assert b.names() == ["astronomy", "cooking", "football"]


def test_a_redis_rolled_back_to_a_snapshot_is_reconciled_with_the_folder(
    tmp_path: Path, own_redis, embedder: Embedder, demo_profiles: dict[str, Profile]
) -> None:
    registry = shared_registry(tmp_path / "profiles", own_redis.url, embedder)
    registry.register(demo_profiles["cooking"])
    registry.register(demo_profiles["football"])
    redis.Redis.from_url(own_redis.url).save()  # an RDB snapshot
    registry.delete("cooking")
    registry.register(demo_profiles["astronomy"])

    own_redis.stop()
    own_redis.start()  # loads the snapshot: cooking is back, astronomy missing, the epoch unchanged
    assert registry.names() == ["astronomy", "football"]
    assert redis_tasks(own_redis.url) == ["astronomy", "football"]


def test_damaged_profiles_at_startup_are_skipped_with_a_logged_error(
    tmp_path: Path, redis_server, embedder: Embedder, demo_profiles: dict[str, Profile], caplog
) -> None:
    redis_server.flush()  # an empty Redis: everything comes from the folder
    good = demo_profiles["cooking"].to_bytes()
    for name in ("cooking", "football", "astronomy", "legal-contracts"):
        demo_profiles[name].save(tmp_path / f"{name}.safetensors")
    (tmp_path / "football.safetensors").write_bytes(good[:300])  # truncated
    (tmp_path / "astronomy.safetensors").write_bytes(b"\xff" * 8 + good[8:])  # a header length past the end
    (tmp_path / "legal-contracts.safetensors").write_bytes(good)  # holds another task's profile
    (tmp_path / "python-coding.safetensors").mkdir()  # not even a file

    with caplog.at_level(logging.ERROR):
        registry = shared_registry(tmp_path, redis_server.url, embedder)
    assert registry.names() == ["cooking"]
    assert redis_tasks(redis_server.url) == ["cooking"]  # nothing damaged was copied into Redis
    for name in ("football", "astronomy", "legal-contracts", "python-coding"):
        assert str(tmp_path / f"{name}.safetensors") in caplog.text
    assert all(record.levelno == logging.ERROR for record in caplog.records)

    local = Registry(LocalProfileStore(tmp_path), embedder=embedder)  # the same without Redis
    assert local.names() == ["cooking"]
    assert sorted(local.problems) == ["astronomy", "football", "legal-contracts", "python-coding"]
    assert all(isinstance(e, DataCorruption) for e in local.problems.values())


# --- the expert cache stays optional ------------------------------------------------------------------


def test_wrongtype_and_oom_replies_are_cache_misses_and_degrade_health(
    own_redis, store_dir: Path, embedder: Embedder
) -> None:
    client = redis.Redis.from_url(own_redis.url)
    manifest = Store(store_dir).manifest
    keys = [f"premoe:{manifest.fingerprint}:{layer}:{e}" for layer in manifest.moe_layers for e in range(4)]
    for key in keys:
        client.lpush(key, "not an expert")  # WRONGTYPE for GET

    service = ServingCore(ServiceConfig(store=store_dir, device="cpu", redis_url=own_redis.url), embedder=embedder)
    reference = generate(service)
    assert reference.loads["disk"] == reference.plan.pattern.size and reference.loads["cache"] == 0
    assert service.stats().cache_health == "degraded"
    assert isinstance(service.cache, RedisCache) and service.cache.counters.failures >= 1
    assert [client.type(key) for key in keys] == [b"string"] * len(keys)  # repaired by the puts from disk
    service.close()

    client.flushall()
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", 1)  # every write is refused with OOM; reads still work
    try:
        service = ServingCore(ServiceConfig(store=store_dir, device="cpu", redis_url=own_redis.url), embedder=embedder)
        result = generate(service)
        assert result.token_ids == reference.token_ids and result.loads["disk"] == result.plan.pattern.size
        assert service.stats().cache_health == "degraded"
        assert client.keys("premoe:*") == []  # no expert was written
        # Only what needs Redis fails: a registration in the shared registry, named.
        with pytest.raises(Unavailable) as info:
            service.registry.register(_profile(manifest.fingerprint, manifest.moe_layers, manifest.num_experts))
        assert info.value.field == "redis_url" and "OutOfMemoryError" in str(info.value)
        assert generate(service).token_ids == reference.token_ids
        service.close()
    finally:
        client.config_set("maxmemory", 0)


def test_a_frozen_redis_costs_one_timeout_per_interval_not_one_per_read(
    own_redis, store_dir: Path, embedder: Embedder, demo_profiles: dict[str, Profile]
) -> None:
    # The interval is as short as the timeout, so a probe's own wait must not count as the interval passing.
    timeout, interval = 0.4, 0.4
    cache = RedisCache(own_redis.url, timeout_s=timeout, retry_s=interval)
    experts = Store(store_dir, cache)
    store = RedisProfileStore(own_redis.url, "frozen", timeout=timeout)
    registry = Registry(store, embedder=embedder, retry_after=interval)
    registry.register(demo_profiles["astronomy"])
    reads = [(layer, e) for layer in experts.manifest.moe_layers for e in range(experts.manifest.num_experts)]
    expected = {address: bytes(experts.read_blob(*address)[0]) for address in reads}  # every expert now cached

    def bound(seconds: float) -> float:  # what "one timeout per interval" allows in that time
        return 1 + seconds / (timeout + interval)

    before_cache, before_registry = cache.counters.attempts, store.counters.attempts
    with frozen(own_redis.process):
        start = time.monotonic()
        for address in reads:
            data, tier = experts.read_blob(*address)
            assert tier == "disk" and bytes(data) == expected[address]
        cache_seconds = time.monotonic() - start
        assert experts.health() == "degraded"
        start = time.monotonic()
        for _ in range(12):
            assert registry.route("What is a neutron star?").task == "astronomy"
        registry_seconds = time.monotonic() - start
        assert registry.health() == "degraded"
    # Per read, the cache would try 24 GETs and 24 puts and the registry 12 version checks, each a timeout.
    assert cache.counters.failures >= 1 and cache.counters.attempts - before_cache <= bound(cache_seconds)
    assert store.counters.failures >= 1 and store.counters.attempts - before_registry <= bound(registry_seconds)


# --- integrity ---------------------------------------------------------------------------------------


def test_a_shard_damaged_after_its_first_read_is_detected_and_never_cached(
    tmp_path: Path, store_dir: Path, redis_server, embedder: Embedder
) -> None:
    redis_server.flush()
    copy = tmp_path / "store"
    shutil.copytree(store_dir, copy)
    experts = Store(copy, RedisCache(redis_server.url))
    client = redis.Redis.from_url(redis_server.url)
    key = experts.cache_key(1, 3)
    assert experts.read_blob(1, 3)[1] == "disk" and client.exists(key)
    client.delete(key)

    nbytes = experts.manifest.expert_nbytes
    with (copy / experts.manifest.layers[1].file).open("r+b") as handle:  # in place: the open descriptor sees it
        handle.seek(3 * nbytes + 11)
        byte = handle.read(1)
        handle.seek(3 * nbytes + 11)
        handle.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(DataCorruption, match="expert 3 of layer 1"):
        experts.read_blob(1, 3)
    with pytest.raises(DataCorruption, match="expert 3 of layer 1"):
        experts.read_many_into([(1, 3, [memoryview(bytearray(nbytes))])])
    assert not client.exists(key)  # never copied into Redis
    assert experts.read_blob(1, 2)[1] == "disk"  # its neighbours are fine

    service = ServingCore(ServiceConfig(store=copy, device="cpu"), embedder=embedder)
    with pytest.raises(DataCorruption, match="expert 3 of layer 1"):  # the request fails, DATA_LOSS at the doors
        generate(service)
    service.close()


_KILLED_WRITER = textwrap.dedent(
    """
    import sys, time
    from premoe_service.fsutil import atomic_writer
    with atomic_writer(sys.argv[1]) as handle:
        handle.write(b"x" * (1 << 20))
        handle.flush()
        print("writing", flush=True)
        time.sleep(60)
    """
)


def test_killed_writes_leave_no_temp_files_after_the_next_start(
    tmp_path: Path, store_dir: Path, embedder: Embedder
) -> None:
    store = tmp_path / "store"
    shutil.copytree(store_dir, store)
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    layer_file = store / Store(store).manifest.layers[1].file
    targets = [layer_file, profiles / "maths.safetensors"]  # a shard write, a registration
    writers = [
        subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(t)], stdout=subprocess.PIPE) for t in targets
    ]
    try:
        for writer in writers:
            assert writer.stdout is not None and writer.stdout.readline() == b"writing\n"
        assert len(temp_files(layer_file.parent, profiles)) == 2
        Store(store)
        LocalProfileStore(profiles)
        assert len(temp_files(layer_file.parent, profiles)) == 2  # live writers hold their lock: kept
    finally:
        for writer in writers:
            writer.kill()
            writer.wait()

    experts = Store(store)  # the next start
    registry = Registry(LocalProfileStore(profiles), embedder=embedder)
    assert temp_files(layer_file.parent, profiles) == []
    assert registry.names() == [] and not (profiles / "maths.safetensors").exists()  # no half task
    assert experts.read_blob(1, 0)[1] == "disk"  # the old layer file, intact and checked

    # A killed `premoe shard` leaves its temp file in the output; the next run cleans it.
    out = tmp_path / "resharded"
    (out / "experts").mkdir(parents=True)
    (out / "experts" / ".layer_001.bin.abcd1234.tmp").write_bytes(b"half")
    shard(store_dir.parent / "ckpt", out, progress=False)
    assert temp_files(out, out / "experts") == []


# --- disk faults at registration ---------------------------------------------------------------------


def _profile(fingerprint: str, layers: tuple[int, ...] | list[int], experts: int, name: str = "maths") -> Profile:
    scores = {"tcess": torch.rand(len(layers), experts, generator=torch.Generator().manual_seed(0))}
    return Profile(name, fingerprint, tuple(layers), scores, demos=["12+30=42"] * 64)


_FULL_DISK = textwrap.dedent(
    """
    import json, resource, sys
    from premoe_service.errors import PreMoeError
    from premoe_service.profiler.profile import Profile
    from premoe_service.retrieval import open_profile_store
    import torch

    folder, url = sys.argv[1], sys.argv[2]
    store = open_profile_store(folder, url, "test")
    profile = Profile("maths", "test", (0, 1), {"tcess": torch.rand(2, 4096)}, demos=["12+30=42"])
    # Python ignores SIGXFSZ, so a write past the limit fails with EFBIG, as on a full disk.
    resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384))
    try:
        store.write(profile, replace=False)
        print(json.dumps({"error": None}))
    except PreMoeError as exc:
        print(json.dumps({"error": type(exc).__name__, "field": exc.field, "message": str(exc)}))
    """
)


def test_a_full_disk_at_registration_is_resource_exhausted_and_writes_nothing(tmp_path: Path, redis_server) -> None:
    redis_server.flush()
    folder = tmp_path / "profiles"
    run = subprocess.run(
        [sys.executable, "-c", _FULL_DISK, str(folder), redis_server.url], capture_output=True, timeout=60
    )
    assert run.returncode == 0, run.stderr.decode()[-2000:]
    reply = json.loads(run.stdout.decode().strip().splitlines()[-1])
    assert reply["error"] == ResourceExhausted.__name__, reply
    assert reply["field"] == str(folder / "maths.safetensors") and "File too large" in reply["message"]
    assert list(folder.iterdir()) == []  # no profile, no temp file
    assert redis_tasks(redis_server.url) == []  # and nothing in Redis


def test_an_unwritable_profile_folder_is_unavailable_and_writes_nothing(
    tmp_path: Path, redis_server, embedder: Embedder, demo_profiles: dict[str, Profile]
) -> None:
    redis_server.flush()
    folder = tmp_path / "profiles"
    registry = shared_registry(folder, redis_server.url, embedder)
    registry.register(demo_profiles["cooking"])
    shutil.rmtree(folder)
    folder.write_bytes(b"")  # the folder's path is now a regular file: ENOTDIR below it

    with pytest.raises(Unavailable) as info:
        registry.register(demo_profiles["football"])
    assert info.value.field == str(folder / "football.safetensors") and "Not a directory" in str(info.value)
    with pytest.raises(Unavailable) as info:
        registry.delete("cooking")  # its tombstone cannot be written: Redis keeps the task
    assert info.value.field == str(folder / "cooking.deleted")
    assert redis_tasks(redis_server.url) == ["cooking"] and registry.names() == ["cooking"]

    with pytest.raises(Unavailable) as info:
        LocalProfileStore(folder / "below-a-file")
    assert info.value.field == str(folder / "below-a-file")
