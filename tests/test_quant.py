"""Quantized experts: the packed format, the store's copies through the tiers, patterns with precisions, the
selection under a byte budget, export of a mixed pattern, and `premoe eval --precisions`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from premoe_service.cli import main as cli
from premoe_service.errors import AlreadyExists, DataCorruption, InvalidArgument, PatternError
from premoe_service.families import adapter_for
from premoe_service.families.tiny import save_tiny_checkpoint, tiny_config
from premoe_service.pattern import Pattern
from premoe_service.profiler.precision_plan import PrecisionOption, select_precisions, store_options
from premoe_service.runtime.build import load_model
from premoe_service.runtime.quantized import attach_precisions
from premoe_service.store import RedisCache, Store, shard
from premoe_service.store.export import export_pruned
from premoe_service.store.quant import dequantize, quantize
from premoe_service.store.quantized_copies import PrecisionReader, add_precisions

from .test_exactness import ATOL, logits, padded_batch

SPEC = adapter_for(tiny_config("qwen3_moe")).spec(tiny_config("qwen3_moe"))  # 8 experts, top-2


@pytest.fixture(scope="module")
def quant_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("quant")
    save_tiny_checkpoint(root / "ckpt", "qwen3_moe")
    shard(root / "ckpt", root / "store", progress=False)
    add_precisions(root / "store", ("int8", "int4", "int2"), 8, progress=False)
    return root


def test_group_quantization_error_falls_with_bits_and_groups_must_divide() -> None:
    weight = torch.randn(24, 64, generator=torch.Generator().manual_seed(0))
    errors = {}
    for bits in (2, 3, 4, 8):
        back = dequantize(quantize(weight, bits, 32), bits, 32, (24, 64), torch.float32)
        errors[bits] = float((back - weight).norm() / weight.norm())
    assert errors[8] < 0.01 < errors[4] < errors[3] < errors[2] < 0.5
    assert errors[4] < 0.15
    with pytest.raises(InvalidArgument) as caught:
        quantize(weight, 4, 48)
    assert caught.value.field == "group_size"


def test_quantized_copies_go_through_redis_under_keys_naming_the_precision(quant_store: Path, redis_server) -> None:
    redis_server.flush()
    store = Store(quant_store / "store", RedisCache(redis_server.url))
    reader = PrecisionReader(store, "int4")
    first, tier = reader.read_blob(1, 3)
    assert tier == "disk" and len(first) == reader.copy.expert_nbytes
    key = f"premoe:{store.fingerprint}:1:3:int4"
    assert store.cache.client.get(key) == first  # type: ignore[union-attr]
    assert reader.read_blob(1, 3) == (first, "cache")
    store.cache.client.set(key, b"x" + first[1:])  # type: ignore[union-attr]
    assert reader.read_blob(1, 3) == (first, "disk") and store.stats.repairs == 1
    assert store.cache.client.get(key) == first  # type: ignore[union-attr]
    # The int4 copy stays the store's int4 copy: a second group size for it is refused, missing ones are added.
    with pytest.raises(AlreadyExists):
        add_precisions(quant_store / "store", ("int4",), 16, progress=False)
    with pytest.raises(InvalidArgument) as caught:
        PrecisionReader(store, "int3")
    assert "premoe shard" in str(caught.value)


def test_a_damaged_quantized_file_is_data_corruption(quant_store: Path, tmp_path: Path) -> None:
    import shutil

    shutil.copytree(quant_store / "store", tmp_path / "store")
    store = Store(tmp_path / "store")
    reader = PrecisionReader(store, "int2")
    path = tmp_path / "store" / reader.copy.files[1]
    data = bytearray(path.read_bytes())
    data[reader.copy.expert_nbytes * 2 + 5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DataCorruption):
        reader.read_blob(1, 2)
    assert reader.read_blob(1, 1)[1] == "disk"


def test_pattern_precisions_round_trip_and_are_checked() -> None:
    layers = {layer: [0, 1, 2] for layer in SPEC.moe_layers}
    lowered = {SPEC.moe_layers[0]: {1: "int4", 2: "full"}}
    pattern = Pattern.build(SPEC, layers, lowered)
    assert pattern.precision(SPEC.moe_layers[0], 1) == "int4" and pattern.precision(SPEC.moe_layers[0], 2) == "full"
    data = pattern.to_json()
    assert data["precisions"] == {str(SPEC.moe_layers[0]): {"1": "int4"}}
    assert Pattern.from_json(SPEC, json.loads(json.dumps(data))) == pattern
    assert "precisions" not in Pattern.build(SPEC, layers).to_json()
    with pytest.raises(PatternError, match="unknown precision"):
        Pattern.build(SPEC, layers, {SPEC.moe_layers[0]: {1: "int5"}})
    with pytest.raises(PatternError, match="not kept") as caught:
        Pattern.build(SPEC, layers, {SPEC.moe_layers[1]: {7: "int4"}})
    assert caught.value.field == f"layer {SPEC.moe_layers[1]}"
    with pytest.raises(InvalidArgument):
        Pattern.from_json(SPEC, {**data, "precisions": {"x": {}}})


def test_selection_fits_the_budget_and_spends_bytes_where_scores_are() -> None:
    layers = len(SPEC.moe_layers)
    scores = torch.tensor([[8.0, 4, 2, 1, 0.5, 0.25, 0.1, 0.05]] * layers)
    error = {p: torch.full((layers, 8), e) for p, e in (("int2", 0.4), ("int4", 0.1), ("int8", 0.01))}
    options = {
        "full": PrecisionOption("full", 1000),
        "int8": PrecisionOption("int8", 530, error["int8"]),
        "int4": PrecisionOption("int4", 290, error["int4"]),
        "int2": PrecisionOption("int2", 160, error["int2"]),
    }
    previous = -1.0
    for budget in (2 * 160 * layers, 1500 * layers, 3000 * layers, 8000 * layers):
        plan = select_precisions(scores, SPEC, options, budget)
        assert plan.nbytes <= budget
        value = 0.0
        for layer in SPEC.moe_layers:
            kept = plan.pattern.kept(layer)
            assert len(kept) >= SPEC.top_k
            bits = [options[plan.pattern.precision(layer, e)].nbytes for e in range(8) if e in kept]
            assert bits == sorted(bits, reverse=True)  # better-scored experts never hold fewer bytes
            for e in kept:
                option = options[plan.pattern.precision(layer, e)]
                value += float(scores[0, e]) * (1 - (0 if option.error is None else float(option.error[0, e]) ** 2))
        assert value > previous
        previous = value
    assert plan.counts == {"int2": 0, "int4": 0, "int8": 0, "full": 8 * layers}  # everything fits at full
    with pytest.raises(InvalidArgument) as caught:
        select_precisions(scores, SPEC, options, 100)
    assert caught.value.field == "budget"


def test_export_of_a_mixed_pattern_holds_the_dequantized_weights(quant_store: Path, tmp_path: Path) -> None:
    store = Store(quant_store / "store")
    kept = {layer: [0, 2, 5, 7] for layer in SPEC.moe_layers}
    lowered = {layer: {0: "int2", 5: "int4", 7: "int8"} for layer in SPEC.moe_layers}
    pattern = Pattern.build(SPEC, kept, lowered)
    patterned, _ = load_model(store, capacity=4)  # the full-precision comparison below needs 4 full slots
    attach_precisions(patterned, store, dict.fromkeys(("int8", "int4", "int2"), 1))
    patterned.apply(pattern, store)
    export_pruned(store, pattern, tmp_path / "pruned", progress=False)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", dtype=torch.float32).eval()
    ids, mask = padded_batch()
    assert (logits(exported, ids, mask) - logits(patterned.model, ids, mask)).abs().max().item() <= ATOL
    full = Pattern.build(SPEC, kept)
    patterned.apply(full, store)
    assert (logits(exported, ids, mask) - logits(patterned.model, ids, mask)).abs().max().item() > 1e-4


def test_eval_compares_drop_uniform_and_mixed_at_the_same_bytes(quant_store: Path, tmp_path: Path) -> None:
    from premoe_service.profiler import Demo, profile_store

    store = Store(quant_store / "store")
    texts = ["the quick brown fox jumps", "lorem ipsum dolor sit amet", "print(sum(range(10)))", "a b c d e f"]
    (tmp_path / "tasks" / "text").mkdir(parents=True)
    (tmp_path / "tasks" / "text" / "eval.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    profile, _ = profile_store(store, "text", [Demo(t) for t in texts[:2]])
    profile.save(tmp_path / "text.safetensors")
    args = ["eval", "--store", str(store.dir), "--profiles", str(tmp_path), "--data", str(tmp_path / "tasks")]
    args += ["--budgets", "0.5,30%", "--precisions", "int8,int4,int2", "--out", str(tmp_path / "out"), "--quiet"]
    assert cli(args) == 0
    report = json.loads((tmp_path / "out" / "precision.json").read_text())
    assert set(report["retention"]["text"]) == {"drop", "uniform", "mixed-error", "mixed-mc"}
    assert report["uniform"] == {"0.5": "int4", "0.3": "int2"}  # groups of 8: int8 ~60%, int4 ~41%, int2 ~27%
    for method, shares in report["share"]["text"].items():
        for budget, share in shares.items():
            assert share <= float(budget) + 1e-9, (method, budget, share)
    options = store_options(store)
    assert math.isclose(
        report["share"]["text"]["uniform"]["0.5"], options["int4"].nbytes / (store.manifest.expert_nbytes / 2)
    )
    table = (tmp_path / "out" / "precision.md").read_text()
    assert "| text | perplexity | drop |" in table and "worst task" in table
    assert (tmp_path / "out" / "precision.png").read_bytes()[:4] == b"\x89PNG"


def test_mixed_patterns_are_refused_where_they_cannot_run(quant_store: Path) -> None:
    from premoe_service.errors import FailedPrecondition

    store = Store(quant_store / "store")
    pattern = Pattern.build(SPEC, {layer: [0, 1, 2] for layer in SPEC.moe_layers}, {SPEC.moe_layers[0]: {1: "int4"}})
    patterned, residency = load_model(store, capacity=4)
    with pytest.raises(FailedPrecondition) as caught:  # no quantized slots
        patterned.apply(pattern, store)
    assert caught.value.field == "precision"
    with pytest.raises(InvalidArgument) as caught:
        attach_precisions(patterned, store, {"int4": 99})
    assert caught.value.field == "capacity.int4"
    # A serving lease of a mixed pattern needs quantized slots too: refused without, held (and pinned) with them.
    with pytest.raises(FailedPrecondition, match="precision-slots") as caught, residency.lease(pattern):
        pass
    assert caught.value.field == "precision"
    quantized = attach_precisions(patterned, store, {"int4": 2})
    with residency.lease(pattern):
        assert residency.is_resident(pattern)
        assert quantized.books["int4"].pins.sum() == 1 and patterned.book.pins.sum() == pattern.size - 1
    assert quantized.books["int4"].pins.sum() == 0 and patterned.book.pins.sum() == 0


def test_precision_errors_measured_on_demos_match_a_direct_computation(quant_store: Path) -> None:
    from premoe_service.profiler import Demo
    from premoe_service.profiler.demo_error import demo_errors
    from premoe_service.profiler.run import tokenize_demos

    store = Store(quant_store / "store")
    demos = [Demo("the quick brown fox jumps over"), Demo("print(sum(range(10)))")]
    options = store_options(store)
    measured = demo_errors(store, demos, options)
    assert measured["full"].error is None

    # Independently: transformers' model on the checkpoint, the tokens each expert gets, SwiGLU by hand.
    model = AutoModelForCausalLM.from_pretrained(quant_store / "ckpt", dtype=torch.float32).eval()
    adapter = adapter_for(model.config)
    layer = SPEC.moe_layers[0]
    seen: dict[str, torch.Tensor] = {}
    hook = adapter.experts(model, layer).register_forward_pre_hook(
        lambda _m, args: seen.update(hidden=args[0].detach(), index=args[1].detach())
    )
    from premoe_service.families.tiny import tiny_tokenizer

    ids, mask, _ = tokenize_demos(tiny_tokenizer(), demos, 512)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    hook.remove()

    def swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        gate, up = (x @ gate_up.T).chunk(2, dim=-1)
        return (torch.nn.functional.silu(gate) * up) @ down.T

    valid = mask.reshape(-1).bool()
    reached = 0
    for expert in range(8):
        rows = (seen["index"] == expert).any(-1) & valid
        weight_error = float(options["int2"].error[0, expert])  # type: ignore[index]
        if not rows.any():
            assert float(measured["int2"].error[0, expert]) == weight_error  # type: ignore[index]
            continue
        reached += 1
        x = seen["hidden"][rows]
        full = store.read(layer, expert)
        exact = swiglu(x, full["gate_up_proj"], full["down_proj"])
        for precision in ("int8", "int4", "int2"):
            lowered = PrecisionReader(store, precision).read_dequantized(layer, expert)
            expected = float((swiglu(x, lowered["gate_up_proj"], lowered["down_proj"]) - exact).norm() / exact.norm())
            got = float(measured[precision].error[0, expert])  # type: ignore[index]
            assert math.isclose(got, expected, rel_tol=1e-4), (expert, precision, got, expected)
        assert float(measured["int8"].error[0, expert]) < float(measured["int2"].error[0, expert])  # type: ignore[index]
    assert reached >= 2


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize(
    ("shape", "packed_dim"), [((384, 192), 1), ((7, 5), 1), ((1, 1), 1), ((8, 3), 0), ((5, 9), 0), ((33, 2), 0)]
)
def test_unpacking_gives_compressed_tensors_integers(bits: int, shape: tuple[int, int], packed_dim: int) -> None:
    """The byte-view unpacking of 8-, 4- and 2-bit weights (and the general one of 3-bit weights) against
    compressed-tensors' own packing and unpacking."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    from premoe_service.store.quant import _unpack

    low, high = -(1 << (bits - 1)), 1 << (bits - 1)
    values = torch.randint(low, high, shape, dtype=torch.int8, generator=torch.Generator().manual_seed(sum(shape)))
    packed = pack_to_int32(values, bits, packed_dim=packed_dim)
    ours = _unpack(packed, bits, shape, packed_dim)
    assert ours.dtype == torch.int8 and torch.equal(ours, values)
    if packed_dim == 1:
        theirs = unpack_from_int32(packed, bits, torch.Size(shape), packed_dim=1)
    else:  # their 4-bit byte path refuses a transposed view: unpack the transpose (plain strides) along its rows
        words = packed.t().clone(memory_format=torch.contiguous_format)
        theirs = unpack_from_int32(words, bits, torch.Size(shape[::-1]), packed_dim=1).t()
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("shape", [(384, 192), (4, 64), (2, 128)])
def test_a_stack_of_slots_dequantizes_to_each_slots_own_weights(bits: int, shape: tuple[int, int]) -> None:
    """The banks dequantize every slot a pass hits in one call over their stacked tensors: each slot of the stack
    must come out bit for bit as it does alone (and as the plain `(q - zero) * scale`), narrow zero points (one
    packed word per column) included."""
    from premoe_service.store.quant import QuantizedWeight, _unpack

    generator = torch.Generator().manual_seed(bits * 1000 + shape[0])
    weights = [quantize(torch.randn(shape, generator=generator, dtype=torch.float64), bits, 64) for _ in range(3)]
    stacked = QuantizedWeight(*(torch.stack([getattr(w, f) for w in weights]) for f in ("packed", "scale", "zero")))
    together = dequantize(stacked, bits, 64, shape, torch.float64)
    assert together.shape == (3, *shape)
    out, groups = shape[0], shape[1] // 64
    for i, w in enumerate(weights):
        alone = dequantize(w, bits, 64, shape, torch.float64)
        assert torch.equal(together[i], alone)
        q = _unpack(w.packed, bits, shape, packed_dim=1).to(torch.float32).view(out, groups, 64)
        zero = _unpack(w.zero, bits, (out, groups), packed_dim=0).to(torch.float32).unsqueeze(-1)
        plain = ((q - zero) * w.scale.to(torch.float32).unsqueeze(-1)).view(shape).to(torch.float64)
        assert torch.equal(alone, plain)
