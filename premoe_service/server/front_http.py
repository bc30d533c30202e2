"""The HTTP API's door in the door process (`server/front.py`), as vLLM's API server runs apart from its engine.

The clients' connections end here. A generation call (`POST /v1/completions`, `/v1/chat/completions`) crosses
the relay with its body and `authorization` header; the engine process checks and runs it as its own HTTP door
would (`server/http_relay.py`) and sends back the response's status and the bytes of its body, the server-sent
events of each engine step in one frame. This door writes them to the client, those that arrived together in one
write. Every other request (the tokenizer's and the tasks' endpoints, models, health), and a generation call
whose body has no declared length or one over the limit, is forwarded as it is to the engine process's HTTP API on
its private socket, so that every answer comes from the one implementation there.

It imports no torch: a plain ASGI app over uvicorn, and httpx for the forwarding.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import uvicorn

from .gen import relay_pb2 as rpb
from .http_door import uvicorn_config

log = logging.getLogger(__name__)
GENERATION = ("/v1/completions", "/v1/chat/completions")
# Headers of one hop (and those that uvicorn writes itself), not forwarded either way; the client's own
# X-Forwarded-* headers are replaced by this door's.
HOP = {
    b"connection",
    b"keep-alive",
    b"proxy-authenticate",
    b"proxy-authorization",
    b"te",
    b"trailer",
    b"transfer-encoding",
    b"upgrade",
    b"date",
    b"server",
    b"x-forwarded-for",
    b"x-forwarded-proto",
}
Scope = dict[str, Any]
Receive = Any
Send = Any


class HttpFront:
    """The ASGI app of the door process's HTTP port.

    Args:
        relay: The door process's relay client (`front.RelayClient`).
        backend: The engine process's HTTP socket (a Unix socket path).
        max_body: The largest body the engine process takes (larger ones are forwarded, and refused there).
    """

    def __init__(self, relay: Any, backend: str, max_body: int) -> None:
        self.relay, self.max_body = relay, max_body
        transport = httpx.AsyncHTTPTransport(uds=backend)
        self.client = httpx.AsyncClient(transport=transport, base_url="http://premoe-engine", timeout=None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        # The body is read here, within the limit, as the engine process's endpoints read it: one too large is
        # refused with their error (413), from its declared length when it has one. (This door holds no secret:
        # such a body is refused before the credentials are checked, where the in-process door checks them first.)
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body:
            await _respond(send, 413, _too_large(f"{declared} bytes, the limit is {self.max_body}"))
            return
        body = await _read(receive, self.max_body)
        if body is None:  # the client left while sending it
            return
        if len(body) > self.max_body:
            await _respond(send, 413, _too_large(f"over the limit of {self.max_body} bytes"))
        elif scope["method"] == "POST" and scope["path"] in GENERATION:
            await self._generate(scope, body, receive, send)
        else:
            await self._forward(scope, body, send)

    async def _generate(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> None:
        """A generation call over the relay: the status and body bytes that the engine process answers with."""
        start = rpb.Start(http=rpb.HttpCall(path=scope["path"], body=body))
        authorization = _header(scope, b"authorization")
        if authorization is not None:
            start.authorization = authorization.decode("latin-1")
        call_id, queue = self.relay.open(start)
        answered = False
        watcher = asyncio.create_task(_watch_disconnect(receive, queue))
        try:
            event = await queue.get()
            if event is None:  # the client left before the answer started
                return
            if not event.http_status:  # the relay broke, or the engine could not take the call
                await _respond(send, 503, _unavailable(event.details))
                answered = True
                return
            if not event.http_stream:
                await _respond(send, event.http_status, event.reply, authenticate=event.http_status == 401)
                answered = True
                return
            headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]
            await send({"type": "http.response.start", "status": event.http_status, "headers": headers})
            parts, ended = [event.reply], event.end
            while not ended:
                await send({"type": "http.response.body", "body": b"".join(parts), "more_body": True})
                parts, ended, left = _drain([await queue.get()], queue)
                if left:  # unanswered: `finish` cancels the call in the engine process
                    return
            await send({"type": "http.response.body", "body": b"".join(parts), "more_body": False})
            answered = True
        finally:
            watcher.cancel()
            self.relay.finish(call_id, answered)

    async def _forward(self, scope: Scope, body: bytes, send: Send) -> None:
        """Forward the request to the engine process's HTTP API and its response back, streamed."""
        path = scope.get("raw_path") or scope["path"].encode()
        if scope.get("query_string"):
            path += b"?" + scope["query_string"]
        # The client's Host and scheme go along, so that URLs the engine's API writes (a redirect's) are the
        # client's; its private server trusts these headers from this process only.
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in HOP]
        headers.append((b"x-forwarded-proto", scope.get("scheme", "http").encode()))
        if scope.get("client"):
            headers.append((b"x-forwarded-for", str(scope["client"][0]).encode()))
        url = path.decode("latin-1")
        request = self.client.build_request(scope["method"], url, headers=headers, content=body)
        try:
            response = await self.client.send(request, stream=True)
        except httpx.TransportError as exc:
            await _respond(send, 503, _unavailable(f"the engine process is not reachable ({exc})"))
            return
        try:
            kept = [(k, v) for k, v in response.headers.raw if k.lower() not in HOP]
            await send({"type": "http.response.start", "status": response.status_code, "headers": kept})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except httpx.TransportError as exc:  # the engine process went away mid-answer: the stream just ends
            log.warning("forwarding %s broke: %s", scope["path"], exc)
        finally:
            await response.aclose()

    async def close(self) -> None:
        await self.client.aclose()


