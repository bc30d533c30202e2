"""Server assembly: `create_server(config) -> (server, port)` with the gRPC door and, when configured, the HTTP door
on the same ServingCore; graceful shutdown, health and reflection."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ..retrieval import Embedder
from ..serving import ServiceConfig, ServingCore
from .auth import Access
from .door_process import DoorProcess
from .gen import premoe_pb2 as pb
from .gen import premoe_pb2_grpc as pb_grpc
from .http import OpenAIApi
from .http_door import HttpDoor, bind_http, bind_private
from .http_types import MAX_BODY_BYTES
from .interceptor import ErrorInterceptor
from .metrics import Metrics
from .relay import RelayServer
from .security import check_exposure, check_tls_files, grpc_credentials, uvicorn_tls
from .servicer import GrpcDoor

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["PreMoe"].full_name


@dataclass
class ServerApp:
    """A started-or-not gRPC server (and HTTP door) with its ServingCore (`core`), health and metrics."""

    grpc_server: grpc.aio.Server
    core: ServingCore
    health: health.aio.HealthServicer
    executor: ThreadPoolExecutor
    metrics: Metrics
    metrics_port: int | None = None
    loop: Any = None  # the event loop it runs on, when started by `running_server`
    http: HttpDoor | None = None  # this process's HTTP API: on the public port, or on a socket the door process uses
    http_listen: socket.socket | None = None  # the HTTP API's public socket (kept for door processes started again)
    http_public_port: int | None = None
    serving: threading.Event = field(default_factory=threading.Event)  # what the HTTP health endpoint reports
    doors: DoorProcess | None = None  # the doors' own process, when they have one (`config.door_process`)
    relay: RelayServer | None = None  # where the door process's generation calls come in
    port: int = 0  # the gRPC door's public port

    @property
    def http_port(self) -> int | None:
        """The bound port of the OpenAI-compatible HTTP API; None without one."""
        return self.http_public_port

    async def start(self) -> None:
        """Start both doors; health reports NOT_SERVING until the `preload` tasks' experts are resident."""
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.grpc_server.start()
        loop = asyncio.get_running_loop()
        if self.http is not None:
            await loop.run_in_executor(None, self.http.start)
        if self.core.config.preload:
            await loop.run_in_executor(self.executor, self.core.preload, self.core.config.preload)
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.serving.set()

    async def stop(self, grace: float) -> int:
        """Report NOT_SERVING, refuse new work, let in-flight requests finish within `grace` seconds; returns how
        many requests were still unfinished after it (cut off)."""
        self.serving.clear()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await asyncio.sleep(min(0.2, grace))  # let health watchers and load balancers see it
        in_flight = self.core.in_flight()
        http_stopped = asyncio.get_running_loop().run_in_executor(None, self.http.stop) if self.http else None
        if self.doors is not None:  # its calls need this process until they end: it stops first
            await self.doors.stop(grace)
        if self.relay is not None:
            self.relay.close()
        await self.grpc_server.stop(grace)
        if http_stopped is not None:
            await http_stopped
        if self.http_listen is not None:
            self.http_listen.close()
        self.core.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.metrics.stop()
        return sum(r.finish_reason not in ("eos", "length", "stop") for r in in_flight)


