"""The engine process's end of the relay from its door process (`server/front.py`).

The relay is a Unix socket in the server's private directory carrying length-prefixed protobuf frames
(protos/premoe/relay/v1/relay.proto): `RelayCalls` from the door process, `RelayBatch` back. Generation calls come
in already accepted by the door process, with the client's request bytes, deadline and credentials; each is
checked and submitted here as the gRPC servicer would (the same checks, errors and metrics). Their events go to one
`RelayLink` as the calls' sink: the engine loop's step hand-over (`engine/outbox.py`) gives it every call's events
of a step at once, on the engine's thread, and the link writes them as one frame. So the engine process does one
socket write per step, whatever the number of client streams, and no event loop of this process takes part.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from ..engine.request import EventSink, Failed
from ..errors import DeadlineExceeded, Unavailable
from ..serving import GenerationResult
from .auth import Access
from .gen import premoe_pb2 as pb
from .gen import relay_pb2 as rpb
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

    def __init__(self, conn: socket.socket, door: GrpcDoor, access: Access, metrics: Metrics | None) -> None:
        self.conn, self.door, self.access, self.metrics = conn, door, access, metrics
        self.calls: dict[int, _Call] = {}
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
                    if call.HasField("start"):
                        self._start(call.id, call.start, executor)
                    elif call.cancel:
                        with self.lock:
                            running = self.calls.get(call.id)
                        if running is not None:
                            running.cancelled.set()
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

    # --- events out (the engine's thread, once per step) ------------------------------------------------

    def deliver(self, events: list[tuple[Any, Any]]) -> None:
        """Write these events of the link's calls as one frame (an `EventSink` target)."""
        with self.lock:
            out = [e for call_id, item in events if (e := self._event(call_id, item)) is not None]
            if not out or not self.open:
                return
            try:
                self.conn.sendall(frame(rpb.RelayBatch(events=out)))
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

    def close(self) -> None:
        with self.lock:
            self._cancel_all()
        with contextlib.suppress(OSError):
            self.conn.close()


class RelayServer:
    """Listens on the relay socket (`path`) and serves the door process's connection on a thread of its own."""

    def __init__(
        self, path: Path, door: GrpcDoor, access: Access, metrics: Metrics | None, executor: ThreadPoolExecutor
    ) -> None:
        self.door, self.access, self.metrics, self.executor = door, access, metrics, executor
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
            self.link = RelayLink(conn, self.door, self.access, self.metrics)
            self.link.serve(self.executor)

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        if self.link is not None:
            self.link.close()
