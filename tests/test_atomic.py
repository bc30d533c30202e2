"""Atomic experts (issue 29): channel scores against a direct computation, the profile file with and without
them, channel-level plans under a byte budget, and the channel-pruned checkpoint against our computation.

- Channel scores (`energy`, `camera`, `heapr`) equal their formulas evaluated token by token on transformers'
  own tensors (hooks on the unmodified model, experts written from each family's formula), in every family.
- A profile made before channel scores loads (no channels) and refuses channel plans with a clear error.
- `select_channels` stays within its bytes, keeps more experts than whole-expert plans at a tight budget, and
  holds each expert's best channels; `channel_nbytes` equals the bytes of the packed tensors themselves.
- `premoe export` with a channel plan writes a checkpoint of reduced intermediate size that transformers loads,
  whose logits equal the engine computing the plan (`evaluation.channel_eval.install_plan`), float64, every family.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from premoe_service.errors import FailedPrecondition, InvalidArgument
from premoe_service.evaluation.channel_eval import PlanWeights, install_plan
from premoe_service.families import adapter_for
from premoe_service.families.channels import intermediate_field
from premoe_service.families.tiny import TINY_CONFIGS, tiny_model, tiny_tokenizer
from premoe_service.pattern import FULL, Pattern
from premoe_service.profiler import Demo, Profile, collect_scores, tokenize_demos
from premoe_service.profiler.channel_plan import (
    ChannelPlan,
    ExpertShape,
    channel_nbytes,
    channel_options,
    layer_shares,
    select_channels,
)
from premoe_service.profiler.channels import CHANNEL_CRITERIA, kept_share
from premoe_service.profiler.demo_error import channel_kept
from premoe_service.profiler.precision_plan import PrecisionOption, select_precisions
from premoe_service.runtime.build import load_model
from premoe_service.runtime.model import PatternedModel
from premoe_service.store import Store, shard
from premoe_service.store.export import export_pruned
from premoe_service.store.quant import packed_shapes, quantize
from premoe_service.store.quantized_copies import add_precisions

from .references import moe_blocks, random_pattern, router_of

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

DEMOS = [Demo("def add(a, b):\n    return a + b\n"), Demo("12+34="), Demo("The quick brown fox.")]
ROOT = Path(__file__).resolve().parents[1]


# --- channel scores -------------------------------------------------------------------------------------------------


def intermediate(model_type: str, experts, e: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One expert's intermediate activations h [I] on x [H] and its down directions [H, I], from the family
    formulas (not from the profiler)."""
    if model_type == "gpt_oss":
        z = x @ experts.gate_up_proj[e] + experts.gate_up_proj_bias[e]
        gate, up = z[..., ::2].clamp(max=experts.limit), z[..., 1::2].clamp(-experts.limit, experts.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * experts.alpha)), experts.down_proj[e].t()
    gate, up = F.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
    return experts.act_fn(gate) * up, experts.down_proj[e]


