"""docker-compose.yml, the Dockerfile and .dockerignore read carefully: services, ports, volumes, and environment
names that the verbs really read; `docker compose config` where docker and its daemon are there."""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from premoe_service.cli import cli

ROOT = Path(__file__).resolve().parents[1]


def twins(verb: str) -> set[str]:
    """The PREMOE_* variables `premoe VERB` reads: its options' environment twins, and the group's (--verbose)."""
    command = cli.commands[verb]
    params = [*cli.params, *command.params]
    return {p.envvar for p in params if isinstance(p, click.Option) and isinstance(p.envvar, str)}


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def dockerfile_lines() -> list[str]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for line in dockerfile_lines():
        if line.startswith("ENV "):
            env.update(re.findall(r"(\w+)=(\S+)", line))
    return env


def published(service: dict[str, Any]) -> dict[int, str]:
    """Container port -> host address of each published port ("127.0.0.1:9100:9100"; "" for every interface)."""
    ports = {}
    for spec in service["ports"]:
        parts = str(spec).split(":")
        ports[int(parts[-1])] = parts[0] if len(parts) == 3 else ""
    return ports


def mounts(service: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Container path -> (source, mode) of each volume ("store:/data/store:ro", "${DIR:-./x}:/model:ro")."""
    found = {}
    for spec in service["volumes"]:
        match = re.fullmatch(r"(?P<source>.+?):(?P<target>/[^:]*)(?::(?P<mode>ro|rw))?", spec)
        assert match, f"cannot read volume {spec!r}"
        found[match["target"]] = (match["source"], match["mode"] or "rw")
    return found


def test_every_service_runs_a_verb_and_sets_only_its_twins() -> None:
    services = compose()["services"]
    assert set(services) == {"redis", "shard", "premoe"}
    for name in ("shard", "premoe"):
        service = services[name]
        assert service["build"] == "."
        verb = service["command"][0]
        unknown = set(service.get("environment", {})) - twins(verb)
        assert not unknown, f"{name} sets variables `premoe {verb}` never reads: {unknown}"
    image_env = {name for name in dockerfile_env() if name.startswith("PREMOE_")}
    assert image_env <= twins("serve"), image_env - twins("serve")


def test_redis_evicts_expert_blobs_not_profiles() -> None:
    redis = compose()["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--maxmemory") + 1].endswith(("mb", "gb"))
    assert command[command.index("--maxmemory-policy") + 1] == "volatile-lru"  # profiles have no TTL
    assert redis["healthcheck"]["test"][-1] == "ping"


def test_the_set_up_creates_the_store_before_the_server_reads_it() -> None:
    spec = compose()
    shard, premoe = spec["services"]["shard"], spec["services"]["premoe"]
    writes, reads = mounts(shard), mounts(premoe)
    volume, mode = writes[shard["environment"]["PREMOE_OUT"]]
    assert mode == "rw" and volume in spec["volumes"], "shard writes the store into a volume that compose creates"
    assert reads[premoe["environment"]["PREMOE_STORE"]] == (volume, "ro")
    assert premoe["depends_on"]["shard"]["condition"] == "service_completed_successfully"
    assert premoe["depends_on"]["redis"]["condition"] == "service_healthy"
    profiles = re.fullmatch(r"\$\{PROFILES_DIR:-(.+)\}", reads[premoe["environment"]["PREMOE_PROFILES"]][0])
    assert profiles and (ROOT / profiles[1]).is_dir()  # the shipped profiles are the default record
    model_dir = re.fullmatch(r"\$\{MODEL_DIR:-(.+)\}", writes[shard["command"][1]][0])
    assert model_dir and (ROOT / model_dir[1] / "config.json").exists()  # the default checkpoint ships


def test_ports_are_published_as_the_server_binds_them() -> None:
    premoe = compose()["services"]["premoe"]
    env = premoe["environment"]
    assert env["PREMOE_HOST"] == "0.0.0.0"  # inside the container; the host side is chosen below
    assert env["PREMOE_REDIS_URL"].startswith("redis://redis:6379")  # the service name resolves in compose
    ports = {int(env[name]) for name in ("PREMOE_PORT", "PREMOE_HTTP_PORT", "PREMOE_METRICS_PORT")}
    host_sides = published(premoe)
    assert set(host_sides) == ports
    # The admin token is empty by default, so the server must be allowed to bind 0.0.0.0 without one (it refuses
    # otherwise), and then only the host's loopback may reach it.
    assert env["PREMOE_ALLOW_INSECURE_ADMIN"] == "1"
    assert set(host_sides.values()) == {"127.0.0.1"}
    image_ports = {int(dockerfile_env()[n]) for n in ("PREMOE_PORT", "PREMOE_HTTP_PORT", "PREMOE_METRICS_PORT")}
    exposed = {int(p) for line in dockerfile_lines() if line.startswith("EXPOSE") for p in line.split()[1:]}
    assert image_ports == exposed == ports


def test_dockerfile_installs_cpu_torch_first_a_compiler_and_checks_health_without_torch() -> None:
    lines = dockerfile_lines()
    runs = [line for line in lines if line.startswith("RUN ")]
    assert "torch==2.13.0" in runs[0] and "--index-url" in runs[0]  # nothing can pull CUDA torch before it
    assert any("g++" in run.split() for run in runs)  # the compiled decoder stack's kernels are C++
    assert 'ENTRYPOINT ["premoe"]' in lines and 'CMD ["serve"]' in lines
    check = next(line for line in lines if line.startswith("HEALTHCHECK"))
    # `premoe health` is a client verb: tests/test_cli.py proves it runs without importing torch.
    assert re.search(r"CMD premoe health --server \"127\.0\.0\.1:\$\{PREMOE_PORT\}\"", check)


def test_dockerignore_keeps_the_context_to_what_the_image_copies() -> None:
    rules = [r.strip() for r in (ROOT / ".dockerignore").read_text().splitlines() if r.strip() and r[0] != "#"]

    def ignored(path: str) -> bool:
        verdict = False
        for rule in rules:  # the last matching rule wins, as in Docker
            negate = rule.startswith("!")
            pattern = rule.lstrip("!").rstrip("/")
            if (
                fnmatch.fnmatch(path, pattern)
                or path.startswith(pattern + "/")
                or fnmatch.fnmatch(path, pattern + "/*")
            ):
                verdict = not negate
        return verdict

    copied = [path for line in dockerfile_lines() if line.startswith("COPY ") for path in line.split()[1:-1]]
    for path in copied:
        assert (ROOT / path).exists(), f"Dockerfile copies {path}, which does not exist"
        assert not ignored(path), f".dockerignore drops {path}, which the Dockerfile copies"
    for path in (".venv", "var", ".git", "models", "models/reference-moe/model.safetensors", ".mypy_cache"):
        assert ignored(path), f"{path} would be sent to the docker daemon"
    assert ignored("premoe_service/__pycache__/cli.cpython-311.pyc")


def test_the_image_installs_the_locked_versions() -> None:
    # The package goes in with requirements.lock as pip constraints, after torch alone (issue 23).
    installs = [line for line in dockerfile_lines() if line.startswith("RUN pip install")]
    assert "torch==2.13.0" in installs[0] and "-c" not in installs[0].split()
    package = [line for line in installs if re.search(r"pip install .* \.( |$)", line)]
    assert len(package) == 1 and "-c requirements.lock" in package[0], installs


def _docker_skip_reason() -> str | None:
    if shutil.which("docker") is None:
        return "docker is not installed"
    if subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30).returncode != 0:
        return "the docker compose plugin is not installed"
    if subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode != 0:
        return "no docker daemon is reachable"
    return None


def test_docker_compose_accepts_the_file() -> None:
    reason = _docker_skip_reason()
    if reason is not None:
        pytest.skip(f"docker compose config not run: {reason}")
    done = subprocess.run(
        ["docker", "compose", "-f", str(ROOT / "docker-compose.yml"), "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("package, name, service", [("premoe/v1", "premoe", True), ("premoe/relay/v1", "relay", False)])
def test_generated_grpc_code_is_current(tmp_path: Path, package: str, name: str, service: bool) -> None:
    """The committed code under premoe_service/server/gen/ is what `make proto` makes from the proto files."""
    from grpc_tools import protoc

    args = [
        "protoc",
        f"-I{ROOT / 'protos'}",
        f"--python_out={tmp_path}",
        f"--pyi_out={tmp_path}",
        f"--grpc_python_out={tmp_path}",
        str(ROOT / f"protos/{package}/{name}.proto"),
    ]
    assert protoc.main(args) == 0
    made = tmp_path / package
    gen = ROOT / "premoe_service" / "server" / "gen"
    module = package.replace("/", ".")
    if service:  # the relay's messages travel as frames over a socket: it has no service, and no gRPC code
        grpc_code = (
            (made / f"{name}_pb2_grpc.py")
            .read_text()
            .replace(f"from {module} import {name}_pb2", f"from . import {name}_pb2")
        )
        assert grpc_code == (gen / f"{name}_pb2_grpc.py").read_text(), "run `make proto`"
    for file in (f"{name}_pb2.py", f"{name}_pb2.pyi"):
        assert (made / file).read_text() == (gen / file).read_text(), f"{file} is stale: run `make proto`"


def test_the_docs_list_every_deployment_knob_with_its_twin_and_default() -> None:
    text = (ROOT / "docs" / "configuration.md").read_text()
    section = text[text.index("# Deployment knobs") :]
    section = section[: section.index("\n## ")] if "\n## " in section else section
    rows = re.findall(r"^\| `(--[a-z-]+)` \| `(PREMOE_[A-Z_]+)` \| ([^|]+) \|", section, re.MULTILINE)
    listed = {flag: (env, default.strip()) for flag, env, default in rows}
    serve = cli.commands["serve"]
    ctx = click.Context(serve, info_name="serve")
    for param in serve.params:
        if not isinstance(param, click.Option):
            continue
        flag = param.opts[-1]
        assert flag in listed, f"docs/configuration.md, Deployment knobs: no row for {flag}"
        value = param.get_default(ctx, call=True)
        unset = value in (None, ()) or value is getattr(click.core, "UNSET", None)  # click >= 8.3 says UNSET
        default = "(required)" if param.required else "-" if unset else f"`{value}`"
        assert listed.pop(flag) == (param.envvar, default), flag
    assert not listed, f"docs/configuration.md lists knobs `premoe serve` does not have: {listed}"


def test_the_profiles_folder_is_writable_for_registrations() -> None:
    """Registrations and deletions are written to the profiles folder (the registry's record): not read-only."""
    premoe = compose()["services"]["premoe"]
    source, mode = mounts(premoe)[premoe["environment"]["PREMOE_PROFILES"]]
    assert mode == "rw" and source.startswith("${PROFILES_DIR:-")
