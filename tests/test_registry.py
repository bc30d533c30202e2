"""The task registry over memory, a profile directory and a real redis-server: register, route, delete, share."""

from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path

import numpy as np
import pytest
import redis
import torch

from premoe_service.errors import (
    AlreadyExists,
    DataCorruption,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from premoe_service.profiler.profile import Profile
from premoe_service.retrieval import Embedder, LocalProfileStore, RedisProfileStore, Registry

NONSENSE = "zxqv blorf 7781 qqq"


def bare_profile(name: str, demos: list[str], **fields: object) -> Profile:
    """A profile as the profiler hands it over before anything embedded its demos."""
    return Profile(
        name=name, fingerprint="test", moe_layers=(0,), scores={"tcess": torch.rand(1, 8)}, demos=demos, **fields
    )  # type: ignore[arg-type]


def fill(registry: Registry, profiles: dict[str, Profile], names: list[str] | None = None) -> None:
    for name in names or list(profiles):
        registry.register(profiles[name])


@pytest.fixture
def redis_url(redis_server) -> str:
    redis_server.flush()
    return str(redis_server.url)


# --- behaviour common to every store ---------------------------------------------------------------


def test_register_route_delete(embedder: Embedder, demo_profiles: dict[str, Profile]) -> None:
    registry = Registry(embedder=embedder)
    fill(registry, demo_profiles)
    assert registry.names() == sorted(demo_profiles)
    assert registry.route("What is the best way to cook risotto?").task == "cooking"

    registry.delete("cooking")
    assert "cooking" not in registry.names()
    decision = registry.route("What is the best way to cook risotto?")
    assert all(task != "cooking" for task, _ in decision.ranked)
    with pytest.raises(NotFound) as info:
        registry.get("cooking")
    assert info.value.field == "name"
    with pytest.raises(NotFound):
        registry.delete("cooking")


def test_registering_an_existing_name_needs_replace(embedder: Embedder, demo_profiles: dict[str, Profile]) -> None:
    registry = Registry(embedder=embedder)
    fill(registry, demo_profiles, ["astronomy"])
    other = bare_profile("astronomy", ["Explain the offside rule in football."])
    with pytest.raises(AlreadyExists) as info:
        registry.register(other)
    assert info.value.field == "name"
    assert registry.get("astronomy") is demo_profiles["astronomy"]

    registry.register(other, replace=True)
    assert registry.get("astronomy").demos == other.demos
    assert registry.index.demo_count("astronomy") == 1


def test_demos_are_embedded_when_the_profile_has_no_or_foreign_embeddings(
    embedder: Embedder, demo_tasks: dict[str, list[str]]
) -> None:
    registry = Registry(embedder=embedder)
    demos = demo_tasks["football"]
    foreign = torch.nn.functional.normalize(torch.rand(len(demos), 768), dim=1)
    kept = registry.register(bare_profile("football", demos, demo_embeddings=foreign, embedder="other-model"))
    assert kept.embedder == embedder.name and kept.demo_embeddings is not None
    np.testing.assert_allclose(kept.demo_embeddings.numpy(), embedder.encode(demos), atol=1e-5)
    assert registry.get("football") is kept

    with pytest.raises(InvalidArgument) as info:
        registry.register(bare_profile("empty", []))
    assert info.value.field == "demos"


def test_profiles_of_another_model_are_refused(embedder: Embedder, demo_profiles: dict[str, Profile]) -> None:
    registry = Registry(embedder=embedder, fingerprint="another-model")
    with pytest.raises(FailedPrecondition) as info:
        registry.register(demo_profiles["cooking"])
    assert info.value.field == "fingerprint"


def test_empty_registry_falls_back(embedder: Embedder) -> None:
    decision = Registry(embedder=embedder).route("anything at all")
    assert decision.ranked == [] and not decision.matched and decision.task is None
    with pytest.raises(InvalidArgument) as info:
        Registry(embedder=embedder).route("  ")
    assert info.value.field == "prompt"


def test_routes_and_changes_from_several_threads(embedder: Embedder, demo_profiles: dict[str, Profile]) -> None:
    registry = Registry(embedder=embedder)
    fill(registry, demo_profiles, ["cooking", "astronomy", "football"])
    errors: list[BaseException] = []

    def route() -> None:
        try:
            for _ in range(8):
                assert registry.route("How do I roast vegetables in the oven?").task == "cooking"
        except BaseException as exc:  # collected and re-raised in the test thread
            errors.append(exc)

    def churn() -> None:
        try:
            for _ in range(4):
                registry.register(demo_profiles["python-coding"])
                registry.delete("python-coding")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=route) for _ in range(3)] + [threading.Thread(target=churn)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


# --- local directory --------------------------------------------------------------------------------


def test_a_directory_registry_survives_restart(
    tmp_path: Path, embedder: Embedder, demo_profiles: dict[str, Profile]
) -> None:
    first = Registry(LocalProfileStore(tmp_path), embedder=embedder)
    fill(first, demo_profiles)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{n}.safetensors" for n in demo_profiles)
    (tmp_path / ".cooking.safetensors.abc123.tmp").write_bytes(b"half a write")  # a crash mid-write

    second = Registry(LocalProfileStore(tmp_path), embedder=embedder)
    assert second.names() == first.names() and second.problems == {}
    for query in ["How do I bake sourdough bread?", "What is a red dwarf star?", "Explain a free kick."]:
        before, after = first.route(query).ranked, second.route(query).ranked
        assert [t for t, _ in after] == [t for t, _ in before]
        np.testing.assert_allclose([s for _, s in after], [s for _, s in before], atol=1e-5)
    np.testing.assert_allclose(
        second.get("astronomy").demo_embeddings.numpy(),  # type: ignore[union-attr]
        demo_profiles["astronomy"].demo_embeddings.numpy(),
    )

    first.delete("football")
    third = Registry(LocalProfileStore(tmp_path), embedder=embedder)
    assert "football" not in third.names()


def test_a_damaged_profile_file_is_skipped_and_named(
    tmp_path: Path, embedder: Embedder, demo_profiles: dict[str, Profile], caplog: pytest.LogCaptureFixture
) -> None:
    fill(Registry(LocalProfileStore(tmp_path), embedder=embedder), demo_profiles, ["cooking", "astronomy"])
    broken = tmp_path / "astronomy.safetensors"
    broken.write_bytes(broken.read_bytes()[:200])  # truncated, as by a disk fault

    with caplog.at_level(logging.WARNING):
        registry = Registry(LocalProfileStore(tmp_path), embedder=embedder)
    assert registry.names() == ["cooking"]
    assert isinstance(registry.problems["astronomy"], DataCorruption)
    assert registry.problems["astronomy"].field == str(broken)
    assert str(broken) in caplog.text

    with pytest.raises(DataCorruption) as info:
        Registry(LocalProfileStore(tmp_path), embedder=embedder, strict=True)
    assert info.value.field == str(broken)

    registry.register(demo_profiles["astronomy"], replace=True)  # repairing it clears the problem
    assert registry.problems == {} and registry.route("Why do stars twinkle?").task == "astronomy"


# --- Redis ------------------------------------------------------------------------------------------


def test_replicas_on_one_redis_see_each_others_changes(
    redis_url: str, embedder: Embedder, demo_profiles: dict[str, Profile]
) -> None:
    a = Registry(RedisProfileStore(redis_url, "replicas"), embedder=embedder)
    b = Registry(RedisProfileStore(redis_url, "replicas"), embedder=embedder)
    assert a.names() == b.names() == []

    fill(a, demo_profiles, ["cooking", "football"])
    assert b.names() == ["cooking", "football"]
    assert b.route("How do I make a tomato sauce from scratch?").task == "cooking"

    b.register(demo_profiles["astronomy"])
    assert a.route("What is a pulsar?").task == "astronomy"

    a.delete("cooking")
    decision = b.route("How do I make a tomato sauce from scratch?")
    assert all(task != "cooking" for task, _ in decision.ranked)
    assert b.names() == ["astronomy", "football"]

    with pytest.raises(AlreadyExists):
        b.register(demo_profiles["football"])  # a registered it
    with pytest.raises(NotFound):
        b.delete("cooking")  # a deleted it

    c = Registry(RedisProfileStore(redis_url, "replicas"), embedder=embedder)  # a late replica starts from Redis
    assert c.names() == ["astronomy", "football"]
    assert Registry(RedisProfileStore(redis_url, "other-namespace"), embedder=embedder).names() == []


def test_a_redis_write_sets_bytes_checksum_and_version_together(
    redis_url: str, embedder: Embedder, demo_profiles
) -> None:
    store = RedisProfileStore(redis_url, "atomic")
    registry = Registry(store, embedder=embedder)
    client = redis.Redis.from_url(redis_url)
    registry.register(demo_profiles["cooking"])
    assert client.get("atomic:registry:version") == b"1"
    assert client.hkeys("atomic:registry:profiles") == client.hkeys("atomic:registry:sha256") == [b"cooking"]

    # A refused write changes nothing, not even the version.
    with pytest.raises(AlreadyExists):
        registry.register(demo_profiles["cooking"])
    assert client.get("atomic:registry:version") == b"1"

    # Bytes that do not match their checksum (bit rot, a stray HSET) are reported by name.
    good = client.hget("atomic:registry:profiles", "cooking")
    client.hset("atomic:registry:profiles", "cooking", b"garbage")
    with pytest.raises(DataCorruption) as info:
        store.read("cooking")
    assert info.value.field == "redis atomic:registry:profiles[cooking]"

    # A replica that meets a checksummed but unreadable profile skips it and says why.
    client.hset("atomic:registry:profiles", "cooking", good[:100])  # type: ignore[index]
    client.hset("atomic:registry:sha256", "cooking", hashlib.sha256(good[:100]).hexdigest())  # type: ignore[index]
    client.incr("atomic:registry:version")
    assert registry.refresh() and registry.names() == []
    assert isinstance(registry.problems["cooking"], DataCorruption)
    assert not registry.refresh() and "cooking" in registry.problems  # not retried until it changes


def test_redis_outage_keeps_routing_from_memory(
    own_redis, embedder: Embedder, demo_profiles: dict[str, Profile]
) -> None:
    registry = Registry(RedisProfileStore(own_redis.url, "outage", timeout=0.5), embedder=embedder, retry_after=0.0)
    fill(registry, demo_profiles, ["cooking", "astronomy"])

    own_redis.stop()
    assert registry.route("What is a pulsar?").task == "astronomy"
    assert isinstance(registry.store_error, Unavailable)
    with pytest.raises(Unavailable) as info:
        registry.register(demo_profiles["football"])
    assert info.value.field == "redis_url"
    with pytest.raises(Unavailable):
        registry.refresh()

    own_redis.start()  # an empty Redis (no persistence): the store, the source of truth, is empty now
    registry.register(demo_profiles["football"])
    assert registry.route("Explain a corner kick.").task == "football"
    assert registry.store_error is None and registry.names() == ["football"]
