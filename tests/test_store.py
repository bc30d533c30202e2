"""The shard store: round trips through shard -> store -> engine, cache tiers, corruption, residency, export."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from premoe_service.errors import AlreadyExists, DataCorruption, InvalidArgument, PatternError, ResourceExhausted
from premoe_service.families import adapter_for
from premoe_service.families.tiny import TINY_CONFIGS, tiny_model
from premoe_service.pattern import Pattern
from premoe_service.runtime.build import load_model
from premoe_service.runtime.residency import Budget
from premoe_service.store import MemoryCache, RedisCache, Store, shard
from premoe_service.store.checkpoint_io import write_safetensors_streaming
from premoe_service.store.export import export_pruned

from .references import pruned_checkpoint_model, random_pattern

ATOL = 1e-5
IDS = torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(5))


def checkpoint(tmp_path: Path, family: str, **save_kwargs) -> tuple[torch.nn.Module, Path]:
    model = tiny_model(family)
    path = tmp_path / f"{family}-ckpt"
    model.save_pretrained(path, **save_kwargs)
    return model, path


def eventually(condition: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    """Poll `condition` until it holds or `timeout_s` has passed."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@torch.no_grad()
def run(patterned, residency, pattern: Pattern) -> torch.Tensor:
    with residency.lease(pattern), residency.model_lock:
        residency.activate(pattern)
        return patterned.model(IDS).logits


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_round_trip_through_redis_equals_transformers(family: str, tmp_path: Path, redis_server) -> None:
    reference, ckpt = checkpoint(tmp_path, family)
    shard(ckpt, tmp_path / "store", progress=False)
    store = Store(tmp_path / "store", RedisCache(redis_server.url))
    patterned, residency = load_model(store, Budget(fraction=1.0))
    with torch.no_grad():
        expected = reference(IDS).logits
    assert (run(patterned, residency, Pattern.full(patterned.spec)) - expected).abs().max().item() <= ATOL

    kept = random_pattern(reference, patterned.spec.num_experts // 2, seed=9)
    pruned = pruned_checkpoint_model(reference, kept)
    with torch.no_grad():
        expected_pruned = pruned(IDS).logits
    actual = run(patterned, residency, Pattern.build(patterned.spec, kept))
    assert (actual - expected_pruned).abs().max().item() <= ATOL
    # Second pass of the full pattern: every expert now comes from Redis or is still resident.
    run(patterned, residency, Pattern.full(patterned.spec))
    assert store.stats.loads["cache"] + store.stats.loads["device"] > 0


def test_sharded_and_fused_checkpoints(tmp_path: Path) -> None:
    reference, ckpt = checkpoint(tmp_path, "qwen3_moe", max_shard_size="20KB")
    assert (ckpt / "model.safetensors.index.json").exists()
    result = shard(ckpt, tmp_path / "store-sharded", progress=False)
    assert result.manifest.source["layout"] == "per_expert"

    fused = tmp_path / "fused-ckpt"  # runtime (fused) expert keys, as some exporters write them
    fused.mkdir()
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, fused / "model.safetensors")
    (fused / "config.json").write_text((ckpt / "config.json").read_text())
    fused_result = shard(fused, tmp_path / "store-fused", progress=False)
    assert fused_result.manifest.source["layout"] == "fused"
    assert fused_result.manifest.layers[0].checksums == result.manifest.layers[0].checksums

    for store_dir in ("store-sharded", "store-fused"):
        patterned, residency = load_model(Store(tmp_path / store_dir))
        with torch.no_grad():
            expected = reference(IDS).logits
        assert (run(patterned, residency, Pattern.full(patterned.spec)) - expected).abs().max().item() <= ATOL


def test_shard_rerun_is_a_noop_and_another_checkpoint_is_refused(tmp_path: Path) -> None:
    _, ckpt = checkpoint(tmp_path, "olmoe")
    first = shard(ckpt, tmp_path / "store", progress=False)
    mtime = (tmp_path / "store" / "manifest.json").stat().st_mtime_ns
    again = shard(ckpt, tmp_path / "store", progress=False)
    assert first.created and not again.created
    assert (tmp_path / "store" / "manifest.json").stat().st_mtime_ns == mtime
    # The fingerprint names the model, not where it was read from: a copy elsewhere gets the same one.
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(ckpt, copy)
    assert shard(copy, tmp_path / "store-copy", progress=False).manifest.fingerprint == first.manifest.fingerprint
    other = tmp_path / "other"
    tiny_model("olmoe", seed=4).save_pretrained(other)
    with pytest.raises(AlreadyExists, match="another checkpoint"):
        shard(other, tmp_path / "store", progress=False)


