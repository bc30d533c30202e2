"""The bf16 copy of a store's experts: each tensor cast (half an fp32 store's bytes, no scales), read through the
disk and Redis tiers under a key naming it, chosen by the precision selection, refused where it would repeat."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from premoe_service.errors import InvalidArgument
from premoe_service.families import adapter_for
from premoe_service.families.tiny import save_tiny_checkpoint, tiny_config, tiny_model, tiny_tokenizer
from premoe_service.pattern import FULL
from premoe_service.profiler.precision_plan import select_precisions, store_options
from premoe_service.runtime.build import load_model
from premoe_service.runtime.quantized import attach_precisions
from premoe_service.store import RedisCache, Store, shard
from premoe_service.store.quantized_copies import PrecisionReader, add_precisions

SPEC = adapter_for(tiny_config("qwen3_moe")).spec(tiny_config("qwen3_moe"))  # 8 experts, top-2


@pytest.fixture(scope="module")
def bf16_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bf16")
    save_tiny_checkpoint(root / "ckpt", "qwen3_moe")
    shard(root / "ckpt", root / "store", progress=False)
    add_precisions(root / "store", ("bf16", "int4"), 8, progress=False)
    return root / "store"


def test_bf16_copy_holds_each_tensor_cast_at_half_the_bytes(bf16_store: Path) -> None:
    store = Store(bf16_store)
    assert store.manifest.dtype == "float32"
    reader = PrecisionReader(store, "bf16")
    copy = reader.copy
    assert copy.expert_nbytes * 2 == store.manifest.expert_nbytes
    assert {(p.tensor, p.dtype) for p in copy.layout} == {("raw", "bfloat16")}  # no scales, no zero points
    assert copy.group_size == 0 and not copy.transposed
    worst = 0.0
    for layer in store.manifest.moe_layers:
        for expert in (0, 5):
            full, held = store.read(layer, expert), reader.read(layer, expert)
            assert set(held) == set(full)
            for name, tensor in full.items():
                assert torch.equal(held[name]["raw"], tensor.to(torch.bfloat16))
            back = reader.read_dequantized(layer, expert)
            assert all(back[n].dtype == torch.float32 for n in back)
            num = sum(float((back[n].double() - full[n].double()).norm() ** 2) for n in full)
            den = sum(float(full[n].double().norm() ** 2) for n in full)
            error = (num / den) ** 0.5
            assert copy.errors[layer][expert] == pytest.approx(error, rel=1e-3, abs=1e-6)
            worst = max(worst, error)
    assert 0 < worst < 0.01  # bf16 keeps 8 bits of mantissa: a relative error of about 2**-9


def test_bf16_copy_goes_through_redis_under_a_key_naming_it(bf16_store: Path, redis_server) -> None:
    redis_server.flush()
    store = Store(bf16_store, RedisCache(redis_server.url))
    reader = PrecisionReader(store, "bf16")
    first, tier = reader.read_blob(2, 6)
    assert tier == "disk" and len(first) == reader.copy.expert_nbytes
    assert store.cache.client.get(f"premoe:{store.fingerprint}:2:6:bf16") == first  # type: ignore[union-attr]
    assert reader.read_blob(2, 6) == (first, "cache")


def test_selection_and_slots_use_bf16(bf16_store: Path) -> None:
    store = Store(bf16_store)
    options = store_options(store, precisions=(FULL, "bf16", "int4"))
    assert options["bf16"].nbytes * 2 == options[FULL].nbytes
    scores = torch.rand(len(SPEC.moe_layers), SPEC.num_experts, generator=torch.Generator().manual_seed(1)) + 0.1
    # Half the store's expert bytes: every expert fits at bf16, which loses far less than int4.
    plan = select_precisions(scores, SPEC, options, store.manifest.total_expert_bytes // 2)
    assert plan.counts["bf16"] == plan.pattern.size == SPEC.num_experts * len(SPEC.moe_layers)
    patterned, _ = load_model(store, capacity=SPEC.top_k)
    attach_precisions(patterned, store, {"bf16": SPEC.num_experts})
    patterned.apply(plan.pattern, store)
    bank = patterned.quantized.banks[SPEC.moe_layers[0]]["bf16"]
    assert bank.nbytes == SPEC.num_experts * options["bf16"].nbytes  # resident: the bf16 tensors themselves


def test_a_bf16_copy_of_a_bf16_store_is_refused(tmp_path: Path, bf16_store: Path) -> None:
    tiny_model("qwen3_moe", dtype=torch.bfloat16).save_pretrained(tmp_path / "ckpt")
    tiny_tokenizer().save_pretrained(tmp_path / "ckpt")
    shard(tmp_path / "ckpt", tmp_path / "store", progress=False)
    with pytest.raises(InvalidArgument, match="bfloat16 already") as caught:
        add_precisions(tmp_path / "store", ("bf16",), 8, progress=False)
    assert caught.value.field == "precisions"
    # A bf16 copy has no groups: asking again with another group size adds nothing and refuses nothing.
    shutil.copytree(bf16_store, tmp_path / "fp32")
    before = (tmp_path / "fp32" / "manifest.json").read_text()
    add_precisions(tmp_path / "fp32", ("bf16",), 16, progress=False)
    assert (tmp_path / "fp32" / "manifest.json").read_text() == before
