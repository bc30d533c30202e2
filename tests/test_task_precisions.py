"""A task's mixed-precision plan over real gRPC: registered with precisions, shown per expert by GetTask, the
`premoe tasks` verb and the HTTP door; a drop-only task shows no lowered experts; bad requests name the field."""

from __future__ import annotations

import json
import urllib.request

import grpc
import pytest

from premoe_service.cli import main as cli
from premoe_service.client import PreMoeClient
from premoe_service.families.tiny import save_tiny_checkpoint
from premoe_service.pattern import FULL
from premoe_service.profiler import Profile
from premoe_service.profiler.precision_plan import select_precisions, store_options
from premoe_service.server import running_server
from premoe_service.serving import ServiceConfig
from premoe_service.store import Store, shard
from premoe_service.store.quantized_copies import add_precisions

DEMOS = ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i)\n", "import os\nprint(os.sep)\n"]
LOWER = ("int4", "int2")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, embedder):
    root = tmp_path_factory.mktemp("task-precisions")
    save_tiny_checkpoint(root / "ckpt", "qwen3_moe")
    shard(root / "ckpt", root / "store", progress=False)
    add_precisions(root / "store", LOWER, 8, progress=False)
    config = ServiceConfig(store=root / "store", profiles=root / "profiles", port=0, http_port=0, device="cpu")
    with running_server(config, embedder=embedder) as (handle, port), PreMoeClient(f"127.0.0.1:{port}") as client:
        yield client, handle, port, root


def test_get_task_shows_each_experts_precision_of_the_plan(served, capsys) -> None:
    client, handle, port, root = served
    info = client.register("code", DEMOS, fraction=0.3, precisions=list(LOWER), replace=True)
    shown = client.get_task("code")
    assert [(x.layer, list(x.experts), dict(x.precisions)) for x in shown.layers] == [
        (x.layer, list(x.experts), dict(x.precisions)) for x in info.layers
    ]

    # The plan the server stored, chosen again here from the profile it saved: the same experts and precisions.
    store = Store(root / "store")
    profile = Profile.load(root / "profiles" / "code.safetensors")
    options = store_options(store, precisions=(FULL, *LOWER))
    budget = int(0.3 * store.manifest.total_expert_bytes)
    spec_layers = store.manifest.moe_layers
    plan = select_precisions(profile.score(profile.selection["criterion"]), _spec(store), options, budget)
    assert [x.layer for x in shown.layers] == list(spec_layers)
    for layer in shown.layers:
        assert list(layer.experts) == list(plan.pattern.kept(layer.layer))
        assert dict(layer.precisions) == dict(plan.pattern.precisions.get(layer.layer, {}))
        assert set(layer.precisions) <= set(layer.experts) and set(layer.precisions.values()) <= set(LOWER)
    lowered = [p for layer in shown.layers for p in layer.precisions.values()]
    assert lowered and len(lowered) < shown.pattern_experts  # a real mix: some lowered, some full

    # Bytes: full experts at the store's size, lowered ones at their packed size (scales included), in the budget.
    counted = sum(options[layer.precisions.get(e, FULL)].nbytes for layer in shown.layers for e in layer.experts)
    assert shown.pattern_bytes == counted <= budget

    # The CLI verb that shows a task marks each lowered expert; the HTTP door counts them per precision.
    first = shown.layers[0]
    marked = [f"{e}:{first.precisions[e]}" if e in first.precisions else str(e) for e in first.experts]
    out = _cli_out(capsys, ["tasks", "code", "--server", f"127.0.0.1:{port}"])
    assert f"layer {first.layer:>3}: [{', '.join(marked)}]" in out
    model = _http_json(handle.http_port, "/v1/models/code")
    assert model["premoe"]["lowered_experts"] == {p: lowered.count(p) for p in sorted(set(lowered))}


def test_a_drop_only_task_shows_no_lowered_experts(served, capsys) -> None:
    client, handle, port, _ = served
    client.register("plain", DEMOS, fraction=0.5, replace=True)
    shown = client.get_task("plain")
    assert shown.pattern_experts == 12 and all(not layer.precisions for layer in shown.layers)
    assert _http_json(handle.http_port, "/v1/models/plain")["premoe"]["lowered_experts"] == {}
    out = _cli_out(capsys, ["tasks", "plain", "--server", f"127.0.0.1:{port}"])
    rows = [line.split(": ", 1)[1] for line in out.splitlines() if line.lstrip().startswith("layer")]
    assert len(rows) == 3 and all(":" not in row for row in rows)


