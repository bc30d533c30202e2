"""`premoe bench serve`, stall check plumbing: a bandwidth-throttling proxy in front of Redis."""

from __future__ import annotations

import asyncio
import threading
from typing import Any


class ThrottledProxy:
    """A TCP proxy on its own event loop thread that paces all traffic (both directions, all connections
    together) to `bytes_per_s`, like one shared slow link."""

    def __init__(self, upstream_port: int, bytes_per_s: float, host: str = "127.0.0.1") -> None:
        self.upstream = (host, upstream_port)
        self.rate = float(bytes_per_s)
        self.host = host
        self.port = 0
        self.forwarded = 0
        self._next = 0.0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="throttled-proxy", daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    def __enter__(self) -> ThrottledProxy:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, self.host, 0), self._loop
        ).result(10)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    def __exit__(self, *exc: object) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(64 * 1024):
                now = self._loop.time()
                self._next = max(now, self._next) + len(data) / self.rate  # the shared link is busy until then
                await asyncio.sleep(self._next - now)
                writer.write(data)
                await writer.drain()
                self.forwarded += len(data)
        finally:
            writer.close()