class QuietServer(uvicorn.Server):
    """uvicorn's server without its signal handlers: the engine process owns this process's lifetime (SIGINT is
    ignored here, and stopping comes over stdin)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def http_server(app: HttpFront, grace_s: float, tls: dict[str, Any] | None) -> QuietServer:
    """uvicorn on the door process's event loop, with the engine process's settings."""
    return QuietServer(uvicorn_config(app, grace_s, tls))


def _drain(first: list[Any], queue: asyncio.Queue[Any]) -> tuple[list[bytes], bool, bool]:
    """The bytes of `first` and of the events waiting behind it (to go out in one write), whether the call ended
    among them, and whether the client left (None) before it ended: then the call is not answered, however many
    of its events were waiting ahead of the None."""
    parts: list[bytes] = []
    events = list(first)
    while not queue.empty() and not any(e is None or e.end for e in events):
        events.append(queue.get_nowait())
    for event in events:
        if event is None:
            return parts, True, True
        # A call that the relay's breaking ended has no bytes but its status: its error is the stream's last event.
        broken = not event.reply and event.code
        parts.append(b"data: " + _unavailable(event.details) + b"\n\n" if broken else event.reply)
        if event.end:
            return parts, True, False
    return parts, False, False


async def _watch_disconnect(receive: Receive, queue: asyncio.Queue[Any]) -> None:
    """Put None into the call's queue when the client disconnects."""
    while (await receive())["type"] != "http.disconnect":
        pass
    queue.put_nowait(None)


async def _read(receive: Receive, limit: int) -> bytes | None:
    """The whole body, or its first bytes past `limit` (None: the client left while sending it)."""
    parts, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        parts.append(message.get("body", b""))
        size += len(parts[-1])
        if not message.get("more_body") or size > limit:
            return b"".join(parts)


async def _respond(send: Send, status: int, body: bytes, *, authenticate: bool = False) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if authenticate:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _unavailable(message: str) -> bytes:
    """OpenAI's error body of a 503 (the engine process's own errors come from it, already encoded)."""
    return _error(message, "service_unavailable_error", "server", "unavailable")


def _too_large(message: str) -> bytes:
    """The error body of a 413, as the engine process's endpoints write it (`http_io.BodyTooLarge`)."""
    return _error(message, "invalid_request_error", "body", "invalid_argument")


def _error(message: str, kind: str, param: str, code: str) -> bytes:
    error = {"message": message, "type": kind, "param": param, "code": code}
    return json.dumps({"error": error}, ensure_ascii=False, separators=(",", ":")).encode()


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return bytes(value)
    return None


def _content_length(scope: Scope) -> int | None:
    value = _header(scope, b"content-length")
    return int(value) if value is not None and value.isdigit() else None
