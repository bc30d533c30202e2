"""Plumbing between the ASGI app and the service: bounded body reads, disconnect watching, server-sent event
framing."""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from starlette.requests import Request

from ..errors import InvalidArgument
from .http_types import MAX_BODY_BYTES, parse_body

T = TypeVar("T")


class BodyTooLarge(InvalidArgument):
    """A request body over the limit (HTTP 413)."""


async def read_json(request: Request) -> dict[str, Any]:
    """The body as a JSON object, refused past the gRPC door's message limit (read no further than that)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise BodyTooLarge(f"{declared} bytes, the limit is {MAX_BODY_BYTES}", field="body")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise BodyTooLarge(f"over the limit of {MAX_BODY_BYTES} bytes", field="body")
        chunks.append(chunk)
    return parse_body(b"".join(chunks))


async def watch_disconnect(request: Request, gone: threading.Event) -> None:
    """Set `gone` when the client disconnects (the engine loop polls it and drops the request's row)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    gone.set()


async def chain(first: T, rest: AsyncIterator[T]) -> AsyncIterator[T]:
    yield first
    async for item in rest:
        yield item


def sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body)}\n\n"
