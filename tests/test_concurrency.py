"""Many concurrent gRPC clients of different tasks share the engine loop: replies equal the request alone, a
cancelled stream frees its row and slots, and a cold task's loads do not hold up running streams."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import grpc
import pytest

from premoe_service.client import PreMoeClient
from premoe_service.server import running_server
from premoe_service.serving import ServiceConfig
from premoe_service.store import shard

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "models" / "reference-moe"


def mixed_requests() -> list[tuple[str, str, int]]:
    """Two prompts per reference task (text tasks cut to 60 characters), 4 to 24 new tokens."""
    requests = []
    for task_dir in sorted((ROOT / "reference" / "tasks").iterdir()):
        lines = (task_dir / "eval.jsonl").read_text().splitlines()[:2]
        for i, line in enumerate(lines):
            item = json.loads(line)
            prompt = item.get("prompt") or item["text"][:60]
            requests.append((prompt, task_dir.name, 4 + (len(requests) * 5) % 21 + i))
    return requests


@pytest.fixture(scope="module")
def reference_server(tmp_path_factory, embedder):
    store = tmp_path_factory.mktemp("reference") / "store"
    shard(REFERENCE, store, progress=False)
    config = ServiceConfig(
        store=store, profiles=ROOT / "profiles", port=0, device="cpu", budget="0.75", max_new_tokens_limit=512
    )
    with running_server(config, embedder=embedder) as (handle, port):
        yield handle, port


def test_sixteen_concurrent_clients_of_mixed_tasks_get_the_replies_they_get_alone(reference_server) -> None:
    handle, port = reference_server
    requests = mixed_requests()
    assert len(requests) == 16 and len({task for _, task, _ in requests}) == 8
    with PreMoeClient(f"127.0.0.1:{port}", timeout=300) as client:
        alone = [list(client.generate(p, task=t, max_new_tokens=n).token_ids) for p, t, n in requests]
    replies: list[list[int] | None] = [None] * len(requests)
    errors: list[BaseException] = []
    start = threading.Barrier(len(requests))

    def send(index: int) -> None:
        prompt, task, new_tokens = requests[index]
        try:
            with PreMoeClient(f"127.0.0.1:{port}", timeout=300) as own:
                start.wait()
                if index % 2:  # half stream, half unary
                    chunks = list(own.stream(prompt, task=task, max_new_tokens=new_tokens))
                    replies[index] = list(chunks[-1].token_ids)
                else:
                    replies[index] = list(own.generate(prompt, task=task, max_new_tokens=new_tokens).token_ids)
        except BaseException as exc:
            errors.append(exc)

    steps_before = handle.core.loop.stats.decode_steps
    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert not errors
    assert replies == alone
    decode_steps = handle.core.loop.stats.decode_steps - steps_before
    tokens = sum(len(r) for r in alone)
    assert decode_steps < tokens / 2, f"{decode_steps} decode steps for {tokens} tokens: requests were not batched"


def test_a_cancelled_stream_frees_its_row_and_slots(reference_server) -> None:
    handle, port = reference_server
    loop = handle.core.loop
    with PreMoeClient(f"127.0.0.1:{port}", timeout=300) as client:
        alone = client.generate("def main():", task="python", max_new_tokens=500)
        assert alone.finish_reason == "length"  # it would run for 500 tokens if not cancelled
        stream = client.stub.GenerateStream(client.request("def main():", task="python", max_new_tokens=500))
        next(stream)  # the request is running (its first token is sent just before it joins the batch)
        deadline = time.monotonic() + 30
        while not loop.running and time.monotonic() < deadline:
            time.sleep(0.005)
        (request,) = loop.running
        stream.cancel()
        with pytest.raises(grpc.RpcError) as info:
            list(stream)
        assert info.value.code() == grpc.StatusCode.CANCELLED
        deadline = time.monotonic() + 30
        while (loop.running or loop.waiting) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not loop.running and not loop.waiting
        # The server stopped it (how many tokens came after the cancel depends on how soon the door's event loop
        # runs, which a loaded machine delays, so the check is the request's fate, not a token count).
        assert request.finish_reason == "cancelled" and len(request.generated) < 500
        pins = sum(len(slots.pins) for slots in handle.core.patterned.slots.values())
        assert pins == 0
        assert len(client.generate("add: 1+2=", task="addition", max_new_tokens=4).token_ids) >= 1