def test_corrupted_redis_value_is_detected_and_repaired(tmp_path: Path, redis_server) -> None:
    redis_server.flush()  # same model, same fingerprint as in other tests: start from an empty cache
    _, ckpt = checkpoint(tmp_path, "mixtral")
    shard(ckpt, tmp_path / "store", progress=False)
    store = Store(tmp_path / "store", RedisCache(redis_server.url))
    good, tier = store.read_blob(1, 3)
    assert tier == "disk"
    client = redis.Redis.from_url(redis_server.url)
    key = store.cache_key(1, 3)
    assert client.get(key) == bytes(good)
    client.set(key, b"\x00" * len(good))  # same length, wrong bytes
    data, tier = store.read_blob(1, 3)
    assert tier == "disk" and bytes(data) == bytes(good) and store.stats.repairs == 1
    assert client.get(key) == bytes(good)
    assert store.read_blob(1, 3)[1] == "cache"

    # The same on the path that reads straight into slot memory (one cache round trip for many experts).
    client.set(key, b"\x00" * len(good))
    buffers = [memoryview(bytearray(len(good)))]
    assert store.read_many_into([(1, 3, buffers)]) == ["disk"]
    assert bytes(buffers[0]) == bytes(good) and store.stats.repairs == 2 and client.get(key) == bytes(good)
    assert store.read_many_into([(1, 3, buffers)]) == ["cache"]


def test_redis_outage_mid_run_falls_back_to_disk(tmp_path: Path, own_redis) -> None:
    _, ckpt = checkpoint(tmp_path, "qwen3_moe")
    shard(ckpt, tmp_path / "store", progress=False)
    cache = RedisCache(own_redis.url, timeout_s=0.5, retry_s=0.1)
    store = Store(tmp_path / "store", cache)
    patterned, residency = load_model(store, Budget(fraction=0.5))
    first = Pattern.build(patterned.spec, {layer: [0, 1, 2, 3] for layer in patterned.spec.moe_layers})
    second = Pattern.build(patterned.spec, {layer: [4, 5, 6, 7] for layer in patterned.spec.moe_layers})
    run(patterned, residency, first)
    assert store.health() == "ok"

    own_redis.stop()
    logits = run(patterned, residency, second)  # must not fail
    assert torch.isfinite(logits).all()
    assert store.health() == "degraded"
    assert store.stats.loads["disk"] == 2 * first.size

    own_redis.start()
    layer = patterned.spec.moe_layers[0]
    # A read tries Redis again once the cache's retry window (0.1 s) has passed; the first that gets through
    # finds it back (no fixed sleep that races the window).
    assert eventually(lambda: store.read_blob(layer, 0) is not None and store.health() == "ok")
    assert store.read_blob(layer, 0)[1] == "cache"  # the value that read put back into Redis
    run(patterned, residency, first)
    assert store.health() == "ok"


def test_corrupted_expert_on_disk_is_a_clear_error(tmp_path: Path) -> None:
    _, ckpt = checkpoint(tmp_path, "olmoe")
    result = shard(ckpt, tmp_path / "store", progress=False)
    layer_file = tmp_path / "store" / result.manifest.layers[1].file
    raw = bytearray(layer_file.read_bytes())
    raw[5 * result.manifest.expert_nbytes + 17] ^= 0xFF  # one bit flip inside expert 5
    layer_file.write_bytes(bytes(raw))
    store = Store(tmp_path / "store", MemoryCache())
    with pytest.raises(DataCorruption, match="expert 5 of layer 1") as info:
        store.read(1, 5)
    assert info.value.field == "layer 1 expert 5"
    store.read(1, 4)  # neighbours are fine

    # Through the engine (reads straight into slot memory): the same error, and the expert never counts as resident.
    patterned, residency = load_model(Store(tmp_path / "store", MemoryCache()))
    with pytest.raises(DataCorruption, match="expert 5 of layer 1"), residency.lease(Pattern.full(patterned.spec)):
        pass
    assert 5 not in patterned.slots[1].resident()


def test_switch_moves_exactly_the_bytes_of_differing_experts(tmp_path: Path) -> None:
    _, ckpt = checkpoint(tmp_path, "qwen2_moe")
    shard(ckpt, tmp_path / "store", progress=False)
    store = Store(tmp_path / "store", MemoryCache())
    patterned, residency = load_model(store, Budget(fraction=5 / 8))
    layers = patterned.spec.moe_layers
    a = Pattern.build(patterned.spec, {layer: [0, 1, 2, 3, 4] for layer in layers})
    b = Pattern.build(patterned.spec, {layer: [2, 3, 4, 5, 6] for layer in layers})
    nbytes = store.manifest.expert_nbytes
    with residency.lease(a) as lease_a:
        pass
    assert lease_a.loaded == {"cache": 0, "disk": 5 * len(layers), "device": 0}
    with residency.lease(b) as lease_b:
        pass
    assert lease_b.loaded_bytes["disk"] + lease_b.loaded_bytes["cache"] == 2 * len(layers) * nbytes
    assert lease_b.loaded["device"] == 3 * len(layers) and lease_b.evicted == 2 * len(layers)
    with residency.lease(a) as lease_back:
        pass
    assert lease_back.loaded == {"cache": 2 * len(layers), "disk": 0, "device": 3 * len(layers)}


