"""The HTTP API in the door process (with `--http-port`, the default): generation crosses the relay and is answered
as the in-process HTTP door answers it (bodies, streams, errors and statuses), every other path is forwarded to
the engine process's HTTP API, and a client that leaves frees its row."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from premoe_service.server import running_server
from premoe_service.server.front_http import HttpFront, _drain
from premoe_service.server.gen import relay_pb2 as rpb
from premoe_service.serving import ServiceConfig

from .test_door_process import listeners

KEY = "k3y"
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
# Fields that differ between two servers answering the same request: ids, clocks, and the experts each one had
# to load (their residency's history).
VARYING = {"id", "created", "timings", "loads"}


def config(store: Path, profiles: Path, *, door_process: bool) -> ServiceConfig:
    return ServiceConfig(
        store=store, profiles=profiles, port=0, http_port=0, device="cpu", door_process=door_process, api_key=KEY
    )


@pytest.fixture(scope="module")
def servers(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory, embedder):
    """The same store with its HTTP API in the door process and in the engine's."""
    profiles = tmp_path_factory.mktemp("profiles")
    with (
        running_server(config(tiny_store, profiles, door_process=True), embedder=embedder) as (doors, _),
        running_server(config(tiny_store, profiles, door_process=False), embedder=embedder) as (inside, _),
    ):
        yield {"doors": doors, "inside": inside}


