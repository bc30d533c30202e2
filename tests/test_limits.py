"""Request limits are checked before expensive work: prompt bytes before tokenizing or embedding (Generate and
Route), prompt tokens and new tokens against the model's context, stop strings; extreme temperatures sample."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest

from premoe_service.client import PreMoeClient
from premoe_service.errors import InvalidArgument
from premoe_service.families.tiny import save_tiny_checkpoint
from premoe_service.server import running_server
from premoe_service.serving import GenerationResult, SamplingParams, ServiceConfig, ServingCore
from premoe_service.store import shard


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("limits")
    save_tiny_checkpoint(root / "ckpt", "qwen3_moe")  # context: 256 positions
    shard(root / "ckpt", root / "store", progress=False)
    return root / "store"


class CountingTokenizer:
    """The service's tokenizer, counting the texts it is asked to encode."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.calls = tokenizer, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.tokenizer(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)


@pytest.fixture(scope="module")
def service(store: Path, embedder, tmp_path_factory):
    config = ServiceConfig(
        store=store, profiles=tmp_path_factory.mktemp("profiles"), device="cpu", max_prompt_bytes=1000
    )
    service = ServingCore(config, embedder=embedder)
    service.tokenizer = CountingTokenizer(service.tokenizer)
    yield service
    service.close()


def generate(service: ServingCore, prompt: str, **options: Any) -> GenerationResult:
    *_, result = service.generate(prompt, SamplingParams(**options))
    assert isinstance(result, GenerationResult)
    return result


@pytest.mark.parametrize("prompt", ["x" * 1001, "é" * 501, "🙂" * 251])
def test_an_oversized_prompt_is_refused_before_it_is_tokenized_or_embedded(service, prompt: str) -> None:
    before = service.tokenizer.calls
    for call in (lambda: service.route(prompt), lambda: generate(service, prompt, max_new_tokens=2)):
        with pytest.raises(InvalidArgument, match="1000 bytes") as info:
            call()
        assert info.value.field == "prompt"
    assert service.tokenizer.calls == before
    assert len(generate(service, "🙂" * 250, max_new_tokens=1).token_ids) == 1  # exactly at the limit: served


def test_prompt_and_new_tokens_must_fit_the_models_context(service) -> None:
    with pytest.raises(InvalidArgument, match="context of 256") as info:
        generate(service, "a" * 200, max_new_tokens=100)
    assert info.value.field == "max_new_tokens"
    with pytest.raises(InvalidArgument, match="limit is 255") as info:
        generate(service, "b" * 300, max_new_tokens=1)
    assert info.value.field == "prompt"
    assert len(generate(service, "a" * 200, max_new_tokens=56).token_ids) == 56


def test_a_request_that_could_never_fit_the_kv_cap_is_refused_before_it_is_routed(
    store: Path, embedder, monkeypatch
) -> None:
    service = ServingCore(ServiceConfig(store=store, device="cpu", max_kv_tokens=64), embedder=embedder)
    try:
        routed: list[str] = []
        route = service.registry.route  # the real routing, observed
        monkeypatch.setattr(
            service.registry, "route", lambda prompt, **kw: routed.append(prompt) or route(prompt, **kw)
        )
        with pytest.raises(InvalidArgument, match="cap of 64 tokens") as info:
            generate(service, "a" * 40, max_new_tokens=30)  # 40 + 30 tokens: 80 in blocks of 16
        assert info.value.field == "max_new_tokens" and routed == []
        assert len(generate(service, "a" * 40, max_new_tokens=24).token_ids) == 24  # 64 exactly: served
    finally:
        service.close()


def test_a_prompt_too_long_in_tokens_is_refused_before_it_is_routed(service, monkeypatch) -> None:
    routed: list[str] = []
    route = service.registry.route  # the real routing, observed
    monkeypatch.setattr(service.registry, "route", lambda prompt, **kw: routed.append(prompt) or route(prompt, **kw))
    with pytest.raises(InvalidArgument, match="limit is 255") as info:
        generate(service, "b" * 300, max_new_tokens=1)
    assert info.value.field == "prompt" and routed == []  # neither embedded nor run through the router signal
    generate(service, "b" * 20, max_new_tokens=1)
    assert routed == ["b" * 20]


def test_the_plan_ray_asks_for_is_made_after_the_prompts_checks(service, monkeypatch) -> None:
    """`plan_generation` (what Ray's ingress asks a replica for before choosing one) tokenizes and checks the prompt
    as `submit` does: one too long for the model is refused before it is embedded and routed."""
    routed: list[str] = []
    route = service.registry.route  # the real routing, observed
    monkeypatch.setattr(service.registry, "route", lambda prompt, **kw: routed.append(prompt) or route(prompt, **kw))
    with pytest.raises(InvalidArgument, match="limit is 255") as info:
        service.plan_generation("b" * 300, SamplingParams(max_new_tokens=1))
    assert info.value.field == "prompt" and routed == []
    with pytest.raises(InvalidArgument, match="context of 256") as info:
        service.plan_generation("a" * 200, SamplingParams(max_new_tokens=100))
    assert info.value.field == "max_new_tokens" and routed == []
    service.plan_generation("b" * 20, SamplingParams(max_new_tokens=1))
    assert routed == ["b" * 20]


def test_stop_strings_are_bounded(service) -> None:
    with pytest.raises(InvalidArgument) as info:
        generate(service, "hello", max_new_tokens=2, stop=("x" * 257,))
    assert info.value.field == "stop"


@pytest.mark.parametrize("temperature", [1e-38, 1e-12, 5e-324])
def test_a_vanishing_temperature_samples_the_argmax(service, temperature: float) -> None:
    greedy = generate(service, "def f(x):", max_new_tokens=8)
    cold = generate(service, "def f(x):", max_new_tokens=8, temperature=temperature, seed=1)
    assert cold.token_ids == greedy.token_ids


def test_route_over_grpc_refuses_an_oversized_prompt(store: Path, embedder, tmp_path: Path) -> None:
    config = ServiceConfig(store=store, profiles=tmp_path, port=0, device="cpu")
    with running_server(config, embedder=embedder) as (_handle, port), PreMoeClient(f"127.0.0.1:{port}") as client:
        for call in (client.route, lambda p: client.generate(p, max_new_tokens=1)):
            with pytest.raises(grpc.RpcError) as info:
                call("y" * (10 << 20))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompt" in info.value.details()
        assert client.health() == "SERVING"
