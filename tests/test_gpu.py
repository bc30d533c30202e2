"""The engine and the loader on a CUDA device (issue 24.6): skipped without one; `make gpu-check` runs them on a GPU.

- For every family, the patterned model on `cuda` gives transformers' logits on the same device: with every expert,
  and with a half pattern against transformers on the pruned checkpoint.
- The engine built from a store onto `cuda` with half the slots (dense part and slots on the device), its experts
  copied in by the loop's loader thread (pinned staging and a copy stream on CUDA), serves two patterns in turn:
  each request's greedy tokens equal transformers' `generate` on the pruned checkpoint on the same device.
- The same with the engine's default compiled step (the decoder stack and the experts kernel; Triton kernels on a
  GPU): compiled before serving, no fallback to eager, the same tokens.
TF32 is switched off so that float32 matmuls are float32 on both sides.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from premoe_service.engine import EngineLoop, Request, SamplingParams, Status
from premoe_service.engine import GenerationResult as Outcome
from premoe_service.families import adapter_for
from premoe_service.families.tiny import TINY_CONFIGS, tiny_model, tiny_tokenizer
from premoe_service.pattern import Pattern
from premoe_service.runtime import PatternedModel
from premoe_service.runtime.build import load_model
from premoe_service.runtime.residency import Budget
from premoe_service.store import Store, open_cache, shard

from .references import pruned_checkpoint_model, random_pattern

# PREMOE_TEST_DEVICE=cpu runs the same checks on the CPU (how they are kept working on machines without a GPU).
DEVICE = os.environ.get("PREMOE_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(
    DEVICE == "cuda" and not torch.cuda.is_available(),
    reason="no CUDA device here: `make gpu-check` runs these on a GPU machine",
)

ATOL = 1e-5
NEW_TOKENS = 12
FAMILIES = sorted(TINY_CONFIGS)
PROMPTS = torch.tensor([[5, 17, 33, 9, 60, 61, 12, 40], [7, 7, 90, 3, 22, 100, 8, 64]])


@pytest.fixture(autouse=True)
def no_tf32() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def build(root: Path, family: str) -> tuple[Any, Store]:
    reference = tiny_model(family)
    reference.generation_config.eos_token_id = None
    reference.save_pretrained(root / "ckpt")
    tiny_tokenizer().save_pretrained(root / "ckpt")
    shard(root / "ckpt", root / "store", progress=False)
    return reference, Store(root / "store", open_cache(None))


@torch.no_grad()
def logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


@torch.no_grad()
def greedy(model: Any, prompt: list[int], new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt], device=DEVICE)
    out = model.generate(input_ids=ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_patterned_model_on_cuda_equals_transformers_on_cuda(family: str) -> None:
    reference = tiny_model(family).to(DEVICE)
    spec = adapter_for(reference.config).spec(reference.config)
    kept = random_pattern(reference, spec.num_experts // 2, seed=3)
    ids = PROMPTS.to(DEVICE)
    full, _ = PatternedModel.from_model(tiny_model(family).to(DEVICE))
    assert (logits(full.model, ids) - logits(reference, ids)).abs().max().item() <= ATOL
    patterned, _ = PatternedModel.from_model(tiny_model(family).to(DEVICE), Pattern.build(spec, kept))
    actual = logits(patterned.model, ids)
    assert (actual - logits(pruned_checkpoint_model(reference, kept).to(DEVICE), ids)).abs().max().item() <= ATOL
    assert (actual - logits(reference, ids)).abs().max().item() > 1e-3  # the pattern matters


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_the_loop_on_cuda_serves_patterns_its_loader_brought_from_the_store(family: str, tmp_path: Path) -> None:
    reference, store = build(tmp_path, family)
    patterned, residency = load_model(store, Budget(fraction=0.5), device=DEVICE)
    assert next(patterned.model.parameters()).device.type == DEVICE
    serve_two_patterns(EngineLoop(patterned, residency, store, eos=set(), pad_id=0), reference, patterned)


def test_the_compiled_loop_on_cuda_serves_patterns_as_transformers(tmp_path: Path) -> None:
    """The default serving path: the decoder stack and the experts kernel compiled (on a GPU, inductor's Triton
    kernels), before serving; the same greedy tokens as transformers on the pruned checkpoint."""
    from premoe_service.engine.compiled_stack import CompiledStack

    reference, store = build(tmp_path, "qwen3_moe")
    patterned, residency = load_model(store, Budget(fraction=0.5), device=DEVICE)
    loop = EngineLoop(patterned, residency, store, eos=set(), pad_id=0, compiled=True)
    stack = loop.batch.stack
    assert isinstance(stack, CompiledStack)
    loop.batch.warm_up()
    assert stack.failure is None and stack.experts_failure is None, loop.batch.stack_state()
    serve_two_patterns(loop, reference, patterned)
    assert stack.failure is None and stack.experts_failure is None, loop.batch.stack_state()


def serve_two_patterns(loop: EngineLoop, reference: Any, patterned: PatternedModel) -> None:
    """Two requests in turn, each with a random half pattern (the second replaces part of the first in the slots):
    each request's greedy tokens equal transformers' `generate` on its pruned checkpoint."""
    reference = reference.to(DEVICE)
    for seed in (5, 6):  # the second pattern replaces part of the first in the slots
        kept = random_pattern(reference, patterned.spec.num_experts // 2, seed=seed)
        prompt = PROMPTS[seed % 2].tolist()
        params = SamplingParams(max_new_tokens=NEW_TOKENS)
        request = Request(prompt, Pattern.build(patterned.spec, kept), params, tiny_tokenizer(), stream=False)
        loop.submit(request)
        deadline = time.monotonic() + 120
        while request.status is not Status.FINISHED:
            assert time.monotonic() < deadline, loop.stats
            if not loop.step():
                time.sleep(0.002)  # the copies run on the loader thread
        *_, last = request.events()
        assert isinstance(last, Outcome), last
        expected = greedy(pruned_checkpoint_model(reference, kept).to(DEVICE), prompt, NEW_TOKENS)
        assert last.token_ids == expected, (seed, last.token_ids, expected)
