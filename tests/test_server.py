"""End to end over real gRPC on a loopback port: exact generation, streaming, task registration, errors, health."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2
from transformers import AutoModelForCausalLM, AutoTokenizer

from premoe_service.client import PreMoeClient
from premoe_service.families import adapter_for
from premoe_service.families.tiny import save_tiny_checkpoint
from premoe_service.pattern import Pattern
from premoe_service.server import running_server
from premoe_service.serving import ServiceConfig
from premoe_service.store import Store, shard
from premoe_service.store.export import export_pruned

from .conftest import free_port
from .references import pruned_checkpoint_model

PROMPT = "def add(a, b):"
CODE_DEMOS = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i)\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n",
    "import os\nprint(os.getcwd())\n",
]
TOKEN = "s3cret"


@pytest.fixture(scope="module")
def model_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    root = tmp_path_factory.mktemp("server")
    model = save_tiny_checkpoint(root / "ckpt", "qwen3_moe")
    shard(root / "ckpt", root / "store", progress=False)
    return model, root / "store"


@pytest.fixture(scope="module")
def server(model_store, redis_server, embedder, tmp_path_factory):
    _, store = model_store
    redis_server.flush()  # the session's Redis may hold another module's tasks for a store of the same model
    config = ServiceConfig(
        store=store,
        profiles=tmp_path_factory.mktemp("profiles"),
        redis_url=redis_server.url,
        port=0,
        device="cpu",
        admin_token=TOKEN,
        metrics_port=free_port(),
        max_new_tokens_limit=256,
    )
    with running_server(config, embedder=embedder) as (handle, port):
        yield handle, port


@pytest.fixture
def client(server) -> PreMoeClient:
    _, port = server
    with PreMoeClient(f"127.0.0.1:{port}", admin_token=TOKEN, timeout=120) as c:
        yield c


def hf_greedy(model, store: Path, prompt: str, new_tokens: int) -> list[int]:
    ids = torch.tensor([AutoTokenizer.from_pretrained(store)(prompt)["input_ids"]])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1] :].tolist()


def test_full_pattern_generates_the_tokens_of_transformers(client, model_store) -> None:
    model, store = model_store
    reply = client.generate(PROMPT, max_new_tokens=16)
    assert list(reply.token_ids) == hf_greedy(model, store, PROMPT, 16)
    assert reply.finish_reason == "length" and reply.stats.generated_tokens == 16
    assert reply.stats.pattern_experts == reply.stats.total_experts == 24


def test_task_pattern_generates_the_tokens_of_the_pruned_checkpoint(client, model_store, tmp_path: Path) -> None:
    model, store = model_store
    info = client.register("code", CODE_DEMOS, description="python code", experts_per_layer=4, replace=True)
    assert info.pattern_experts == 12 and len(info.layers) == 3 and 0 < info.demo_coverage <= 1
    kept = {layer.layer: list(layer.experts) for layer in client.get_task("code").layers}
    pruned = pruned_checkpoint_model(model, kept)
    reply = client.generate(PROMPT, task="code", max_new_tokens=16)
    assert reply.stats.task == "code" and reply.stats.decision == "override" and reply.stats.pattern_experts == 12
    assert list(reply.token_ids) == hf_greedy(pruned, store, PROMPT, 16)
    assert 0 < reply.stats.coverage < 1
    # The same through `premoe export`: the checkpoint a distributed engine would load.
    spec = adapter_for(model.config).spec(model.config)
    export_pruned(Store(store), Pattern.build(spec, kept), tmp_path / "exported", progress=False)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported", local_files_only=True)
    assert list(reply.token_ids) == hf_greedy(exported, store, PROMPT, 16)

    routed = client.route("def multiply(a, b):\n    return a * b")
    assert routed.decision == "match" and routed.task == "code" and routed.pattern_experts == 12


def test_stream_yields_the_tokens_of_generate(client) -> None:
    reply = client.generate(PROMPT, max_new_tokens=12, task=None)
    chunks = list(client.stream(PROMPT, max_new_tokens=12))
    assert "".join(c.text for c in chunks) == reply.text
    assert list(chunks[-1].token_ids) == list(reply.token_ids)
    assert chunks[-1].finish_reason == "length" and chunks[-1].stats.generated_tokens == 12


def test_sampling_is_reproducible_with_a_seed(client) -> None:
    greedy = list(client.generate(PROMPT, max_new_tokens=10).token_ids)
    sampled = []
    for seed in (1, 2, 7):
        first = client.generate(PROMPT, max_new_tokens=10, temperature=1.0, top_p=0.9, seed=seed)
        again = client.generate(PROMPT, max_new_tokens=10, temperature=1.0, top_p=0.9, seed=seed)
        assert list(first.token_ids) == list(again.token_ids)
        sampled.append(list(first.token_ids))
    assert any(tokens != greedy for tokens in sampled)  # it really samples


@pytest.mark.parametrize(
    ("call", "code", "field"),
    [
        (lambda c: c.generate("   ", max_new_tokens=4), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        (lambda c: c.generate(PROMPT, max_new_tokens=-3), grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
        (lambda c: c.generate(PROMPT, max_new_tokens=100000), grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
        (lambda c: c.generate(PROMPT, temperature=-1.0), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        (lambda c: c.generate(PROMPT, task="no-such-task"), grpc.StatusCode.NOT_FOUND, "no-such-task"),
        (lambda c: c.generate(PROMPT, task="Bad Name!"), grpc.StatusCode.INVALID_ARGUMENT, "task"),
        (lambda c: c.register("Bad Name!", CODE_DEMOS), grpc.StatusCode.INVALID_ARGUMENT, "name"),
        (lambda c: c.register("empty", []), grpc.StatusCode.INVALID_ARGUMENT, "demos"),
        (lambda c: c.register("blank", ["ok", " "]), grpc.StatusCode.INVALID_ARGUMENT, "demos[1]"),
        (lambda c: c.register("x", CODE_DEMOS, criterion="magic"), grpc.StatusCode.INVALID_ARGUMENT, "criterion"),
        (lambda c: c.register("x", CODE_DEMOS, fraction=1.5), grpc.StatusCode.INVALID_ARGUMENT, "fraction"),
        (lambda c: c.get_task("missing"), grpc.StatusCode.NOT_FOUND, "missing"),
        (lambda c: c.delete_task("missing"), grpc.StatusCode.NOT_FOUND, "missing"),
        (lambda c: c.route(""), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    ],
    ids=[
        "empty-prompt",
        "negative-tokens",
        "huge-tokens",
        "negative-temperature",
        "unknown-task",
        "invalid-task-name",
        "invalid-register-name",
        "no-demos",
        "blank-demo",
        "unknown-criterion",
        "bad-fraction",
        "get-unknown",
        "delete-unknown",
        "route-empty",
    ],
)
def test_bad_input_gets_the_right_code_and_names_the_field(client, call, code, field) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call(client)
    assert info.value.code() == code
    assert field in info.value.details()
    assert client.health() == "SERVING"
    assert len(client.generate(PROMPT, max_new_tokens=2).token_ids) == 2  # still serving


def test_duplicate_registration_is_refused(client) -> None:
    client.register("dup", CODE_DEMOS[:2], experts_per_layer=3, replace=True)
    with pytest.raises(grpc.RpcError) as info:
        client.register("dup", CODE_DEMOS[:2], experts_per_layer=3)
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS and "dup" in info.value.details()
    dry = client.register("dup", CODE_DEMOS, experts_per_layer=5, dry_run=True)
    assert not dry.registered and dry.pattern_experts == 15
    assert client.get_task("dup").pattern_experts == 9  # the dry run changed nothing
    assert client.delete_task("dup")
    assert "dup" not in [t.name for t in client.tasks()]


def test_route_examples_are_indexed_for_retrieval_but_score_no_expert(client, server) -> None:
    example = "Could you tell me how long the walk to the old lighthouse takes?"
    plain = client.register("plain-code", CODE_DEMOS, experts_per_layer=3, replace=True)
    withex = client.register("code-ex", CODE_DEMOS, experts_per_layer=3, replace=True, examples=[example])
    try:
        # The pattern comes from the demos alone: the same experts as without the example.
        assert [list(x.experts) for x in withex.layers] == [list(x.experts) for x in plain.layers]
        # Retrieval indexes the example: the prompt finds its own vector.
        routed = client.route(example)
        assert routed.ranked[0].task == "code-ex" and routed.ranked[0].score > 0.99
        profile = server[0].core.registry.get("code-ex")
        assert profile.examples == [example] and profile.demo_embeddings.shape[0] == len(CODE_DEMOS) + 1
        assert profile.router_inputs.shape[0] == len(CODE_DEMOS) + 1
    finally:
        client.delete_task("plain-code")
        client.delete_task("code-ex")


def test_admin_calls_need_the_token(server, client) -> None:
    _, port = server
    client.register("readable", CODE_DEMOS[:2], experts_per_layer=3, replace=True)
    for token, code in ((None, grpc.StatusCode.UNAUTHENTICATED), ("wrong", grpc.StatusCode.PERMISSION_DENIED)):
        with PreMoeClient(f"127.0.0.1:{port}", admin_token=token, timeout=30) as anonymous:
            with pytest.raises(grpc.RpcError) as info:
                anonymous.register("sneaky", CODE_DEMOS)
            assert info.value.code() == code
            with pytest.raises(grpc.RpcError) as info:
                anonymous.delete_task("readable")
            assert info.value.code() == code
            # Reads stay open: the tasks an admin sees, and a task's pattern.
            names = [t.name for t in anonymous.tasks()]
            assert names == [t.name for t in client.tasks()] and "readable" in names and "sneaky" not in names
            assert anonymous.get_task("readable").pattern_experts == 9
    assert client.delete_task("readable")


def scrape(handle) -> dict[str, float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{handle.metrics_port}/metrics", timeout=10).read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in body.splitlines() if line[:1] != "#"}


def wait_idle(handle, timeout_s: float = 30.0) -> None:
    """Wait until the server has handled every call it was given and holds no request and no pin. A client that
    gave up (its deadline) may return before the server even queued the request, so idleness alone is not enough:
    the calls in progress at the door (metrics' in-flight gauge) must be done too."""
    loop, slots = handle.core.loop, handle.core.patterned.slots.values()

    def busy() -> bool:
        pins = sum(len(layer.pins) for layer in slots)
        return bool(not loop.idle() or pins or handle.metrics.registry.get_sample_value("premoe_calls_in_progress"))

    deadline = time.monotonic() + timeout_s
    while busy() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not busy()


def test_deadline_is_honoured(client, server) -> None:
    handle, _ = server
    tokens = handle.core.loop.stats.tokens
    with pytest.raises(grpc.RpcError) as info:
        client.generate(PROMPT, max_new_tokens=240, timeout=0.05)  # within the tiny model's 256 positions
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_idle(handle)  # the server stopped the work too, and let go of its slots
    assert handle.core.loop.stats.tokens - tokens < 240
    assert sum(len(slots.pins) for slots in handle.core.patterned.slots.values()) == 0
    assert client.health() == "SERVING"


def test_stats_and_metrics(client, server) -> None:
    handle, _ = server
    client.register("metered", CODE_DEMOS[:2], experts_per_layer=3, replace=True)
    client.generate(PROMPT, max_new_tokens=3, task="metered")
    wait_idle(handle)  # a finished row leaves the batch at the end of its step, just after its reply went out
    stats = client.stats()
    resident = sum(len(slots.slot_of) for slots in handle.core.patterned.slots.values())
    assert stats.capacity_experts == 24 and stats.resident_experts == resident >= 9
    assert stats.loads.disk + stats.loads.cache + stats.loads.device > 0 and stats.cache_health == "ok"
    figures = scrape(handle)
    assert figures['premoe_request_seconds_count{code="OK",method="Generate"}'] >= 1
    with pytest.raises(grpc.RpcError):
        client.generate("   ", max_new_tokens=3)  # a failure is counted under its own code, not as OK
    generate_ok = scrape(handle)['premoe_request_seconds_count{code="OK",method="Generate"}']
    assert generate_ok == figures['premoe_request_seconds_count{code="OK",method="Generate"}']
    assert scrape(handle)['premoe_request_seconds_count{code="INVALID_ARGUMENT",method="Generate"}'] >= 1
    assert figures['premoe_task_coverage{task="metered"}'] > 0
    assert figures["premoe_generated_tokens_total"] >= 3 and figures["premoe_engine_steps_total"] >= 2
    assert stats.generated_tokens >= 3 and stats.in_flight == 0 and stats.queued == 0
    assert figures["premoe_queue_seconds_count"] >= 1 and figures["premoe_inflight_requests"] == 0
    assert figures["premoe_expert_evictions_total"] == handle.core.residency.stats.evictions
    assert figures["premoe_batch_rows"] == 0 and figures["premoe_queue_loading"] == 0
    assert figures["premoe_loader_bytes_in_flight"] == 0 and figures["premoe_engine_step_seconds_last"] > 0
    assert figures["premoe_resident_expert_bytes"] > 0
    pool = handle.core.loop.kv
    assert figures["premoe_kv_blocks_held"] == 0 and figures["premoe_kv_blocks"] == pool.blocks  # nothing running
    assert figures["premoe_kv_pool_bytes"] == pool.nbytes() > 0
    assert figures["premoe_kv_reserved_tokens"] == 0  # no cap: nothing is reserved
    assert client.delete_task("metered")
    assert 'premoe_task_coverage{task="metered"}' not in scrape(handle)  # a deleted task's series goes


def test_health_reports_not_serving_while_shutting_down(model_store, embedder, tmp_path: Path) -> None:
    _, store = model_store
    config = ServiceConfig(store=store, profiles=tmp_path, port=0, device="cpu", grace_s=2.0)
    with (
        running_server(config, embedder=embedder) as (handle, port),
        PreMoeClient(f"127.0.0.1:{port}", timeout=10) as c,
    ):
        assert c.health() == "SERVING" and c.health("premoe.v1.PreMoe") == "SERVING"
        # A watcher (a load balancer) hears every change: no sleep that races the shutdown.
        watch = c.health_stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        stopping = asyncio.run_coroutine_threadsafe(handle.stop(grace=2.0), handle.loop)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()
        stopping.result(30)
