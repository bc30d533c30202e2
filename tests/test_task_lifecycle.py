"""The task lifecycle over real gRPC, HTTP and the CLI: LoadTask warms a task so that its requests load nothing, a
pin holds while other tasks churn a tight budget, UnloadTask releases the bytes, refusals and the admin token."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch

from premoe_service.cli import main
from premoe_service.client import PreMoeClient
from premoe_service.profiler import Profile, Selection
from premoe_service.server import running_server
from premoe_service.serving import ServiceConfig
from premoe_service.store import Store

pytestmark = pytest.mark.usefixtures("one_thread")

TOKEN = "lifecycle-token"
TASKS = ("a", "b", "c", "d")  # task i keeps experts 2i and 2i+1 of every layer: patterns that share no expert
BUDGET = "0.5"  # 4 of the tiny model's 8 experts per layer: two tasks side by side


def profile(store: Path, name: str, first: int, embedder, created: str = "2026-12-01T00:00:00+00:00") -> Profile:
    """A task keeping experts `first` and `first + 1` of every layer."""
    spec = Store(store)
    layers = tuple(spec.manifest.moe_layers)
    scores = torch.full((len(layers), spec.manifest.num_experts), 0.01)
    scores[:, first : first + 2] = 1.0
    demos = [f"task {name} demo {i}" for i in range(2)]
    return Profile(
        name=name,
        fingerprint=spec.fingerprint,
        moe_layers=layers,
        scores={"tcess": scores},
        demo_embeddings=torch.from_numpy(embedder.encode(demos)),
        embedder=embedder.name,
        selection=Selection("tcess", "top_k", 2, "experts").to_json(),
        demos=demos,
        created=created,
    )


def write_profiles(store: Path, folder: Path, embedder) -> None:
    for index, name in enumerate(TASKS):
        profile(store, name, 2 * index, embedder).save(folder / f"{name}.safetensors")


@pytest.fixture(scope="module")
def server(tiny_store: Path, embedder, tmp_path_factory: pytest.TempPathFactory):
    profiles = tmp_path_factory.mktemp("lifecycle-profiles")
    write_profiles(tiny_store, profiles, embedder)
    config = ServiceConfig(
        store=tiny_store,
        profiles=profiles,
        port=0,
        http_port=0,
        device="cpu",
        budget=BUDGET,
        admin_token=TOKEN,
        route_signal=False,
        lease_timeout_s=2.0,
        engine_threads=1,
    )
    with running_server(config, embedder=embedder) as (handle, port):
        yield handle, port


@pytest.fixture
def client(server) -> Iterator[PreMoeClient]:
    """An admin client; every task is unloaded after the test, so that each starts from released slots."""
    _, port = server
    with PreMoeClient(f"127.0.0.1:{port}", admin_token=TOKEN, timeout=60) as c:
        for name in TASKS:
            c.unload_task(name)
        yield c
        for name in TASKS:
            c.unload_task(name)


def generate(client: PreMoeClient, task: str):
    return client.generate("the quick brown fox", task=task, max_new_tokens=3).stats


def residency(client: PreMoeClient, task: str):
    return client.get_task(task).residency


# --- gRPC ---------------------------------------------------------------------------------------------------------


def test_a_loaded_task_is_served_with_no_load_on_the_requests_path(client: PreMoeClient) -> None:
    assert residency(client, "a").resident_share == 0.0
    reply = client.load_task("a")
    assert reply.loads.cache + reply.loads.disk == 6 and reply.loads.device == 0  # 2 experts x 3 layers
    assert reply.loads.bytes > 0 and reply.replicas == []
    state = reply.task.residency
    assert state.resident_share == 1.0 and state.resident_experts == 6 and dict(state.precisions) == {"full": 6}
    assert not state.pinned and not state.loading
    stats = generate(client, "a")
    assert (stats.loads.device, stats.loads.cache, stats.loads.disk, stats.loads.bytes) == (6, 0, 0, 0)
    again = client.load_task("a")  # already resident: nothing moves
    assert (again.loads.device, again.loads.cache + again.loads.disk) == (6, 0)


def test_a_task_not_loaded_loads_on_its_requests_path(client: PreMoeClient) -> None:
    """The contrast of the test above: the same request without LoadTask pays for its experts."""
    stats = generate(client, "b")
    assert stats.loads.cache + stats.loads.disk == 6 and stats.loads.device == 0


def churn(client: PreMoeClient) -> None:
    for _ in range(2):
        for task in ("b", "c", "d"):
            generate(client, task)


def test_a_pin_holds_while_other_tasks_churn_the_budget(client: PreMoeClient) -> None:
    client.load_task("a")
    churn(client)  # b, c and d take turns in the two slots per layer a leaves, then in a's: it is evicted
    assert residency(client, "a").resident_share < 1.0

    pinned = client.load_task("a", pin=True)
    assert pinned.task.residency.pinned and pinned.task.residency.resident_share == 1.0
    churn(client)  # the others still run, in the slots a leaves them
    state = residency(client, "a")
    assert state.pinned and state.resident_share == 1.0
    stats = generate(client, "a")
    assert (stats.loads.cache, stats.loads.disk) == (0, 0)
    listed = {info.name: info.residency for info in client.tasks()}
    assert listed["a"].pinned and not any(listed[t].pinned for t in ("b", "c", "d"))


def test_a_task_reports_loading_while_its_copies_are_held(server, client: PreMoeClient) -> None:
    """The loader's gate (shut) holds the copies: LoadTask waits and the task says `loading` until it opens."""
    handle, _ = server
    gate = handle.core.loop.loader.gate
    gate.clear()
    try:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(client.load_task, "d")
            deadline = time.monotonic() + 30
            while not residency(client, "d").loading:
                assert time.monotonic() < deadline and not pending.done()
                time.sleep(0.02)
            assert residency(client, "d").resident_share == 0.0
            gate.set()
            assert pending.result(timeout=30).task.residency.resident_share == 1.0
    finally:
        gate.set()
    assert not residency(client, "d").loading


