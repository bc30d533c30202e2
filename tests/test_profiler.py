"""The profiler's criteria against a direct computation on transformers, layer streaming, selection, demos."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from premoe_service.errors import DataCorruption, FailedPrecondition, InvalidArgument
from premoe_service.families import adapter_for
from premoe_service.families.tiny import TINY_CONFIGS, save_tiny_checkpoint, tiny_config, tiny_tokenizer
from premoe_service.pattern import Pattern
from premoe_service.profiler import (
    CRITERIA,
    Demo,
    Profile,
    Selection,
    collect_scores,
    load_demos,
    profile_store,
    select,
    tokenize_demos,
)
from premoe_service.runtime.model import PatternedModel
from premoe_service.store import Store, shard

from .references import moe_blocks, router_of

DEMOS = [
    Demo("def add(a, b):\n    return a + b\n"),
    Demo("12+34=", "46"),
    Demo("for i in range(10): print(i)"),
    Demo("The quick brown fox jumps over the lazy dog."),
]


def direct_scores(model, ids: torch.Tensor, mask: torch.Tensor, threshold: float = 0.0) -> dict[str, np.ndarray]:
    """The four criteria from a plain transformers forward, read with hooks and computed with numpy."""
    seen: dict[int, dict[str, torch.Tensor]] = {}
    handles = []
    for layer, block in moe_blocks(model).items():
        rec: dict[str, torch.Tensor] = {}
        seen[layer] = rec
        norm = model.model.layers[layer].post_attention_layernorm
        handles.append(norm.register_forward_pre_hook(lambda _m, a, rec=rec: rec.__setitem__("residual", a[0])))
        handles.append(
            router_of(block).register_forward_hook(
                lambda _m, a, out, rec=rec: rec.update(logits=out[0], weights=out[1], chosen=out[2])
            )
        )
        handles.append(block.experts.register_forward_hook(lambda _m, a, _o, rec=rec: rec.__setitem__("x", a[0])))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for handle in handles:
        handle.remove()

    keep = mask.reshape(-1).bool().numpy()
    out: dict[str, list[np.ndarray]] = {"frequency": [], "tcess": [], "easyep": [], "reap": []}
    for layer, block in moe_blocks(model).items():
        rec = seen[layer]
        experts = block.experts
        x = rec["x"].reshape(-1, rec["x"].shape[-1])
        chosen, weights = rec["chosen"].numpy(), rec["weights"].float().numpy()
        logits = rec["logits"].float()
        probs = (logits.sigmoid() if model.config.model_type == "deepseek_v3" else logits.softmax(-1)).numpy()
        residual = rec["residual"].reshape(-1, x.shape[-1]).float().numpy()
        num_tokens, k = chosen.shape
        num_experts = probs.shape[1]
        norms = np.zeros((num_tokens, k))
        routed = np.zeros_like(residual)
        for t in range(num_tokens):
            for j in range(k):
                y = expert_output(model.config.model_type, experts, int(chosen[t, j]), x[t]).numpy()
                norms[t, j] = np.linalg.norm(y)
                routed[t] += weights[t, j] * y
        after = residual + routed
        with np.errstate(invalid="ignore"):  # padding rows may be zero; they are masked out below
            cos = (residual * after).sum(-1) / (np.linalg.norm(residual, axis=-1) * np.linalg.norm(after, axis=-1))
        contribution = np.maximum(0.0, 1.0 - cos)
        frequency, easyep, reap_sum = np.zeros(num_experts), np.zeros(num_experts), np.zeros(num_experts)
        for t in np.nonzero(keep)[0]:
            for j in range(k):
                e = chosen[t, j]
                frequency[e] += 1
                easyep[e] += contribution[t] * weights[t, j] * norms[t, j]
                reap_sum[e] += weights[t, j] * norms[t, j]
        n = keep.sum()
        p = probs[keep]
        out["frequency"].append(frequency / n)
        out["tcess"].append((p * (p >= threshold)).sum(0) / n)
        out["easyep"].append(easyep)
        out["reap"].append(np.where(frequency > 0, reap_sum / np.maximum(frequency, 1), 0.0))
    return {name: np.stack(rows) for name, rows in out.items()}


def expert_output(model_type: str, experts, e: int, x: torch.Tensor) -> torch.Tensor:
    """One expert's output written from the families' formulas, not from the engine."""
    with torch.no_grad():
        if model_type == "gpt_oss":
            h = x @ experts.gate_up_proj[e] + experts.gate_up_proj_bias[e]
            gate, up = h[..., ::2].clamp(max=experts.limit), h[..., 1::2].clamp(-experts.limit, experts.limit)
            glu = gate * torch.sigmoid(gate * experts.alpha)
            return ((up + 1) * glu) @ experts.down_proj[e] + experts.down_proj_bias[e]
        gate, up = F.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
        return F.linear(experts.act_fn(gate) * up, experts.down_proj[e])


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[torch.nn.Module, Store]]:
    root = tmp_path_factory.mktemp("profiler")
    out = {}
    for family in TINY_CONFIGS:
        model = save_tiny_checkpoint(root / family, family)
        shard(root / family, root / f"{family}-store", progress=False)
        out[family] = (model, Store(root / f"{family}-store"))
    return out


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_criteria_equal_a_direct_computation_on_transformers(family: str, stores) -> None:
    model, _ = stores[family]
    ids, mask, _ = tokenize_demos(tiny_tokenizer(), DEMOS, 256)
    expected = direct_scores(model, ids, mask, threshold=0.02)
    patterned, source = PatternedModel.from_model(_copy(model))
    run = collect_scores(patterned, source, ids, mask, streamed=False, tcess_threshold=0.02)
    assert run.token_count == int(mask.sum())
    assert set(run.scores) == set(expected) == set(CRITERIA)  # every declared criterion, each checked here
    for criterion, matrix in expected.items():
        np.testing.assert_allclose(run.scores[criterion].numpy(), matrix, atol=1e-5, rtol=1e-5, err_msg=criterion)
        assert matrix.sum() > 0


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_layer_streaming_equals_the_fully_loaded_model(family: str, stores) -> None:
    model, store = stores[family]
    profile, streamed = profile_store(store, "code", DEMOS)
    ids, mask, _ = tokenize_demos(tiny_tokenizer(), DEMOS, 256)
    patterned, source = PatternedModel.from_model(_copy(model))
    full = collect_scores(patterned, source, ids, mask, streamed=False)
    for criterion in full.scores:
        assert torch.allclose(profile.scores[criterion], full.scores[criterion], atol=1e-6), criterion
    per_layer = store.manifest.expert_nbytes * store.manifest.num_experts
    assert streamed.peak_slot_bytes == per_layer < full.peak_slot_bytes
    assert profile.fingerprint == store.fingerprint and profile.token_count == int(mask.sum())


def _copy(model):
    clone = type(model)(model.config)
    clone.load_state_dict(model.state_dict())
    return clone.eval()


# --- selection ----------------------------------------------------------------------------------------


def spec_of(family: str, **overrides):
    config = tiny_config(family, **overrides)
    return adapter_for(config).spec(config)


def test_top_k_policy_keeps_the_best_per_layer_and_the_minimum() -> None:
    spec = spec_of("qwen3_moe")  # 3 layers x 8 experts, top-2
    scores = torch.tensor(
        [[8, 7, 6, 5, 4, 3, 2, 1], [1, 2, 3, 4, 5, 6, 7, 8], [0, 0, 5, 5, 0, 0, 9, 0]], dtype=torch.float
    )
    pattern = select(scores, spec, Selection(policy="top_k", value=3, unit="experts"))
    assert pattern.layers == {0: (0, 1, 2), 1: (5, 6, 7), 2: (2, 3, 6)}
    tiny = select(scores, spec, Selection(policy="top_k", value=1, unit="experts"))
    assert all(len(kept) == spec.top_k for kept in tiny.layers.values())
    ties = select(torch.ones(3, 8), spec, Selection(policy="top_k", value=0.5))
    assert ties.layers == {layer: (0, 1, 2, 3) for layer in spec.moe_layers}  # ties -> lower ids, deterministic


def test_coverage_policy_takes_the_smallest_set_holding_the_mass() -> None:
    spec = spec_of("olmoe")
    scores = torch.tensor([[50, 30, 10, 5, 2, 1, 1, 1], [10, 10, 10, 10, 10, 10, 10, 30]], dtype=torch.float)
    pattern = select(scores, spec, Selection(policy="coverage", value=0.8))
    assert pattern.layers == {0: (0, 1), 1: (0, 1, 2, 3, 4, 7)}  # 50+30 = 80; 30+5x10 = 80


def test_budget_policy_is_exact_and_gives_layers_different_counts() -> None:
    spec = spec_of("qwen3_moe")
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(3, 8, generator=generator)
    scores[0] = torch.tensor([100, 1, 1, 1, 1, 1, 1, 1])  # one dominant expert: little mass elsewhere
    scores[1] = torch.ones(8)  # flat: every expert matters
    for budget in (6, 9, 12, 17, 24):
        pattern = select(scores, spec, Selection(policy="budget", value=budget, unit="experts"))
        assert pattern.size == budget
        assert all(len(kept) >= spec.top_k for kept in pattern.layers.values())
    pattern = select(scores, spec, Selection(policy="budget", value=12, unit="experts"))
    assert len(pattern.kept(1)) > len(pattern.kept(0))
    nbytes = 1000
    by_bytes = select(scores, spec, Selection(policy="budget", value=12 * nbytes + 999, unit="bytes"), nbytes)
    assert by_bytes == pattern
    with pytest.raises(InvalidArgument, match="minimum"):
        select(scores, spec, Selection(policy="budget", value=5, unit="experts"))
    # A cap per layer (a server's slots) moves the surplus to other layers and keeps the total.
    capped = select(scores, spec, Selection(policy="budget", value=12, unit="experts"), max_per_layer=5)
    assert capped.size == 12 and max(len(k) for k in capped.layers.values()) <= 5


@pytest.mark.parametrize("family", ["deepseek_v3", "deepseek_v2_grouped"])
def test_selection_respects_group_routing(family: str) -> None:
    spec = spec_of(family)
    floor = spec.routing.min_experts
    generator = torch.Generator().manual_seed(1)
    for trial in range(20):
        scores = torch.rand(len(spec.moe_layers), spec.num_experts, generator=generator) ** 4
        for count in range(floor, spec.num_experts + 1):
            pattern = select(scores, spec, Selection(policy="top_k", value=count, unit="experts"))
            pattern.validate(spec)  # raises on a group violation
            assert all(len(kept) == count for kept in pattern.layers.values()), (trial, count)


def test_a_selection_names_a_declared_criterion() -> None:
    assert Selection().criterion in CRITERIA
    with pytest.raises(InvalidArgument, match="unknown criterion") as info:
        Selection("magic")
    assert info.value.field == "criterion"


def test_selection_is_deterministic() -> None:
    spec = spec_of("mixtral")
    scores = torch.rand(2, 8, generator=torch.Generator().manual_seed(3))
    runs = {select(scores, spec, Selection(policy="budget", value=0.5)).to_json().__repr__() for _ in range(5)}
    assert len(runs) == 1


# --- demos and profile files ---------------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_bad_demo_files_name_the_line(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="no demos"):
        load_demos(write(tmp_path / "empty.jsonl", "\n\n"))
    with pytest.raises(InvalidArgument, match=r"line 2.*not JSON"):
        load_demos(write(tmp_path / "bad.jsonl", '{"text": "ok"}\n{"text": oops}\n'))
    with pytest.raises(InvalidArgument, match=r"line 3.*empty"):
        load_demos(write(tmp_path / "blank.jsonl", '{"text": "a"}\n{"prompt": "b", "answer": "c"}\n{"text": "  "}\n'))
    with pytest.raises(InvalidArgument, match=r"line 1.*unexpected keys"):
        load_demos(write(tmp_path / "keys.jsonl", '{"question": "a"}\n'))
    demos = load_demos(write(tmp_path / "good.jsonl", '{"text": "a b"}\n\n{"prompt": "1+1=", "answer": "2"}\n'))
    assert [d.text for d in demos] == ["a b", "1+1=2"]


def test_long_demos_are_truncated_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        ids, mask, truncated = tokenize_demos(tiny_tokenizer(), [Demo("x" * 50), Demo("short")], max_length=20)
    assert truncated == [0] and ids.shape == (2, 20) and int(mask[1].sum()) == 5
    assert "demo 0 has 50 tokens" in caplog.text


def test_profile_files_refuse_other_models_versions_and_damage(tmp_path: Path, stores) -> None:
    _, store = stores["olmoe"]
    profile, _ = profile_store(store, "prose", DEMOS[3:])
    profile.save(tmp_path / "prose.safetensors")
    loaded = Profile.load(tmp_path / "prose.safetensors", fingerprint=store.fingerprint)
    assert loaded.name == "prose" and torch.equal(loaded.scores["tcess"], profile.scores["tcess"])
    with pytest.raises(FailedPrecondition, match="fingerprint"):
        Profile.load(tmp_path / "prose.safetensors", fingerprint="another-model")
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes((tmp_path / "prose.safetensors").read_bytes()[:-40])
    with pytest.raises(DataCorruption, match=r"damaged.safetensors"):
        Profile.load(damaged)
    raw = (tmp_path / "prose.safetensors").read_bytes().replace(b'"format_version":"2"', b'"format_version":"9"')
    (tmp_path / "future.safetensors").write_bytes(raw)
    with pytest.raises(FailedPrecondition, match="format"):
        Profile.load(tmp_path / "future.safetensors")


def test_selected_pattern_runs(stores) -> None:
    _, store = stores["deepseek_v3"]
    profile, _ = profile_store(store, "code", DEMOS[:2])
    spec = spec_of("deepseek_v3")
    pattern = select(profile.scores["easyep"], spec, Selection(policy="budget", value=0.5))
    assert isinstance(pattern, Pattern) and pattern.size == round(0.5 * 16 * len(spec.moe_layers))
