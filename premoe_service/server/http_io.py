"""Plumbing between the ASGI app and the blocking service: bounded body reads, disconnect watching, a blocking
iterator relayed onto the event loop, server-sent event framing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
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


async def relay(items: Iterator[T], executor: ThreadPoolExecutor, gone: threading.Event) -> AsyncGenerator[T, None]:
    """Drive a blocking iterator on the executor and hand its items over as they come; a consumer that stops early
    sets `gone`, so the request behind the iterator is cancelled rather than run to its end."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()

    def put(item: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed while shutting down
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def pump() -> None:
        try:
            for item in items:
                put(item)
        except BaseException as exc:  # re-raised on the loop, where it is mapped to a status
            put(_Failure(exc))
        finally:
            put(_DONE)

    loop.run_in_executor(executor, pump)
    try:
        while (item := await queue.get()) is not _DONE:
            if isinstance(item, _Failure):
                raise item.exc
            yield item
    finally:
        gone.set()


async def chain(first: T, rest: AsyncIterator[T]) -> AsyncIterator[T]:
    yield first
    async for item in rest:
        yield item


def sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body)}\n\n"


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_DONE = object()