def test_a_pin_taken_while_other_tasks_stream_waits_for_their_slots(client: PreMoeClient) -> None:
    """Three clients keep b, c and d running (their requests pin the slots in turn) while a is loaded and pinned:
    the load waits for a turn, every request succeeds, and the others keep being served beside the pin."""
    stop = threading.Event()
    served: list[str] = []
    errors: list[BaseException] = []

    def keep_asking(task: str) -> None:
        while not stop.is_set():
            try:
                generate(client, task)
                served.append(task)
            except BaseException as exc:
                errors.append(exc)
                return

    threads = [threading.Thread(target=keep_asking, args=(task,)) for task in ("b", "c", "d")]
    for thread in threads:
        thread.start()
    try:
        while len(served) < 3:
            time.sleep(0.01)
        reply = client.load_task("a", pin=True, timeout_s=30)
        before = len(served)
        while len(served) < before + 6 and not errors:
            time.sleep(0.01)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    assert not errors, errors
    assert reply.task.residency.pinned and residency(client, "a").resident_share == 1.0
    assert (generate(client, "a").loads.disk, generate(client, "a").loads.cache) == (0, 0)


def test_unload_releases_the_bytes(client: PreMoeClient, tiny_store: Path) -> None:
    client.load_task("a", pin=True)
    before = client.stats().resident_bytes
    reply = client.unload_task("a")
    assert reply.was_pinned and reply.released_experts == 6
    assert reply.released_bytes == 6 * Store(tiny_store).manifest.expert_nbytes
    assert client.stats().resident_bytes == before - reply.released_bytes
    state = reply.task.residency
    assert state.resident_share == 0.0 and not state.pinned and dict(state.precisions) == {}
    assert not client.unload_task("a").was_pinned  # unloading twice is no error


def test_a_pin_that_cannot_fit_is_refused_naming_the_pinned_bytes(client: PreMoeClient, tiny_store: Path) -> None:
    client.load_task("a", pin=True)
    client.load_task("b", pin=True)
    with pytest.raises(grpc.RpcError) as refused:
        client.load_task("c", pin=True)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = refused.value.details()
    pinned_bytes = 12 * Store(tiny_store).manifest.expert_nbytes
    assert "a, b" in details and f"{pinned_bytes} bytes" in details, details
    with pytest.raises(grpc.RpcError) as waited:  # without a pin it waits for slots, which the pins never free
        client.load_task("c", timeout_s=0.3)
    assert waited.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "timeout_s" in waited.value.details()
    assert residency(client, "a").resident_share == 1.0 and residency(client, "b").resident_share == 1.0
    client.unload_task("b")
    assert client.load_task("c", pin=True).task.residency.pinned  # room again


