"""The engine process's handle on its door process (`server/front.py`): start it on the public address (and the HTTP
API's), stop it with a grace period, read back what it cut off."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Any

from ..serving import ServiceConfig

log = logging.getLogger(__name__)
START_TIMEOUT_S = 60.0


class DoorProcess:
    """The door process of one server: it listens on `config`'s host and port (with its TLS) and reaches this
    process over two Unix sockets in a private directory: the relay (`relay`, `server/relay.py`) for generation
    and this process's gRPC server (`backend`) for every other call."""

    def __init__(self, config: ServiceConfig, max_message_bytes: int) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="premoe-doors-"))  # mode 0700: only this user reaches the socket
        # Removed on stop, and else when this handle is collected or the process exits (a server never stopped);
        # a door process whose engine process died removes it itself (`server/front.py`).
        self._remove_dir = weakref.finalize(self, _remove_folder, str(self.dir), os.getpid())
        self.backend = f"unix:{self.dir / 'engine.sock'}"
        self.relay = self.dir / "relay.sock"
        self.settings: dict[str, Any] = {
            "listen": f"{config.host}:{config.port}",
            "backend": self.backend,
            "relay": str(self.relay),
            "max_message_bytes": max_message_bytes,
            "tls": _tls(config),
        }
        self.http_socket = self.dir / "http.sock"  # the engine process's HTTP API, when the server has one
        self.inherited: tuple[int, ...] = ()
        self.host = config.host
        self.process: subprocess.Popen[str] | None = None
        self.port = 0
        self.stopping = False
        self.restarts = 0  # door processes started again after one ended unasked

    def serve_http(self, public: socket.socket, grace_s: float, tls: dict[str, Any]) -> None:
        """Have the door process serve the HTTP API on `public` (bound here, inherited by it; TLS with uvicorn's
        `tls` options), generation over the relay and the rest forwarded to this process's HTTP API on
        `http_socket`. Call before `launch`."""
        backend = str(self.http_socket)
        self.settings["http"] = {"fd": public.fileno(), "backend": backend, "grace_s": grace_s, "tls": tls}
        self.inherited = (public.fileno(),)

    def launch(self) -> int:
        """Start the door process and wait until it listens; returns its port. The relay socket must listen already;
        calls it forwards wait for this process's gRPC server to start on `backend`. From then on, a door process
        that ends unasked (killed, out of memory) is started again on the same port.

        Raises:
            OSError: It could not bind its address, or did not start.
        """
        try:
            self.port = self._start()
        except OSError:
            self._cleanup()
            raise
        threading.Thread(target=self._watch, name="premoe-doors-watch", daemon=True).start()
        return self.port

    def _start(self) -> int:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "premoe_service.server.front"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            pass_fds=self.inherited,
        )
        reply = self._exchange(json.dumps(self.settings))
        if "port" not in reply:
            self.process.wait(10)
            raise OSError(reply.get("error", "the door process did not start"))
        return int(reply["port"])

    def _watch(self) -> None:
        """Start the door process again, on the same port, whenever it ends while the server is not stopping."""
        while not self.stopping:
            process = self.process
            assert process is not None
            code = process.wait()
            if self.stopping:
                return
            log.error("the door process ended (exit status %s); starting it again on port %d", code, self.port)
            self.settings["listen"] = f"{self.host}:{self.port}"
            for attempt in range(20):  # the old socket may linger for a moment
                try:
                    self._start()
                    self.restarts += 1
                    break
                except OSError as exc:
                    if self.stopping:
                        return
                    log.warning("the door process did not start again (%s), attempt %d", exc, attempt + 1)
                    time.sleep(0.5)
            else:
                log.error("the door process could not be started again: the gRPC port stays closed")
                return

    async def stop(self, grace: float) -> int:
        """Stop taking calls, let running ones finish within `grace` seconds; returns how many it cut off."""
        self.stopping = True
        if self.process is None:
            self._cleanup()
            return 0
        try:
            reply = await asyncio.to_thread(self._exchange, json.dumps({"grace": grace}), grace + START_TIMEOUT_S)
        finally:
            await asyncio.to_thread(self._end)
            self._cleanup()
        return int(reply.get("cut", 0))

    def _exchange(self, line: str, timeout: float = START_TIMEOUT_S) -> dict[str, Any]:
        """Write one line to the door process, read its one-line JSON reply ({} when it ended without one)."""
        assert self.process is not None and self.process.stdin is not None and self.process.stdout is not None
        try:
            self.process.stdin.write(line + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            return {}
        reply = _read_line(self.process.stdout, timeout)
        try:
            parsed: dict[str, Any] = json.loads(reply) if reply else {}
        except json.JSONDecodeError:
            log.error("the door process said %r", reply)
            return {}
        return parsed

    def _end(self) -> None:
        assert self.process is not None
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def close(self) -> None:
        """End the door process at once (start-up failed after it started)."""
        self.stopping = True
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._cleanup()

    def _cleanup(self) -> None:
        self._remove_dir()


def _remove_folder(path: str, owner: int) -> None:
    if os.getpid() == owner:  # never from a forked child's exit: its parent may still serve from the folder
        shutil.rmtree(path, ignore_errors=True)


def _read_line(stream: Any, timeout: float) -> str:
    """One line from a pipe, waiting at most `timeout` seconds ("" then; a pipe has no timeout, a thread reads)."""
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return line[0].strip() if line else ""


def _tls(config: ServiceConfig) -> dict[str, str] | None:
    """The PEM texts of the gRPC door's TLS (None without TLS): handed over the pipe, not as paths, so that the door
    process reads no file."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    tls = {"cert": config.tls_cert.read_text(), "key": config.tls_key.read_text()}
    if config.tls_client_ca is not None:
        tls["client_ca"] = config.tls_client_ca.read_text()
    return tls
