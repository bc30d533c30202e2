"""Routing as shipped: the routing record travels with the profiles (folder and Redis), so `premoe serve --profiles`
with no other flag decides exactly as `premoe route --evaluate` measures, offline and through the server's Route."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from premoe_service.cli import main
from premoe_service.client import PreMoeClient
from premoe_service.errors import DataCorruption
from premoe_service.profiler import Demo, profile_store
from premoe_service.retrieval import LocalProfileStore, RedisProfileStore, Registry, load_route_records
from premoe_service.retrieval.routing_record import ROUTING_FILE, RoutingRecord
from premoe_service.runtime.router_signal import RouterSignal
from premoe_service.server.app import running_server
from premoe_service.serving import ServiceConfig
from premoe_service.store import Store

pytestmark = pytest.mark.usefixtures("one_thread")

BACKGROUND = [
    "Bonjour tout le monde, il fait beau.",
    "SELECT name FROM users WHERE id = 3;",
    "<html><body>hi</body></html>",
    "Guten Morgen, wie geht es dir?",
    '{"key": [1, 2, 3]}',
    'fn main() { println!("x"); }',
]


@pytest.fixture(scope="module")
def shipped(tiny_store: Path, embedder, demo_tasks, held_out_queries, tmp_path_factory) -> tuple[Path, Path]:
    """A profiles folder for the tiny store, with the routing record `premoe route --evaluate --save-routing` wrote,
    and a labelled query file (on-task and off-topic)."""
    folder = tmp_path_factory.mktemp("shipped")
    profiles = folder / "profiles"
    profiles.mkdir()
    store = Store(tiny_store)
    for name, demos in list(demo_tasks.items())[:3]:
        profile, _ = profile_store(store, name, [Demo(d) for d in demos], embedder=embedder)
        profile.save(profiles / f"{name}.safetensors")
    queries = folder / "queries.jsonl"
    records = [{"query": q, "task": t} for q, t in held_out_queries if (profiles / f"{t}.safetensors").exists()]
    records += [{"query": q, "task": None} for q in ("Hola, ¿qué tal?", "<div>x</div>", "UPDATE t SET a = 1;")]
    queries.write_text("".join(json.dumps(r) + "\n" for r in records))
    background = folder / "background.jsonl"
    background.write_text("".join(json.dumps({"query": q, "task": None}) + "\n" for q in BACKGROUND))
    args = ["route", "--evaluate", str(queries), "--profiles", str(profiles), "--store", str(tiny_store)]
    assert main([*args, "--background", str(background), "--save-routing"]) == 0
    return profiles, queries


def test_the_routing_record_is_saved_beside_the_profiles_and_read_back(shipped, tiny_store: Path, embedder) -> None:
    profiles, _ = shipped
    record = RoutingRecord.from_bytes((profiles / ROUTING_FILE).read_bytes(), source="routing.json")
    assert record.background == tuple(BACKGROUND) and set(record.task_leads) <= {p.stem for p in profiles.iterdir()}
    # A registry on the folder with no background of its own routes with the record's none-class and leads.
    registry = Registry(
        LocalProfileStore(profiles), embedder=embedder, signal=RouterSignal.from_store(Store(tiny_store))
    )
    assert registry.evidence is not None and registry.evidence.background_size == len(BACKGROUND)
    assert dict(registry.policy.task_leads) == record.task_leads
    # The record is not a task, and a damaged one is refused naming the file.
    assert registry.names() == sorted(p.stem for p in profiles.glob("*.safetensors"))
    with pytest.raises(DataCorruption, match=r"routing\.json") as info:
        RoutingRecord.from_bytes(b'{"format": 1, "task_leads": {"Bad Name": 1}}', source="routing.json")
    assert info.value.field == "routing.json"


def test_serve_with_its_defaults_decides_as_route_evaluate_measures(
    shipped, tiny_store: Path, embedder, capsys
) -> None:
    profiles, queries = shipped
    offline = Registry(
        LocalProfileStore(profiles), embedder=embedder, signal=RouterSignal.from_store(Store(tiny_store))
    )
    config = ServiceConfig(store=tiny_store, profiles=profiles, port=0, device="cpu")  # no routing flag at all
    with running_server(config, embedder=embedder) as (_, port), PreMoeClient(f"127.0.0.1:{port}") as client:
        for record in load_route_records(queries):
            mine, served = offline.route(record.query), client.route(record.query)
            assert (served.task or None, list(served.fallback_tasks)) == (mine.task, mine.fallback_tasks), record
            assert [(t.task, round(t.score, 4)) for t in served.ranked] == [(t, round(s, 4)) for t, s in mine.ranked]
        capsys.readouterr()
        assert main(["route", "--evaluate", str(queries), "--server", f"127.0.0.1:{port}"]) == 0
        remote = capsys.readouterr().out
    assert main(["route", "--evaluate", str(queries), "--profiles", str(profiles), "--store", str(tiny_store)]) == 0
    local = capsys.readouterr().out
    assert "routing record" in local and "through the Route RPC" in remote

    def figures(text: str) -> list[str]:
        head = ("top-1 accuracy", "match accuracy", "no-match", "on-task rejected", "off-topic rejected")
        return [line for line in text.splitlines() if line.startswith(head)]

    assert figures(remote) == figures(local.split("embedding + router signal")[1]) and len(figures(remote)) == 6
    assert remote.split("confusion")[1] == local.split("confusion")[1]
    # Offline-only options without --profiles are a usage error naming them, not a call to a server.
    assert main(["route", "--evaluate", str(queries), "--store", str(tiny_store)]) == 2
    assert "--profiles" in capsys.readouterr().err


def test_redis_replicas_share_the_routing_record(shipped, tiny_store: Path, embedder, redis_server, tmp_path) -> None:
    profiles = Path(shutil.copytree(shipped[0], tmp_path / "profiles"))
    redis_server.flush()
    namespace = "premoe-registry:routing-test"
    seeded = RedisProfileStore(redis_server.url, namespace=namespace, record=LocalProfileStore(profiles))
    assert seeded.revisions()  # seeds Redis from the folder, its routing record too
    replica_store = RedisProfileStore(redis_server.url, namespace=namespace)  # no folder of its own
    assert replica_store.routing() == (profiles / ROUTING_FILE).read_bytes()
    signal = RouterSignal.from_store(Store(tiny_store))
    replica = Registry(replica_store, embedder=embedder, signal=signal)
    assert replica.evidence is not None and replica.evidence.background_size == len(BACKGROUND)
    # A new record written through one replica reaches the other at its next version check.
    seeded.write_routing(RoutingRecord(("Hej, hur mår du?",), {}, source="test").to_bytes())
    assert replica.refresh() and replica.evidence.background_size == 1 and not replica.policy.task_leads
    assert json.loads((profiles / ROUTING_FILE).read_text())["background"] == ["Hej, hur mår du?"]
