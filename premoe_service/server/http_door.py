"""The HTTP API's uvicorn server in the engine process, on a thread and event loop of its own."""

from __future__ import annotations

import math
import socket
import threading
import time
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette


def bind_http(host: str, port: int) -> socket.socket:
    """The HTTP API's listening socket on `host`:`port` (0 picks a free port).

    Raises:
        OSError: The port cannot be bound.
    """
    # Created as TCP (proto IPPROTO_TCP, not 0): asyncio sets TCP_NODELAY only on such sockets' accepted
    # connections, and without it Nagle and the client's delayed ACK hold a stream's first event for ~40 ms.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot bind the HTTP port {host}:{port}: {exc}") from exc
    return sock


def uvicorn_config(
    app: Any, grace_s: float, tls: dict[str, Any] | None, *, behind_door: bool = False
) -> uvicorn.Config:
    """uvicorn's settings for the HTTP API, in either process: h11, no lifespan, no access log, `grace_s` seconds for
    open requests when it stops, TLS from `tls` (uvicorn's `ssl_*` options). `behind_door`: the engine process's
    private socket, which only the door process reaches; the X-Forwarded-* headers it sets are trusted there."""
    return uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        lifespan="off",
        loop="asyncio",
        http="h11",
        ws="none",
        timeout_graceful_shutdown=max(1, math.ceil(grace_s)),
        forwarded_allow_ips="*" if behind_door else None,
        **(tls or {}),
    )


def bind_private(path: Path) -> socket.socket:
    """A listening Unix socket at `path` (in the server's private directory), where the door process forwards
    the HTTP API's requests."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    return sock


class HttpDoor:
    """The HTTP API's uvicorn server on its own thread, on a socket bound already (`bind_http`, `bind_private`).

    Args:
        app: The ASGI app.
        sock: Where it listens: the public port, or a private socket the door process forwards to.
        grace_s: Seconds open requests get on `stop()`.
        tls: uvicorn's `ssl_*` options (HTTPS, and client certificates with `ssl_cert_reqs`); None: plain HTTP.
    """

    def __init__(self, app: Starlette, sock: socket.socket, grace_s: float, tls: dict[str, Any] | None = None) -> None:
        self.socket = sock
        behind_door = sock.family == socket.AF_UNIX
        self.server = uvicorn.Server(uvicorn_config(app, grace_s, tls, behind_door=behind_door))
        self.grace_s = grace_s
        self.thread: threading.Thread | None = None

    def start(self, timeout_s: float = 30.0) -> None:
        """Serve on a new thread; returns once uvicorn accepts connections."""
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.socket]}, name="premoe-http", daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"the HTTP server on {self.socket.getsockname()} did not start; see the log")
            time.sleep(0.01)

    def stop(self) -> None:
        """Refuse new connections, give open requests the grace period, then end them (blocking)."""
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(self.grace_s + 10)
        self.socket.close()
