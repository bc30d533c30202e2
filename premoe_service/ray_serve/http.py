"""The OpenAI-compatible HTTP door on Ray Serve: the ingress forwards each HTTP request (method, path, headers,
body) to an engine replica chosen by its `model` (the task, as the multiplexed model id), and the replica runs the
single server's own HTTP app (`OpenAIApi` on its `ServingCore`) on it in process, streaming the response back. So
validation, credentials, errors, streaming and the replies are the single server's, byte for byte."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..names import TASK_NAME
from ..server.auth import Access
from ..server.http import OpenAIApi
from ..serving import ServingCore

AUTO = "auto"
DONE = {"type": "http.disconnect"}


def model_of(body: bytes) -> tuple[str | None, str | None]:
    """The task a request body names (`model`), and for `auto` the prompt of a completion (a single string) that
    retrieval can route; (None, None) for anything else, which any replica answers (errors included)."""
    try:
        value = json.loads(body)
    except ValueError:
        return None, None
    if not isinstance(value, dict) or not isinstance(value.get("model"), str):
        return None, None
    model = value["model"]
    if model == AUTO:
        prompt = value.get("prompt")
        return None, prompt if isinstance(prompt, str) else None
    return (model, None) if TASK_NAME.fullmatch(model) else (None, None)


class HttpTunnel:
    """Runs the single server's HTTP app on requests forwarded from the ingress (on an engine replica)."""

    def __init__(self, core: ServingCore, executor: ThreadPoolExecutor) -> None:
        serving = threading.Event()
        serving.set()  # the replica is up: Serve only routes to replicas that are
        access = Access(core.config.admin_token, core.config.api_key)
        self.app = OpenAIApi(core, executor, access, serving).app()

    async def run(
        self, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> AsyncIterator[dict[str, Any]]:
        """Yield the response: `{"status", "headers"}` first, then `{"body"}` pieces. Closing the generator early
        (the client went away) tells the app the client disconnected, which cancels the request in the engine."""
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": query,
            "headers": headers,
            "client": ("ray-serve", 0),
            "server": ("premoe", 0),
        }
        gone = asyncio.Event()
        sent: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        request = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict[str, Any]:
            if request:
                return request.pop()
            await gone.wait()
            return DONE

        async def send(message: MutableMapping[str, Any]) -> None:
            await sent.put(dict(message))

        task = asyncio.create_task(self.app(scope, receive, send))
        try:
            while True:
                message = await sent.get()
                if message["type"] == "http.response.start":
                    yield {"status": message["status"], "headers": [list(h) for h in message.get("headers", [])]}
                elif message["type"] == "http.response.body":
                    if message.get("body"):
                        yield {"body": bytes(message["body"])}
                    if not message.get("more_body", False):
                        break
            await task
        finally:
            gone.set()
            if not task.done():
                task.cancel()