def test_generating_with_a_mixed_task_is_refused_naming_the_precision(served) -> None:
    """A server without slots for a task's precisions (no `--precision-slots`) refuses it clearly instead of
    serving its experts quietly at full precision; the fallback pattern holds its experts at full precision."""
    client = served[0]
    client.register("mixed", DEMOS, fraction=0.3, precisions=["int2"], replace=True)
    with pytest.raises(grpc.RpcError) as info:
        client.generate("def add(a, b):", task="mixed", max_new_tokens=2)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "precision" in info.value.details()
    client.register("drop-only", DEMOS, fraction=0.5, replace=True)
    assert len(client.generate("def add(a, b):", task="drop-only", max_new_tokens=2).token_ids) == 2
    book = served[1].core.tasks
    fallback = book.fallback_pattern(["mixed", "drop-only"], capacity=8)
    assert (
        not fallback.mixed
        and fallback.layers
        == book.pattern(book.registry.get("mixed")).union(book.pattern(book.registry.get("drop-only"))).layers
    )


@pytest.mark.parametrize(
    ("options", "field", "words"),
    [
        ({"fraction": 0.3, "precisions": ["int5"]}, "precisions", "unknown precision"),
        ({"fraction": 0.3, "precisions": ["int3"]}, "precisions", "holds no"),  # the store has int4 and int2 only
        ({"experts_per_layer": 3, "precisions": ["int4"]}, "precisions", "byte budget"),
        ({"bytes": 1000, "precisions": ["int2"]}, "bytes", "below"),  # under top-k experts per layer at int2
    ],
    ids=["unknown", "not-in-store", "not-a-byte-budget", "budget-too-small"],
)
def test_bad_precision_requests_name_the_field(served, options, field, words) -> None:
    client = served[0]
    with pytest.raises(grpc.RpcError) as info:
        client.register("bad", DEMOS, **options)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in info.value.details() and words in info.value.details()
    assert "bad" not in [t.name for t in client.tasks()]


def test_a_plan_the_server_has_no_slots_for_is_listed_unloaded_and_refused_a_load(served) -> None:
    client = served[0]
    info = client.register("code", DEMOS, fraction=0.3, precisions=list(LOWER), replace=True)
    lowered = sum(len(layer.precisions) for layer in info.layers)
    state = client.get_task("code").residency
    assert state.resident_experts <= info.pattern_experts - lowered and "int4" not in state.precisions
    assert {t.name: t.residency.resident_share < 1.0 for t in client.tasks()}["code"]
    assert not client.unload_task("code").was_pinned
    with pytest.raises(grpc.RpcError) as refused:
        client.load_task("code")
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "precision" in refused.value.details()


def _spec(store: Store):
    from premoe_service.cli.shared import store_spec

    return store_spec(store)


def _cli_out(capsys: pytest.CaptureFixture[str], args: list[str]) -> str:
    capsys.readouterr()
    assert cli(args) == 0
    return capsys.readouterr().out


def _http_json(port: int, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as reply:
        return json.loads(reply.read())


def test_a_server_with_precision_slots_chooses_plans_its_slots_hold_and_serves_them(served, embedder) -> None:
    root = served[3]
    config = ServiceConfig(
        store=root / "store", profiles=root / "profiles-slots", port=0, device="cpu", precision_slots="int4=4"
    )
    with running_server(config, embedder=embedder) as (handle, port), PreMoeClient(f"127.0.0.1:{port}") as client:
        four = client.register("four", DEMOS, fraction=0.3, precisions=["int4"])
        assert any(layer.precisions for layer in four.layers)
        assert all(len(layer.precisions) <= 4 for layer in four.layers)  # four int4 slots per layer
        full_slots = handle.core.tasks.max_per_layer
        assert all(len(layer.experts) - len(layer.precisions) <= full_slots for layer in four.layers)
        reply = client.generate("def add(a, b):", task="four", max_new_tokens=3)
        assert len(reply.token_ids) == 3 and reply.stats.pattern_experts == four.pattern_experts
        # The budget the server reports is the bytes of its slot tensors, quantized banks included.
        assert client.stats().budget_bytes == handle.core.patterned.expert_bytes_resident()
        with pytest.raises(grpc.RpcError) as info:
            client.register("two", DEMOS, fraction=0.3, precisions=["int2"])  # no int2 slots here
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "precisions" in info.value.details()
        assert "two" not in [t.name for t in client.tasks()]
