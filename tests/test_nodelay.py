"""Both doors send a stream's first event at once on a reused connection: their accepted sockets have TCP_NODELAY,
so Nagle's algorithm does not hold the first event behind the response headers until the client's delayed ACK
(~40 ms on Linux) releases it."""

from __future__ import annotations

import json
import socket
import statistics
import time

import pytest

from premoe_service.client import PreMoeClient
from premoe_service.server import running_server
from premoe_service.serving import ServiceConfig

pytestmark = pytest.mark.usefixtures("one_thread")
STALL_S = 0.02  # a delayed-ACK stall is ~40 ms; a prompt event on loopback takes well under a millisecond
BODY = json.dumps({"model": "auto", "prompt": "def add(a, b):", "max_tokens": 2, "stream": True}).encode()


@pytest.fixture(scope="module")
def server(tiny_store, embedder, tmp_path_factory):
    config = ServiceConfig(
        store=tiny_store, profiles=tmp_path_factory.mktemp("profiles"), port=0, http_port=0, device="cpu"
    )
    with running_server(config, embedder=embedder) as (handle, port):
        yield handle, port


def headers_to_first_event(connection: socket.socket, port: int) -> float:
    """Send one streamed completion on `connection` (HTTP/1.1 keep-alive) and read the whole reply; returns the
    seconds between the response headers' arrival and the first event's arrival (0 when they came together)."""
    request = (
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(BODY)}\r\n\r\n"
    ).encode() + BODY
    connection.sendall(request)
    received, headers_at, event_at = b"", None, None
    while not received.endswith(b"0\r\n\r\n"):  # the chunked body's last chunk
        chunk = connection.recv(65536)
        assert chunk, "the server closed the connection"
        now = time.perf_counter()
        received += chunk
        if headers_at is None and b"\r\n\r\n" in received:
            headers_at = now
        if event_at is None and b"data: " in received:
            event_at = now
    assert received.startswith(b"HTTP/1.1 200") and b"[DONE]" in received
    assert headers_at is not None and event_at is not None
    return event_at - headers_at


def test_the_http_doors_first_event_is_not_held_on_a_reused_connection(server) -> None:
    handle, _ = server
    port = handle.http_port
    fresh = []
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
            fresh.append(headers_to_first_event(connection, port))
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        reused = [headers_to_first_event(connection, port) for _ in range(6)][1:]  # the first one is fresh
    assert statistics.median(reused) < STALL_S, (reused, fresh)
    assert statistics.median(fresh) < STALL_S, (reused, fresh)


def test_the_grpc_doors_first_chunk_is_not_held_on_a_reused_channel(server) -> None:
    """gRPC core sets TCP_NODELAY on its sockets itself: on a reused channel the first chunk arrives within a
    stall's time of the server's own time to the first token (routing, queue, loads, prefill)."""
    _, port = server

    def overhead(client: PreMoeClient) -> float:
        start = time.perf_counter()
        chunks = iter(client.stream("def add(a, b):", max_new_tokens=4))
        next(chunks)
        first = time.perf_counter() - start
        *_, last = chunks
        t = last.stats.timings
        return first - (t.route_ms + t.queue_ms + t.load_ms + t.prefill_ms) / 1e3

    with PreMoeClient(f"127.0.0.1:{port}", timeout=60) as client:
        overhead(client)  # opens the channel
        reused = [overhead(client) for _ in range(5)]
    assert statistics.median(reused) < STALL_S, reused