def direct_channel_scores(model, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, np.ndarray]:
    seen: dict[int, dict[str, torch.Tensor]] = {}
    handles = []
    for layer, block in moe_blocks(model).items():
        rec: dict[str, torch.Tensor] = {}
        seen[layer] = rec
        norm = model.model.layers[layer].post_attention_layernorm
        handles.append(norm.register_forward_pre_hook(lambda _m, a, rec=rec: rec.__setitem__("residual", a[0])))
        handles.append(
            router_of(block).register_forward_hook(
                lambda _m, a, out, rec=rec: rec.update(weights=out[1], chosen=out[2])
            )
        )
        handles.append(block.experts.register_forward_hook(lambda _m, a, _o, rec=rec: rec.__setitem__("x", a[0])))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for handle in handles:
        handle.remove()
    keep = mask.reshape(-1).bool().numpy()
    out: dict[str, list[np.ndarray]] = {name: [] for name in CHANNEL_CRITERIA}
    model_type = model.config.model_type
    with torch.no_grad():
        for layer, block in moe_blocks(model).items():
            rec = seen[layer]
            x = rec["x"].reshape(-1, rec["x"].shape[-1]).double()
            chosen, weights = rec["chosen"], rec["weights"].double()
            residual = rec["residual"].reshape(-1, x.shape[-1]).double()
            experts = block.experts
            num_experts, width = experts.gate_up_proj.shape[0], experts.down_proj.shape[-1]
            if model_type == "gpt_oss":
                width = experts.down_proj.shape[1]
            sums = {name: np.zeros((num_experts, width)) for name in CHANNEL_CRITERIA}
            for t in np.nonzero(keep)[0]:
                acts = [
                    intermediate(model_type, experts, int(e), x[t].to(experts.gate_up_proj.dtype)) for e in chosen[t]
                ]
                after = residual[t] + sum(
                    float(weights[t, j]) * (h.double() @ d.double().t()) for j, (h, d) in enumerate(acts)
                )
                if model_type == "gpt_oss":
                    after = after + sum(
                        float(weights[t, j]) * experts.down_proj_bias[int(e)].double() for j, e in enumerate(chosen[t])
                    )
                for j, (h, d) in enumerate(acts):
                    e, g = int(chosen[t, j]), float(weights[t, j])
                    h, d = h.double().numpy(), d.double().numpy()
                    a = after.numpy()
                    for c in range(width):
                        v = g * h[c] * d[:, c]  # channel c's share of the layer output
                        sums["energy"][e, c] += h[c] ** 2
                        sums["camera"][e, c] += v @ v
                        size = a @ a
                        sums["heapr"][e, c] += len(a) * (v @ v - (a @ v) ** 2 / size) / size
            for name in CHANNEL_CRITERIA:
                out[name].append(sums[name])
    return {name: np.stack(rows) for name, rows in out.items()}


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_channel_scores_equal_their_formulas_on_transformers(family: str) -> None:
    model = tiny_model(family).eval()
    ids, mask, _ = tokenize_demos(tiny_tokenizer(), DEMOS, 256)
    expected = direct_channel_scores(model, ids, mask)
    clone = type(model)(model.config)
    clone.load_state_dict(model.state_dict())
    patterned, source = PatternedModel.from_model(clone.eval())
    run = collect_scores(patterned, source, ids, mask, streamed=False)
    assert set(run.channel_scores) == set(CHANNEL_CRITERIA)
    for name, matrix in expected.items():
        assert matrix.sum() > 0
        np.testing.assert_allclose(run.channel_scores[name].numpy(), matrix, rtol=2e-4, atol=1e-6, err_msg=name)
    plain = collect_scores(patterned, source, ids, mask, streamed=False, channels=False)
    assert plain.channel_scores == {}
    for name in run.scores:  # the expert criteria do not move when channels are gathered
        assert torch.equal(plain.scores[name], run.scores[name]), name


def test_a_profile_without_channel_scores_loads_and_refuses_channel_plans(tmp_path: Path) -> None:
    old = Profile.load(ROOT / "tests" / "data" / "profile-before-channels.safetensors")
    assert old.channels == {} and old.scores
    with pytest.raises(FailedPrecondition, match="no channel scores") as info:
        old.channel_score("heapr")
    assert info.value.field == "channel_criterion"
    with pytest.raises(InvalidArgument, match="unknown channel criterion"):
        old.channel_score("nope")
    layers, experts = len(old.moe_layers), next(iter(old.scores.values())).shape[1]
    channels = {name: torch.rand(layers, experts, 8) for name in CHANNEL_CRITERIA}
    new = Profile(
        name=old.name, fingerprint=old.fingerprint, moe_layers=old.moe_layers, scores=old.scores, channels=channels
    )
    new.save(tmp_path / "new.safetensors")
    back = Profile.load(tmp_path / "new.safetensors")
    assert set(back.channels) == set(CHANNEL_CRITERIA)
    assert all(torch.equal(back.channels[n], channels[n]) for n in CHANNEL_CRITERIA)
    with pytest.raises(InvalidArgument, match="not \\["):
        Profile(name="x", fingerprint="f", moe_layers=(0,), scores={}, channels={"heapr": torch.zeros(2, 3)})


