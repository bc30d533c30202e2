"""Memory after oversized requests, on a `premoe serve` process of its own: 50 prompts of 8 MiB on Generate and
Route are refused by the byte limit (before any tokenizing or embedding), and the server's resident memory stays
within 100 MB of its level before them.

The first few such requests size the allocator's pools for messages of that size (some 40-80 MB, once), so they
come before the measurement; what must not happen is growth with the number of requests. It did: gRPC keeps an
aborted call's exception in a reference cycle whose traceback held the interceptor's frame, and with it the
request, until a rare full collection (+200 MB over the 50)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from premoe_service.client import PreMoeClient
from premoe_service.loopback import rss_mib, wait_serving

from .conftest import free_port

PROMPT_BYTES = 8 << 20


@pytest.fixture(scope="module")
def store(tiny_store: Path) -> Path:
    return tiny_store


def test_oversized_prompts_are_refused_and_their_memory_returns(store: Path, tmp_path: Path) -> None:
    port = free_port()
    command = [sys.executable, "-m", "premoe_service.cli", "serve", "--store", str(store), "--device", "cpu"]
    command += ["--profiles", str(tmp_path), "--port", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        target = f"127.0.0.1:{port}"
        wait_serving(server, target)
        with PreMoeClient(target, timeout=60) as client:
            for _ in range(3):
                assert len(client.generate("def add(a, b):", max_new_tokens=4).token_ids) == 4
                client.route("def add(a, b):")
            prompt = "x" * PROMPT_BYTES
            refuse(client, prompt, 6)
            time.sleep(0.5)
            before = rss_mib(server.pid)
            refuse(client, prompt, 50)
            time.sleep(0.5)
            after = rss_mib(server.pid)
            assert client.health() == "SERVING"
        assert after - before < 100, f"resident memory grew from {before:.0f} to {after:.0f} MiB"
    finally:
        server.terminate()
        server.wait(60)


def refuse(client: PreMoeClient, prompt: str, count: int) -> None:
    """`count` oversized prompts, Route and Generate in turn, each refused naming the prompt's byte limit."""
    for i in range(count):
        with pytest.raises(grpc.RpcError) as info:
            client.generate(prompt, max_new_tokens=4) if i % 2 else client.route(prompt)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "prompt" in (info.value.details() or "") and "bytes" in (info.value.details() or "")
