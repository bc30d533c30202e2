"""Where the engine thread's events for the doors wait until the end of its step.

Each event handed to an asyncio loop from another thread costs a wake-up of that loop (`call_soon_threadsafe`
writes to its self-pipe). A step makes one event per running request, so the loop thread holds them and hands
each event loop all of its step's events in one call when the step ends. Events for a sink's target (the door
process's relay) are held the same way and delivered in one `deliver` call per target, on the engine's thread.
Events put from any other thread (a shutdown failing the queue, say) go out at once. Order is kept: a request's
events are delivered in the order they were put.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from typing import Any


class Outbox:
    """Holds events while the thread that opened `holding()` runs, then delivers them per event loop."""

    def __init__(self) -> None:
        self._holder: int | None = None
        self._held: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Any], Any]]] = {}
        self._direct: dict[Any, list[tuple[Any, Any]]] = {}  # sink target -> (key, event)

    def put(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Any], item: Any) -> None:
        """Deliver `item` to `queue` on `loop`: at the end of the holding block when called inside it, else now."""
        if self._holder == threading.get_ident():
            self._held.setdefault(loop, []).append((queue, item))
            return
        _hand_over(loop, [(queue, item)])

    def put_direct(self, sink: Any, item: Any) -> None:
        """Deliver `item` to `sink.target` (an `EventSink`'s): at the end of the holding block when called inside it,
        with the block's other events for that target, else now."""
        if self._holder == threading.get_ident():
            self._direct.setdefault(sink.target, []).append((sink.key, item))
            return
        sink.target.deliver([(sink.key, item)])

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        """Hold this thread's events until the block ends (one engine step)."""
        self._holder = threading.get_ident()
        try:
            yield
        finally:
            self._holder = None
            held, self._held = self._held, {}
            direct, self._direct = self._direct, {}
            for target, events in direct.items():
                target.deliver(events)
            for loop, items in held.items():
                _hand_over(loop, items)


def _hand_over(loop: asyncio.AbstractEventLoop, items: list[tuple[asyncio.Queue[Any], Any]]) -> None:
    with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody is listening any more
        loop.call_soon_threadsafe(_deliver, items)


def _deliver(items: list[tuple[asyncio.Queue[Any], Any]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)
