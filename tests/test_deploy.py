"""docker-compose.yml and the Dockerfile, read carefully (no Docker engine here): wiring, ports, env names."""

from __future__ import annotations

import re
from pathlib import Path

import click
import yaml

from premoe_service.cli import cli

ROOT = Path(__file__).resolve().parents[1]


def serve_env_names() -> set[str]:
    """The PREMOE_* variables `premoe serve` reads (every option's environment twin)."""
    serve = cli.commands["serve"]
    return {p.envvar for p in serve.params if isinstance(p, click.Option) and isinstance(p.envvar, str)}


def test_compose_wires_redis_and_the_server() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"redis", "premoe"}

    redis = services["redis"]
    command = redis["command"]
    policy = command[command.index("--maxmemory-policy") + 1]
    assert "--maxmemory" in command and command[command.index("--maxmemory") + 1].endswith(("mb", "gb"))
    assert policy.endswith("-lru")
    assert redis["healthcheck"]["test"][-1] == "ping"

    premoe = services["premoe"]
    assert premoe["build"] == "." and (ROOT / "Dockerfile").exists()
    assert premoe["depends_on"]["redis"]["condition"] == "service_healthy"
    env = premoe["environment"]
    unknown = set(env) - serve_env_names()
    assert not unknown, f"compose sets variables the server never reads: {unknown}"
    assert env["PREMOE_REDIS_URL"].startswith("redis://redis:6379")  # the service name resolves in compose
    published = {int(p.split(":")[1]) for p in premoe["ports"]}
    assert {int(env["PREMOE_PORT"]), int(env["PREMOE_METRICS_PORT"])} == published
    mounts = {v.split(":")[1] for v in premoe["volumes"]}
    assert {env["PREMOE_STORE"], env["PREMOE_PROFILES"]} <= mounts


def test_dockerfile_installs_cpu_torch_first_and_runs_the_cli() -> None:
    text = (ROOT / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    runs = [line for line in lines if line.startswith("RUN ")]
    assert "torch==2.13.0" in runs[0] and "--index-url" in runs[0]  # nothing can pull CUDA torch before it
    assert 'ENTRYPOINT ["premoe"]' in lines and 'CMD ["serve"]' in lines
    exposed = {int(p) for line in lines if line.startswith("EXPOSE") for p in line.split()[1:]}
    env_ports = dict(re.findall(r"(PREMOE_(?:METRICS_)?PORT)=(\d+)", text))
    assert {int(v) for v in env_ports.values()} == exposed
    copied = [line.split()[1] for line in lines if line.startswith("COPY ")]
    for path in copied:
        assert (ROOT / path).exists(), f"Dockerfile copies {path}, which does not exist"
    env_names = set(re.findall(r"\b(PREMOE_[A-Z_]+)=", text))
    assert env_names <= serve_env_names()


def test_generated_grpc_code_is_current(tmp_path: Path) -> None:
    """The committed code under premoe_service/server/gen/ is what `make proto` makes from the proto file."""
    from grpc_tools import protoc

    args = [
        "protoc",
        f"-I{ROOT / 'protos'}",
        f"--python_out={tmp_path}",
        f"--pyi_out={tmp_path}",
        f"--grpc_python_out={tmp_path}",
        str(ROOT / "protos/premoe/v1/premoe.proto"),
    ]
    assert protoc.main(args) == 0
    made = tmp_path / "premoe" / "v1"
    gen = ROOT / "premoe_service" / "server" / "gen"
    grpc_code = (
        (made / "premoe_pb2_grpc.py")
        .read_text()
        .replace("from premoe.v1 import premoe_pb2", "from . import premoe_pb2")
    )
    assert grpc_code == (gen / "premoe_pb2_grpc.py").read_text(), "run `make proto`"
    for name in ("premoe_pb2.py", "premoe_pb2.pyi"):
        assert (made / name).read_text() == (gen / name).read_text(), f"{name} is stale: run `make proto`"
