"""The engine runs a plain family's decoder stack itself (`runtime/decoder_stack.py`): the same logits, bit for bit,
as the model's own forward on the same packed pass, for every family in float32 and float64, prefill and decode;
a family not marked plain runs the model's forward."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from premoe_service.engine import BatchLimits, EngineLoop, Status
from premoe_service.engine.batch import forward
from premoe_service.families.tiny import TINY_CONFIGS
from premoe_service.runtime import decoder_stack

from .test_batching import Job, build, prompt

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_stack_gives_the_models_own_logits(tmp_path: Path, family: str, dtype: torch.dtype) -> None:
    setup = build(tmp_path, family, dtype)
    loop = EngineLoop(
        setup.patterned, setup.residency, setup.store, eos=set(), limits=BatchLimits(max_join_wait_steps=0)
    )
    batch = loop.batch
    assert batch.stack is not None  # every family we claim runs a plain stack
    requests = [Job(prompt(n, i), None, 6).request(setup) for i, n in enumerate((5, 9, 3))]
    for request in requests:
        loop.submit(request)
    compared = 0
    for _ in range(5):  # a prefill pass of all three, then decode passes
        loop.waiting.extend(loop._inbox.take_all())
        loop.admission.reserve(loop.waiting, loop.stats.steps)
        while loop.loader.backlog or any(r.status is not Status.READY for r in loop.waiting):
            loop.admission.commit(loop.waiting, loop.stats.steps)
            loop.admission.reserve(loop.waiting, loop.stats.steps)
        loop._join()
        plan = batch.plan(loop.limits.max_prefill_tokens)
        assert plan is not None
        stack, batch.stack = batch.stack, None
        own = forward(batch, plan)  # the model's forward, then the stack on the same pass
        batch.stack = stack
        assert torch.equal(forward(batch, plan), own)
        compared += 1
        loop.plan = plan
        for b, request in enumerate(plan.rows):  # advance the rows as the loop would, greedy
            request.cached += plan.counts[b]
            request.generated.append(int(own[plan.kept[b][-1]].argmax()))
    assert compared == 5
    loop.close()


def test_a_family_not_marked_plain_runs_the_models_forward(tmp_path: Path, monkeypatch) -> None:
    setup = build(tmp_path, "qwen3_moe", torch.float32)
    assert decoder_stack.plain_stack(setup.patterned.model) is not None
    adapter = dataclasses.replace(setup.patterned.adapter, plain_stack=False)
    monkeypatch.setattr(decoder_stack, "adapter_for", lambda config: adapter)
    assert decoder_stack.plain_stack(setup.patterned.model) is None
    loop = EngineLoop(setup.patterned, setup.residency, setup.store, eos=set())
    assert loop.batch.stack is None
    loop.close()
