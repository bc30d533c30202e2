"""`premoe serve` shuts down on SIGTERM: exit 0 after a clean drain, exit 3 naming the count when the grace
period cut requests off."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from premoe_service.client import PreMoeClient

from .conftest import free_port


@pytest.fixture(scope="module")
def store(tiny_store: Path) -> Path:
    return tiny_store


def start(store: Path, tmp_path: Path, grace: str) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    command = [sys.executable, "-m", "premoe_service.cli", "serve", "--store", str(store)]
    command += ["--profiles", str(tmp_path), "--port", str(port), "--device", "cpu", "--grace", grace]
    server = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    target = f"127.0.0.1:{port}"
    with PreMoeClient(target, timeout=10) as client:
        deadline = time.monotonic() + 180
        while True:
            try:
                if client.health() == "SERVING":
                    return server, target
            except grpc.RpcError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)


def test_a_clean_drain_exits_zero(store: Path, tmp_path: Path) -> None:
    server, target = start(store, tmp_path, "5")
    with PreMoeClient(target, timeout=60) as client:
        assert len(client.generate("hello", max_new_tokens=3).token_ids) == 3
    server.send_signal(signal.SIGTERM)
    _, err = server.communicate(timeout=120)
    assert server.returncode == 0, err


def test_requests_cut_off_by_the_grace_period_make_a_non_zero_exit(store: Path, tmp_path: Path) -> None:
    server, target = start(store, tmp_path, "0")
    with PreMoeClient(target, timeout=60) as client:
        stream = client.stub.GenerateStream(client.request("hello", max_new_tokens=240))
        next(stream)  # decoding
        server.send_signal(signal.SIGTERM)
        with pytest.raises(grpc.RpcError):
            list(stream)
    _, err = server.communicate(timeout=120)
    assert server.returncode == 3 and "cut off 1 unfinished request" in err
