"""A real third-party client: Node.js with @grpc/grpc-js loads the proto file and calls Route and Generate."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from premoe_service.families.tiny import save_tiny_checkpoint
from premoe_service.server import running_server
from premoe_service.serving import ServiceConfig
from premoe_service.store import shard

NODE_CLIENT = Path(__file__).resolve().parents[1] / "clients" / "node"


@pytest.fixture(scope="module")
def node_client() -> Path:
    if shutil.which("node") is None or shutil.which("npm") is None:
        raise RuntimeError("node and npm are needed for this test (.ci/run installs them when missing)")
    if not (NODE_CLIENT / "node_modules" / "@grpc" / "grpc-js").exists():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_CLIENT, check=True, timeout=600)
    return NODE_CLIENT


def test_node_client_calls_route_and_generate(node_client: Path, embedder, tmp_path: Path) -> None:
    save_tiny_checkpoint(tmp_path / "ckpt", "olmoe")
    shard(tmp_path / "ckpt", tmp_path / "store", progress=False)
    config = ServiceConfig(store=tmp_path / "store", profiles=tmp_path / "profiles", port=0, device="cpu")
    with running_server(config, embedder=embedder) as (_, port):
        done = subprocess.run(
            ["node", "client.js", f"127.0.0.1:{port}", "hello world", "6"],
            cwd=node_client,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["route"]["decision"] == "fallback" and out["route"]["pattern_experts"] == 16
    assert len(out["reply"]["token_ids"]) == 6 and out["reply"]["finish_reason"] == "length"
    assert out["reply"]["stats"]["generated_tokens"] == 6
    assert out["bad"]["code"] == "INVALID_ARGUMENT" and "prompt" in out["bad"]["details"]
