"""The engine process's end of the relay from its door process (`server/front.py`).

The relay is a Unix socket in the server's private directory carrying length-prefixed protobuf frames
(protos/premoe/relay/v1/relay.proto): `RelayCalls` from the door process, `RelayBatch` back. Generation calls come
in already accepted by the door process, with the client's request bytes, deadline and credentials; each is
checked and submitted here as the gRPC servicer would (the same checks, errors and metrics); calls of the HTTP
API's generation endpoints come with their body and are answered as the HTTP door would (`server/http_relay.py`).
Their events go to one `RelayLink` as the calls' sink: the engine loop's step hand-over (`engine/outbox.py`) gives
it every call's events of a step at once, on the engine's thread, and the link writes them as one frame. So the
engine process does one socket write per step, whatever the number of client streams, and no event loop of this
process takes part.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import grpc

from ..engine.request import EventSink, Failed
from ..errors import DeadlineExceeded, Unavailable
from ..serving import GenerationResult
from .auth import Access
from .gen import premoe_pb2 as pb
from .gen import relay_pb2 as rpb
from .http import OpenAIApi
from .http_relay import HttpCall
from .interceptor import MAX_DETAILS, METHODS, status_of
from .metrics import Metrics
from .relay_frames import HEADER, frame
from .servicer import GrpcDoor
from .types import GenerateCall, stats_to_pb
from .wire import Undecodable, tolerant

log = logging.getLogger(__name__)
_DECODE = tolerant(pb.GenerateRequest.FromString, METHODS["GenerateStream"].input_type)
SEND_TIMEOUT_S = 10


@dataclass
class _Call:
    stream: bool
    started: float = field(default_factory=time.perf_counter)
    first: float | None = None  # seconds to its first text piece
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def method(self) -> str:
        return "GenerateStream" if self.stream else "Generate"


class RelayLink:
    """One connection from the door process: its calls, read on the relay thread, answered in frames."""

    def __init__(
        self, conn: socket.socket, door: GrpcDoor, access: Access, metrics: Metrics | None, api: OpenAIApi | None
    ) -> None:
        self.conn, self.door, self.access, self.metrics, self.api = conn, door, access, metrics, api
        self.calls: dict[int, _Call] = {}
        self.http_calls: dict[int, HttpCall] = {}  # the HTTP API's generation calls
        self.lock = threading.Lock()  # the calls and the socket's writes
        self.open = True

    # --- calls in (the relay thread) ---------------------------------------------------------------------

    def serve(self, executor: ThreadPoolExecutor) -> None:
        """Read calls until the door process closes the connection; then its calls still running are cancelled."""
        try:
            while self.open:
                body = self._read()
                if body is None:
                    break
                for call in rpb.RelayCalls.FromString(body).calls:
                    if call.HasField("start") and call.start.HasField("http"):
                        self._start_http(call.id, call.start, executor)
                    elif call.HasField("start"):
                        self._start(call.id, call.start, executor)
                    elif call.cancel:
                        with self.lock:
                            running = self.calls.get(call.id)
                            http = self.http_calls.get(call.id)
                        if running is not None:
                            running.cancelled.set()
                        if http is not None:
                            http.gone.set()
        except (OSError, ValueError) as exc:
            log.warning("the door process's relay broke: %s", exc)
        finally:
            self.close()

    def _read(self) -> bytes | None:
        header = self._exactly(HEADER.size)
        if header is None:
            return None
        (size,) = HEADER.unpack(header)
        return self._exactly(size)

    def _exactly(self, size: int) -> bytes | None:
        chunks, left = [], size
        while left:
            chunk = self.conn.recv(min(left, 1 << 20))
            if not chunk:
                return None
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def _start(self, call_id: int, start: rpb.Start, executor: ThreadPoolExecutor) -> None:
        call = _Call(start.stream)
        with self.lock:
            if call_id in self.calls:
                return
            self.calls[call_id] = call
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
            self.deliver([(call_id, Failed(exc))])
            return

        def submit() -> None:
            self.door.core.submit(
                generate.prompt,
                generate.params,
                task=generate.task,
                deadline=deadline,
                cancelled=call.cancelled.is_set,
                stream=start.stream,
                sink=EventSink(self, call_id),
            )

        def failed(done: Future[None]) -> None:  # a bad field, an unknown task, a full queue; or shutting down
            error = Unavailable("the server is shutting down", field="server") if done.cancelled() else done.exception()
            if error is not None:
                self.deliver([(call_id, Failed(error))])

        try:
            executor.submit(submit).add_done_callback(failed)
        except RuntimeError:  # the executor is shut down: the server is stopping
            self.deliver([(call_id, Failed(Unavailable("the server is shutting down", field="server")))])

    def _start_http(self, call_id: int, start: rpb.Start, executor: ThreadPoolExecutor) -> None:
        """A call of the HTTP API's generation endpoints (`http_relay.HttpCall`): its requests' events come back
        keyed (call id, request index)."""
        if self.api is None:  # the door process sends none when the server has no HTTP API
            log.error("an HTTP call came over the relay, but this server has no HTTP API")
            with self.lock:
                self._send([rpb.RelayEvent(id=call_id, end=True, code=grpc.StatusCode.UNIMPLEMENTED.value[0])])
            return
        http = HttpCall(self.api, call_id)
        with self.lock:
            if call_id in self.http_calls:
                return
            self.http_calls[call_id] = http
        try:
            authorization = start.authorization if start.HasField("authorization") else None
            http.parse(start.http.path, start.http.body, authorization)
        except Exception as exc:
            self._answer(http, partial(http.fail, exc))
            return

        def submit() -> None:
            submissions = http.submit(lambda index: EventSink(self, (call_id, index)))
            self._answer(http, lambda: http.submitted(submissions))

        def failed(done: Future[None]) -> None:
            error = Unavailable("the server is shutting down", field="server") if done.cancelled() else done.exception()
            if error is not None:
                self._answer(http, partial(http.fail, error))

        try:
            executor.submit(submit).add_done_callback(failed)
        except RuntimeError:  # the executor is shut down: the server is stopping
            self._answer(http, partial(http.fail, Unavailable("the server is shutting down", field="server")))

    def _answer(self, http: HttpCall, step: Callable[[], list[rpb.RelayEvent]]) -> None:
        """Run one step of an HTTP call under the lock (it shares its state with the engine's thread) and write its
        relay events."""
        with self.lock:
            events = step()
            if http.ended:
                self.http_calls.pop(http.call_id, None)
            self._send(events)

    # --- events out (the engine's thread, once per step) ------------------------------------------------

    def deliver(self, events: list[tuple[Any, Any]]) -> None:
        """Write these events of the link's calls as one frame (an `EventSink` target)."""
        with self.lock:
            out: list[rpb.RelayEvent] = []
            for key, item in events:
                if isinstance(key, tuple):  # a request of an HTTP call
                    http = self.http_calls.get(key[0])
                    if http is not None:
                        out.extend(http.take(key[1], item))
                        if http.ended:
                            del self.http_calls[key[0]]
                elif (event := self._event(key, item)) is not None:
                    out.append(event)
            self._send(out)

    def _send(self, events: list[rpb.RelayEvent]) -> None:
        """Write `events` as one frame (the lock held)."""
        if not events or not self.open:
            return
        try:
            self.conn.sendall(frame(rpb.RelayBatch(events=events)))
        except OSError as exc:
            log.warning("the door process's relay broke: %s", exc)
            self._cancel_all()

    def _event(self, call_id: int, item: Any) -> rpb.RelayEvent | None:
        """One engine event of a call as its relay event (a result or a failure ends the call)."""
        call = self.calls.get(call_id)
        if call is None:
            return None
        if isinstance(item, Failed):
            code, details = status_of(item.error)
            if code is grpc.StatusCode.INTERNAL:
                log.error("relayed generation failed", exc_info=item.error)
            if len(details) > MAX_DETAILS:
                details = details[: MAX_DETAILS - 3] + "..."
            self._end(call_id, code)
            return rpb.RelayEvent(id=call_id, end=True, code=code.value[0], details=details)
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
            return rpb.RelayEvent(id=call_id, reply=reply.SerializeToString(), end=True)
        if call.first is None:
            call.first = time.perf_counter() - call.started
        return rpb.RelayEvent(id=call_id, reply=pb.GenerateChunk(text=item).SerializeToString())

    def _end(self, call_id: int, code: grpc.StatusCode) -> None:
        call = self.calls.pop(call_id)
        if self.metrics is not None:
            self.metrics.request(call.method, code.name, time.perf_counter() - call.started)
            self.metrics.in_progress.dec()

    def _cancel_all(self) -> None:
        self.open = False
        for call in self.calls.values():
            call.cancelled.set()
        for http in self.http_calls.values():
            http.gone.set()

    def close(self) -> None:
        with self.lock:
            self._cancel_all()
        with contextlib.suppress(OSError):
            self.conn.close()


class RelayServer:
    """Listens on the relay socket (`path`) and serves the door process's connection on a thread of its own."""

    def __init__(
        self,
        path: Path,
        door: GrpcDoor,
        access: Access,
        metrics: Metrics | None,
        executor: ThreadPoolExecutor,
        api: OpenAIApi | None = None,
    ) -> None:
        self.door, self.access, self.metrics, self.executor = door, access, metrics, executor
        self.api = api  # the HTTP API, when the door process serves it
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(1)
        self.link: RelayLink | None = None
        self.closed = False
        self.thread = threading.Thread(target=self._accept, name="premoe-relay", daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            # A door process that stops reading must not hold the engine's thread: writes give up after a while.
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", SEND_TIMEOUT_S, 0))
            self.link = RelayLink(conn, self.door, self.access, self.metrics, self.api)
            self.link.serve(self.executor)

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        if self.link is not None:
            self.link.close()
