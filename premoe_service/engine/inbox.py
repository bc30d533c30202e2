"""Where requests wait to be taken in by the engine loop: handed over from any thread, with the event that wakes
the loop, and the queue limit checked on the way in."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

from ..errors import ResourceExhausted
from ..pattern import Pattern
from .request import Request


class Inbox:
    """Requests submitted since the loop's last step, and the loop's wake-up event (the loader sets it too).

    Args:
        observe: Sees each request's pattern as the loop takes it in, before it is planned, on the loop's thread
            (shared-use eviction counts its experts there).
    """

    def __init__(self, observe: Callable[[Pattern], None] | None = None) -> None:
        self.observe = observe
        self.wake = threading.Event()
        self._queue: queue.SimpleQueue[Request] = queue.SimpleQueue()

    def put(self, request: Request, *, waiting: int, limit: int) -> None:
        """Hand a request to the loop (any thread); refused when `waiting` ones and these reach `limit`."""
        queued = waiting + self._queue.qsize()
        if queued >= limit:
            raise ResourceExhausted(f"{queued} requests are queued (the limit); retry later", field="queue")
        self._queue.put(request)
        self.wake.set()

    def take_all(self) -> list[Request]:
        """Every request handed over so far (loop thread)."""
        out: list[Request] = []
        while True:
            try:
                request = self._queue.get_nowait()
            except queue.Empty:
                return out
            if self.observe is not None:
                self.observe(request.pattern)
            out.append(request)

    def __len__(self) -> int:
        return self._queue.qsize()
