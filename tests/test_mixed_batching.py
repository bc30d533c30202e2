"""Mixed-precision patterns through the engine loop: a row whose task holds experts at int8/int4/int2/bf16 decodes in
one batch with rows of other tasks (drop-only, all experts), and every row's logits equal transformers' on its own
checkpoint: the dequantized one with the dropped experts excluded for the mixed row, the pruned one for the others.
The mixed row also skips low-weight experts while decoding (`test_expert_skip`), through the quantized slots' ids."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from premoe_service.engine import EngineLoop, Request, SamplingParams
from premoe_service.engine.schedule import BatchLimits
from premoe_service.families import adapter_for
from premoe_service.families.tiny import TINY_CONFIGS, save_tiny_checkpoint, tiny_tokenizer
from premoe_service.pattern import Pattern
from premoe_service.runtime.build import load_model
from premoe_service.runtime.quantized import attach_precisions
from premoe_service.store import MemoryCache, Store, shard
from premoe_service.store.quantized_copies import PrecisionReader, add_precisions

from .references import masked_transformers, random_pattern
from .test_batching import Observer, forced_logits
from .test_expert_skip import THRESHOLD as SKIP
from .test_expert_skip import reference_logits, run_together
from .test_quant_exactness import GROUP, PRECISIONS, mixed_plan, reference_dequantized

FAMILIES = sorted(TINY_CONFIGS)
ATOL = 2e-5  # fp32 rows of a padded batch against one request alone in transformers


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def dequantized_model(reference, store: Store, precisions: dict[int, dict[int, str]]):
    """Transformers' model whose experts held below full precision carry the weights the store's copies decode to
    (rebuilt independently of the runtime), bf16 ones their own weights rounded to bfloat16."""
    model = copy.deepcopy(reference)
    adapter = adapter_for(model.config)
    with torch.no_grad():
        for layer, by_expert in precisions.items():
            experts = adapter.experts(model, layer)
            for expert, precision in by_expert.items():
                if precision == "bf16":
                    for name in {part.name for part in store.manifest.parts}:
                        weight = getattr(experts, name)
                        weight[expert] = weight[expert].to(torch.bfloat16).float()
                elif precision != "full":
                    weights = reference_dequantized(PrecisionReader(store, precision), layer, expert)
                    for name, tensor in weights.items():
                        getattr(experts, name)[expert] = tensor
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_rows_batched_with_other_tasks_equal_their_checkpoints(family: str, tmp_path: Path) -> None:
    mixed_rows_scenario(family, tmp_path)


def mixed_rows_scenario(
    family: str,
    tmp_path: Path,
    loop_of: Callable[..., EngineLoop] | None = None,
    observer_of: Callable[[EngineLoop], Observer] = Observer,
    atol: float = ATOL,
) -> dict[str, Request]:
    """The scenario above through the loop that `loop_of(patterned, residency, store)` makes (default: the eager
    loop), observed by `observer_of(loop)`; returns the requests once checked."""
    save_tiny_checkpoint(tmp_path / "model", family)
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    shard(tmp_path / "model", tmp_path / "store", progress=False)
    add_precisions(tmp_path / "store", PRECISIONS, GROUP, progress=False)
    store = Store(tmp_path / "store", MemoryCache())
    reference = store_reference(tmp_path / "model")
    spec = adapter_for(reference.config).spec(reference.config)
    kept, precisions = mixed_plan(reference, seed=5)
    drop_only = random_pattern(reference, spec.num_experts // 2, seed=9)
    patterns = {
        "mixed": Pattern.build(spec, kept, precisions),
        "drop-only": Pattern.build(spec, drop_only),
        "all": Pattern.full(spec),
    }
    assert patterns["mixed"].mixed

    patterned, residency = load_model(store, device="cpu")  # a full-precision slot for every expert
    attach_precisions(patterned, store, dict.fromkeys(PRECISIONS, spec.num_experts // 2))
    if loop_of is None:
        loop = EngineLoop(patterned, residency, store, eos=set(), pad_id=0, limits=BatchLimits(max_join_wait_steps=0))
    else:
        loop = loop_of(patterned, residency, store)
    prompts = {"mixed": [5, 9, 17, 3, 44], "drop-only": [7, 7, 21, 90, 11, 4, 60], "all": [12, 30, 8]}
    skip = {"mixed": SKIP, "drop-only": 0.0, "all": 0.0}  # the mixed row also skips experts while decoding
    requests = {
        name: Request(
            prompts[name], patterns[name], SamplingParams(6, skip_below=skip[name]), tiny_tokenizer(), stream=False
        )
        for name in patterns
    }
    observer = run_together(loop, list(requests.values()), observer_of)
    assert max(observer.decode_rows) == 3  # the three tasks decoded in one batch

    dequantized = dequantized_model(reference, store, precisions)
    expected = {}
    for name, request in requests.items():
        model = dequantized if name == "mixed" else reference
        keep = {"mixed": kept, "drop-only": drop_only, "all": None}[name]
        if keep is None:
            expected[name] = forced_logits(model, request.prompt_ids, request.generated)
        else:
            with masked_transformers(model, keep):
                expected[name] = reference_logits(model, request.prompt_ids, request.generated, skip[name], [])
        actual = torch.stack(observer.logits[request.id])
        assert actual.shape == expected[name].shape
        assert (actual - expected[name]).abs().max().item() <= atol, name
    # The precisions matter, or the comparison proves nothing: the same experts at full precision differ.
    with masked_transformers(reference, kept):
        mixed = requests["mixed"]
        full_precision = reference_logits(reference, mixed.prompt_ids, mixed.generated, SKIP, [])
    assert mixed.experts_skipped > 0
    assert (expected["mixed"] - full_precision).abs().max().item() > 1e-3
    return requests


def store_reference(model_dir: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    return model
