"""Start-up: `--preload` loads tasks' experts before health says SERVING; an unknown task stops the start."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from premoe_service.client import PreMoeClient
from premoe_service.errors import NotFound
from premoe_service.server import running_server
from premoe_service.server.app import create_server
from premoe_service.serving import ServiceConfig
from premoe_service.store import shard

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reference_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("startup") / "store"
    shard(ROOT / "models" / "reference-moe", store, progress=False)
    return store


def config(store: Path, **overrides) -> ServiceConfig:
    return ServiceConfig(store=store, profiles=ROOT / "profiles", port=0, device="cpu", budget="0.5", **overrides)


def test_preloaded_tasks_are_resident_before_health_says_serving(reference_store: Path, embedder) -> None:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def create():
        return create_server(config(reference_store, preload=("addition",)), embedder=embedder)

    handle, port = asyncio.run_coroutine_threadsafe(create(), loop).result(300)
    handle.core.loop.loader.gate.clear()  # hold the expert copies: the warm-up cannot finish yet
    starting = asyncio.run_coroutine_threadsafe(handle.start(), loop)
    try:
        with PreMoeClient(f"127.0.0.1:{port}", timeout=60) as client:
            deadline = time.monotonic() + 60
            while True:  # the gRPC door is up (health answers) but not SERVING while experts load
                try:
                    status = client.health()
                    break
                except Exception:
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
            assert status == "NOT_SERVING" and not starting.done()
            handle.core.loop.loader.gate.set()
            starting.result(120)
            assert client.health() == "SERVING"
            task = client.get_task("addition")
            assert client.stats().resident_experts >= task.pattern_experts
            reply = client.generate("add: 1+2=", task="addition", max_new_tokens=2)
            assert reply.stats.loads.device == task.pattern_experts  # all found resident
            assert reply.stats.loads.cache + reply.stats.loads.disk == 0
    finally:
        asyncio.run_coroutine_threadsafe(handle.stop(grace=1.0), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def test_an_unknown_preload_task_stops_the_start(reference_store: Path, embedder) -> None:
    with pytest.raises(NotFound) as info, running_server(config(reference_store, preload=("nope",)), embedder=embedder):
        pass
    assert info.value.field == "preload" and "nope" in str(info.value)
