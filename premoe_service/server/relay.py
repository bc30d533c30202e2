"""The engine process's end of the relay from its door process (`server/front.py`; the wire is
protos/premoe/relay/v1/relay.proto).

Generation calls come in over one stream, already accepted by the door process, with the client's request bytes,
deadline and credentials; each is checked and submitted here as the gRPC servicer would (the same checks, errors
and metrics). Their events do not go to a coroutine per call: every call's sink puts its events into one link,
which the engine loop's step hand-over (`engine/outbox.py`) fills once per step, and the link answers with one
batch of that step's events. So the engine process does one gRPC message of work per step, whatever the number of
client streams; the door process fans the batch out to them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from ..engine.request import failure_of
from ..errors import DeadlineExceeded
from ..serving import GenerationResult
from .auth import Access
from .gen import premoe_pb2 as pb
from .gen import relay_pb2 as rpb
from .gen import relay_pb2_grpc as rpb_grpc
from .interceptor import MAX_DETAILS, METHODS, status_of
from .metrics import Metrics
from .servicer import GrpcDoor
from .types import GenerateCall, stats_to_pb
from .wire import Undecodable, tolerant

log = logging.getLogger(__name__)
_DECODE = tolerant(pb.GenerateRequest.FromString, METHODS["GenerateStream"].input_type)


@dataclass
class _Call:
    stream: bool
    started: float = field(default_factory=time.perf_counter)
    first: float | None = None  # seconds to its first text piece
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def method(self) -> str:
        return "GenerateStream" if self.stream else "Generate"


class _Sink:
    """One call's events, put on the link's event loop by the engine's step hand-over."""

    __slots__ = ("id", "link")

    def __init__(self, link: _Link, call_id: int) -> None:
        self.link, self.id = link, call_id

    def put_nowait(self, item: Any) -> None:
        self.link.event(self.id, item)


class _Link:
    """The calls of one relay stream and the events waiting to go back in its next batch."""

    def __init__(self, door: GrpcDoor, metrics: Metrics | None) -> None:
        self.door, self.metrics = door, metrics
        self.calls: dict[int, _Call] = {}
        self.pending: list[rpb.RelayEvent] = []
        self.wake = asyncio.Event()
        self.reading = True

    def event(self, call_id: int, item: Any) -> None:
        """Turn one engine event of a call into its relay event (the call ends with a result or a failure)."""
        call = self.calls.get(call_id)
        if call is None:
            return
        failure = failure_of(item)
        if failure is not None:
            self.fail(call_id, failure)
            return
        if isinstance(item, GenerationResult):
            self.door._observe(item, call.first if call.stream else None)
            stats = stats_to_pb(item, self.door.total_experts)
            reply: Any
            if call.stream:
                reply = pb.GenerateChunk(token_ids=item.token_ids, finish_reason=item.finish_reason, stats=stats)
            else:
                reply = pb.GenerateResponse(
                    text=item.text, token_ids=item.token_ids, finish_reason=item.finish_reason, stats=stats
                )
            self._end(call_id, grpc.StatusCode.OK)
            self._put(rpb.RelayEvent(id=call_id, reply=reply.SerializeToString(), end=True))
            return
        if call.first is None:
            call.first = time.perf_counter() - call.started
        self._put(rpb.RelayEvent(id=call_id, reply=pb.GenerateChunk(text=item).SerializeToString()))

    def fail(self, call_id: int, error: BaseException) -> None:
        """End a call with the status of `error`, as the servicer's interceptor would."""
        if call_id not in self.calls:
            return
        code, details = status_of(error)
        if code is grpc.StatusCode.INTERNAL:
            log.error("relayed generation failed", exc_info=error)
        if len(details) > MAX_DETAILS:
            details = details[: MAX_DETAILS - 3] + "..."
        self._end(call_id, code)
        self._put(rpb.RelayEvent(id=call_id, end=True, code=code.value[0], details=details))

    def cancel(self, call_id: int) -> None:
        call = self.calls.get(call_id)
        if call is not None:
            call.cancelled.set()

    def cancel_all(self) -> None:
        for call in self.calls.values():
            call.cancelled.set()

    def _end(self, call_id: int, code: grpc.StatusCode) -> None:
        call = self.calls.pop(call_id)
        if self.metrics is not None:
            self.metrics.request(call.method, code.name, time.perf_counter() - call.started)
            self.metrics.in_progress.dec()

    def _put(self, event: rpb.RelayEvent) -> None:
        self.pending.append(event)
        self.wake.set()

    async def batches(self) -> AsyncIterator[rpb.RelayBatch]:
        """The events as they come, one batch per wake-up, until the door process stops sending and every call
        has ended."""
        while self.reading or self.calls or self.pending:
            await self.wake.wait()
            self.wake.clear()
            if self.pending:
                events, self.pending = self.pending, []
                yield rpb.RelayBatch(events=events)


class RelayDoor(rpb_grpc.RelayServicer):
    """The Relay service of the engine process: generation calls from its door process, over one stream."""

    def __init__(self, door: GrpcDoor, access: Access, metrics: Metrics | None = None) -> None:
        self.door, self.access, self.metrics = door, access, metrics

    async def Relay(
        self, request_iterator: AsyncIterator[rpb.RelayCalls], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[rpb.RelayBatch]:
        link = _Link(self.door, self.metrics)
        reader = asyncio.create_task(self._read(request_iterator, link))
        try:
            async for batch in link.batches():
                yield batch
        finally:
            reader.cancel()
            link.cancel_all()

    async def _read(self, calls: AsyncIterator[rpb.RelayCalls], link: _Link) -> None:
        try:
            async for batch in calls:
                for call in batch.calls:
                    if call.HasField("start"):
                        if call.id not in link.calls:
                            self._start(link, call.id, call.start)
                    elif call.cancel:
                        link.cancel(call.id)
        except (asyncio.CancelledError, grpc.aio.AioRpcError):
            pass
        finally:
            link.reading = False
            link.wake.set()

    def _start(self, link: _Link, call_id: int, start: rpb.Start) -> None:
        call = _Call(start.stream)
        link.calls[call_id] = call
        if self.metrics is not None:
            self.metrics.in_progress.inc()
        try:
            self.access.check(start.authorization if start.HasField("authorization") else None, admin=False)
            request = _DECODE(start.request)
            if isinstance(request, Undecodable):
                raise request.error
            generate = GenerateCall.from_pb(request)
            deadline = None
            if start.HasField("timeout_s"):
                if start.timeout_s <= 0:
                    raise DeadlineExceeded("the deadline passed before the request started", field="deadline")
                deadline = time.monotonic() + start.timeout_s
        except Exception as exc:
            link.fail(call_id, exc)
            return
        loop = asyncio.get_running_loop()

        def submit() -> None:
            self.door.core.submit(
                generate.prompt,
                generate.params,
                task=generate.task,
                deadline=deadline,
                cancelled=call.cancelled.is_set,
                stream=start.stream,
                loop=loop,
                sink=_Sink(link, call_id),
            )

        submitted = loop.run_in_executor(self.door.executor, submit)
        submitted.add_done_callback(lambda done: _failed_submit(link, call_id, done))


def _failed_submit(link: _Link, call_id: int, done: asyncio.Future[None]) -> None:
    """A submission that raised (a bad field, an unknown task, a full queue) ends its call with that error."""
    if done.cancelled():
        link.fail(call_id, asyncio.CancelledError())
    elif done.exception() is not None:
        link.fail(call_id, done.exception())  # type: ignore[arg-type]