def test_deleting_a_pinned_task_drops_its_pin(server, client: PreMoeClient, tiny_store: Path, embedder) -> None:
    handle, _ = server
    handle.core.registry.register(profile(tiny_store, "e", 2, embedder))  # b's experts
    try:
        client.load_task("e", pin=True)
        client.load_task("a", pin=True)
        with pytest.raises(grpc.RpcError) as refused:
            client.load_task("c", pin=True)
        assert "a, e" in refused.value.details()
    finally:
        client.delete_task("e")
    assert client.load_task("c", pin=True).task.residency.pinned  # e's slots are free again


def test_a_replaced_task_stays_pinned_until_loaded_again(
    server, client: PreMoeClient, tiny_store: Path, embedder
) -> None:
    handle, _ = server
    registry = handle.core.registry
    registry.register(profile(tiny_store, "f", 0, embedder))
    try:
        client.load_task("f", pin=True)
        registry.register(
            profile(tiny_store, "f", 4, embedder, "2026-12-02T00:00:00+00:00"), replace=True
        )  # now c's experts
        state = residency(client, "f")
        assert state.pinned and state.resident_share == 0.0  # the pin holds the old pattern's experts
        client.load_task("a", pin=True)  # the same experts as f's old pattern: they fit
        moved = client.load_task("f", pin=True).task.residency  # the pin moves to the new pattern
        assert moved.pinned and moved.resident_share == 1.0
        client.unload_task("a")
        # Had f's old pin stayed, a's experts would still be pinned and b would not fit beside f.
        assert client.load_task("b", pin=True, timeout_s=0.5).task.residency.pinned
    finally:
        client.delete_task("f")


@pytest.mark.parametrize(
    ("call", "code", "field"),
    [
        (lambda c: c.load_task("nope"), grpc.StatusCode.NOT_FOUND, "nope"),
        (lambda c: c.unload_task("nope"), grpc.StatusCode.NOT_FOUND, "nope"),
        (lambda c: c.load_task("Bad Name"), grpc.StatusCode.INVALID_ARGUMENT, "name"),
        (lambda c: c.unload_task(""), grpc.StatusCode.INVALID_ARGUMENT, "name"),
        (lambda c: c.load_task("a", timeout_s=-1.0), grpc.StatusCode.INVALID_ARGUMENT, "timeout_s"),
        (lambda c: c.load_task("a", timeout_s=float("nan")), grpc.StatusCode.INVALID_ARGUMENT, "timeout_s"),
    ],
)
def test_bad_loads_are_refused_with_their_code_and_field(client: PreMoeClient, call, code, field) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        call(client)
    assert refused.value.code() == code and field in refused.value.details()


def test_load_and_unload_need_the_admin_token(server) -> None:
    _, port = server
    for token, code in ((None, grpc.StatusCode.UNAUTHENTICATED), ("wrong", grpc.StatusCode.PERMISSION_DENIED)):
        with PreMoeClient(f"127.0.0.1:{port}", admin_token=token, timeout=30) as c:
            for call in (lambda: c.load_task("a", pin=True), lambda: c.unload_task("a")):
                with pytest.raises(grpc.RpcError) as refused:
                    call()
                assert refused.value.code() == code
            assert not c.get_task("a").residency.pinned  # listing stays an inference call


