"""What a Ray Serve deployment of PreMoe is given: the engine's `ServiceConfig` and the deployment's own settings,
both as plain JSON values (a Serve config YAML's `args`, or what `premoe serve-ray` builds). Imports no Ray."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InvalidArgument
from ..profiler.selection import Selection
from ..serving.config import ServiceConfig

SERVICER = "premoe_service.ray_serve.proxy.add_to_proxy"  # Serve's gRPC proxy registers premoe.v1.PreMoe with it
APP_NAME = "premoe"
BUILDER = "premoe_service.ray_serve.app:build"

# Fields of `ServiceConfig` a Ray deployment has no use for: Serve's proxies own the ports, and they speak no TLS.
DOOR_FIELDS = ("host", "port", "http_port", "metrics_port", "tls_cert", "tls_key", "tls_client_ca")


@dataclass(frozen=True)
class RaySettings:
    """How the application is laid out on the Ray cluster.

    Attributes:
        replicas: Engine replicas (one per device); 0: one per GPU in the cluster, or 1 without GPUs.
        replica_cpus: CPUs Ray reserves for each engine replica (fractions allowed).
        replica_gpus: GPUs Ray reserves for each engine replica; None: 1 when the cluster has GPUs, else 0.
        ingress_cpus: CPUs Ray reserves for the ingress replica (credentials, request checks, forwarding).
        tasks_per_replica: Tasks a replica's budget holds (Serve's multiplexing LRU size); 0: how many registered
            tasks' patterns fit the slots together at start-up (`holding`), -1: no limit.
        affinity: Send each request with its task as Serve's multiplexed model id (the point of this deployment);
            False routes with Serve's default policy (benchmarks compare the two).
        stats_ttl_s: Seconds a replica's published stats live in Redis without a refresh.
    """

    replicas: int = 0
    replica_cpus: float = 1.0
    replica_gpus: float | None = None
    ingress_cpus: float = 0.5
    tasks_per_replica: int = 0
    affinity: bool = True
    stats_ttl_s: float = 30.0

    def __post_init__(self) -> None:
        if self.replicas < 0:
            raise InvalidArgument(f"must be 0 (one per GPU) or more, got {self.replicas}", field="replicas")
        for name in ("replica_cpus", "ingress_cpus"):
            if getattr(self, name) < 0:
                raise InvalidArgument(f"must be >= 0, got {getattr(self, name)}", field=name)
        if self.replica_gpus is not None and self.replica_gpus < 0:
            raise InvalidArgument(f"must be >= 0, got {self.replica_gpus}", field="replica_gpus")
        if self.tasks_per_replica < -1:
            raise InvalidArgument(
                f"must be -1 (no limit), 0 (estimated) or positive, got {self.tasks_per_replica}",
                field="tasks_per_replica",
            )
        if self.stats_ttl_s <= 0:
            raise InvalidArgument(f"must be positive, got {self.stats_ttl_s}", field="stats_ttl_s")


def config_to_args(config: ServiceConfig) -> dict[str, Any]:
    """A `ServiceConfig` as JSON values (paths as strings, the selection as a mapping), without the door fields."""
    args: dict[str, Any] = {}
    for field in dataclasses.fields(config):
        if field.name in DOOR_FIELDS:
            continue
        value = getattr(config, field.name)
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, Selection):
            value = dataclasses.asdict(value)
        elif isinstance(value, tuple):
            value = list(value)
        args[field.name] = value
    return args


def config_from_args(args: dict[str, Any]) -> ServiceConfig:
    """The `ServiceConfig` of `config_to_args`'s values (also what a Serve config YAML's `service:` holds).

    Raises:
        InvalidArgument: An unknown key, a door field (Serve's proxies own the ports), or a bad value (the
            dataclass's own checks, naming the field).
    """
    known = {f.name for f in dataclasses.fields(ServiceConfig)}
    fields = dict(args)
    for name in fields:
        if name in DOOR_FIELDS:
            raise InvalidArgument("Serve's proxies own the ports and speak no TLS: see serve-ray's options", field=name)
        if name not in known:
            raise InvalidArgument(f"unknown service setting {name!r}", field=name)
    if "store" not in fields:
        raise InvalidArgument("the store folder is required", field="store")
    if isinstance(fields.get("selection"), dict):
        fields["selection"] = Selection(**fields["selection"])
    if "preload" in fields:
        fields["preload"] = tuple(fields["preload"])
    if not fields.get("redis_url"):
        raise InvalidArgument(
            "replicas share the expert cache and the task registry through Redis: set redis_url", field="redis_url"
        )
    return ServiceConfig(**fields)


def settings_from_args(args: dict[str, Any]) -> RaySettings:
    """`RaySettings` of a mapping; an unknown key is refused, naming it."""
    known = {f.name for f in dataclasses.fields(RaySettings)}
    for name in args:
        if name not in known:
            raise InvalidArgument(f"unknown deployment setting {name!r}", field=name)
    return RaySettings(**args)


def serve_config(config: ServiceConfig, settings: RaySettings, grpc_port: int = 9000, http_port: int = 8000) -> dict:
    """A Serve config (what `serve deploy` takes) running `premoe_service.ray_serve.app:build` with these values."""
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": http_port},
        "grpc_options": {"port": grpc_port, "grpc_servicer_functions": [SERVICER]},
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",  # the OpenAI-compatible HTTP API at /v1, as on the single server
                "import_path": BUILDER,
                "args": {"service": config_to_args(config), "deployment": dataclasses.asdict(settings)},
            }
        ],
    }


def serve_config_yaml(
    config: ServiceConfig, settings: RaySettings, grpc_port: int = 9000, http_port: int = 8000
) -> str:
    """`serve_config` as YAML (Ray brings PyYAML)."""
    import yaml

    header = "# premoe on Ray Serve: `serve deploy` this file on a cluster (see docs/ray.md).\n"
    return header + yaml.safe_dump(serve_config(config, settings, grpc_port, http_port), sort_keys=False)
