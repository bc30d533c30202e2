"""The engine process's handle on its door process (`server/front.py`): start it on the public address, stop it
with a grace period, read back what it cut off."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import subprocess
import sys
import tempfile
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
        self.backend = f"unix:{self.dir / 'engine.sock'}"
        self.relay = self.dir / "relay.sock"
        self.settings: dict[str, Any] = {
            "listen": f"{config.host}:{config.port}",
            "backend": self.backend,
            "relay": str(self.relay),
            "max_message_bytes": max_message_bytes,
            "tls": _tls(config),
        }
        self.process: subprocess.Popen[str] | None = None
        self.port = 0

    def launch(self) -> int:
        """Start the door process and wait until it listens; returns its port. The relay socket must listen already;
        calls it forwards wait for this process's gRPC server to start on `backend`.

        Raises:
            OSError: It could not bind its address, or did not start.
        """
        self.process = subprocess.Popen(
            [sys.executable, "-m", "premoe_service.server.front"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        reply = self._exchange(json.dumps(self.settings))
        if "port" not in reply:
            self.process.wait(10)
            self._cleanup()
            raise OSError(reply.get("error", "the door process did not start"))
        self.port = int(reply["port"])
        return self.port

    async def stop(self, grace: float) -> int:
        """Stop taking calls, let running ones finish within `grace` seconds; returns how many it cut off."""
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
        reader = _Reader(self.process.stdout)
        reply = reader.read(timeout)
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
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._cleanup()

    def _cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class _Reader:
    """One line from a pipe, waiting at most some seconds (a thread reads it; the pipe has no timeout)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def read(self, timeout: float) -> str:
        import threading

        line: list[str] = []
        thread = threading.Thread(target=lambda: line.append(self.stream.readline()), daemon=True)
        thread.start()
        thread.join(timeout)
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
