"""PreMoe on Ray Serve, on CPU with the tiny model: a local Ray instance, two engine replicas sharing one Redis and one
profile folder, Serve's gRPC proxy in front. A task registered once is served by both replicas, replies equal the
single-process server's, each task's requests stick to one replica, a deleted task stops everywhere, and errors
carry the single server's status codes."""

from __future__ import annotations

import dataclasses
import json
import time
import urllib.request
from collections import Counter

import grpc
import pytest

from premoe_service.client import PreMoeClient
from premoe_service.families.tiny import save_tiny_checkpoint
from premoe_service.server import running_server
from premoe_service.server.gen import premoe_pb2 as pb
from premoe_service.serving import ServiceConfig
from premoe_service.store import shard

from .conftest import free_port

ray = pytest.importorskip("ray", reason="the ray extra is not installed (make setup installs it)")

TOKEN = "s3cret"
TASKS = {
    "code": [
        "def add(a, b):\n    return a + b\n",
        "for i in range(10):\n    print(i)\n",
        "class Point:\n    def __init__(self, x, y):\n        self.x = x\n",
        "import os\nprint(os.getcwd())\n",
    ],
    "prose": [
        "The committee met on Tuesday to discuss the budget for next year.",
        "She walked along the river and watched the boats drift by.",
        "Rain fell softly over the quiet village all afternoon.",
        "The museum opens its new gallery of modern art in the spring.",
    ],
}
PROMPTS = {"code": "def multiply(a, b):", "prose": "The weather in the village was"}
REQUESTS_PER_TASK = 6


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory, redis_server) -> ServiceConfig:
    root = tmp_path_factory.mktemp("ray")
    save_tiny_checkpoint(root / "ckpt", "qwen3_moe")
    shard(root / "ckpt", root / "store", progress=False)
    redis_server.flush()
    return ServiceConfig(
        store=root / "store",
        profiles=root / "profiles",
        redis_url=redis_server.url,
        budget="0.5",  # one task's pattern (4 of 8 experts per layer) per replica
        device="cpu",
        admin_token=TOKEN,
        engine_threads=1,
        max_new_tokens_limit=64,
    )


@pytest.fixture(scope="module")
def ray_ports(config: ServiceConfig):
    """Serve's gRPC and HTTP proxy ports, on a local Ray instance with two engine replicas."""
    from ray import serve

    from premoe_service.ray_serve.app import start
    from premoe_service.ray_serve.settings import RaySettings

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ports = free_port(), free_port()
    try:
        settings = RaySettings(replicas=2, replica_cpus=0.5, ingress_cpus=0.25, tasks_per_replica=1)
        start(config, settings, grpc_port=ports[0], http_port=ports[1])
        yield ports
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_port(ray_ports: tuple[int, int]) -> int:
    return ray_ports[0]


