"""`premoe bench serve`, server side: `premoe serve` as shipped, started in a process of its own with default flags."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ...loopback import free_port, wait_serving


@dataclass(frozen=True)
class ServerProcess:
    target: str
    pid: int
    command: list[str]

    def cpu_seconds(self) -> float | None:
        """CPU time the server process has used so far, all its threads (Linux /proc; None elsewhere)."""
        return process_cpu_seconds(self.pid)


def process_cpu_seconds(pid: int) -> float | None:
    """User plus system CPU seconds of process `pid` (Linux /proc; None where it cannot be read)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


@contextmanager
def server_process(
    store: Path,
    profiles: Path,
    *,
    device: str,
    budget: str,
    embedder: str | None,
    token_limit: int,
    extra: Sequence[str] = (),
) -> Iterator[ServerProcess]:
    """Run `premoe serve` on a free loopback port until the block ends. Only what the benchmark needs is set (the
    store, profiles, port, device, budget, a token limit that admits its requests); every other flag keeps its
    default, `extra` adds the caller's own."""
    port = free_port()
    command = [sys.executable, "-m", "premoe_service.cli", "serve", "--store", str(store), "--profiles", str(profiles)]
    command += ["--port", str(port), "--device", device, "--budget", budget]
    if token_limit > 1024:
        command += ["--max-new-tokens-limit", str(token_limit)]
    if embedder:
        command += ["--embedder", embedder]
    command += list(extra)
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
            server.terminate()
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(10)
