"""The Serve application: `build(args)` is the import path a Serve config names
(`premoe_service.ray_serve.app:build`), and `run` is what `premoe serve-ray` does on a laptop or a cluster."""

from __future__ import annotations

import dataclasses
import logging
import signal
import time
from typing import Any

import ray
from ray import serve

from ..serving import ServiceConfig
from .ingress import PreMoeIngress
from .replica import EngineReplica
from .settings import APP_NAME, SERVICER, RaySettings, config_from_args, config_to_args, settings_from_args

log = logging.getLogger(__name__)


def build(args: dict[str, Any]) -> Any:
    """The application for Serve's `import_path`: `args` holds `service` (`ServiceConfig` values: store, redis_url,
    profiles, budget, ...) and optionally `deployment` (`RaySettings` values).

    Raises:
        InvalidArgument: A missing or unknown setting, or a bad value, naming it.
    """
    service = dict(args.get("service") or {})
    config = config_from_args(service)  # fail here, naming the field, not in every replica
    settings = settings_from_args(dict(args.get("deployment") or {}))
    gpus_in_cluster = int(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0
    gpus = settings.replica_gpus if settings.replica_gpus is not None else (1.0 if gpus_in_cluster else 0.0)
    replicas = settings.replicas or (gpus_in_cluster if gpus_in_cluster and gpus else 1)
    if gpus and config.device == "auto":
        service["device"] = "cuda"  # Ray sets CUDA_VISIBLE_DEVICES per replica: its one device is cuda:0
    deployment = dataclasses.asdict(settings)
    engine = serve.deployment(
        name="PreMoeEngine",
        num_replicas=replicas,
        ray_actor_options={"num_cpus": settings.replica_cpus, "num_gpus": gpus},
        # A replica batches up to max_batch_rows requests per forward pass; Serve should let it have them.
        max_ongoing_requests=config.max_batch_rows,
        health_check_period_s=5,
    )(EngineReplica)
    ingress = serve.deployment(
        name="PreMoeIngress",
        num_replicas=1,
        ray_actor_options={"num_cpus": settings.ingress_cpus},
        max_ongoing_requests=config.max_queue,
    )(PreMoeIngress)
    return ingress.bind(engine.bind(service, deployment), service, deployment)


def build_args(config: ServiceConfig, settings: RaySettings) -> dict[str, Any]:
    """The `args` of `build` for a config and settings (what a Serve config YAML's `args:` holds)."""
    return {"service": config_to_args(config), "deployment": dataclasses.asdict(settings)}


def start(
    config: ServiceConfig,
    settings: RaySettings,
    *,
    grpc_port: int = 9000,
    http_port: int | None = None,
    host: str = "127.0.0.1",
    app_name: str = APP_NAME,
) -> None:
    """Start Serve's proxies (gRPC with premoe.v1.PreMoe, HTTP with the OpenAI-compatible API) on the Ray instance
    this process is connected to, and deploy the application; returns once its replicas are up."""
    grpc_options = {"port": grpc_port, "grpc_servicer_functions": [SERVICER]}
    http_options: dict[str, Any] = {"host": host, "port": http_port if http_port is not None else 8000}
    serve.start(grpc_options=grpc_options, http_options=http_options)
    serve.run(build(build_args(config, settings)), name=app_name, route_prefix="/", blocking=False)


def run(
    config: ServiceConfig,
    settings: RaySettings,
    *,
    address: str | None = None,
    grpc_port: int = 9000,
    http_port: int | None = None,
    host: str = "127.0.0.1",
    num_cpus: int | None = None,
) -> int:
    """`premoe serve-ray`: connect to a Ray cluster (`address`, e.g. "auto" after `ray start --head`) or start a
    local one, deploy, and serve until interrupted; a local instance is shut down on the way out."""
    local = address is None
    signal.signal(signal.SIGTERM, _interrupt)  # a container's stop: the same clean exit as Ctrl-C
    # "local": a new instance even where a cluster runs on this machine (ray.init would join it)
    ray.init(address=address or "local", num_cpus=num_cpus if local else None, include_dashboard=False)
    try:
        start(config, settings, grpc_port=grpc_port, http_port=http_port, host=host)
        http = f"http://{host}:{http_port if http_port is not None else 8000}/v1"
        print(f"premoe on Ray Serve: gRPC premoe.v1.PreMoe on port {grpc_port}, HTTP (OpenAI) on {http}", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("premoe serve-ray shutting down", flush=True)
    finally:
        if local:
            serve.shutdown()
            ray.shutdown()
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