@pytest.fixture(scope="module")
def ray_client(ray_port: int):
    with PreMoeClient(f"127.0.0.1:{ray_port}", admin_token=TOKEN, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def registered(ray_client: PreMoeClient) -> dict[str, pb.TaskInfo]:
    """Both tasks, registered once for the module: every test that serves them asks for this, so that it also
    passes alone, or on a pytest-xdist worker that took it from another's share (with a Ray instance of its own)."""
    return {
        name: ray_client.register(name, demos, description=name, experts_per_layer=4) for name, demos in TASKS.items()
    }


def replica_of(call) -> str:
    """The engine replica that answered (trailing metadata set by the ingress)."""
    return dict(call.trailing_metadata())["premoe-replica"]


def generate(client: PreMoeClient, prompt: str, **options) -> tuple[pb.GenerateResponse, str]:
    reply, call = client.stub.Generate.with_call(client.request(prompt, **options), timeout=120)
    return reply, replica_of(call)


def test_a_task_registered_once_is_served_by_both_replicas_as_the_single_server_serves_it(
    ray_client: PreMoeClient, registered: dict[str, pb.TaskInfo], config: ServiceConfig, embedder
) -> None:
    for name, info in registered.items():
        assert info.name == name and info.pattern_experts == 12
    before = Counter({t.task: t.requests for t in ray_client.stats().tasks})  # other tests' requests, if any ran

    # Each task's first request alone, then a moment: Serve learns which replica holds it (pushed every 0.1 s).
    served: dict[str, list[str]] = {name: [] for name in TASKS}
    ray_replies: dict[tuple[str, bool], pb.GenerateResponse] = {}
    for name in TASKS:
        reply, replica = generate(ray_client, PROMPTS[name], task=name, max_new_tokens=8)
        served[name].append(replica)
        ray_replies[name, True] = reply
        time.sleep(1.0)
    for _ in range(REQUESTS_PER_TASK - 1):
        for name in TASKS:
            reply, replica = generate(ray_client, PROMPTS[name], max_new_tokens=8)  # retrieval in the ingress
            served[name].append(replica)
            ray_replies[name, False] = reply

    # Task affinity: most of a task's requests land on one replica; the two tasks were spread over both.
    for name, replicas in served.items():
        _, count = Counter(replicas).most_common(1)[0]
        assert count / len(replicas) >= 0.8, (name, replicas)
    assert len({Counter(r).most_common(1)[0][0] for r in served.values()}) == 2, served

    # The same requests on the single-process server (its own registry view of the same Redis and folder).
    single = dataclasses.replace(config, port=0)
    with running_server(single, embedder=embedder) as (_, port), PreMoeClient(f"127.0.0.1:{port}") as client:
        for (name, named), ray_reply in ray_replies.items():
            alone = client.generate(PROMPTS[name], task=name if named else None, max_new_tokens=8)
            assert list(ray_reply.token_ids) == list(alone.token_ids) and len(alone.token_ids) == 8
            assert ray_reply.text == alone.text and ray_reply.finish_reason == alone.finish_reason
            assert (ray_reply.stats.task, ray_reply.stats.decision) == (alone.stats.task, alone.stats.decision)
            assert ray_reply.stats.decision == ("override" if named else "match")
            assert ray_reply.stats.pattern_experts == alone.stats.pattern_experts == 12
            assert ray_reply.stats.score == pytest.approx(alone.stats.score, abs=1e-5)

    # The stream carries the same tokens; the deployment's stats sum both replicas' published figures.
    chunks = list(ray_client.stream(PROMPTS["code"], task="code", max_new_tokens=8))
    assert "".join(c.text for c in chunks) == ray_replies["code", True].text
    assert list(chunks[-1].token_ids) == list(ray_replies["code", True].token_ids)
    stats = ray_client.stats()
    assert stats.capacity_experts == 2 * 12  # two replicas, 12 slots each
    counted = Counter({t.task: t.requests for t in stats.tasks})
    counted.subtract(before)
    assert +counted == {"code": REQUESTS_PER_TASK + 1, "prose": REQUESTS_PER_TASK}


def not_found_on_both_replicas(client: PreMoeClient, name: str) -> None:
    answered: set[str] = set()
    for _ in range(40):  # GetTask goes to either replica (Serve's default routing)
        with pytest.raises(grpc.RpcError) as failed:
            client.stub.GetTask.with_call(pb.GetTaskRequest(name=name), timeout=60)
        assert failed.value.code() == grpc.StatusCode.NOT_FOUND
        answered.add(dict(failed.value.trailing_metadata())["premoe-replica"])
        if len(answered) == 2:
            return
    raise AssertionError(f"only replicas {answered} answered")


def test_the_openai_http_door_answers_as_the_single_server(
    ray_client: PreMoeClient, ray_ports: tuple[int, int], config: ServiceConfig, embedder
) -> None:
    openai = pytest.importorskip("openai")
    for name, demos in TASKS.items():
        ray_client.register(name, demos, description=name, experts_per_layer=4, replace=True)
    on_ray = openai.OpenAI(base_url=f"http://127.0.0.1:{ray_ports[1]}/v1", api_key="unused", max_retries=0)
    asks = [("code", PROMPTS["code"]), ("auto", PROMPTS["prose"])]
    replies = [on_ray.completions.create(model=m, prompt=p, max_tokens=8, temperature=0) for m, p in asks]
    chunks = on_ray.completions.create(model="code", prompt=PROMPTS["code"], max_tokens=8, temperature=0, stream=True)
    streamed = "".join(c.choices[0].text for c in chunks)
    with pytest.raises(openai.NotFoundError):
        on_ray.completions.create(model="missing", prompt="x", max_tokens=4)
    held_by = Counter(  # HTTP requests of a task go to the replica holding it too
        on_ray.completions.with_raw_response.create(model="code", prompt=PROMPTS["code"], max_tokens=2).headers[
            "premoe-replica"
        ]
        for _ in range(8)
    )
    assert held_by.most_common(1)[0][1] >= 7, held_by
    assert {"auto", *TASKS} <= {m.id for m in on_ray.models.list().data}

    single = dataclasses.replace(config, port=0, http_port=0)
    with running_server(single, embedder=embedder) as (handle, _):
        alone = openai.OpenAI(base_url=f"http://127.0.0.1:{handle.http_port}/v1", api_key="unused", max_retries=0)
        for (model, prompt), reply in zip(asks, replies, strict=True):
            expected = alone.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
            assert reply.choices[0].text == expected.choices[0].text and reply.usage == expected.usage
            ours, theirs = reply.model_extra["premoe"], expected.model_extra["premoe"]
            assert (ours["task"], ours["decision"]) == (theirs["task"], theirs["decision"])
    assert streamed == replies[0].choices[0].text


def test_load_task_goes_to_the_replica_serve_sends_the_task_to_and_names_it(
    ray_client: PreMoeClient, registered: dict[str, pb.TaskInfo], ray_ports: tuple[int, int]
) -> None:
    """LoadTask with the task as multiplexed model id: the replica that holds it (or will) loads and pins it, the
    reply names it, and the task's next request goes there and finds every expert resident."""
    admin = ray_client._admin()
    loaded, call = ray_client.stub.LoadTask.with_call(pb.LoadTaskRequest(name="code", pin=True), metadata=admin)
    assert list(loaded.replicas) == [replica_of(call)]
    assert loaded.task.residency.pinned and loaded.task.residency.resident_share == 1.0
    time.sleep(1.0)  # Serve learns the replica's holds (pushed every 0.1 s)
    reply, replica = generate(ray_client, PROMPTS["code"], task="code", max_new_tokens=2)
    assert replica == loaded.replicas[0]
    assert (reply.stats.loads.cache, reply.stats.loads.disk) == (0, 0)
    unloaded, call = ray_client.stub.UnloadTask.with_call(pb.UnloadTaskRequest(name="code"), metadata=admin)
    assert list(unloaded.replicas) == [replica_of(call)] == list(loaded.replicas) and unloaded.was_pinned
    with pytest.raises(grpc.RpcError) as missing:
        ray_client.load_task("missing")
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as no_token:
        ray_client.stub.LoadTask(pb.LoadTaskRequest(name="code"))
    assert no_token.value.code() == grpc.StatusCode.UNAUTHENTICATED

    # The HTTP path goes the same way; the replica is in the reply's header.
    def post(path: str, body: bytes) -> tuple[dict, str]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{ray_ports[1]}{path}", body, method="POST", headers={"authorization": f"Bearer {TOKEN}"}
        )
        with urllib.request.urlopen(request, timeout=120) as answer:
            return json.loads(answer.read()), answer.headers["premoe-replica"]

    body, held_by = post("/v1/tasks/prose/load", b'{"pin": true}')
    assert body["task"]["residency"]["pinned"] and body["task"]["residency"]["resident_share"] == 1.0
    time.sleep(1.0)
    assert generate(ray_client, PROMPTS["prose"], task="prose", max_new_tokens=2)[1] == held_by
    body, unloaded_by = post("/v1/tasks/prose/unload", b"")
    assert body["was_pinned"] and unloaded_by == held_by