def test_leases_pin_experts_against_eviction(tmp_path: Path) -> None:
    _, ckpt = checkpoint(tmp_path, "mixtral")
    shard(ckpt, tmp_path / "store", progress=False)
    store = Store(tmp_path / "store", MemoryCache())
    patterned, residency = load_model(store, Budget(fraction=0.5), wait_timeout_s=0.2)  # 4 slots per layer
    layers = patterned.spec.moe_layers
    a = Pattern.build(patterned.spec, {layer: [0, 1, 2, 3] for layer in layers})
    b = Pattern.build(patterned.spec, {layer: [4, 5] for layer in layers})
    with residency.lease(a):
        with pytest.raises(ResourceExhausted, match="pinned"), residency.lease(b):
            pass
        assert all(patterned.slots[layer].resident() == {0, 1, 2, 3} for layer in layers)

    # A waiting lease proceeds as soon as the pinning lease ends.
    done = threading.Event()
    holder = residency.lease(a)
    holder.__enter__()

    errors: list[BaseException] = []

    def waiter() -> None:
        try:
            with residency.lease(b, timeout_s=10):
                done.set()
        except BaseException as exc:  # a thread's exception is otherwise lost
            errors.append(exc)

    waits = residency.stats.waits
    thread = threading.Thread(target=waiter)
    thread.start()
    assert eventually(lambda: residency.stats.waits > waits)  # the waiter found the slots pinned and waits
    assert not done.is_set()
    holder.__exit__(None, None, None)
    thread.join(10)
    assert not errors and done.is_set(), errors

    too_big = Pattern.full(patterned.spec)
    with pytest.raises(ResourceExhausted, match="slots per layer"), residency.lease(too_big):
        pass


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_exported_checkpoint_loads_with_transformers_and_matches(family: str, tmp_path: Path) -> None:
    reference, ckpt = checkpoint(tmp_path, family)
    shard(ckpt, tmp_path / "store", progress=False)
    store = Store(tmp_path / "store")
    patterned, residency = load_model(store)
    pattern = Pattern.build(patterned.spec, random_pattern(reference, patterned.spec.num_experts // 2, seed=2))
    export_pruned(store, pattern, tmp_path / "pruned", progress=False)
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", local_files_only=True)
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert getattr(pruned.config, adapter_for(pruned.config).expert_count_field) == patterned.spec.num_experts // 2
    assert config["model_type"] == reference.config.model_type
    with torch.no_grad():
        expected = pruned(IDS).logits
    assert (run(patterned, residency, pattern) - expected).abs().max().item() <= ATOL


def test_export_refuses_uneven_patterns(tmp_path: Path) -> None:
    _, ckpt = checkpoint(tmp_path, "olmoe")
    shard(ckpt, tmp_path / "store", progress=False)
    store = Store(tmp_path / "store")
    spec = adapter_for(tiny_model("olmoe").config).spec(tiny_model("olmoe").config)
    uneven = Pattern.build(spec, {0: [0, 1, 2], 1: [0, 1, 2, 3]})
    with pytest.raises(PatternError, match="different expert counts"):
        export_pruned(store, uneven, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_a_streamed_tensor_unlike_its_declaration_is_data_corruption_and_writes_nothing(tmp_path: Path) -> None:
    specs = [("a", torch.float32, (2, 3)), ("b", torch.float32, (4,))]
    tensors = [torch.zeros(2, 3), torch.zeros(5)]  # b is not what the header says
    with pytest.raises(DataCorruption, match="declared") as info:
        write_safetensors_streaming(tmp_path / "out.safetensors", specs, iter(tensors), metadata={})
    assert info.value.field == "b"
    assert list(tmp_path.iterdir()) == []  # no file, no temp file left behind


def test_memory_cache_stays_within_its_bound() -> None:
    cache = MemoryCache(max_bytes=100)
    for i in range(10):
        cache.put(f"k{i}", bytes(30))
    assert cache.size_bytes <= 100
    assert cache.get("k9") is not None and cache.get("k0") is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.5", Budget(fraction=0.5)),
        ("25%", Budget(fraction=0.25)),
        ("512MiB", Budget(bytes=512 << 20)),
        ("2000000B", Budget(bytes=2_000_000)),
        ("2e9B", Budget(bytes=2_000_000_000)),
        ("1", Budget(fraction=1.0)),
    ],
)
def test_budget_parsing(text: str, expected: Budget) -> None:
    assert Budget.parse(text) == expected


@pytest.mark.parametrize("text", ["2000000", "8", "half", "-1GiB"])
def test_a_budget_without_a_unit_or_meaning_is_refused(text: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        Budget.parse(text)
    assert info.value.field == "budget"