# --- a precision plan ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def int8_server(embedder, tmp_path_factory: pytest.TempPathFactory):
    """The tiny model's store with int8 copies, served with two int8 slots per layer beside the full ones."""
    from premoe_service.families.tiny import save_tiny_checkpoint
    from premoe_service.store import shard
    from premoe_service.store.quantized_copies import add_precisions

    root = tmp_path_factory.mktemp("lifecycle-int8")
    save_tiny_checkpoint(root / "ckpt", "qwen3_moe")
    shard(root / "ckpt", root / "store", progress=False)
    add_precisions(root / "store", ("int8",), 16, progress=False)
    (root / "profiles").mkdir()
    write_profiles(root / "store", root / "profiles", embedder)
    config = ServiceConfig(
        store=root / "store",
        profiles=root / "profiles",
        port=0,
        device="cpu",
        budget=BUDGET,
        precision_slots="int8=2",
        route_signal=False,
        engine_threads=1,
    )
    with running_server(config, embedder=embedder) as (_, port), PreMoeClient(f"127.0.0.1:{port}", timeout=60) as c:
        yield c, f"127.0.0.1:{port}"


def test_a_task_loaded_at_a_lower_precision_is_served_at_it_until_loaded_again(int8_server) -> None:
    client, _ = int8_server
    assert dict(generate(client, "a").precisions) == {"full": 6}
    reply = client.load_task("a", precision="int8")
    assert dict(reply.task.residency.precisions) == {"int8": 6} and reply.task.residency.resident_share == 1.0
    assert reply.loads.cache + reply.loads.disk == 6  # the int8 copies, not the resident full experts
    stats = generate(client, "a")
    assert dict(stats.precisions) == {"int8": 6} and (stats.loads.cache, stats.loads.disk) == (0, 0)
    assert all(dict(layer.precisions) == dict.fromkeys(layer.experts, "int8") for layer in client.get_task("a").layers)
    client.load_task("a")  # its own plan again: full precision
    assert dict(generate(client, "a").precisions) == {"full": 6}
    client.load_task("b", precision="int8", pin=True)
    client.unload_task("b")  # unload, too, gives the task back its own plan
    assert dict(generate(client, "b").precisions) == {"full": 6}
    for precision, why in (("int4", "--precision-slots"), ("int7", "unknown precision")):
        with pytest.raises(grpc.RpcError) as refused:
            client.load_task("a", precision=precision)
        details = refused.value.details()
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "precision" in details and why in details


def test_a_server_without_precision_slots_refuses_a_precision_plan(client: PreMoeClient) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        client.load_task("a", precision="int8")
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "precision" in refused.value.details()
    assert dict(generate(client, "a").precisions) == {"full": 6}


# --- HTTP ---------------------------------------------------------------------------------------------------------


