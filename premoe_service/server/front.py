"""The door process: the gRPC door of `premoe serve` (and its HTTP API's, `server/front_http.py`), in a process of
its own beside the engine's.

The engine process runs the model in one thread, and a step is mostly Python. When the gRPC door shares that
process, its per-message work for every client stream (about 0.1 ms of interpreter time a token) runs under the
same interpreter lock, and every step waits for it. Here the clients' connections end in this process instead:
generation calls cross to the engine process over the relay socket (`server/relay.py`), whose engine end writes
one frame of events per engine step, and this process fans each frame out to the client streams. Every other call
(task administration, stats, routing, health) is forwarded as it is to the engine process's gRPC server.
Reflection is answered here.

Nothing here imports torch: the process starts in a fraction of a second and holds no model. It reads its
settings as one JSON line on stdin, prints `{"port": N}` once it listens (or `{"error": ...}` and exits 2), and
stops on the next stdin line (`{"grace": seconds}`), or when stdin closes (the engine process has gone); it then
prints `{"cut": N}`, the calls that the grace period cut off; when stdin closed, it first removes the sockets'
private folder, which the engine process removes itself on stopping. The engine process owns the lifetime: SIGINT (a
terminal's Ctrl-C reaches the whole process group) is left to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection

from .front_http import HttpFront, http_server
from .gen import premoe_pb2 as pb
from .gen import relay_pb2 as rpb
from .relay_frames import HEADER, frame

PREMOE = pb.DESCRIPTOR.services_by_name["PreMoe"]
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"]
RELAYED = {"Generate": False, "GenerateStream": True}  # method -> streams its reply
CODES = {code.value[0]: code for code in grpc.StatusCode}
# Metadata the transport sets itself and that is not the caller's to forward.
TRANSPORT_KEYS = ("user-agent", "content-type", "te", "grpc-")


class RelayClient:
    """This process's end of the relay socket: calls out in frames (those of one event-loop turn together), each
    event back to its call's queue."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.queues: dict[int, asyncio.Queue[rpb.RelayEvent]] = {}
        self.outgoing: list[rpb.RelayCall] = []
        self.writer: asyncio.StreamWriter | None = None
        self.flush_due = False
        self.ids = itertools.count(1)
        self.broken: str | None = None  # why the relay is down
        self.stopping = False  # the server is stopping: calls that end unanswered now were cut off
        self.cut = 0

    async def run(self) -> None:
        """Connect (the engine process listens before this process starts), then hand each event to its call;
        when the relay breaks, every open call fails with UNAVAILABLE."""
        reason = "the engine process closed the relay"
        try:
            reader, self.writer = await asyncio.open_unix_connection(self.path, limit=1 << 26)
            self._flush()
            while True:
                (size,) = HEADER.unpack(await reader.readexactly(HEADER.size))
                for event in rpb.RelayBatch.FromString(await reader.readexactly(size)).events:
                    queue = self.queues.get(event.id)
                    if queue is not None:
                        queue.put_nowait(event)
        except (OSError, asyncio.IncompleteReadError) as exc:
            if not isinstance(exc, asyncio.IncompleteReadError):
                reason = f"the engine process is not reachable ({exc})"
        self.broken = reason
        for call_id in list(self.queues):
            self._unavailable(call_id)

    def start(self, request: bytes, stream: bool, context: grpc.aio.ServicerContext) -> tuple[int, asyncio.Queue[Any]]:
        """Send a gRPC call over; its events arrive in the returned queue."""
        start = rpb.Start(request=request, stream=stream)
        remaining = context.time_remaining()
        if remaining is not None:
            start.timeout_s = remaining
        authorization = dict(context.invocation_metadata() or ()).get("authorization")
        if authorization is not None:
            start.authorization = authorization if isinstance(authorization, str) else authorization.decode("latin-1")
        return self.open(start)

    def open(self, start: rpb.Start) -> tuple[int, asyncio.Queue[Any]]:
        """Send a call over (a gRPC one, or one of the HTTP API's: `start.http`); its events arrive in the returned
        queue."""
        call_id = next(self.ids)
        queue: asyncio.Queue[rpb.RelayEvent] = asyncio.Queue()
        self.queues[call_id] = queue
        if self.broken is not None:
            self._unavailable(call_id)
            return call_id, queue
        self._send(rpb.RelayCall(id=call_id, start=start))
        return call_id, queue

    def finish(self, call_id: int, answered: bool) -> None:
        """The call is over here; an unanswered one is cancelled over there (and counted, when cut off)."""
        self.queues.pop(call_id, None)
        if not answered:
            if self.stopping:
                self.cut += 1
            if self.broken is None:
                self._send(rpb.RelayCall(id=call_id, cancel=True))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def _send(self, call: rpb.RelayCall) -> None:
        self.outgoing.append(call)
        if not self.flush_due:  # the calls of this event-loop turn go in one frame
            self.flush_due = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self.flush_due = False
        if self.writer is None or not self.outgoing:
            return
        calls, self.outgoing = self.outgoing, []
        self.writer.write(frame(rpb.RelayCalls(calls=calls)))

    def _unavailable(self, call_id: int) -> None:
        queue = self.queues.get(call_id)
        if queue is not None:
            code = grpc.StatusCode.UNAVAILABLE.value[0]
            queue.put_nowait(rpb.RelayEvent(id=call_id, end=True, code=code, details=self.broken or ""))


