"""The engine's experts forward (`runtime/experts_forward.py`) against transformers' own experts forward.

For every family whose experts module uses transformers' experts interface, in float64: the engine's experts
forward, and the compiled kernel's function run eager, give the module's eager output (the reference every
exactness test uses) for a lone token, two tokens, and a wide pass, with some pairs carrying the skip id (a pair
the masked router took out), on the path each size takes; and a model run through it gives the logits of the same
model run with eager experts.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from premoe_service.families import adapter_for
from premoe_service.families.tiny import TINY_CONFIGS, tiny_model
from premoe_service.runtime import experts_forward
from premoe_service.runtime.experts_forward import (
    IMPLEMENTATION,
    INLINE_PAIRS,
    experts_kernel,
    gathered_experts,
    hit_experts_forward,
    own_forward,
    replace_forward,
    use_hit_experts,
)

FAMILIES = sorted(TINY_CONFIGS)


def _experts(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, "has_gate") and hasattr(m, "num_experts")]


def _eager(module: torch.nn.Module, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    module.config._experts_implementation = "eager"
    try:
        return module(hidden, index, weights)
    finally:
        module.config._experts_implementation = IMPLEMENTATION


def _routed(tokens: int, module: torch.nn.Module, skip: bool, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    experts, top_k, hidden = module.num_experts, 2, module.down_proj.shape[1 if not module.is_transposed else 2]
    index = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)])
    if skip:
        index[0, -1] = experts  # the skip id: this pair contributes nothing
    weights = torch.rand(tokens, top_k, generator=g, dtype=torch.float64)
    return torch.randn(tokens, hidden, generator=g, dtype=torch.float64), index, weights


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tokens", [1, 2, 9])
@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("forward", [hit_experts_forward, gathered_experts], ids=["hit", "gathered"])
def test_experts_forward_equals_eager(family: str, tokens: int, skip: bool, forward: Callable[..., Tensor]) -> None:
    """The engine's experts forward, and the compiled kernel's function (`gathered_experts`) run eager: the module's
    eager output for every layout the families use (gate or not, biases, transposed weights, their own gates).
    `tests/test_compiled_stack.py` runs the kernel compiled inside the engine."""
    model = tiny_model(family, dtype=torch.float64)
    use_hit_experts(model)
    modules = _experts(model)
    if not modules:
        pytest.skip(f"{family}'s experts module does not use transformers' experts interface")
    for layer, module in enumerate(modules):
        hidden, index, weights = _routed(tokens, module, skip, seed=layer)
        actual = forward(module, hidden, index, weights)
        if skip:  # the reference leaves the pair out as weight 0 on a real expert (GPT-OSS's eager path has no skip id)
            weights = weights.clone()
            weights[0, -1] = 0.0
            index = index.clone()
            index[0, -1] = int(index[0, 0] == 0)
        expected = _eager(module, hidden, index, weights)
        assert actual.shape == expected.shape
        assert (actual - expected).abs().max().item() < 1e-12, (family, layer)


@pytest.mark.parametrize("family", FAMILIES)
def test_model_logits_equal_eager_experts(family: str) -> None:
    model = tiny_model(family, dtype=torch.float64)
    if not _experts(model):
        pytest.skip(f"{family}'s experts module does not use transformers' experts interface")
    ids = torch.tensor([[5, 17, 3, 99, 42, 7, 61]])
    model.set_experts_implementation("eager")
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        use_hit_experts(model)
        full = model(input_ids=ids).logits
        last = model(input_ids=ids[:, :1]).logits  # one token: the lone-row path
        model.set_experts_implementation("eager")
        last_expected = model(input_ids=ids[:, :1]).logits
    assert (full - expected).abs().max().item() < 1e-9
    assert (last - last_expected).abs().max().item() < 1e-9


def test_wide_float32_pass_goes_to_the_grouped_kernel() -> None:
    """Above the pair threshold in float32 the grouped kernel runs, and it computes the same output."""
    model = tiny_model("qwen3_moe", dtype=torch.float32)
    use_hit_experts(model)
    module = _experts(model)[0]
    tokens = int(experts_forward.HIT_PAIRS_PER_EXPERT * module.num_experts) + 3
    hidden, index, weights = _routed(tokens, module, skip=False, seed=1)
    hidden, weights = hidden.float(), weights.float()
    actual = hit_experts_forward(module, hidden, index, weights)
    assert (actual - _eager(module, hidden, index, weights)).abs().max().item() < 1e-5
    assert adapter_for(model.config).name == "qwen3_moe"


@pytest.mark.parametrize("family", FAMILIES)
def test_skip_ids_in_a_wide_float32_pass_contribute_exactly_nothing(family: str) -> None:
    """transformers' grouped kernel leaves the rows of pairs past the module's experts uninitialised; a wide pass
    holding skip ids (here with non-zero weights, which a skipped pair of the masked router does not have) must still
    equal the pass without those pairs, whatever that memory holds."""
    model = tiny_model(family, dtype=torch.float32)
    use_hit_experts(model)
    modules = _experts(model)
    if not modules:
        pytest.skip(f"{family}'s experts module does not use transformers' experts interface")
    module = modules[0]
    tokens = int(experts_forward.HIT_PAIRS_PER_EXPERT * module.num_experts) + 40
    hidden, index, weights = _routed(tokens, module, skip=False, seed=3)
    hidden, weights = hidden.float(), weights.float()
    skipped = index.clone()
    skipped[::3, -1] = module.num_experts  # a third of the tokens skip their second pair
    kept_weights = weights.clone()
    kept_weights[::3, -1] = 0.0
    index[::3, -1] = int(index[0, 0] == 0)  # the reference: the same pairs on a real expert, weight 0
    for _ in range(3):  # fresh allocations each time: whatever the uninitialised rows hold
        actual = hit_experts_forward(module, hidden, skipped, weights)
        assert torch.isfinite(actual).all()
        assert (actual - _eager(module, hidden, index, kept_weights)).abs().max().item() < 1e-5, family


def test_the_kernel_takes_the_passes_its_bound_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a kernel in place (as while the engine's stack runs compiled), a float32 pass goes to it up to
    `GATHERED_PAIRS_PER_EXPERT` pairs per slot when the layer's slots fit `CACHED_LAYER_BYTES`, and up to a quarter
    as many pairs as slots when they do not; the rest, and float64 passes, go to the library paths. Either way the
    output is the module's."""
    taken: list[int] = []

    def kernel(m: torch.nn.Module, hidden: Tensor, index: Tensor, weights: Tensor) -> Tensor:
        taken.append(index.shape[0])
        return gathered_experts(m, hidden, index, weights)

    def passes(dtype: torch.dtype, token_counts: list[int]) -> list[int]:
        model = tiny_model("qwen3_moe", dtype=dtype)
        use_hit_experts(model)
        module = _experts(model)[0]
        taken.clear()
        with experts_kernel(kernel):
            for tokens in token_counts:
                hidden, index, weights = _routed(tokens, module, skip=False, seed=tokens)
                hidden, weights = hidden.to(dtype), weights.to(dtype)
                actual = hit_experts_forward(module, hidden, index, weights)
                assert (actual - _eager(module, hidden, index, weights)).abs().max().item() < 1e-5
        return list(taken)

    slots, top_k = tiny_model("qwen3_moe").config.num_experts, 2
    widest = experts_forward.GATHERED_PAIRS_PER_EXPERT * slots // top_k
    assert passes(torch.float32, [1, widest, widest + 1]) == [1, widest]
    assert passes(torch.float64, [1, 2]) == []
    monkeypatch.setattr(experts_forward, "CACHED_LAYER_BYTES", 0)  # the layer no longer fits the caches
    narrow = max(1, slots // (4 * top_k))
    assert passes(torch.float32, [narrow, narrow + 1]) == [narrow]


def test_a_forward_replaced_under_a_graph_that_computes_the_module_is_refused() -> None:
    """A compiled step that computes an experts module inside its graph (`INLINE_PAIRS`) would not see a forward
    installed later (slot banks): `replace_forward` refuses it. Before, the module is its class's own, and after a
    replacement it is not (`own_forward`: what the compiled step checks before it inlines a module)."""
    model = tiny_model("qwen3_moe")
    use_hit_experts(model)
    plain, inlined = _experts(model)[:2]
    assert own_forward(plain) and own_forward(inlined)
    replace_forward(plain, lambda hidden, index, weights: hidden)
    assert not own_forward(plain)
    setattr(inlined, INLINE_PAIRS, 8)
    with pytest.raises(RuntimeError, match="compiled into the step's graph"):
        replace_forward(inlined, lambda hidden, index, weights: hidden)
    assert own_forward(inlined)