def send(handle, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """Status, headers and body bytes of one request over a fresh connection."""
    connection = http.client.HTTPConnection("127.0.0.1", handle.http_port, timeout=60)
    try:
        connection.request(method, path, body=body, headers=AUTH if headers is None else headers)
        reply = connection.getresponse()
        return reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read()
    finally:
        connection.close()


def steady(value: Any) -> Any:
    """`value` without the fields that differ between two servers."""
    if isinstance(value, dict):
        return {k: steady(v) for k, v in value.items() if k not in VARYING}
    if isinstance(value, list):
        return [steady(v) for v in value]
    return value


def events(body: bytes) -> list[Any]:
    """A stream's server-sent events, each decoded (`[DONE]` kept as it is)."""
    out = []
    for block in body.decode().split("\n\n"):
        if block:
            assert block.startswith("data: "), block
            data = block[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def by_choice(stream: list[Any]) -> dict[Any, list[Any]]:
    """A stream's events per choice, in order (the choices' events interleave as their requests' steps do)."""
    out: dict[Any, list[Any]] = {}
    for event in stream:
        if not isinstance(event, dict):  # [DONE]
            key: Any = "done"
        elif "error" in event:
            key = "error"
        else:
            key = event["choices"][0]["index"] if event["choices"] else "usage"
        out.setdefault(key, []).append(event)
    return out


def answer(handle, path: str, body: dict | bytes, headers: dict | None = None) -> tuple[int, str | None, Any]:
    """Status, WWW-Authenticate and the decoded body (a stream's events per choice) of a POST."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, got, reply = send(handle, "POST", path, raw, headers)
    stream = got.get("content-type", "").startswith("text/event-stream")
    return status, got.get("www-authenticate"), steady(by_choice(events(reply)) if stream else json.loads(reply))


CALLS: list[tuple[str, dict | bytes, dict | None]] = [
    ("/v1/completions", {"model": "auto", "prompt": "def add(a, b):", "max_tokens": 9, "temperature": 0}, None),
    (
        "/v1/completions",
        {"model": "auto", "prompt": "The river ran", "max_tokens": 7, "stream": True, "temperature": 0},
        None,
    ),
    (
        "/v1/completions",
        {
            "model": "auto",
            "prompt": ["12 + 30 =", "hello world"],
            "max_tokens": 5,
            "stream": True,
            "n": 2,
            "seed": 7,
            "stream_options": {"include_usage": True},
        },
        None,
    ),
    (
        "/v1/completions",
        {"model": "auto", "prompt": "import os\n", "max_tokens": 4, "logprobs": 2, "echo": True, "temperature": 0},
        None,
    ),
    (
        "/v1/chat/completions",
        {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "stream": True, "seed": 3},
        None,
    ),
    (
        "/v1/chat/completions",
        {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "seed": 3},
        None,
    ),
    # errors: a body that is no JSON, a bad field, an unknown model, no key, a wrong key
    ("/v1/completions", b"{not json", None),
    ("/v1/completions", {"model": "auto", "prompt": "hi", "max_tokens": -1}, None),
    ("/v1/completions", {"model": "no-such-task", "prompt": "hi", "stream": True}, None),
    ("/v1/completions", {"model": "auto", "prompt": "hi"}, {"Content-Type": "application/json"}),
    ("/v1/chat/completions", {"model": "auto", "messages": []}, {"Authorization": "Bearer wrong"}),
]


@pytest.mark.parametrize("case", range(len(CALLS)))
def test_generation_is_answered_as_the_in_process_door_answers_it(servers, case: int) -> None:
    path, body, headers = CALLS[case]
    doors = answer(servers["doors"], path, body, headers)
    inside = answer(servers["inside"], path, body, headers)
    assert doors == inside
    assert doors[0] == 200 or "error" in doors[2], doors


def test_the_public_http_port_is_the_door_processs_and_a_body_too_large_is_refused_there(servers) -> None:
    handle = servers["doors"]
    assert handle.doors is not None and handle.doors.process is not None
    assert handle.doors.process.pid in listeners(handle.http_port)
    inside = servers["inside"]
    assert listeners(inside.http_port) == {os.getpid()}
    for server in (handle, inside):  # refused from its declared length, before it is read, with the same error
        connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
        connection.putrequest("POST", "/v1/completions")
        connection.putheader("Authorization", f"Bearer {KEY}")
        connection.putheader("Content-Length", str((64 << 20) + 1))
        connection.endheaders()
        reply = connection.getresponse()
        assert reply.status == 413 and json.loads(reply.read())["error"]["param"] == "body"
        connection.close()


def test_other_paths_are_forwarded_to_the_engine_processs_api(servers) -> None:
    for method, path in [("GET", "/v1/models"), ("GET", "/health"), ("GET", "/v1/nowhere"), ("GET", "/tokenizer_info")]:
        doors, inside = send(servers["doors"], method, path), send(servers["inside"], method, path)
        assert doors[0] == inside[0] and json.loads(doors[2]) == json.loads(inside[2]), path
    body = json.dumps({"prompt": "def add(a, b):"}).encode()
    doors, inside = (
        send(servers["doors"], "POST", "/tokenize", body),
        send(servers["inside"], "POST", "/tokenize", body),
    )
    assert doors[0] == inside[0] == 200 and json.loads(doors[2]) == json.loads(inside[2])
    assert send(servers["doors"], "GET", "/v1/completions")[0] == 405
    # A URL the engine's API writes (the redirect of a path with a trailing slash) is the client's, not the
    # private socket's.
    host = {"Host": "example.org:1234"}
    doors, inside = (
        send(servers["doors"], "GET", "/v1/models/", None, host),
        send(servers["inside"], "GET", "/v1/models/", None, host),
    )
    assert (
        doors[0] == inside[0] == 307
        and doors[1]["location"] == inside[1]["location"] == "http://example.org:1234/v1/models"
    )


def test_a_client_that_leaves_an_http_stream_frees_its_rows(servers) -> None:
    """Its call's requests are cancelled: each stops before its end. (Sixteen choices of 240 tokens make each
    step wide and the call long, so that a busy machine's delay in closing does not let them finish first.)"""
    handle = servers["doors"]
    connection = http.client.HTTPConnection("127.0.0.1", handle.http_port, timeout=60)
    body = {"model": "auto", "prompt": "Once upon a time", "max_tokens": 240, "stream": True, "ignore_eos": True}
    body |= {"n": 16, "seed": 1}
    connection.request("POST", "/v1/completions", body=json.dumps(body).encode(), headers=AUTH)
    reply = connection.getresponse()
    assert reply.status == 200 and reply.read(6) == b"data: "
    requests = handle.core.loop.in_flight()
    assert len(requests) == 16
    connection.close()
    deadline = time.monotonic() + 60
    while handle.core.loop.in_flight():
        assert time.monotonic() < deadline, "the requests of a client that left still hold their rows"
        time.sleep(0.05)
    assert all(len(r.generated) < 240 for r in requests), "they ran to their end"


def test_generation_crosses_the_relay_not_the_engine_processs_http_api(tiny_store: Path, tmp_path: Path, embedder):
    """With the engine process's own HTTP API stopped, generation still answers (over the relay) and the paths
    that are forwarded to it get a 503."""
    with running_server(config(tiny_store, tmp_path, door_process=True), embedder=embedder) as (handle, _):
        assert handle.http is not None
        handle.http.stop()
        body = {"model": "auto", "prompt": "def add(a, b):", "max_tokens": 4, "stream": True}
        status, _, reply = send(handle, "POST", "/v1/completions", json.dumps(body).encode())
        assert status == 200 and events(reply)[-1] == "[DONE]"
        status, _, reply = send(handle, "GET", "/v1/models")
        assert status == 503 and json.loads(reply)["error"]["param"] == "server"


def test_a_door_process_started_again_serves_the_http_port_again(tiny_store: Path, tmp_path: Path, embedder):
    """The public socket stays with the engine process, and a door process started after a crash inherits it."""
    with running_server(config(tiny_store, tmp_path, door_process=True), embedder=embedder) as (handle, _):
        doors = handle.doors
        assert doors is not None and doors.process is not None
        old = doors.process.pid
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while doors.process.pid == old or doors.process.pid not in listeners(handle.http_port):
            assert time.monotonic() < deadline, "no door process serves the HTTP port again"
            time.sleep(0.1)
        body = {"model": "auto", "prompt": "hello world", "max_tokens": 4, "stream": True}
        status, _, reply = send(handle, "POST", "/v1/completions", json.dumps(body).encode())
        assert status == 200 and events(reply)[-1] == "[DONE]"
        assert send(handle, "GET", "/health")[0] == 200


def test_the_events_waiting_for_a_stream_go_out_in_one_write() -> None:
    async def run() -> None:
        queue: asyncio.Queue[Any] = asyncio.Queue()
        for piece in (b"b", b"c"):
            queue.put_nowait(rpb.RelayEvent(reply=piece))
        queue.put_nowait(rpb.RelayEvent(reply=b"d", end=True))
        queue.put_nowait(rpb.RelayEvent(reply=b"after the end"))
        assert _drain([rpb.RelayEvent(reply=b"a")], queue) == ([b"a", b"b", b"c", b"d"], True, False)
        assert queue.qsize() == 1
        assert _drain([queue.get_nowait()], queue) == ([b"after the end"], False, False)
        queue.put_nowait(rpb.RelayEvent(end=True, code=14, details="the engine process closed the relay"))
        parts, ended, left = _drain([rpb.RelayEvent(reply=b"e")], queue)
        assert ended and not left and json.loads(parts[1][len(b"data: ") :])["error"]["param"] == "server"
        queue.put_nowait(rpb.RelayEvent(reply=b"g"))
        queue.put_nowait(None)  # the client left, after events that were still waiting
        assert _drain([rpb.RelayEvent(reply=b"f")], queue) == ([b"f", b"g"], True, True)

    asyncio.run(run())


class _Relay:
    """The relay client's two calls that the door's generation makes, with the call's events already queued."""

    def __init__(self, events: list[Any]) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        for event in events:
            self.queue.put_nowait(event)
        self.finished: list[tuple[int, bool]] = []

    def open(self, start: rpb.Start) -> tuple[int, asyncio.Queue[Any]]:
        return 7, self.queue

    def finish(self, call_id: int, answered: bool) -> None:
        self.finished.append((call_id, answered))


def test_a_client_that_leaves_behind_waiting_events_cancels_its_call(tmp_path: Path) -> None:
    """The client's leaving (None) is queued behind events that have not gone out yet (the engine's steps came
    faster than the writes): the call is cancelled in the engine process, not counted as answered."""

    async def run() -> list[tuple[int, bool]]:
        first = rpb.RelayEvent(reply=b"data: a\n\n", http_status=200, http_stream=True)
        relay = _Relay([first, rpb.RelayEvent(reply=b"data: b\n\n"), rpb.RelayEvent(reply=b"data: c\n\n"), None])
        door = HttpFront(relay, str(tmp_path / "engine.sock"), max_body=1 << 20)
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            await asyncio.Event().wait()  # the client's leaving is already in the queue
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}
        await door._generate(scope, b"{}", receive, send)
        await door.close()
        assert not any(m["type"] == "http.response.body" and not m["more_body"] for m in sent)
        return relay.finished

    assert asyncio.run(run()) == [(7, False)]