def test_a_deleted_task_stops_on_every_replica_and_stays_deleted_after_reseeding(
    ray_client: PreMoeClient, registered: dict[str, pb.TaskInfo], redis_server
) -> None:
    ray_client.register("gone", TASKS["prose"], experts_per_layer=4, replace=True)
    assert ray_client.delete_task("gone")
    not_found_on_both_replicas(ray_client, "gone")
    redis_server.flush()  # Redis loses everything: the next registry access re-seeds it from the shared folder
    assert {t.name for t in ray_client.tasks()} == set(TASKS)
    not_found_on_both_replicas(ray_client, "gone")
    with pytest.raises(grpc.RpcError) as failed:
        ray_client.generate(PROMPTS["prose"], task="gone", max_new_tokens=4)
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND and "gone" in (failed.value.details() or "")


@pytest.mark.parametrize(
    ("call", "code", "field"),
    [
        (lambda c: c.generate("   ", max_new_tokens=4), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        (lambda c: c.generate("x", max_new_tokens=100000), grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
        (lambda c: c.generate("x", task="Bad Name!"), grpc.StatusCode.INVALID_ARGUMENT, "task"),
        (lambda c: c.generate("x" * 300_000, max_new_tokens=4), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        (lambda c: list(c.stream("x", task="missing")), grpc.StatusCode.NOT_FOUND, "missing"),
        (lambda c: c.register("x", []), grpc.StatusCode.INVALID_ARGUMENT, "demos"),
        (lambda c: c.get_task("missing"), grpc.StatusCode.NOT_FOUND, "missing"),
    ],
    ids=[
        "empty-prompt",
        "huge-tokens",
        "bad-task-name",
        "huge-prompt",
        "stream-unknown-task",
        "no-demos",
        "unknown-task",
    ],
)
def test_errors_carry_the_single_servers_status_codes(ray_client: PreMoeClient, call, code, field) -> None:
    with pytest.raises(grpc.RpcError) as failed:
        call(ray_client)
    assert failed.value.code() == code
    assert field in (failed.value.details() or "")


def test_admin_calls_need_the_token_without_our_interceptor(ray_port: int) -> None:
    with PreMoeClient(f"127.0.0.1:{ray_port}", timeout=60) as anonymous:
        with pytest.raises(grpc.RpcError) as failed:
            anonymous.register("sneaky", TASKS["code"], experts_per_layer=4)
        assert failed.value.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
        assert "sneaky" not in {t.name for t in anonymous.tasks()}


def test_undecodable_request_bytes_are_invalid_argument_naming_the_field(ray_client: PreMoeClient) -> None:
    raw = ray_client.channel.unary_unary("/premoe.v1.PreMoe/Generate")  # bytes in, bytes out
    with pytest.raises(grpc.RpcError) as failed:
        raw(b"\x0a\x02\xff\xfe", timeout=60)  # field 1 (prompt): two bytes that are not UTF-8
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt" in (failed.value.details() or "")


def test_an_engine_replica_that_dies_is_replaced_and_the_replacement_serves_the_shared_tasks(
    ray_client: PreMoeClient, registered: dict[str, pb.TaskInfo]
) -> None:
    """Last in the module: it kills a replica. Meanwhile clients get answers or UNAVAILABLE, never another code."""
    reply, victim = generate(ray_client, PROMPTS["code"], task="code", max_new_tokens=4)
    ray.kill(ray.get_actor(f"SERVE_REPLICA::premoe#PreMoeEngine#{victim}", namespace="serve"), no_restart=True)
    seen: set[str] = set()
    deadline = time.monotonic() + 180  # a bound on waiting for Serve to start the replacement, not a measurement
    while time.monotonic() < deadline:
        try:
            again, replica = generate(ray_client, PROMPTS["code"], task="code", max_new_tokens=4)
            assert list(again.token_ids) == list(reply.token_ids) and replica != victim
            _, call = ray_client.stub.GetTask.with_call(pb.GetTaskRequest(name="code"), timeout=60)
            seen.add(replica_of(call))
        except grpc.RpcError as failed:
            assert failed.code() == grpc.StatusCode.UNAVAILABLE, failed.details()
        if len(seen) == 2:  # the survivor and the replacement both answer for the task registered before
            break
        time.sleep(0.2)
    assert len(seen) == 2 and victim not in seen, seen
