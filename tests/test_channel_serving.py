"""Channel plans served in slots (issue 29): a pattern whose kept experts hold some of their channels runs on the
serving path (residency, loader, channel banks of reduced width, the experts wrapper), batched with rows of other
patterns, and each row's logits equal transformers' on its own checkpoint, float64, every family:

- a channel row: the checkpoint `premoe export` writes for that plan (experts cut to their kept channels);
- a second channel row holding the same experts with other channels (two variants of an expert in one bank);
- an expert-level row (half the experts, whole) and a row with every expert: transformers' own model, masked.

Also: eviction and reloading of variants through leases gives the same logits again; channel banks hold
`width / I` of an expert's bytes; pattern files carry channels and refuse bad ones naming the field; what the
slots cannot hold is refused with the reason.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from premoe_service.cli import main
from premoe_service.engine import EngineLoop, Request, SamplingParams
from premoe_service.engine.schedule import BatchLimits
from premoe_service.errors import (
    DataCorruption,
    FailedPrecondition,
    InvalidArgument,
    PatternError,
    ResourceExhausted,
)
from premoe_service.families import MoESpec, adapter_for
from premoe_service.families.channels import intermediate_field
from premoe_service.families.tiny import TINY_CONFIGS, save_tiny_checkpoint, tiny_model, tiny_tokenizer
from premoe_service.pattern import Pattern
from premoe_service.profiler.channel_plan import ChannelPlan, ExpertShape, channel_nbytes
from premoe_service.runtime.build import load_model
from premoe_service.runtime.channel_banks import parse_key
from premoe_service.runtime.channel_slots import attach_channels
from premoe_service.runtime.quantized import attach_precisions
from premoe_service.store import Store, open_cache, shard
from premoe_service.store.channel_major import add_channel_major
from premoe_service.store.channel_major_reader import ChannelMajorReader, runs
from premoe_service.store.export import export_pruned
from premoe_service.store.quantized_copies import PrecisionReader, add_precisions

from .references import masked_transformers, random_pattern
from .test_batching import forced_logits
from .test_expert_skip import THRESHOLD as SKIP
from .test_expert_skip import reference_logits, run_together

FAMILIES = sorted(TINY_CONFIGS)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def bound(family: str) -> float:
    return 1e-6 if family.startswith("deepseek") else 1e-9  # DeepSeek routes in float32 inside a float64 model


def build(root: Path, family: str):
    """A float64 tiny checkpoint of `family` (transformers' eager experts), its store, and the serving engine (a
    full-precision slot for every expert)."""
    reference = tiny_model(family, dtype=torch.float64)
    reference.set_experts_implementation("eager")  # the CPU grouped path rejects float64
    reference.generation_config.eos_token_id = None
    reference.save_pretrained(root / "ckpt")
    tiny_tokenizer().save_pretrained(root / "ckpt")
    shard(root / "ckpt", root / "store", progress=False)
    store = Store(root / "store", open_cache(None))
    patterned, residency = load_model(store, device="cpu")  # the serving engine's own experts path, float64 too
    width = int(getattr(reference.config, intermediate_field(reference.config.model_type)))
    return reference, store, patterned, residency, width


def channel_pattern(
    spec: MoESpec, kept: dict[int, list[int]], width: int, seed: int, lowered: tuple[str, ...] = ()
) -> Pattern:
    """`kept` experts, two of every three cut to a random number of random channels (the third whole); with
    `lowered`, the experts take the precisions full, then each of `lowered`, in turn (cut and whole ones alike)."""
    generator = torch.Generator().manual_seed(seed)
    channels: dict[int, dict[int, list[int]]] = {}
    precisions: dict[int, dict[int, str]] = {}
    turn = 0
    for layer, ids in kept.items():
        for i, e in enumerate(ids):
            if lowered:
                precisions.setdefault(layer, {})[e] = ("full", *lowered)[turn % (1 + len(lowered))]
                turn += 1
            if i % 3 == 2:
                continue
            count = int(torch.randint(1, width, (1,), generator=generator))
            channels.setdefault(layer, {})[e] = (
                torch.randperm(width, generator=generator)[:count].sort().values.tolist()
            )
    return Pattern.build(spec, kept, precisions, channels)


def exported(store: Store, pattern: Pattern, out: Path):
    """Transformers on the checkpoint `premoe export` writes for the channel plan (float64, eager experts)."""
    channels = {layer: {e: torch.tensor(ids) for e, ids in by.items()} for layer, by in pattern.channels.items()}
    whole = Pattern.build(store_spec(store), pattern.layers, pattern.precisions)
    export_pruned(store, whole, out, progress=False, channels=channels)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64).eval()
    model.set_experts_implementation("eager")
    return model


def store_spec(store: Store) -> MoESpec:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(store.dir, local_files_only=True)
    return adapter_for(config).spec(config)


LOWER = ("int4", "int2")
GROUP = 16  # divides the tiny models' hidden size (32)


def banks(width: int, slots: int) -> dict[str, int]:
    """Full-precision channel banks of a quarter, half and all but one of the intermediate size; int4 banks of
    half and all but one; an int2 bank of all but one."""
    full = {f"full@{w}": slots for w in sorted({max(1, width // 4), width // 2, width - 1})}
    return full | {f"int4@{width // 2}": slots, f"int4@{width - 1}": slots, f"int2@{width - 1}": slots}


@pytest.mark.parametrize("family", FAMILIES)
def test_channel_rows_batched_with_other_tasks_equal_their_exported_checkpoints(family: str, tmp_path: Path) -> None:
    reference, store, patterned, residency, width = build(tmp_path, family)
    add_precisions(tmp_path / "store", LOWER, GROUP, progress=False)
    store = Store(tmp_path / "store", open_cache(None))
    spec = patterned.spec
    kept = random_pattern(reference, spec.num_experts // 2, seed=4)
    patterns = {
        "channels": channel_pattern(spec, kept, width, seed=4, lowered=LOWER),  # cut and whole, full and lowered
        "other-channels": channel_pattern(spec, kept, width, seed=8),  # the same experts, other channels
        "drop-only": Pattern.build(spec, random_pattern(reference, spec.num_experts // 2, seed=9)),
        "all": Pattern.full(spec),
    }
    first, second = patterns["channels"], patterns["other-channels"]
    assert any(
        first.channel_ids(layer, e) != second.channel_ids(layer, e)
        and first.channel_ids(layer, e) is not None
        and second.channel_ids(layer, e) is not None
        for layer in spec.moe_layers
        for e in kept[layer]
    )
    lowered = patterns["channels"]
    assert {lowered.precision(layer, e) for layer, by in lowered.channels.items() for e in by} == {"full", *LOWER}
    whole_lowered = [
        (layer, e)
        for layer in spec.moe_layers
        for e in kept[layer]
        if lowered.precision(layer, e) != "full" and lowered.channel_ids(layer, e) is None
    ]
    assert whole_lowered  # experts held whole below full precision, in the quantized banks
    attach_precisions(patterned, store, dict.fromkeys(LOWER, spec.num_experts // 2))
    attach_channels(patterned, store, banks(width, spec.num_experts))
    loop = EngineLoop(patterned, residency, store, eos=set(), pad_id=0, limits=BatchLimits(max_join_wait_steps=0))
    prompts = {
        "channels": [5, 9, 17, 3, 44],
        "other-channels": [7, 7, 21, 90, 11, 4, 60],
        "drop-only": [12, 30, 8],
        "all": [40, 2, 33, 19],
    }
    # That row also skips low-weight experts while decoding. Not in GPT-OSS: the reference, transformers' eager
    # GPT-OSS experts (float64 needs eager), cannot take a skipped pair's id.
    skip = dict.fromkeys(patterns, 0.0) | {"other-channels": 0.0 if family == "gpt_oss" else SKIP}
    requests = {
        name: Request(
            prompts[name], patterns[name], SamplingParams(6, skip_below=skip[name]), tiny_tokenizer(), stream=False
        )
        for name in patterns
    }
    observer = run_together(loop, list(requests.values()))
    assert max(observer.decode_rows) == 4  # the four tasks decoded in one batch

    tol = bound(family)
    skipped: list[int] = []
    for name, request in requests.items():
        if name in ("channels", "other-channels"):
            model = exported(store, patterns[name], tmp_path / name)
            expected = reference_logits(model, request.prompt_ids, request.generated, skip[name], skipped)
        elif name == "drop-only":
            with masked_transformers(reference, patterns[name].layers):
                expected = forced_logits(reference, request.prompt_ids, request.generated)
        else:
            expected = forced_logits(reference, request.prompt_ids, request.generated)
        actual = torch.stack(observer.logits[request.id])
        assert actual.shape == expected.shape, name
        assert (actual - expected).abs().max().item() <= tol, name
    if family != "gpt_oss":  # skipping happened, through the channel slots' ids
        assert requests["other-channels"].experts_skipped > 0 and sum(skipped) > 0
    # The channels matter, or the comparison proves nothing: the same experts held whole differ.
    channel_request = requests["channels"]
    with masked_transformers(reference, kept):
        whole = forced_logits(reference, channel_request.prompt_ids, channel_request.generated)
    assert (torch.stack(observer.logits[channel_request.id]) - whole).abs().max().item() > 1e-4

    # A channel slot holds `width` channels: a full one `width / I` of an expert's weights (GPT-OSS: plus biases),
    # a quantized one the packed bytes a plan counts for `width` channels (`channel_nbytes`, scales included).
    item = patterned.experts_module(spec.moe_layers[0]).down_proj.element_size()
    shape = ExpertShape.of(store.manifest)
    expected_bytes = 0
    assert patterned.channels is not None and patterned.quantized is not None
    for key in banks(width, spec.num_experts):
        precision, w = key.split("@")
        if precision == "full":
            per_slot = shape.params(int(w)) * item
        else:
            per_slot = channel_nbytes(shape, precision, int(w), GROUP, full_nbytes=0)
        assert patterned.channels.slot_nbytes(parse_key(key)) == per_slot, key
        expected_bytes += len(spec.moe_layers) * spec.num_experts * per_slot
    assert patterned.channels.nbytes == expected_bytes
    full_bytes = sum(
        p.numel() * p.element_size()
        for layer in spec.moe_layers
        for p in patterned.experts_module(layer).parameters(recurse=False)
    )
    assert patterned.expert_bytes_resident() == full_bytes + patterned.quantized.nbytes + expected_bytes


def test_variants_evicted_and_reloaded_through_leases_compute_the_same(tmp_path: Path) -> None:
    """Banks with room for one pattern's channel experts: leasing the other evicts them (the same experts, other
    channels, in the same slots), and each lease computes its own exported checkpoint."""
    reference, store, patterned, residency, width = build(tmp_path, "qwen3_moe")
    spec = patterned.spec
    kept = random_pattern(reference, spec.num_experts // 2, seed=4)
    first = channel_pattern(spec, kept, width, seed=4)
    second = channel_pattern(spec, kept, width, seed=8)
    # One bank wide enough for every cut expert, with room for one pattern's cut experts per layer.
    most = max(len(first.channels.get(layer, {})) for layer in spec.moe_layers)
    most = max(most, *(len(second.channels.get(layer, {})) for layer in spec.moe_layers))
    attach_channels(patterned, store, {f"full@{width - 1}": most})
    models = {
        id(first): exported(store, first, tmp_path / "first"),
        id(second): exported(store, second, tmp_path / "second"),
    }
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(5))
    seen = []
    for pattern in (first, second, first):
        with residency.lease(pattern) as lease:
            residency.activate(pattern)
            with torch.no_grad():
                ours = patterned.model(ids).logits
                theirs = models[id(pattern)](ids).logits
            assert (ours - theirs).abs().max().item() <= 1e-9
            seen.append((lease.evicted, ours))
        described = residency.describe(pattern, store.manifest.expert_nbytes)
        assert described.share == 1.0 and described.precisions[f"full@{width - 1}"] == sum(
            len(by) for by in pattern.channels.values()
        )
    assert seen[1][0] > 0 and seen[2][0] > 0  # the second lease evicted the first's variants, and back
    assert (seen[0][1] - seen[1][1]).abs().max().item() > 1e-4  # the two channel sets compute differently
    assert torch.equal(seen[0][1], seen[2][1])


def test_a_pattern_file_carries_channels_and_refuses_bad_ones_naming_the_field() -> None:
    model = tiny_model("olmoe")
    spec = adapter_for(model.config).spec(model.config)
    layers = {layer: [0, 1, 2, 3] for layer in spec.moe_layers}
    pattern = Pattern.build(spec, layers, {0: {1: "int4"}}, {0: {1: [0, 5, 7]}, 1: {3: [2]}})
    data = json.loads(json.dumps(pattern.to_json()))
    assert data["channels"] == {"0": {"1": [0, 5, 7]}, "1": {"3": [2]}}
    back = Pattern.from_json(spec, data)
    assert back == pattern and back.sliced and back.channel_ids(0, 1) == (0, 5, 7) and back.channel_ids(0, 0) is None
    assert not Pattern.build(spec, layers).sliced
    # A channel plan's file is such a pattern file: a server reads the plan `premoe pattern --channels` wrote.
    plan = ChannelPlan(Pattern.build(spec, layers), {0: {1: torch.tensor([0, 5, 7])}}, 0, {})
    assert Pattern.from_json(spec, plan.to_json()) == plan.served()
    for bad, field in (
        ({"0": {"1": [7, 5]}}, "channels.0.1"),
        ({"0": {"1": [5, 5]}}, "channels.0.1"),
        ({"0": {"1": []}}, "channels.0.1"),
        ({"0": {"1": [-1, 2]}}, "channels.0.1"),
        ({"0": {"1": "0,1"}}, "channels.0.1"),
        ({"0": {"1": [True]}}, "channels.0.1"),
        ({"0": {"6": [1]}}, "channels.0.6"),
        ({"0": {"x": [1]}}, "channels.0.x"),
        ({"9": {"1": [1]}}, "channels.9"),
        ({"0": [1]}, "channels.0"),
        ([1], "channels"),
    ):
        with pytest.raises(InvalidArgument) as info:
            Pattern.from_json(spec, data | {"channels": bad})
        assert info.value.field == field, bad
    # The union of two patterns: an expert held whole by either is whole, else the union of the channels.
    other = Pattern.build(spec, layers, None, {0: {1: [2, 5]}, 1: {2: [4]}})
    union = pattern.union(other)
    assert union.channel_ids(0, 1) == (0, 2, 5, 7)
    assert union.channel_ids(1, 3) is None and union.channel_ids(1, 2) is None
    assert union.precision(0, 1) == "full" and pattern.precision(0, 1) == "int4"


def test_what_channel_slots_cannot_hold_is_refused_with_the_reason(tmp_path: Path) -> None:
    reference, store, patterned, residency, width = build(tmp_path, "mixtral")
    spec = patterned.spec
    kept = random_pattern(reference, spec.num_experts // 2, seed=4)
    layer, expert = spec.moe_layers[0], kept[spec.moe_layers[0]][0]

    def cut(ids: list[int], precision: str | None = None) -> Pattern:
        lowered = {layer: {expert: precision}} if precision else None
        return Pattern.build(spec, kept, lowered, {layer: {expert: ids}})

    with pytest.raises(FailedPrecondition, match="--channel-slots") as info:  # no channel slots at all
        residency.reserve(cut([1, 2]))
    assert info.value.field == "channels"
    with pytest.raises(FailedPrecondition, match="no channel slots"):
        patterned.apply(cut([1, 2]), store)
    for bad, error, field in (
        ({"int4@4": 2}, FailedPrecondition, "channel_slots"),  # quantized channel banks are not built
        ({"full@0": 2}, InvalidArgument, "channel_slots"),
        ({f"full@{width}": 2}, InvalidArgument, "channel_slots"),  # as wide as the expert: a full slot
        ({"full4": 2}, InvalidArgument, "channel_slots"),
        ({"full@4": -1}, InvalidArgument, "capacity.full@4"),
    ):
        with pytest.raises(error) as info:
            attach_channels(patterned, store, bad)
        assert info.value.field == field, bad
    assert patterned.channels is None
    attach_channels(patterned, store, {"full@4": 2}, variants=6)
    with pytest.raises(FailedPrecondition, match="of 5 channels") as info:  # wider than every bank
        residency.reserve(cut([0, 1, 2, 3, 4]))
    assert info.value.field == f"channels.{layer}.{expert}"
    with pytest.raises(FailedPrecondition, match="int4"):  # quantized channel slices are not served yet
        residency.reserve(cut([1, 2], "int4"))
    with pytest.raises(PatternError, match="out of range") as info:
        residency.reserve(cut([1, width]))
    assert info.value.field == f"channels.{layer}.{expert}"
    three = Pattern.build(spec, kept, None, {layer: {e: [0, 1] for e in kept[layer][:3]}})
    with pytest.raises(ResourceExhausted, match="2 full@4 channel slots") as info:  # two slots a layer
        residency.reserve(three)
    assert info.value.field == f"layer {layer}"
    for ids in ([0], [1], [2], [0]):  # with the three above, six variants name all of the bank's columns
        with residency.lease(cut(ids)):
            pass
    with pytest.raises(ResourceExhausted, match="--channel-variants") as info:
        residency.reserve(cut([3]))
    assert info.value.field == f"channels.{layer}.{expert}"


def test_a_server_with_channel_slots_serves_channel_plans_to_tasks_registered_with_precisions(
    tmp_path: Path, embedder, capsys: pytest.CaptureFixture[str]
) -> None:
    """`premoe serve --channel-slots`: a task registered with precisions gets a channel-level plan (its profile with
    channel scores) within its budget and the server's slots, and generates the tokens that plan computes (the
    plan's weights in a second engine's full slots, `premoe eval`'s way, checked against the exported checkpoint in
    tests/test_atomic.py)."""
    from premoe_service.client import PreMoeClient
    from premoe_service.evaluation.channel_eval import PlanWeights, install_plan
    from premoe_service.profiler import Profile
    from premoe_service.server import running_server
    from premoe_service.serving import ServiceConfig

    save_tiny_checkpoint(tmp_path / "ckpt", "qwen3_moe")
    shard(tmp_path / "ckpt", tmp_path / "store", progress=False)
    add_precisions(tmp_path / "store", ("int8",), 8, progress=False)
    with pytest.raises(InvalidArgument) as info:
        ServiceConfig(store=tmp_path / "store", channel_slots="full@4")
    assert info.value.field == "channel_slots"
    config = ServiceConfig(
        store=tmp_path / "store",
        profiles=tmp_path / "profiles",
        port=0,
        device="cpu",
        precision_slots="int8=8",
        channel_slots="full@2=6,full@4=6,int8@4=6",
    )
    demos = ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i)\n", "import os\n"]
    with running_server(config, embedder=embedder) as (handle, port), PreMoeClient(f"127.0.0.1:{port}") as client:
        info = client.register("code", demos, fraction=0.12, precisions=["int8"])
        profile = Profile.load(tmp_path / "profiles" / "code.safetensors")
        assert set(profile.channels) >= {"heapr"}  # profiled with channel scores
        pattern, nbytes = handle.core.tasks.plan(profile)
        assert pattern.sliced and nbytes <= 0.12 * Store(tmp_path / "store").manifest.total_expert_bytes
        for layer in pattern.layers:
            held = [f"{pattern.precision(layer, e)}@{len(ids)}" for e, ids in pattern.channels.get(layer, {}).items()]
            assert set(held) <= {"full@2", "full@4", "int8@4"} and all(held.count(b) <= 6 for b in held)
        banks_used = {
            f"{pattern.precision(layer, e)}@{len(ids)}"
            for layer, by in pattern.channels.items()
            for e, ids in by.items()
        }
        print(f"\nserved plan: {pattern.size} experts, banks {sorted(banks_used)}")
        assert info.pattern_experts == pattern.size
        shown = {layer.layer: dict(layer.channels) for layer in client.get_task("code").layers}
        held = {layer: {e: len(ids) for e, ids in by.items()} for layer, by in pattern.channels.items()}
        assert {layer: by for layer, by in shown.items() if by} == held and held  # GetTask names the cut experts
        assert main(["tasks", "code", "--server", f"127.0.0.1:{port}"]) == 0  # and `premoe tasks` shows them
        shown_lines = capsys.readouterr().out
        for layer, by in held.items():
            line = next(line for line in shown_lines.splitlines() if line.strip().startswith(f"layer {layer:>3}:"))
            for expert, count in by.items():
                lowered = pattern.precision(layer, expert)
                assert (f"{expert}:{lowered}@{count}" if lowered != "full" else f"{expert}@{count}") in line, line
        reply = client.generate("def add(a, b):", task="code", max_new_tokens=4)
        assert len(reply.token_ids) == 4 and reply.stats.pattern_experts == pattern.size
        tokens = list(reply.token_ids)
        prompt = handle.core.tokenizer("def add(a, b):")["input_ids"]
        # LoadTask pins the plan's variants; UnloadTask releases them at the bytes the plan counts.
        client.load_task("code", pin=True)
        released = client.unload_task("code")
        assert released.was_pinned and released.released_experts == pattern.size
        assert released.released_bytes == nbytes

    store = Store(tmp_path / "store")
    patterned, _ = load_model(store, device="cpu")
    patterned.apply(Pattern.full(patterned.spec), store)
    channels = {layer: {e: torch.tensor(ids) for e, ids in by.items()} for layer, by in pattern.channels.items()}
    whole = Pattern.build(patterned.spec, pattern.layers, pattern.precisions)
    patterned.activate(install_plan(patterned, PlanWeights(store), ChannelPlan(whole, channels, 0, {})))
    with torch.no_grad():
        out = patterned.model.generate(
            input_ids=torch.tensor([prompt]), max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0
        )
    assert out[0, len(prompt) :].tolist() == tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_channel_major_copies_fill_the_same_slots_reading_only_the_kept_channels(family: str, tmp_path: Path) -> None:
    """With the store's channel-major copies (`premoe shard --channel-major`), channel slots are filled from the
    kept channels' records (one read per run of consecutive ids, each record verified), byte for byte as from the
    expert blobs, and the engine computes the same logits; a corrupt record is refused naming the expert."""
    reference, _, patterned, residency, width = build(tmp_path, family)
    add_precisions(tmp_path / "store", LOWER, GROUP, progress=False)
    spec = patterned.spec
    kept = random_pattern(reference, spec.num_experts // 2, seed=4)
    pattern = channel_pattern(spec, kept, width, seed=4, lowered=LOWER)
    bank_sizes = {key: spec.num_experts for key in banks(width, spec.num_experts)}
    blobs = Store(tmp_path / "store")
    attach_precisions(patterned, blobs, dict.fromkeys(LOWER, spec.num_experts // 2))
    attach_channels(patterned, blobs, bank_sizes)
    assert patterned.channels is not None and patterned.channels.channel_major == {}
    add_channel_major(tmp_path / "store", ("full", *LOWER), progress=False)
    major_store = Store(tmp_path / "store")
    other, other_residency = load_model(major_store, device="cpu")
    attach_precisions(other, major_store, dict.fromkeys(LOWER, spec.num_experts // 2))
    attach_channels(other, major_store, bank_sizes)
    assert other.channels is not None and set(other.channels.channel_major) == {"full", *LOWER}
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(5))
    before = dict(major_store.stats.bytes)
    with residency.lease(pattern), other_residency.lease(pattern), torch.no_grad():
        residency.activate(pattern)
        ours = patterned.model(ids).logits
        other_residency.activate(pattern)
        theirs = other.model(ids).logits
    assert torch.equal(ours, theirs)
    for layer in spec.moe_layers:
        for key, bank in patterned.channels.banks[layer].items():
            mine = other.channels.banks[layer][key]
            assert bank.tensors.keys() == mine.tensors.keys()
            assert all(torch.equal(t, mine.tensors[name]) for name, t in bank.tensors.items()), (layer, key)
    # The bytes read: per expert held in part, its checksum row, its kept channels' records and the tail.
    expected = 0
    for layer, by in pattern.channels.items():
        for e, channel_ids in by.items():
            layout = other.channels.channel_major[pattern.precision(layer, e)].layout
            expected += (width + 1) * 8 + len(channel_ids) * layout.record_nbytes + layout.tail_nbytes
    disk = major_store.stats.bytes["disk"] - before.get("disk", 0)
    blob = {"full": major_store.manifest.expert_nbytes} | {
        p: PrecisionReader(major_store, p).copy.expert_nbytes for p in LOWER
    }
    whole = sum(
        blob[pattern.precision(layer, e)]
        for layer in spec.moe_layers
        for e in kept[layer]
        if pattern.channel_ids(layer, e) is None
    )
    assert disk == expected + whole  # whole experts are still read whole, at their precision
    assert list(runs([0, 1, 2, 5, 7, 8])) == [(0, 3), (5, 1), (7, 2)]

    # A flipped byte in one record: that channel is refused naming the expert; its neighbours still read.
    reader = ChannelMajorReader(major_store, "int4")
    layout, layer = reader.layout, spec.moe_layers[0]
    path = tmp_path / "store" / "channel-major" / "int4" / f"layer_{layer:03d}.bin"
    data = bytearray(path.read_bytes())
    data[1 * layout.expert_nbytes + 3 * layout.record_nbytes + 5] ^= 0xFF  # expert 1, channel 3
    path.write_bytes(bytes(data))
    reader.read(layer, 1, [0, 1, 2, 4])
    with pytest.raises(DataCorruption, match="channel 3 of expert 1") as info:
        reader.read(layer, 1, [2, 3])
    assert info.value.field == f"layer {layer} expert 1"
    reader.close()


@pytest.mark.parametrize("tier", ["memory", "redis"])
def test_channel_major_reads_go_through_the_cache_tier(
    tier: str, tmp_path: Path, redis_server, capsys: pytest.CaptureFixture[str]
) -> None:
    """With a cache (in-process or a real Redis), an expert's channel-major block is one cache value: the first read
    of an expert reads its whole block from disk and caches it, later reads of any of its channels come from the
    cache (Redis GETRANGEs of the kept runs), each record verified; a damaged cache value is repaired from disk.
    Every read returns the records the disk holds."""
    save_tiny_checkpoint(tmp_path / "ckpt", "qwen3_moe")
    shard(tmp_path / "ckpt", tmp_path / "store", progress=False)
    add_precisions(tmp_path / "store", ("int4",), GROUP, progress=False)
    args = ["shard", str(tmp_path / "ckpt"), "--out", str(tmp_path / "store"), "--channel-major", "full", "--quiet"]
    assert main(args) == 0 and "channel-major full: " in capsys.readouterr().out
    assert main(args) == 0 and "already up to date" in capsys.readouterr().out.splitlines()[-1]
    (tmp_path / "store" / "channel-major" / "full" / "layout.json").unlink()
    written = add_channel_major(tmp_path / "store", ("full", "int4"), progress=False)
    assert [(folder.name, fresh) for folder, fresh in written] == [("full", True), ("int4", True)]
    # A second run keeps up-to-date copies; one whose file is cut short (or whose layout.json, written last, is
    # missing: an interrupted run) is written again.
    assert [fresh for _, fresh in add_channel_major(tmp_path / "store", ("full", "int4"), progress=False)] == [0, 0]
    layer_file = written[1][0] / f"layer_{Store(tmp_path / 'store').manifest.moe_layers[0]:03d}.bin"
    whole = layer_file.read_bytes()
    layer_file.write_bytes(whole[:-7])
    (written[0][0] / "layout.json").unlink()
    assert [fresh for _, fresh in add_channel_major(tmp_path / "store", ("full", "int4"), progress=False)] == [1, 1]
    assert layer_file.read_bytes() == whole
    if tier == "redis":
        redis_server.flush()
    cache = open_cache(redis_server.url if tier == "redis" else None)
    cached, plain = Store(tmp_path / "store", cache=cache), Store(tmp_path / "store")
    layer = cached.manifest.moe_layers[-1]
    for precision in ("full", "int4"):
        reader, disk = ChannelMajorReader(cached, precision), ChannelMajorReader(plain, precision)
        layout, repairs = reader.layout, cached.stats.repairs
        for expert, ids, want_tier in ((2, [0, 1, 5], "disk"), (2, [3, 4, 5, 9], "cache"), (3, [7], "disk")):
            records, nbytes, got_tier = reader.read(layer, expert, ids)
            theirs, _, _ = disk.read(layer, expert, ids)
            assert got_tier == want_tier and records.keys() == theirs.keys()
            assert all(torch.equal(records[name], theirs[name]) for name in records)
            kept = len(ids) * layout.record_nbytes + layout.tail_nbytes
            assert nbytes == (layout.expert_nbytes if want_tier == "disk" else kept)
        assert cached.stats.repairs == repairs  # a miss is a miss, not a damaged value
        # A value damaged in the cache (one byte of channel 4's record): repaired from disk, then read again.
        key = reader.cache_key(layer, 2)
        value = bytearray(cache.get(key) or b"")
        value[4 * layout.record_nbytes + 1] ^= 0xFF
        cache.put(key, bytes(value))
        records, _, got_tier = reader.read(layer, 2, [4])
        assert got_tier == "disk" and cached.stats.repairs == repairs + 1
        assert all(torch.equal(records[n], disk.read(layer, 2, [4])[0][n]) for n in records)
        assert reader.read(layer, 2, [4])[2] == "cache"
        reader.close()
        disk.close()


def test_channel_tasks_take_turns_in_banks_that_hold_one_of_them(tmp_path: Path) -> None:
    """Through the engine loop, two channel plans cutting the same experts differently, in a bank with room for
    one plan's cut experts a layer: the second request waits, its variants then take the first's slots (evicted
    once unpinned, copied by the loader thread), and each request computes its own exported checkpoint."""
    reference, store, patterned, residency, width = build(tmp_path, "qwen3_moe")
    spec = patterned.spec
    kept = random_pattern(reference, spec.num_experts // 2, seed=4)
    first = channel_pattern(spec, kept, width, seed=4)
    second = channel_pattern(spec, kept, width, seed=8)
    most = max(len(p.channels.get(layer, {})) for p in (first, second) for layer in spec.moe_layers)
    attach_channels(patterned, store, {f"full@{width - 1}": most})
    loop = EngineLoop(patterned, residency, store, eos=set(), pad_id=0, limits=BatchLimits(max_join_wait_steps=0))
    requests = [
        Request([5, 9, 17, 3, 44], first, SamplingParams(5), tiny_tokenizer(), stream=False),
        Request([7, 21, 90, 11], second, SamplingParams(5), tiny_tokenizer(), stream=False),
    ]
    evictions = residency.stats.evictions
    observer = run_together(loop, requests)
    assert max(observer.decode_rows) == 1  # never in one batch: the bank holds one plan's cut experts
    assert residency.stats.evictions > evictions  # the second plan's variants took the first's slots
    for name, (request, pattern) in enumerate(zip(requests, (first, second), strict=True)):
        model = exported(store, pattern, tmp_path / f"plan-{name}")
        expected = forced_logits(model, request.prompt_ids, request.generated)
        actual = torch.stack(observer.logits[request.id])
        assert actual.shape == expected.shape
        assert (actual - expected).abs().max().item() <= 1e-9