class Doors(grpc.GenericRpcHandler):
    """Every method of the PreMoe and Health services: generation over the relay, the rest forwarded as bytes."""

    def __init__(self, channel: grpc.aio.Channel, relay: RelayClient) -> None:
        self.channel, self.relay = channel, relay

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        path: str = details.method
        service, _, name = path.lstrip("/").rpartition("/")
        if service == PREMOE.full_name and name in RELAYED:
            if RELAYED[name]:
                return grpc.unary_stream_rpc_method_handler(self._generate_stream)
            return grpc.unary_unary_rpc_method_handler(self._generate)
        for descriptor in (PREMOE, HEALTH):
            method = descriptor.methods_by_name.get(name) if service == descriptor.full_name else None
            if method is not None and not method.client_streaming:
                if method.server_streaming:
                    return grpc.unary_stream_rpc_method_handler(self._forward_stream(path))
                return grpc.unary_unary_rpc_method_handler(self._forward(path))
        return None

    async def _generate_stream(self, request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        async for reply in self._relayed(request, True, context):
            yield reply

    async def _generate(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        replies = [reply async for reply in self._relayed(request, False, context)]
        return replies[-1] if replies else b""  # the one reply, a GenerateResponse

    async def _relayed(self, request: bytes, stream: bool, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        """A generation call over the relay: its replies as they come; its error ends the call with its status."""
        call_id, queue = self.relay.start(request, stream, context)
        answered = False
        try:
            while True:
                event = await queue.get()
                if event.reply:
                    yield event.reply
                if event.end:
                    answered = True
                    if event.code:
                        await context.abort(CODES[event.code], event.details)
                    return
        finally:
            self.relay.finish(call_id, answered)

    def _forward(self, path: str) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]]:
        call = self.channel.unary_unary(path)

        async def run(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            try:
                reply: bytes = await call(request, timeout=context.time_remaining(), metadata=_metadata(context))
                return reply
            except grpc.aio.AioRpcError as exc:
                await context.abort(exc.code(), exc.details() or "")
                raise  # abort raised already

        return run

    def _forward_stream(self, path: str) -> Callable[[bytes, grpc.aio.ServicerContext], AsyncIterator[bytes]]:
        call = self.channel.unary_stream(path)

        async def run(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            try:
                async for reply in call(request, timeout=context.time_remaining(), metadata=_metadata(context)):
                    yield reply
            except grpc.aio.AioRpcError as exc:
                await context.abort(exc.code(), exc.details() or "")

        return run


def _metadata(context: grpc.aio.ServicerContext) -> list[tuple[str, Any]]:
    return [(k, v) for k, v in context.invocation_metadata() or () if not k.startswith(TRANSPORT_KEYS)]


def _credentials(tls: dict[str, str] | None) -> grpc.ServerCredentials | None:
    if not tls:
        return None
    ca = tls.get("client_ca")
    return grpc.ssl_server_credentials(
        [(tls["key"].encode(), tls["cert"].encode())],
        root_certificates=ca.encode() if ca else None,
        require_client_auth=bool(ca),
    )


async def serve_front(settings: dict[str, Any]) -> int:
    """Listen on `settings["listen"]` and relay to the engine process at `settings["backend"]` until told to stop;
    returns the exit status."""
    size = int(settings["max_message_bytes"])
    options = [("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size)]
    channel = grpc.aio.insecure_channel(settings["backend"], options=options)
    relay = RelayClient(settings["relay"])
    pump = asyncio.create_task(relay.run())
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers([Doors(channel, relay)])
    reflection.enable_server_reflection((PREMOE.full_name, HEALTH.full_name, reflection.SERVICE_NAME), server)
    credentials, port, error = _credentials(settings.get("tls")), 0, ""
    try:
        listen = settings["listen"]
        port = server.add_insecure_port(listen) if credentials is None else server.add_secure_port(listen, credentials)
    except RuntimeError as exc:
        error = f": {exc}"
    if port == 0:
        _say({"error": f"cannot bind {settings['listen']}{error}"})
        return 2
    await server.start()
    http = settings.get("http")
    if http is not None:  # the HTTP API's public socket, bound by the engine process and inherited
        front = HttpFront(relay, http["backend"], size)
        web = http_server(front, float(http["grace_s"]), http.get("tls"))
        web_task = asyncio.create_task(web.serve(sockets=[socket.socket(fileno=int(http["fd"]))]))
        while not web.started and not web_task.done():
            await asyncio.sleep(0.01)
        if not web.started:
            _say({"error": f"the HTTP door did not start: {web_task.exception() if not web_task.cancelled() else ''}"})
            return 2
    _say({"port": port})
    line = await asyncio.to_thread(sys.stdin.readline)
    grace = float(json.loads(line).get("grace", 0.0)) if line.strip() else 0.0
    relay.stopping = True
    if http is not None:
        web.should_exit = True
    await server.stop(grace)
    if http is not None:
        await web_task
        await front.close()
    relay.close()
    pump.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await pump
    await channel.close()
    if not line:  # stdin closed: the engine process died, and left its doors' private folder behind
        _remove_private_folder(settings)
    _say({"cut": relay.cut})
    return 0


def _remove_private_folder(settings: dict[str, Any]) -> None:
    """Remove the folder the engine process made for the doors' sockets, as it does itself on stopping: the sockets
    the settings name, then the folder if nothing else is in it."""
    relay = Path(settings["relay"])
    sockets = [relay, Path(str(settings["backend"]).removeprefix("unix:"))]
    if settings.get("http") is not None:
        sockets.append(Path(settings["http"]["backend"]))
    for path in sockets:
        if path.parent == relay.parent:
            with contextlib.suppress(OSError):
                path.unlink()
    with contextlib.suppress(OSError):
        relay.parent.rmdir()


def _say(message: dict[str, Any]) -> None:
    """One JSON line to the engine process (gone already, when it died: nobody is left to tell)."""
    try:
        print(json.dumps(message), flush=True)
    except OSError:  # the engine process is gone: what is left in stdout's buffer goes nowhere at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    settings = json.loads(sys.stdin.readline())
    sys.exit(asyncio.run(serve_front(settings)))


if __name__ == "__main__":
    main()