def create_server(config: ServiceConfig, *, embedder: Embedder | None = None) -> tuple[ServerApp, int]:
    """Build the ServingCore and bind its gRPC server and, with `config.http_port`, its HTTP door (call `start()` inside
    an event loop). Port 0 picks one; the HTTP door's is `handle.http_port`.

    Raises:
        InvalidArgument: A secret no client could send, a non-loopback host without an admin token (unless
            `allow_insecure_admin`), or TLS files that do not load; all before the model is loaded.
        OSError: A port that cannot be bound.
    """
    access = Access(config.admin_token, config.api_key)
    check_exposure(config)
    check_tls_files(config)
    core = ServingCore(config, embedder=embedder)
    metrics = Metrics()
    metrics.watch_engine(core.loop.stats, core.residency.stats)
    # Routing, tokenizing and task administration run here; generation runs in the engine loop, and the doors
    # read its events on their event loops, so no thread waits per request.
    executor = ThreadPoolExecutor(max_workers=16, thread_name_prefix="premoe")
    server = grpc.aio.server(
        interceptors=[ErrorInterceptor(access, metrics)],
        options=[
            ("grpc.max_receive_message_length", MAX_BODY_BYTES),
            ("grpc.max_send_message_length", MAX_BODY_BYTES),
        ],
    )
    door = GrpcDoor(core, executor, metrics)
    pb_grpc.add_PreMoeServicer_to_server(door, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    doors = DoorProcess(config, MAX_BODY_BYTES) if config.door_process else None
    handle = ServerApp(server, core, health_servicer, executor, metrics, doors=doors)
    api = OpenAIApi(core, executor, access, handle.serving, metrics) if config.http_port is not None else None
    public: socket.socket | None = None
    try:
        if api is not None:
            public = bind_http(config.host, config.http_port or 0)
            handle.http_public_port = int(public.getsockname()[1])
            if doors is None:
                handle.http = HttpDoor(api.app(), public, config.grace_s, tls=uvicorn_tls(config))
            else:  # the door process serves the public port; this process's API answers on a private socket
                doors.serve_http(public, config.grace_s, uvicorn_tls(config))
                handle.http = HttpDoor(api.app(), bind_private(doors.http_socket), config.grace_s)
        if doors is not None:
            handle.relay = RelayServer(doors.relay, door, access, metrics, executor, api)
        handle.port = _bind(server, config, doors)
    except OSError:
        core.close()
        if handle.relay is not None:
            handle.relay.close()
        if doors is not None:
            doors.close()
        if public is not None:
            public.close()
        raise
    handle.http_listen = public
    if config.metrics_port is not None:
        handle.metrics_port = metrics.serve(config.metrics_port, config.host)
    return handle, handle.port


def _bind(server: grpc.aio.Server, config: ServiceConfig, doors: DoorProcess | None) -> int:
    """Bind the gRPC server: on the public address, or, with a door process, on its private socket, the door process
    then listening on the public address; returns the public port."""
    address, credentials = f"{config.host}:{config.port}", grpc_credentials(config)
    if doors is not None:
        address, credentials = doors.backend, None
    port, bind_error = 0, ""
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as exc:  # grpc raises where it cannot bind
        bind_error = f": {exc}"
    if port == 0:
        raise OSError(f"cannot bind {address}{bind_error}")
    return doors.launch() if doors is not None else port


async def serve_async(config: ServiceConfig, ready: threading.Event | None = None) -> int:
    """Serve until SIGINT/SIGTERM, then shut down gracefully; returns the requests the grace period cut off."""
    handle, port = create_server(config)
    await handle.start()
    log.warning("premoe serving on %s:%d (metrics %s)", config.host, port, handle.metrics_port or "off")
    print(f"premoe serving on {config.host}:{port}" + (" (TLS)" if config.tls else ""), flush=True)
    if handle.http_port is not None:
        scheme = "https" if config.tls else "http"
        print(f"premoe HTTP (OpenAI-compatible) on {scheme}://{config.host}:{handle.http_port}/v1", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.set()
    await stop.wait()
    print("premoe shutting down", flush=True)
    return await handle.stop(config.grace_s)


def serve(config: ServiceConfig) -> int:
    """Serve until SIGINT/SIGTERM; returns the number of requests cut off at shutdown (0: a clean drain)."""
    return asyncio.run(serve_async(config))


@contextmanager
def running_server(config: ServiceConfig, *, embedder: Embedder | None = None) -> Iterator[tuple[ServerApp, int]]:
    """Run a server on its own event loop thread for the duration of the block (tests, demos, benches)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="premoe-grpc", daemon=True)
    thread.start()

    async def create_and_start() -> tuple[ServerApp, int]:
        handle, port = create_server(config, embedder=embedder)  # grpc.aio binds to the running loop
        await handle.start()
        return handle, port

    handle, port = asyncio.run_coroutine_threadsafe(create_and_start(), loop).result(600)
    handle.loop = loop
    try:
        yield handle, port
    finally:
        if not handle.core.stopping.is_set():
            asyncio.run_coroutine_threadsafe(handle.stop(grace=config.grace_s), loop).result(120)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