# --- channel plans ---------------------------------------------------------------------------------------------------


def spec_of(family: str):
    model = tiny_model(family)
    return adapter_for(model.config).spec(model.config)


def test_channel_bytes_are_the_packed_tensors_bytes() -> None:
    shape = ExpertShape(hidden=64, intermediate=48, biased=False, itemsize=4)
    for bits, name in ((4, "int4"), (2, "int2"), (8, "int8")):
        for k in (1, 5, 12, 48):
            rows = quantize(torch.randn(3 * k, 64), bits, 32)  # gate, up and down rows of k channels at once
            gate_up = quantize(torch.randn(2 * k, 64), bits, 32)
            down = quantize(torch.randn(k, 64), bits, 32)
            measured = sum(t.numel() * t.element_size() for q in (gate_up, down) for t in (q.packed, q.scale, q.zero))
            assert channel_nbytes(shape, name, k, 32, full_nbytes=0) == measured
            assert measured <= sum(t.numel() * t.element_size() for t in (rows.packed, rows.scale, rows.zero)) + 8
            expected = sum(math.prod(s) for s in packed_shapes(2 * k, 64, bits, 32).values())
            assert expected > 0
    assert channel_nbytes(shape, FULL, 12, 32, full_nbytes=4800) == 1200


def test_channel_plans_fit_the_budget_and_keep_more_experts_when_tight() -> None:
    spec = spec_of("qwen3_moe")  # 3 layers x 8 experts, top-2
    layers, experts, width = len(spec.moe_layers), spec.num_experts, 16
    shape = ExpertShape(hidden=32, intermediate=width, biased=False, itemsize=4)
    generator = torch.Generator().manual_seed(3)
    scores = torch.rand(layers, experts, generator=generator) + 0.1
    channel_scores = torch.rand(layers, experts, width, generator=generator) ** 8  # a few channels carry most
    unit = 3 * width * 32 * 2
    error = torch.full((layers, experts), 0.3, dtype=torch.float64)
    base = {FULL: PrecisionOption(FULL, unit), "int4": PrecisionOption("int4", unit // 3, error)}
    options = channel_options(base, channel_scores, shape, [2, 4, 8], 32)
    total = unit * layers * experts
    with pytest.raises(InvalidArgument, match="below 2 experts per layer"):
        select_precisions(scores, spec, base, int(0.05 * total))  # whole experts cannot go this low
    for share in (0.05, 0.1, 0.25, 0.6):
        budget = int(share * total)
        plan = select_channels(scores, channel_scores, spec, options, budget)
        assert plan.nbytes <= budget
        assert plan.nbytes == sum(options[k].nbytes * n for k, n in plan.counts.items())
        for i, layer in enumerate(spec.moe_layers):
            assert len(plan.pattern.kept(layer)) >= spec.top_k
            for e, ids in plan.channels.get(layer, {}).items():
                best = channel_scores[i, e].argsort(descending=True)[: ids.numel()].sort().values
                assert torch.equal(ids, best)  # the expert's best channels
    tight = select_channels(scores, channel_scores, spec, options, int(0.1 * total))
    assert tight.pattern.size > select_precisions(scores, spec, base, int(0.1 * total)).pattern.size
    roomy = select_channels(scores, channel_scores, spec, options, total)
    assert roomy.channels == {} and roomy.pattern.size == layers * experts  # everything fits whole
    share = kept_share(channel_scores, [2, 16])
    assert torch.allclose(share[..., 1], torch.ones_like(share[..., 1]).double())


def test_channel_plans_weigh_each_layer_by_its_share_of_the_channel_scores() -> None:
    """The expert scores are normalised per layer; a channel plan weighs each layer by its share of the channel
    scores' total (what its experts move the model by, in one unit across layers), so a layer whose channels
    carry more gets more of the bytes, and every layer alike when the totals are equal."""
    spec = spec_of("qwen3_moe")  # 3 layers x 8 experts, top-2
    layers, experts, width = len(spec.moe_layers), spec.num_experts, 16
    shape = ExpertShape(hidden=32, intermediate=width, biased=False, itemsize=4)
    generator = torch.Generator().manual_seed(5)
    scores = torch.rand(layers, experts, generator=generator) + 0.1
    flat = torch.rand(layers, experts, width, generator=generator) ** 4
    flat = flat / flat.sum(dim=(1, 2), keepdim=True)  # every layer's channel scores sum to 1
    unit = 3 * width * 32 * 2
    error = torch.full((layers, experts), 0.3, dtype=torch.float64)
    base = {FULL: PrecisionOption(FULL, unit), "int4": PrecisionOption("int4", unit // 3, error)}
    budget = int(0.3 * unit * layers * experts)

    def first_layer_bytes(plan: ChannelPlan) -> int:
        layer = spec.moe_layers[0]
        total = 0
        for expert in plan.pattern.kept(layer):
            precision = plan.pattern.precisions.get(layer, {}).get(expert, FULL)
            total += channel_nbytes(shape, precision, plan.channel_count(layer, expert, width), 32, unit)
        return total

    assert torch.allclose(layer_shares(flat), torch.full((layers,), 1 / layers, dtype=torch.float64))
    options = channel_options(base, flat, shape, [2, 4, 8], 32)
    alike = select_channels(scores, flat, spec, options, budget)
    assert alike.pattern == select_channels(scores, flat, spec, options, budget, weigh_layers=False).pattern
    heavy = flat.clone()
    heavy[0] *= 20  # the first layer's channels move the model 20 times as much
    assert layer_shares(heavy)[0] > 0.9
    options = channel_options(base, heavy, shape, [2, 4, 8], 32)  # the same kept shares: ranks and shapes hold
    weighed = select_channels(scores, heavy, spec, options, budget)
    unweighed = select_channels(scores, heavy, spec, options, budget, weigh_layers=False)
    assert unweighed.pattern == alike.pattern  # without weights the totals do not matter
    assert weighed.nbytes <= budget
    assert first_layer_bytes(weighed) > first_layer_bytes(unweighed)
    assert layer_shares(torch.zeros(layers, experts, width)) is None


def test_a_channel_plan_file_round_trips_and_bad_channels_name_the_field() -> None:
    spec = spec_of("olmoe")
    pattern = Pattern.build(spec, {0: [0, 1, 2], 1: [3, 4]})
    plan = ChannelPlan(pattern, {0: {1: torch.tensor([0, 5, 7])}}, 0, {})
    back = ChannelPlan.from_json(spec, 16, plan.to_json())
    assert back.pattern == pattern and torch.equal(back.channels[0][1], torch.tensor([0, 5, 7]))
    for bad, field in (
        ({"0": {"1": [7, 5]}}, "channels.0.1"),
        ({"0": {"1": [16]}}, "channels.0.1"),
        ({"0": {"5": [1]}}, "channels.0.5"),
        ({"9": {"1": [1]}}, "channels.9"),
    ):
        data = plan.to_json() | {"channels": bad}
        with pytest.raises(InvalidArgument) as info:
            ChannelPlan.from_json(spec, 16, data)
        assert info.value.field == field


# --- the channel-pruned checkpoint -----------------------------------------------------------------------------------


def random_channel_plan(reference, spec, width: int, seed: int, precisions: dict[int, dict[int, str]] | None = None):
    """Half the experts of every layer, each kept expert at a random channel count (some whole)."""
    kept = random_pattern(reference, spec.num_experts // 2, seed=seed)
    pattern = Pattern.build(spec, kept, precisions)
    generator = torch.Generator().manual_seed(seed)
    channels: dict[int, dict[int, torch.Tensor]] = {}
    for layer, ids in kept.items():
        for i, e in enumerate(ids):
            if i % 3 == 2:
                continue  # whole
            count = int(torch.randint(1, width, (1,), generator=generator))
            chosen = torch.randperm(width, generator=generator)[:count].sort().values
            channels.setdefault(layer, {})[e] = chosen
    return ChannelPlan(pattern, channels, 0, {})


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_channel_pruned_checkpoint_equals_the_engine_in_float64(family: str, tmp_path: Path) -> None:
    reference = tiny_model(family, dtype=torch.float64)
    reference.set_experts_implementation("eager")  # the CPU grouped path rejects float64
    reference.save_pretrained(tmp_path / "ckpt")
    tiny_tokenizer().save_pretrained(tmp_path / "ckpt")
    shard(tmp_path / "ckpt", tmp_path / "store", progress=False)
    store = Store(tmp_path / "store")
    precisions = None
    spec = adapter_for(reference.config).spec(reference.config)
    if family in ("qwen3_moe", "gpt_oss", "deepseek_v3"):  # quantized channel slices too
        add_precisions(tmp_path / "store", ("int4", "int8"), 16, progress=False)
        store = Store(tmp_path / "store")
        precisions = {
            layer: {e: ("int4", "int8")[e % 2] for e in range(0, spec.num_experts, 3)} for layer in spec.moe_layers
        }
    width = int(getattr(reference.config, intermediate_field(reference.config.model_type)))
    patterned, _ = load_model(store, device="cpu")
    patterned.model.set_experts_implementation("eager")
    draft = random_channel_plan(reference, spec, width, seed=4)
    if precisions:  # keep only the lowered experts the pattern keeps
        lowered = {
            layer: {e: p for e, p in by_expert.items() if e in draft.pattern.kept(layer)}
            for layer, by_expert in precisions.items()
        }
        draft = ChannelPlan(Pattern.build(spec, draft.pattern.layers, lowered), draft.channels, 0, {})
    export_pruned(store, draft.pattern, tmp_path / "pruned", progress=False, channels=draft.channels)
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", dtype=torch.float64).eval()
    pruned.set_experts_implementation("eager")
    widest = max(ids.numel() for by in draft.channels.values() for ids in by.values())
    assert getattr(pruned.config, intermediate_field(reference.config.model_type)) >= widest
    assert getattr(pruned.config, adapter_for(pruned.config).expert_count_field) == spec.num_experts // 2
    patterned.apply(Pattern.full(spec), store)
    patterned.activate(install_plan(patterned, PlanWeights(store), draft))
    ids = torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = patterned.model(ids).logits
        theirs = pruned(ids).logits
        whole = reference(ids).logits
    bound = 1e-6 if family.startswith("deepseek") else 1e-9  # DeepSeek routes in float32 inside a float64 model
    assert (ours - theirs).abs().max().item() <= bound
    assert (ours - whole).abs().max().item() > 1e-4  # the plan changes the model: the comparison can tell


def test_measured_channel_share_equals_a_direct_computation(tmp_path: Path) -> None:
    model = tiny_model("qwen3_moe").eval()
    model.save_pretrained(tmp_path / "ckpt")
    tiny_tokenizer().save_pretrained(tmp_path / "ckpt")
    shard(tmp_path / "ckpt", tmp_path / "store", progress=False)
    store = Store(tmp_path / "store")
    ids, mask, _ = tokenize_demos(tiny_tokenizer(), DEMOS, 256)
    scores = torch.rand(3, 8, 16, generator=torch.Generator().manual_seed(2))
    counts = [2, 5, 11]
    kept = channel_kept(store, DEMOS, {"heapr": scores}, counts)["heapr"]
    seen: dict[int, dict[str, torch.Tensor]] = {}
    handles = []
    for layer, block in moe_blocks(model).items():
        rec: dict[str, torch.Tensor] = {}
        seen[layer] = rec
        handles.append(router_of(block).register_forward_hook(lambda _m, a, o, rec=rec: rec.update(chosen=o[2])))
        handles.append(block.experts.register_forward_hook(lambda _m, a, _o, rec=rec: rec.__setitem__("x", a[0])))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for handle in handles:
        handle.remove()
    valid = mask.reshape(-1).bool()
    checked = 0
    for i, (layer, block) in enumerate(moe_blocks(model).items()):
        x, chosen = seen[layer]["x"].reshape(-1, 32), seen[layer]["chosen"]
        for e in range(8):
            rows = ((chosen == e).any(-1) & valid).nonzero().flatten()
            if rows.numel() == 0:
                continue
            with torch.no_grad():
                h, d = intermediate("qwen3_moe", block.experts, e, x[rows])
            h, d = h.double(), d.detach().double()
            order = scores[i, e].argsort(descending=True)
            for j, k in enumerate(counts):
                rest = order[k:]
                expected = 1 - float(((h[:, rest] @ d[:, rest].t()) ** 2).sum() / ((h @ d.t()) ** 2).sum())
                assert kept[i, e, j].item() == pytest.approx(max(expected, 0.0), abs=1e-6)
                checked += 1
    assert checked > 20


def test_pattern_and_export_verbs_write_a_channel_pruned_checkpoint(tmp_path: Path, capsys) -> None:
    from premoe_service.cli import main
    from premoe_service.profiler import profile_store

    model = tiny_model("olmoe").eval()
    model.save_pretrained(tmp_path / "ckpt")
    tiny_tokenizer().save_pretrained(tmp_path / "ckpt")
    shard(tmp_path / "ckpt", tmp_path / "store", progress=False)
    add_precisions(tmp_path / "store", ("int4",), 16, progress=False)
    profile, _ = profile_store(Store(tmp_path / "store"), "code", DEMOS, channels=True)
    profile.save(tmp_path / "code.safetensors")
    store, plan_file = str(tmp_path / "store"), str(tmp_path / "plan.json")
    args = ["pattern", str(tmp_path / "code.safetensors"), "--store", store, "--out", plan_file, "--budget", "0.1"]
    assert main([*args, "--precisions", "int4", "--channels", "camera"]) == 0
    assert "holding part of their channels" in capsys.readouterr().out
    assert main([*args, "--channels", "camera"]) == 2
    assert "--precisions" in capsys.readouterr().err
    assert main(["export", "--store", store, "--pattern", plan_file, "--out", str(tmp_path / "pruned"), "--quiet"]) == 0
    assert "cut to their kept channels" in capsys.readouterr().out
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    written = json.loads(Path(plan_file).read_text())
    counts = [len(ids) for by_expert in written["channels"].values() for ids in by_expert.values()]
    assert counts and min(counts) < model.config.intermediate_size
    whole = any(
        str(e) not in written["channels"].get(layer, {}) for layer, kept in written["layers"].items() for e in kept
    )
    assert pruned.config.intermediate_size == (model.config.intermediate_size if whole else max(counts))


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_a_quantized_channel_slice_is_channel_major(family: str, tmp_path: Path) -> None:
    """Gate and up rows come from the store's copy as they are; the down projection is quantized per channel
    (each kept column a row of the hidden size, groups along it), unlike the copy's (groups along the channels)."""
    from premoe_service.store.channels import ChannelReader
    from premoe_service.store.quant import dequantize
    from premoe_service.store.quantized_copies import PrecisionReader

    tiny_model(family).save_pretrained(tmp_path / "ckpt")
    shard(tmp_path / "ckpt", tmp_path / "store", progress=False)
    add_precisions(tmp_path / "store", ("int4",), 16, progress=False)
    store = Store(tmp_path / "store")
    kept = torch.tensor([1, 4, 9, 15])
    cut = ChannelReader(store).channels(0, 3, "int4", kept)
    copy = PrecisionReader(store, "int4").read_dequantized(0, 3)
    full = store.read(0, 3)
    transposed = family == "gpt_oss"
    gate_up, down = copy["gate_up_proj"], full["down_proj"]
    if transposed:  # [H, 2I], gate and up interleaved; down [I, H]
        assert torch.equal(cut["gate_up_proj"], gate_up[:, torch.stack([2 * kept, 2 * kept + 1], 1).reshape(-1)])
        rows = down
    else:  # [2I, H], gate rows then up rows; down [H, I]
        assert torch.equal(cut["gate_up_proj"], gate_up[torch.cat([kept, kept + 16])])
        rows = down.t()
    # every channel's row quantized on its own (groups along H), then the kept ones
    expected = dequantize(quantize(rows.contiguous(), 4, 16), 4, 16, (16, rows.shape[1]), rows.dtype)[kept]
    got = cut["down_proj"] if transposed else cut["down_proj"].t()
    assert torch.equal(got, expected)
    store_down = copy["down_proj"][kept] if transposed else copy["down_proj"][:, kept].t()
    assert not torch.equal(got, store_down)  # the copy's grouping differs: the re-quantization is real


def test_premoe_eval_channels_writes_the_comparison_within_its_budgets(tmp_path: Path, capsys) -> None:
    from premoe_service.cli import main
    from premoe_service.profiler import profile_store

    tiny_model("qwen3_moe").save_pretrained(tmp_path / "ckpt")
    tiny_tokenizer().save_pretrained(tmp_path / "ckpt")
    shard(tmp_path / "ckpt", tmp_path / "store", progress=False)
    add_precisions(tmp_path / "store", ("int4", "int2"), 16, progress=False)
    store = Store(tmp_path / "store")
    texts = ["the cat sat on the mat", "def f(x): return x", "1 2 3 4 5", "hello world again"]
    (tmp_path / "tasks" / "text").mkdir(parents=True)
    (tmp_path / "tasks" / "text" / "eval.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (tmp_path / "profiles").mkdir()
    profile, _ = profile_store(store, "text", [Demo(t) for t in texts[:2]], channels=True)
    profile.save(tmp_path / "profiles" / "text.safetensors")
    args = [
        "eval",
        "--store",
        str(store.dir),
        "--profiles",
        str(tmp_path / "profiles"),
        "--data",
        str(tmp_path / "tasks"),
    ]
    args += ["--budgets", "0.2,0.04", "--out", str(tmp_path / "out"), "--quiet"]
    assert main([*args, "--channels", "heapr"]) == 2  # --channels needs --precisions
    assert "--precisions" in capsys.readouterr().err
    assert main([*args, "--precisions", "int4,int2", "--channels", "heapr,energy"]) == 0
    report = json.loads((tmp_path / "out" / "channels.json").read_text())
    assert set(report["retention"]["text"]) == {"mixed-error", "channels-heapr", "channels-energy"}
    for method, shares in report["share"]["text"].items():
        for budget, share in shares.items():
            assert math.isnan(share) or share <= float(budget) + 1e-9, (method, budget, share)
    assert math.isnan(report["share"]["text"]["mixed-error"]["0.04"])  # two whole int2 experts a layer do not fit
    assert report["channel_share"]["text"]["channels-heapr"]["0.04"] < 1  # channels do
    assert 0 < report["retention"]["text"]["channels-heapr"]["0.04"] <= 1.5
    assert "worst task" in (tmp_path / "out" / "channels.md").read_text()
    assert (tmp_path / "out" / "channels.png").read_bytes()[:4] == b"\x89PNG"
