"""Online expert skipping (the Mixture Compressor's dynamic pruning) in the engine loop: a decoding token skips
the routed experts below its request's share of the routing weights, never its top one; prompt tokens are
protected. Checked for every family against transformers with the same rule applied to its own routers' outputs,
in one batch with a row that skips nothing; and through gRPC, where the stats count the skipped calls."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from premoe_service.engine import EngineLoop, Request, SamplingParams
from premoe_service.engine.schedule import BatchLimits
from premoe_service.families.tiny import TINY_CONFIGS, save_tiny_checkpoint, tiny_tokenizer
from premoe_service.pattern import Pattern
from premoe_service.runtime.build import load_model
from premoe_service.store import MemoryCache, Store, shard

from .references import moe_blocks, router_of
from .test_batching import Observer

FAMILIES = sorted(TINY_CONFIGS)
ATOL = 2e-5
THRESHOLD = 0.45  # top-2 tiny models: the second expert is skipped when it holds under 45% of the weight

pytestmark = pytest.mark.usefixtures("one_thread")


def run_together(
    loop: EngineLoop, requests: Sequence[Request], observer_of: Callable[[EngineLoop], Observer] = Observer
) -> Observer:
    """Submit the requests at once and run the loop until they finish; returns the logits each row got (observed by
    `observer_of(loop)`)."""
    observer = observer_of(loop)
    try:
        for request in requests:
            observer.expect(request)
            loop.submit(request)
        loop.run_until_idle(timeout_s=120)
    finally:
        observer.close()
        loop.loader.close()
    return observer


@contextmanager
def skipping(model, threshold: float, counts: list[int]) -> Iterator[None]:
    """Transformers' routers, each output rewritten by the rule: weight 0 and the experts module's own skip id
    (its expert count) for every expert under `threshold` of the token's weights but its top one."""

    def hook(_module, _args, output):
        logits, weights, indices = output
        share = weights / weights.sum(-1, keepdim=True)
        drop = (share < threshold) & (weights < weights.amax(-1, keepdim=True))
        counts.append(int(drop.sum()))
        return logits, weights.masked_fill(drop, 0.0), indices.masked_fill(drop, model_experts(model))

    blocks = moe_blocks(model).values()
    handles = [router_of(block).register_forward_hook(hook) for block in blocks]
    for block in blocks:  # transformers' own handling of skipped pairs (expert-parallel sentinels)
        block.experts._is_expert_parallel = True
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for block in blocks:
            block.experts._is_expert_parallel = False


def model_experts(model) -> int:
    block = next(iter(moe_blocks(model).values()))
    return int(block.experts.num_experts)


@torch.no_grad()
def reference_logits(model, prompt: Sequence[int], tokens: Sequence[int], threshold: float, counts: list[int]):
    """The request alone in transformers: the prompt in full, then one decode step per token under the rule."""
    cache = DynamicCache(config=model.config)
    out = model(input_ids=torch.tensor([list(prompt)]), cache=cache, use_cache=True)
    rows = [out.logits[0, -1]]
    with skipping(model, threshold, counts):
        for token in tokens[:-1]:
            out = model(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True)
            rows.append(out.logits[0, -1])
    return torch.stack(rows)


@pytest.mark.parametrize("family", FAMILIES)
def test_skipping_rows_equal_transformers_under_the_same_rule(family: str, tmp_path: Path) -> None:
    save_tiny_checkpoint(tmp_path / "model", family)
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    shard(tmp_path / "model", tmp_path / "store", progress=False)
    store = Store(tmp_path / "store", MemoryCache())
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32).eval()
    patterned, residency = load_model(store, device="cpu")
    loop = EngineLoop(patterned, residency, store, eos=set(), pad_id=0, limits=BatchLimits(max_join_wait_steps=0))
    sentinels: list[int] = []  # pairs the experts modules were handed as skipped: no compute for them
    hooks = [
        patterned.experts_module(layer).register_forward_pre_hook(
            lambda module, args: sentinels.append(int((args[1] >= module.num_experts).sum()))
        )
        for layer in patterned.spec.moe_layers
    ]
    prompts = {THRESHOLD: [5, 9, 17, 3, 44], 0.0: [7, 21, 90, 11]}
    requests = {
        t: Request(p, Pattern.full(patterned.spec), SamplingParams(8, skip_below=t), tiny_tokenizer(), stream=False)
        for t, p in prompts.items()
    }
    try:
        observer = run_together(loop, list(requests.values()))
    finally:
        for hook in hooks:
            hook.remove()
    assert max(observer.decode_rows) == 2  # both rows decoded together
    assert sum(sentinels) == requests[THRESHOLD].experts_skipped
    for threshold, request in requests.items():
        counts: list[int] = []
        expected = reference_logits(reference, request.prompt_ids, request.generated, threshold, counts)
        actual = torch.stack(observer.logits[request.id])
        assert (actual - expected).abs().max().item() <= ATOL, threshold
        assert request.experts_skipped == sum(counts)
    assert requests[THRESHOLD].experts_skipped > 0 and requests[0.0].experts_skipped == 0
    # The rule matters, or the comparison proves nothing: without it the skipping row's logits differ.
    plain = reference_logits(reference, requests[THRESHOLD].prompt_ids, requests[THRESHOLD].generated, 0.0, [])
    assert (plain - torch.stack(observer.logits[requests[THRESHOLD].id])).abs().max().item() > 1e-4


def test_the_threshold_at_the_door(tiny_store: Path, embedder) -> None:
    from premoe_service.client import PreMoeClient
    from premoe_service.server import running_server
    from premoe_service.serving import ServiceConfig

    config = ServiceConfig(store=tiny_store, port=0, device="cpu")
    with running_server(config, embedder=embedder) as (_, port), PreMoeClient(f"127.0.0.1:{port}") as client:
        plain = client.generate("def add(a, b):", max_new_tokens=6)
        skipped = client.generate("def add(a, b):", max_new_tokens=6, expert_skip_threshold=0.45)
        assert plain.stats.expert_calls_skipped == 0 and skipped.stats.expert_calls_skipped > 0
        assert plain.stats.expert_calls == skipped.stats.expert_calls > skipped.stats.expert_calls_skipped
        for bad in (1.0, -0.1, float("nan")):
            with pytest.raises(grpc.RpcError) as info:
                client.generate("def add(a, b):", max_new_tokens=2, expert_skip_threshold=bad)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "expert_skip_threshold" in info.value.details()
