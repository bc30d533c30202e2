"""Plumbing between the ASGI app and the service: bounded body reads, disconnect watching, server-sent event
framing."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any, TypeVar

from starlette.requests import Request

from ..errors import InvalidArgument
from .http_types import MAX_BODY_BYTES, parse_body

T = TypeVar("T")


class BodyTooLarge(InvalidArgument):
    """A request body over the limit (HTTP 413)."""


async def read_body(request: Request) -> bytes:
    """The body's bytes, refused past the gRPC door's message limit (read no further than that)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise BodyTooLarge(f"{declared} bytes, the limit is {MAX_BODY_BYTES}", field="body")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise BodyTooLarge(f"over the limit of {MAX_BODY_BYTES} bytes", field="body")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: Request) -> dict[str, Any]:
    """The body as a JSON object, refused past the gRPC door's message limit."""
    return parse_body(await read_body(request))


async def watch_disconnect(request: Request, gone: threading.Event) -> None:
    """Set `gone` when the client disconnects (the engine loop polls it and drops the request's row)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    gone.set()


async def merged(firsts: Sequence[T], streams: Sequence[AsyncIterator[T]]) -> AsyncGenerator[tuple[int, T], None]:
    """The items of several streams as they come, each with its stream's index (`firsts`: each stream's first
    item, already taken). An error in one stream ends them all."""
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    done = object()

    async def pump(index: int, first: T, stream: AsyncIterator[T]) -> None:
        try:
            await queue.put((index, first))
            async for item in stream:
                await queue.put((index, item))
            await queue.put((index, done))
        except Exception as exc:
            await queue.put((index, _Raised(exc)))

    tasks = [asyncio.create_task(pump(i, f, s)) for i, (f, s) in enumerate(zip(firsts, streams, strict=True))]
    try:
        open_ = len(tasks)
        while open_:
            index, item = await queue.get()
            if item is done:
                open_ -= 1
            elif isinstance(item, _Raised):
                raise item.error
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _Raised:
    def __init__(self, error: Exception) -> None:
        self.error = error


def usage_so_far(requests: Sequence[Any], generated: int) -> dict[str, int]:
    """vLLM's `continuous_usage_stats`: the prompts' tokens and the tokens generated so far."""
    prompt = sum(len(r.prompt_ids) for r in requests)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


def sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body)}\n\n"
