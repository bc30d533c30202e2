"""`premoe bench serve`, the llama.cpp baseline: what a user would run on a CPU instead of this project.

llama.cpp's `llama-server` runs in a process of its own on a free loopback port, with every expert of the same model
(a GGUF converted from the transformers checkpoint, see docs/serving.md for the build and the conversion), one slot
per client (`-np`, continuous batching), at a given thread count. Its clients run in a process of their own, as
ours do: N threads in a closed loop over the request list, each request sent as the token ids our tokenizer gives
its prompt (so both servers see the same input), greedy, for at most the number of tokens of our server's lone reply
(it stops earlier only at its own end-of-sequence token), prompt caching off. It reports tokens/s (llama.cpp's own
count of predicted tokens) and how many replies equal our lone replies (our reply's final EOS token aside: llama.cpp
does not return it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import InvalidArgument
from ...loopback import free_port, process_cpu_seconds, stop_process
from .clients import closed_loop


@dataclass(frozen=True)
class LlamaServer:
    """A running `llama-server`: its base URL, process id and thread count."""

    url: str
    pid: int
    threads: int

    def cpu_seconds(self) -> float | None:
        return process_cpu_seconds(self.pid)


@contextmanager
def llama_server(binary: str, gguf: str, *, slots: int, context: int, threads: int) -> Iterator[LlamaServer]:
    """Run `binary` on `gguf` with `slots` parallel slots of `context` tokens each and `threads` threads until the
    block ends; yields once `/health` answers 200. A server that exits first is reported with its log's end."""
    for field, path in (("llama_server", binary), ("llama_gguf", gguf)):
        if not Path(path).is_file():
            raise InvalidArgument(f"{path} is not a file", field=field)
    port = free_port()
    command = [binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "-np", str(slots)]
    command += ["-c", str(slots * context), "-t", str(threads), "-tb", str(threads), "--no-warmup"]
    with tempfile.TemporaryFile(mode="w+") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_healthy(process, url, log)
            yield LlamaServer(url, process.pid, threads)
        finally:
            stop_process(process)


def _wait_healthy(process: subprocess.Popen[str], url: str, log: Any, timeout_s: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"llama-server exited with {process.returncode}: {log.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"llama-server did not become healthy within {timeout_s:.0f}s")


def run_llama_clients(url: str, prompts: Sequence[list[int]], lengths: Sequence[int], clients: int) -> dict[str, Any]:
    """The clients in a process of their own (JSON in, JSON out): tokens/s, wall time and each reply's tokens."""
    payload = {"url": url, "clients": clients, "prompts": list(prompts), "lengths": list(lengths)}
    done = subprocess.run(
        [sys.executable, "-m", "premoe_service.bench.serve.llama"],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        timeout=900,
    )
    if done.returncode != 0:
        raise RuntimeError(f"llama.cpp client process failed: {done.stderr.strip()[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def _clients(url: str, prompts: list[list[int]], lengths: list[int], clients: int) -> dict[str, Any]:
    import httpx

    replies: list[list[int] | None] = [None] * len(prompts)
    predicted = [0] * len(prompts)
    errors: list[str] = []
    lock = threading.Lock()

    def worker(http: httpx.Client) -> Callable[[int], None]:
        def send(i: int) -> None:
            body = {
                "prompt": prompts[i],
                "n_predict": lengths[i],
                "temperature": 0.0,
                "top_k": 1,
                "cache_prompt": False,
                "return_tokens": True,
                "stream": False,
            }
            try:
                reply = http.post("/completion", json=body)
                reply.raise_for_status()
                data = reply.json()
                replies[i] = [int(t) for t in data.get("tokens", [])]
                predicted[i] = int(data.get("tokens_predicted", len(replies[i] or [])))
            except (httpx.HTTPError, ValueError) as exc:
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")

        return send

    sessions = [httpx.Client(base_url=url, timeout=600.0) for _ in range(clients)]
    try:
        wall = closed_loop(len(prompts), [worker(http) for http in sessions])
    finally:
        for http in sessions:
            http.close()
    tokens = sum(predicted)
    return {
        "clients": clients,
        "wall_s": wall,
        "tokens": tokens,
        "tokens_per_s": tokens / wall if wall > 0 else None,
        "replies": replies,
        "errors": errors,
        "pid": os.getpid(),
    }


def compare(run: dict[str, Any], alone: Sequence[list[int]]) -> dict[str, Any]:
    """A client run's summary against our lone replies (same real tokens: EOS included on our side)."""
    same = sum(
        1
        for got, want in zip(run["replies"], alone, strict=True)
        if got is not None and got in (list(want), list(want)[:-1])
    )
    return {
        "tokens_per_s": run["tokens_per_s"],
        "wall_s": run["wall_s"],
        "tokens": run["tokens"],
        "errors": len(run["errors"]),
        "error_messages": run["errors"][:3],
        "same_tokens_as_ours": same,
        "requests": len(alone),
        "client_pid": run["pid"],
    }


def _main() -> None:
    payload = json.load(sys.stdin)
    json.dump(_clients(payload["url"], payload["prompts"], payload["lengths"], int(payload["clients"])), sys.stdout)


if __name__ == "__main__":
    _main()