def http(server, method: str, path: str, body: bytes | None = None, token: str | None = TOKEN):
    handle, _ = server
    headers = {"authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(
        f"http://127.0.0.1:{handle.http_port}{path}", data=body, method=method, headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_http_paths_load_list_and_unload(server, client: PreMoeClient) -> None:
    status, body = http(server, "POST", "/v1/tasks/a/load", json.dumps({"pin": True}).encode())
    assert status == 200, body
    assert body["task"]["residency"]["pinned"] and body["task"]["residency"]["resident_share"] == 1.0
    assert body["loads"]["cache"] + body["loads"]["disk"] == 6
    status, listed = http(server, "GET", "/v1/tasks")
    assert status == 200 and [t["name"] for t in listed["data"]] == list(TASKS)
    rows = {t["name"]: t["residency"] for t in listed["data"]}
    assert rows["a"]["pinned"] and rows["a"]["precisions"] == {"full": 6} and not rows["b"]["pinned"]
    first = listed["data"][0]
    assert first["pattern_precisions"] == {"full": 6} and first["experts_in_part"] == 0
    status, one = http(server, "GET", "/v1/tasks/a")  # GetTask's view: the pattern per layer
    assert status == 200 and one["name"] == "a" and one["residency"]["pinned"]
    assert sum(len(layer["experts"]) for layer in one["layers"]) == 6
    assert all(layer["precisions"] == {} and layer["channels"] == {} for layer in one["layers"])
    assert http(server, "GET", "/v1/tasks/nope")[0] == 404
    stats = generate(client, "a")
    assert (stats.loads.device, stats.loads.cache, stats.loads.disk) == (6, 0, 0)
    status, body = http(server, "POST", "/v1/tasks/b/load")  # no body: the defaults (no pin)
    assert status == 200 and not body["task"]["residency"]["pinned"]
    status, body = http(server, "POST", "/v1/tasks/a/unload")
    assert status == 200 and body["was_pinned"] and body["released_experts"] == 6
    assert body["task"]["residency"]["resident_share"] == 0.0


def test_http_refusals_and_their_statuses(server, client: PreMoeClient) -> None:
    assert http(server, "POST", "/v1/tasks/a/load", b'{"pin": true}')[0] == 200
    assert http(server, "POST", "/v1/tasks/b/load", b'{"pin": true}')[0] == 200
    status, body = http(server, "POST", "/v1/tasks/c/load", b'{"pin": true}')
    assert status == 429 and body["error"]["code"] == "resource_exhausted"
    assert "a, b" in body["error"]["message"] and "bytes pinned" in body["error"]["message"]
    cases = [
        ("POST", "/v1/tasks/nope/load", None, 404, None),
        ("POST", "/v1/tasks/Bad/load", None, 400, "name"),
        ("POST", "/v1/tasks/a/load", b'{"pin": "yes"}', 400, "pin"),
        ("POST", "/v1/tasks/a/load", b'{"timeout_s": -2}', 400, "timeout_s"),
        ("POST", "/v1/tasks/a/load", b'{"pinned": true}', 400, "pinned"),
        ("POST", "/v1/tasks/a/load", b'{"precision": "int7"}', 400, "precision"),
        ("POST", "/v1/tasks/a/load", b'{"precision": false}', 400, "precision"),
        ("POST", "/v1/tasks/a/load", b'{"precision": "int8"}', 400, "precision"),  # no int8 slots here
        ("POST", "/v1/tasks/a/load", b"[1]", 400, "body"),
        ("POST", "/v1/tasks/a/load", b"{", 400, "body"),
        ("POST", "/v1/tasks/a/unload", b'{"pin": false}', 400, "pin"),
        ("GET", "/v1/tasks/a/load", None, 405, None),
    ]
    for method, path, body_bytes, want, param in cases:
        status, body = http(server, method, path, body_bytes)
        assert status == want, (path, body_bytes, body)
        if param is not None:
            assert body["error"]["param"] == param, body


def test_http_paths_need_the_admin_token(server, client: PreMoeClient) -> None:
    for token, want in ((None, 401), ("wrong", 403)):
        gets = ("GET", "/v1/tasks"), ("GET", "/v1/tasks/a")
        for method, path in (*gets, ("POST", "/v1/tasks/a/load"), ("POST", "/v1/tasks/a/unload")):
            assert http(server, method, path, None, token)[0] == want, (path, token)
    assert not residency(client, "a").pinned


# --- CLI ------------------------------------------------------------------------------------------------------------


def test_cli_load_and_unload(server, client: PreMoeClient, capsys: pytest.CaptureFixture[str]) -> None:
    _, port = server
    where = ["--server", f"127.0.0.1:{port}", "--admin-token", TOKEN]
    assert main(["load", "a", "--pin", *where]) == 0
    out = capsys.readouterr().out
    assert "task a loaded and pinned: 100% resident (6/6 experts, full 6), pinned" in out, out
    assert residency(client, "a").pinned
    stats = generate(client, "a")
    assert (stats.loads.device, stats.loads.cache, stats.loads.disk) == (6, 0, 0)
    assert main(["load", "b", "--pin", *where]) == 0
    capsys.readouterr()
    assert main(["load", "c", "--pin", *where]) == 1  # an RPC that failed
    err = capsys.readouterr().err
    assert "RESOURCE_EXHAUSTED" in err and "a, b" in err, err
    assert main(["tasks", "--server", f"127.0.0.1:{port}"]) == 0
    listing = capsys.readouterr().out
    assert any(line.startswith("a ") and "pinned" in line for line in listing.splitlines()), listing
    assert main(["unload", "a", *where]) == 0
    assert "task a unloaded (was pinned): released 6 experts" in capsys.readouterr().out
    assert main(["load", "a", "--server", f"127.0.0.1:{port}", "--admin-token", "wrong"]) == 1
    assert "PERMISSION_DENIED" in capsys.readouterr().err


# --- the pressure benchmark's measurement ---------------------------------------------------------------------------


def test_the_pressure_bench_counts_tokens_latency_and_bytes_moved(server, client: PreMoeClient) -> None:
    """`premoe bench pressure`'s figures of one budget, against this server (4 tasks, 2 fit at a time)."""
    from premoe_service.bench.pressure import measure
    from premoe_service.bench.serve.clients import Req

    _, port = server
    requests = [Req(i, TASKS[i % 4], "the quick brown fox", 3) for i in range(24)]
    before = client.stats()
    row = measure(f"127.0.0.1:{port}", requests, 4, list(TASKS))
    after = client.stats()
    assert row["requests"] == 24 and row["failures"] == 0
    assert 0 < row["tokens"] <= 24 * 3 and row["tokens_per_s"] > 0
    assert sorted(row["p99_ms"]) == list(TASKS) and row["worst_p99_ms"] == max(row["p99_ms"].values())
    assert 0 < row["bytes_moved"] <= after.loads.bytes - before.loads.bytes  # the churn of 4 tasks in 2 tasks' slots
    assert row["evictions"] > 0
    assert row["precision_share"] == {"full": 1.0} and row["demoted_token_share"] == 0.0


def test_the_pressure_bench_can_serve_every_task_at_a_lower_precision(int8_server) -> None:
    from premoe_service.bench.pressure import measure
    from premoe_service.bench.serve.clients import Req

    client, target = int8_server
    requests = [Req(i, ("a", "b")[i % 2], "the quick brown fox", 2) for i in range(6)]
    row = measure(target, requests, 2, ["a", "b"], load_precision="int8", demote_to="int8")
    assert row["failures"] == 0 and row["tokens"] > 0
    assert row["precision_share"] == {"int8": 1.0} and row["demoted_token_share"] == 0.0  # loaded so, not demoted
    assert dict(generate(client, "b").precisions) == {"int8": 6}  # held until loaded again
    for task in ("a", "b"):
        client.load_task(task)


def test_the_pressure_bench_reports_medians_over_its_rounds() -> None:
    """`premoe bench pressure --rounds`: a server's figures are the medians over the interleaved rounds (tokens/s,
    each task's p99, bytes moved per round), failures and tokens summed, shares weighted by tokens."""
    from premoe_service.bench.pressure import combine

    def round_(tok_s: float, p99: dict[str, float], tokens: int, share: dict[str, float], moved: int) -> dict:
        return {
            "requests": 10, "failures": 1 if tok_s < 50 else 0, "failure_messages": ["x"] if tok_s < 50 else [],
            "tokens": tokens, "wall_s": tokens / tok_s, "tokens_per_s": tok_s, "p99_ms": p99,
            "worst_p99_ms": max(p99.values()), "worst_p99_task": max(p99, key=lambda t: p99[t]),
            "bytes_moved": moved, "experts_loaded": moved // 10, "evictions": moved // 100, "capacity_experts": 8,
            "demoted_token_share": share.get("int8", 0.0), "precision_share": share,
        }  # fmt: skip

    rounds = [
        round_(100.0, {"a": 10.0, "b": 30.0}, 100, {"full": 1.0}, 1000),
        round_(40.0, {"a": 50.0, "b": 20.0}, 100, {"full": 0.5, "int8": 0.5}, 3000),
        round_(80.0, {"a": 20.0, "b": 25.0}, 200, {"int8": 1.0}, 2000),
    ]
    row = combine(rounds)
    assert row["tokens_per_s"] == 80.0  # the median round, not the mean (73.3) or the total's rate
    assert row["p99_ms"] == {"a": 20.0, "b": 25.0} and row["worst_p99_ms"] == 25.0 and row["worst_p99_task"] == "b"
    assert row["requests"] == 30 and row["failures"] == 1 and row["failure_messages"] == ["x"] and row["tokens"] == 400
    assert row["bytes_moved"] == 2000 and row["evictions"] == 20
    assert row["precision_share"] == pytest.approx({"full": 0.375, "int8": 0.625})
    assert row["demoted_token_share"] == pytest.approx(0.625)
    assert [r["tokens_per_s"] for r in row["rounds"]] == [100.0, 40.0, 80.0]
